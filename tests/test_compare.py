"""`hpo train --seeds` and `hpo compare`: several seeds, the head to head with the report's
config, and the table's numbers checked against the per-seed metrics behind them."""

from __future__ import annotations

import json
import math
import re
import statistics
from dataclasses import replace
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from conftest import run_hpo
from optuna.artifacts import FileSystemArtifactStore
from optuna_dashboard import get_note
from rich.console import Console
from test_dashboard import make_study
from typer.testing import CliRunner

from data.dataset import load_dataset
from model.config import REPORT_TABLE1
from search.cli import app
from search.commands.compare import (
    Entry,
    paired_difference,
    report_entry,
    report_scaling,
    t_975,
    top_entries,
    training_plan,
)
from search.commands.export import trial_document
from search.commands.figures import TRAINING_FIGURES
from search.commands.report import write_report
from search.commands.status import study_table
from search.rules import attrs
from search.rules.artifacts import artifact_dir
from search.rules.config import StepArgs, TrialConfig
from search.rules.settings import StudySettings
from search.rules.space import LEVERS_OFF, config_from_params, report_params_in, sample_config
from search.rules.study import create_or_join, load_settings
from search.training.final import train_seeds
from storage import open_storage

# A config small enough to train an epoch of the test set in a second.
TINY_CONFIG = {
    "model": {"channels": [[3, 8, 8]], "blocks": [2], "dropout": 0.1},
    "train": {"lr": 0.01, "batch_size": 64, "epochs": 5, "scheduler": "cosine"},
    "augment": {"crop_padding": 2, "flip": True},
}


def pct(value: float) -> str:
    return f"{100 * value:.2f}"


@pytest.fixture
def one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """One thread here and in spawned children, as `hpo` runs under hpo_env: the same seed
    then sums in the same order wherever it trains."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_train_seeds_keeps_every_seed_and_repeats_one(
    hpo_env: dict[str, str], data_dir: Path, tmp_path: Path, one_thread: None
) -> None:
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(TINY_CONFIG))
    done = run_hpo(
        "train", "--config", "tiny.yaml", "--dataset", "synthetic", "--epochs", "1",
        "--seeds", "2", "--output-dir", "two", env=hpo_env, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert [run["seed"] for run in two["seeds"]] == [0, 1]
    for run in two["seeds"]:
        assert f"seed {run['seed']}: test accuracy {pct(run['test_acc'])}%" in done.stdout
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(
        ["metrics.json", "model-seed0.pt", "model-seed1.pt", *TRAINING_FIGURES]
    )
    acc = [run["test_acc"] for run in two["seeds"]]
    assert two["test_acc"] == {"mean": statistics.mean(acc), "std": statistics.stdev(acc)}
    assert two["epochs"] == 1 and two["train_images"] == 600  # all of them: train + validation
    assert two["config"]["train"]["scheduler"] == "cosine"  # the config's own recipe

    def weights(folder: str, seed: int) -> dict[str, torch.Tensor]:
        return torch.load(tmp_path / folder / f"model-seed{seed}.pt")["state_dict"]

    # Seeds differ; seed 0 again (here, in this process) gives the same weights and scores.
    first = weights("two", 0)
    assert any(not torch.equal(first[k], v) for k, v in weights("two", 1).items())
    cfg = TrialConfig.from_dict(TINY_CONFIG).with_epochs(1)
    images = load_dataset("synthetic", data_dir)
    again = train_seeds(cfg, images, [0], tmp_path / "again", [torch.device("cpu")])["seeds"][0]
    assert (again["test_acc"], again["test_loss"]) == (acc[0], two["seeds"][0]["test_loss"])
    assert all(torch.equal(first[k], v) for k, v in weights("again", 0).items())


@pytest.mark.slow
def test_seeds_side_by_side_train_as_one_after_another(
    data_dir: Path, tmp_path: Path, one_thread: None
) -> None:
    """The --gpus path (one spawned process per device) on two CPU 'devices'."""
    cfg = TrialConfig.from_dict(TINY_CONFIG).with_epochs(1)
    images = load_dataset("synthetic", data_dir)
    cpu = torch.device("cpu")
    apart = train_seeds(cfg, images, [0, 1], tmp_path / "apart", [cpu, cpu])
    alone = train_seeds(cfg, images, [0, 1], tmp_path / "alone", [cpu])
    assert [run["seed"] for run in apart["seeds"]] == [0, 1]
    for field in ("test_acc", "test_loss", "train_loss", "train_acc", "lr"):
        assert [r[field] for r in apart["seeds"]] == [r[field] for r in alone["seeds"]]
    assert {"model-seed0.pt", "model-seed1.pt"} < {p.name for p in (tmp_path / "apart").iterdir()}


def test_paired_difference_and_its_interval() -> None:
    # Differences 0.02, 0.04, 0.03: mean 0.03, sample sd 0.01, t(2) = 4.303.
    diff = paired_difference([0.92, 0.94, 0.93], [0.90, 0.90, 0.90])
    assert diff["mean"] == pytest.approx(0.03)
    half = 4.303 * 0.01 / math.sqrt(3)
    assert (diff["low"], diff["high"]) == (pytest.approx(0.03 - half), pytest.approx(0.03 + half))
    # Paired: a shift shared by both configs in one seed does not widen the interval.
    shared = paired_difference([0.92, 0.84, 0.93], [0.90, 0.80, 0.90])
    assert shared["high"] - shared["low"] == pytest.approx(2 * half)
    one = paired_difference([0.9], [0.8])
    assert one == {"mean": pytest.approx(0.1), "low": None, "high": None}
    assert t_975(1) == 12.706 and t_975(30) == 2.042
    assert t_975(60) == pytest.approx(2.000, abs=1e-3)  # past the table: the expansion
    assert t_975(1000) == pytest.approx(1.962, abs=1e-3)


ROW = re.compile(
    r"^\| (?P<name>[^|]+?) \| (?P<val>[^|]+?) \| (?P<acc>[^|]+?) \| (?P<diff>[^|]+?) \|",
    re.MULTILINE,
)


@pytest.mark.slow
def test_compare_table_matches_the_per_seed_metrics(
    hpo_env: dict[str, str], tmp_path: Path
) -> None:
    url = hpo_env["HPO_STORAGE"]
    study = make_study(url, "demo", complete=3)  # the tiny space, the synthetic set
    done = run_hpo(
        "compare", "--study", "demo", "--seeds", "2", "--epochs", "1", "--top", "2",
        env=hpo_env, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    out = tmp_path / "runs" / "compare"
    table = json.loads((out / "compare.json").read_text())
    markdown = (out / "compare.md").read_text()
    assert table["epochs"] == 1 and table["seeds"] == [0, 1] and table["dataset"] == "synthetic"
    assert "widths 128, 256, 512, 1028 -> 4, 4, 8, 16" in table["report_config"]

    best, second = sorted(
        (t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE),
        key=lambda t: t.value,
    )[:2]
    folders = {
        f"trial {best.number} (best)": f"trial-{best.number}",
        f"trial {second.number} (#2)": f"trial-{second.number}",
        "report": "report",
    }
    per_seed = {
        name: json.loads((out / folder / "metrics.json").read_text())["seeds"]
        for name, folder in folders.items()
    }
    rows = {m["name"]: m for m in ROW.finditer(markdown)}
    assert set(rows) == {"config", *folders}
    report_acc = [run["test_acc"] for run in per_seed["report"]]
    for name, runs in per_seed.items():
        acc = [run["test_acc"] for run in runs]
        assert [run["seed"] for run in runs] == [0, 1]
        expected = f"{pct(statistics.mean(acc))}% ± {pct(statistics.stdev(acc))}%"
        assert rows[name]["acc"] == expected
        assert expected in done.stdout  # the printed table
        if name == "report":
            assert rows[name]["diff"] == "baseline"
            continue
        diffs = [a - b for a, b in zip(acc, report_acc, strict=True)]
        mean, half = statistics.mean(diffs), 12.706 * statistics.stdev(diffs) / math.sqrt(2)
        assert rows[name]["diff"] == (
            f"{100 * mean:+.2f} pts [{100 * (mean - half):+.2f}, {100 * (mean + half):+.2f}]"
        )

    # Both files are artifacts of the study; the table is in its attrs, note and report.
    study = optuna.load_study(study_name="demo", storage=open_storage(url))
    stored = study.user_attrs[attrs.COMPARE]
    assert stored["configs"] == table["configs"]
    store = FileSystemArtifactStore(str(artifact_dir(None, url)))
    for file in ("compare.md", "compare.json"):
        with store.open_reader(stored["artifacts"][file]) as artifact:
            assert artifact.read() == (out / file).read_bytes()
    best_row = markdown.splitlines()[2]
    assert best_row in get_note(study)
    assert "Backbone search `demo`" in get_note(study)  # the settings note is kept
    shown = Console(width=200, record=True)
    shown.print(study_table(study))  # what `hpo status --study demo` prints
    assert rows[f"trial {best.number} (best)"]["diff"] in shown.export_text()
    page = write_report(study, tmp_path / "report").page.read_text()
    assert rows[f"trial {best.number} (best)"]["acc"] in page


def test_compare_train_and_pareto_refusals_are_one_line(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    make_study(url, "s", complete=1, pruned=0, failed=0)
    storage = open_storage(url)
    create_or_join(storage, "empty", load_settings(storage, "s"), 2)
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(TINY_CONFIG))

    def refused(*args: str) -> str:
        done = CliRunner().invoke(app, [*args, "--storage", url])
        assert done.exit_code == 2, done.output
        assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
        return done.stderr.removeprefix("error: ").strip()

    assert refused("compare", "--study", "nope") == "no study named 'nope' in this storage"
    assert refused("compare", "--study", "empty") == "study 'empty' has no completed trial yet"
    assert refused("best", "--study", "empty", "--pareto") == (
        "study 'empty' has no completed trial yet"
    )
    if not torch.cuda.is_available():
        config = str(tmp_path / "tiny.yaml")
        assert refused("train", "--config", config, "--gpus", "0").startswith(
            "--gpus 0: no CUDA GPU is visible"
        )
        assert refused("compare", "--study", "s", "--gpus", "all").startswith("--gpus all: no CUDA")


def _tell(study: optuna.Study, settings: StudySettings, value: float, lrs: list[float]) -> int:
    """Claim the next ticket and tell it complete as a worker would, with an LR per epoch."""
    trial = study.ask()
    cfg = sample_config(trial, settings.search_space(), settings.epochs)
    trial.set_user_attr(attrs.CONFIG, cfg.to_dict())
    trial.set_user_attr(attrs.EPOCHS, [{"epoch": e, "lr": lr} for e, lr in enumerate(lrs, 1)])
    for epoch in range(1, settings.epochs + 1):
        trial.report(value + 1 / epoch, epoch)
    study.tell(trial, value)
    return trial.number


@pytest.mark.filterwarnings("ignore:Fixed parameter")
def test_the_report_entry_is_its_trials_export_trained_once(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    storage = open_storage(url)
    settings = StudySettings.for_space(epochs=4, dataset="synthetic")  # the default space
    create_or_join(storage, "r", settings, 2)
    study = optuna.load_study(study_name="r", storage=storage)
    trace = [1e-3, 1e-3, 1e-4, 1e-5]  # the report's plateau, cut twice in the trial
    assert _tell(study, settings, 0.5, trace) == 0  # the first ticket: the report's config
    other = _tell(study, settings, 0.7, [2e-3] * 4)

    report = report_entry(study, url, settings, 90)
    exported = TrialConfig.from_dict(trial_document(study, url, 0)).with_epochs(90)
    assert report.trial == 0 and report.cfg == exported and report.val_loss == 0.5
    assert report.cfg.train.scheduler == "plateau" and report.cfg.train.lr_by_epoch == tuple(trace)
    top = top_entries(study, url, 2, 90)
    assert [entry.trial for entry in top] == [0, other]
    plan = training_plan([*top, report])
    assert [entry.name for entry in plan.values()] == ["trial 0 (best)", f"trial {other} (#2)"]
    assert "the study's trial 0, exported" in report_scaling(settings, report)

    # Without the report's trial (a study not in the default space): its config as a trial
    # of the study, scaled as the trials are, and the table's note says so.
    tiny = StudySettings.for_space("tiny", epochs=20, dataset="synthetic")
    alone = report_entry(study, url, tiny, 90)
    space = tiny.search_space()
    assert alone.trial is None and alone.val_loss is None
    assert alone.cfg == config_from_params(report_params_in(space), space, 20).with_epochs(90)
    assert alone.cfg.train.scheduler_args["patience"] == 45  # 10 of 20 epochs, as a trial's
    note = report_scaling(tiny, alone)
    assert "not a trial of this study" in note and "watches the training loss" in note


@pytest.mark.parametrize(
    ("override", "fitted"),
    [
        ({"batch_size": [512]}, "batch_size 256 -> 512"),
        ({"kernel_size": [5]}, "kernel_size 3 -> 5"),
        ({"schedulers": ["onecycle"]}, "scheduler plateau (factor 0.1, patience 45) -> onecycle"),
        ({"schedulers": ["step", "constant"]}, "-> step (step_size 45, gamma 0.1)"),
    ],
)
def test_the_report_is_fitted_to_any_space_and_the_note_names_each_change(
    override: dict, fitted: str, tmp_path: Path
) -> None:
    settings = _yaml_space_settings(tmp_path, override)  # the default space but for one key
    space = settings.search_space()
    cfg = _report_entry_alone(tmp_path, settings).cfg
    assert cfg.train.batch_size in space.batch_size and cfg.model.kernel_size in space.kernel_size
    assert cfg.train.scheduler in space.schedulers
    assert cfg.model.channels == REPORT_TABLE1.channels  # the report's network, as published
    note = report_scaling(settings, Entry("report", None, cfg))
    assert fitted in note and note.count(" -> ") == 1, note
    if "step" in fitted:  # the plateau's own numbers: a cut by its factor every patience
        assert cfg.with_epochs(20).train.schedule == StepArgs(step_size=10, gamma=0.1)


def _yaml_space_settings(folder: Path, override: dict, base: str = "default") -> StudySettings:
    path = folder / "space.yaml"
    path.write_text(yaml.safe_dump({"base": base, **override}))
    return StudySettings.for_space(str(path), epochs=20, dataset="synthetic")


def _report_entry_alone(folder: Path, settings: StudySettings) -> Entry:
    """The report's entry as `hpo compare` makes it, in a study of `settings` without its
    trial (the report's run is no trial of a YAML space)."""
    url = f"sqlite:///{folder / 'alone.db'}"
    storage = open_storage(url)
    create_or_join(storage, "alone", settings, 2)
    study = optuna.load_study(study_name="alone", storage=storage)
    return report_entry(study, url, settings, 90)


def _assert_the_reports_recipe(cfg: TrialConfig) -> None:
    """AdamW at the report's LR, no smoothing, no average, no cutout, no mixing, no TTA."""
    train, augment = cfg.train, cfg.augment
    assert (train.optimizer, train.lr, train.label_smoothing, train.ema_decay) == (
        "adamw",
        1e-3,
        0.0,
        0.0,
    )
    assert (augment.cutout_size, augment.mix, augment.tta) == (0, "none", "none")


# Each space fixes a lever on, or offers only its "on" side: the report's entry is still the
# report's recipe, and the note names only what differs from the published run.
FIXED_LEVERS = {
    "smoothing and flip views (tiny)": (
        "tiny",
        {"label_smoothing": [0.1, 0.1], "tta": ["flip"]},
        "widths 128, 256, 512, 1028",
    ),
    "only SGD": ("default", {"optimizers": ["sgd"]}, None),
    "only weight averaging": ("default", {"weight_averaging": [True]}, None),
    "only cutout": ("default", {"cutout": [True]}, None),
    "only mixup": ("default", {"mixes": ["mixup"]}, None),
}


@pytest.mark.filterwarnings("ignore:Fixed parameter")
@pytest.mark.parametrize("case", FIXED_LEVERS, ids=list(FIXED_LEVERS))
def test_the_report_entry_is_the_reports_recipe_whatever_the_space_fixes(
    case: str, tmp_path: Path
) -> None:
    base, override, fitted = FIXED_LEVERS[case]
    settings = _yaml_space_settings(tmp_path, override, base)
    report = _report_entry_alone(tmp_path, settings)
    _assert_the_reports_recipe(report.cfg)
    note = report_scaling(settings, report)
    assert "without" not in note, note
    for lever in ("label_smoothing", "tta", "optimizer", "ema_decay", "cutout", "mix"):
        assert lever not in note, note
    if fitted is None:  # the default space's network, batch, kernel and plateau: exact
        assert note.startswith("the report's Table 1/2 config exactly as published"), note
    else:  # the tiny space's widths and augmentation, and nothing else
        assert f"{fitted} -> 4, 4, 8, 16" in note and "fitted" in note, note
        assert "crop_padding 4 -> 2" in note and "rotation_degrees 5.0 -> 0.0" in note, note


@pytest.mark.filterwarnings("ignore:Fixed parameter")
def test_an_old_studys_report_trial_is_called_exact(tmp_path: Path) -> None:
    """A study stored before the recipe levers: its space has none, its first trial ran the
    published run, and the note calls it that."""
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    storage = open_storage(url)
    new = StudySettings.for_space(epochs=4, dataset="synthetic")
    levers = {*LEVERS_OFF, "sgd_lr", "momentum", "ema_decay", "cutout_size", "cutout_prob"}
    old_space = {k: v for k, v in new.space.items() if k not in levers | {"mix_alpha", "mix_prob"}}
    settings = replace(new, space=old_space)
    create_or_join(storage, "old", settings, 2)
    study = optuna.load_study(study_name="old", storage=storage)
    assert _tell(study, settings, 0.5, [1e-3] * 4) == 0
    assert "optimizer" not in study.trials[0].params  # an old space draws no lever
    report = report_entry(study, url, settings, 90)
    assert report.trial == 0
    _assert_the_reports_recipe(report.cfg)
    note = report_scaling(settings, report)
    assert note.startswith("the report's Table 1/2 config exactly as published"), note
    assert "fitted" not in note and "without" not in note, note


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Fixed parameter")
def test_hpo_compare_trains_the_reports_recipe_in_a_space_with_levers_fixed_on(
    hpo_env: dict[str, str], tmp_path: Path
) -> None:
    settings = _yaml_space_settings(
        tmp_path, {"label_smoothing": [0.1, 0.1], "tta": ["flip"]}, base="tiny"
    )
    url = hpo_env["HPO_STORAGE"]
    storage = open_storage(url)
    create_or_join(storage, "fixed", settings, 1)
    study = optuna.load_study(study_name="fixed", storage=storage)
    _tell(study, replace(settings, epochs=1), 0.5, [1e-2])
    done = run_hpo(
        "compare", "--study", "fixed", "--seeds", "1", "--epochs", "1",
        env=hpo_env, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    out = tmp_path / "runs" / "compare"
    trained = json.loads((out / "report" / "metrics.json").read_text())["config"]
    _assert_the_reports_recipe(TrialConfig.from_dict(trained))
    best = json.loads((out / "trial-0" / "metrics.json").read_text())["config"]
    assert (best["train"]["label_smoothing"], best["augment"]["tta"]) == (0.1, "flip")
    note = json.loads((out / "compare.json").read_text())["report_config"]
    assert "without" not in note and "label_smoothing" not in note and "tta" not in note, note
