"""`hpo ablate`: the path from the report's config to the best trial, predicted by a forest
fitted to the study's trials (and, with --measure, trained), one group of changes a step."""

from __future__ import annotations

import json
import math
import os
import random
import re
import signal
import subprocess
import time
from pathlib import Path

import optuna
import pytest
from conftest import HPO, run_hpo
from optuna_dashboard import get_note
from rich.console import Console
from typer.testing import CliRunner

from search.cli import app
from search.commands.ablation import RESULTS, study_path
from search.commands.report import write_report
from search.commands.status import study_table
from search.rules import attrs
from search.rules.ablation import (
    MIN_TRIALS,
    AblationError,
    group_of,
    largest_steps,
    with_group,
)
from search.rules.settings import StudySettings
from search.rules.space import (
    BUILTIN_SPACES,
    DEFAULT_SPACE,
    SearchSpace,
    report_params_in,
    report_table1_params,
    sample_config,
)
from search.rules.study import create_or_join
from storage import open_storage

EPOCHS = 4
# The best trial: the report's config but for four groups, of which grad_clip does nothing.
BEST_CHANGES = {"label_smoothing": 0.3, "weight_decay": 1e-2, "grad_clip": 0.9}


def best_params(space: SearchSpace) -> dict:
    """The report's config with BEST_CHANGES and the space's highest dropout (no draw beats
    it), its K cut to the space's (the tiny space's is below the report's: an idle change)."""
    params = {**report_params_in(space), **BEST_CHANGES, "dropout": space.dropout[1]}
    return {
        name: min(value, space.blocks[1]) if name.startswith("blocks_") else value
        for name, value in params.items()
    }


def score(params: dict) -> float:
    """Label smoothing drives the score, dropout less, weight decay less still; the gradient
    clipping and everything else do nothing."""
    return (
        2.0
        - 10.0 * params["label_smoothing"]
        - 4.0 * params["dropout"]
        - 0.05 * (math.log10(params["weight_decay"]) + 6)
    )


def driven_study(
    url: str, name: str, drawn: int = 40, report: bool = True, space_name: str = "default"
) -> optuna.Study:
    """A study made as `hpo create` makes one (in the default space its first ticket the
    report's config, claimed and told where `report`), then `drawn` random trials and the
    best one (the report's config with BEST_CHANGES), scored by `score`, not trained."""
    storage = open_storage(url)
    settings = StudySettings.for_space(space_name, epochs=EPOCHS, dataset="synthetic")
    create_or_join(storage, name, settings, 1)
    study = optuna.load_study(study_name=name, storage=storage)
    space = settings.search_space()
    if report:
        trial = study.ask()
        _tell(study, trial, sample_config(trial, space, EPOCHS), score(trial.params))
    # Drawn in memory, added at once: a SQLite round trip per suggestion is most of the time.
    scratch = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    scratch.enqueue_trial(best_params(space))
    noise = random.Random(0)
    for number in range(drawn + 1):
        trial = scratch.ask()
        cfg = sample_config(trial, space, EPOCHS)
        _tell(scratch, trial, cfg, score(trial.params) + (number and abs(noise.gauss(0, 0.02))))
    study.add_trials(scratch.trials)
    return study


def _tell(study: optuna.Study, trial: optuna.Trial, cfg, value: float) -> None:
    trial.set_user_attr(attrs.CONFIG, cfg.to_dict())
    study.tell(trial, value)


@pytest.fixture(scope="module")
def driven(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, optuna.Study]:
    url = f"sqlite:///{tmp_path_factory.mktemp('ablation') / 'hpo.db'}"
    return url, driven_study(url, "driven")


def test_every_parameter_of_every_space_moves_with_a_group() -> None:
    names = set(report_table1_params())
    for space in BUILTIN_SPACES.values():
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
        for _ in range(300):  # every branch: each optimizer, schedule, lever on and off
            trial = study.ask()
            sample_config(trial, space, 10)
            names |= set(trial.params)
    for name in sorted(names):
        group_of(name)  # raises for a parameter no group claims
    with pytest.raises(AblationError, match="belongs to no ablation group"):
        group_of("warmup_epochs")


def test_a_switch_brings_its_conditional_parameters() -> None:
    adamw = {"optimizer": "adamw", "lr": 1e-3, "dropout": 0.1, "width_0_1": 64}
    sgd = {"optimizer": "sgd", "sgd_lr": 0.1, "momentum": 0.9, "dropout": 0.2, "width_0_1": 32}
    assert with_group(adamw, sgd, "optimizer") == {
        "optimizer": "sgd", "sgd_lr": 0.1, "momentum": 0.9, "dropout": 0.1, "width_0_1": 64,
    }  # fmt: skip
    deeper = {**adamw, "layers_0": 2, "width_0_2": 128}
    assert with_group(deeper, adamw, "architecture") == adamw  # the second width goes too


def test_the_predicted_path_puts_the_driving_group_first_and_the_idle_one_last(
    driven: tuple[str, optuna.Study],
) -> None:
    _url, study = driven
    settings = StudySettings.from_dict(study.user_attrs[attrs.SETTINGS])
    best = study.best_trial
    assert best.params == best_params(DEFAULT_SPACE) and report_params_in(DEFAULT_SPACE) == (
        report_table1_params()
    )
    path = study_path(study, settings)
    report = study.trials[0]
    assert path.start_trial == 0 and path.target_trial == best.number
    assert path.steps[0].params == report.params and path.steps[-1].params == best.params
    assert path.trials == len(study.trials)
    groups = [step.group for step in path.steps[1:]]
    assert groups == ["label smoothing", "dropout", "weight decay", "gradient clipping"]
    assert path.steps[1].changes == {"label_smoothing": (0.0, 0.3)}
    assert all(step.sd >= 0 for step in path.steps)
    # The driving step's predicted gain is the largest: --steps 1 keeps it alone.
    assert largest_steps(path, 1) == [["label smoothing"], groups[1:]]


@pytest.mark.slow
def test_hpo_ablate_prints_the_predicted_path_and_draws_it_and_refuses_bad_inputs(
    driven: tuple[str, optuna.Study],
    hpo_env: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The predicted path as a user gets it from a real `hpo ablate`; its refusals through
    CliRunner in this process (`hpo` is `app()` and nothing more: the same code, no process
    start of seconds each)."""
    url, study = driven
    done = run_hpo("ablate", "--study", "driven", "-o", "out", env={**hpo_env, "HPO_STORAGE": url},
                   cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "a prediction, not a measurement" in done.stdout
    assert f"fitted to {len(study.trials)} complete trials" in done.stdout
    assert "+ label smoothing" in done.stdout and (tmp_path / "out" / "ablation.png").is_file()

    driven_study(url, "no-report", drawn=MIN_TRIALS, report=False)
    driven_study(url, "small", drawn=MIN_TRIALS - 3)
    monkeypatch.chdir(tmp_path)  # -o a-file/out below, relative as a user's shell has it
    unset: dict[str, str | None] = {k: None for k in os.environ if k.startswith("HPO_")}
    runner = CliRunner(env={**unset, **hpo_env, "HPO_STORAGE": url})

    def refused(*args: str) -> str:
        done = runner.invoke(app, ["ablate", *args])
        assert done.exit_code == 2, done.output
        assert isinstance(done.exception, SystemExit), done.exception  # no traceback
        assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
        return done.stderr.removeprefix("error: ").strip()

    assert refused("--study", "driven", "--trial", "999") == (
        "trial 999 of 'driven' is no end: there is no such trial"
    )
    assert refused("--study", "no-report").startswith(
        "study 'no-report' holds no complete trial of the report's config"
    )
    (tmp_path / "a-file").write_text("")
    assert refused("--study", "driven", "-o", "a-file/out").startswith("--output-dir a-file/out: ")
    assert refused("--study", "small") == (
        f"too few trials: {MIN_TRIALS - 1} complete, the predicted path needs at least {MIN_TRIALS}"
    )


@pytest.mark.slow
def test_the_report_draws_the_path_or_says_why_not(
    driven: tuple[str, optuna.Study], tmp_path: Path
) -> None:
    url, study = driven
    page = write_report(study, tmp_path / "report")
    text = page.page.read_text()
    assert 'id="ablation"' in text and 'src="ablation.png"' in text
    assert "+ gradient clipping" in text and (tmp_path / "report" / "ablation.png") in page.images
    small = driven_study(url, "few", drawn=3)
    written = write_report(small, tmp_path / "small")
    assert any("skipped, too few trials" in line for line in written.skipped), written.skipped
    assert f"needs at least {MIN_TRIALS}" in written.page.read_text()


@pytest.mark.slow
def test_the_measured_path_resumes_and_trains_nothing_twice(
    hpo_env: dict[str, str], tmp_path: Path
) -> None:
    """Through real `hpo` processes: compare trains the report's and the best's configs; the
    measured path takes them, trains one step, is stopped, and the resumed run trains the
    rest, each (step, seed) once."""
    url = hpo_env["HPO_STORAGE"]
    driven_study(url, "tiny", drawn=MIN_TRIALS, report=False, space_name="tiny")
    base = ["--study", "tiny", "--seeds", "1", "--epochs", "1"]
    compared = run_hpo("compare", *base, env=hpo_env, cwd=tmp_path)
    assert compared.returncode == 0, compared.stderr
    ablate = [HPO, "ablate", *base, "--measure", "--steps", "2", "-o", "out"]
    first = subprocess.Popen(
        ablate, env=hpo_env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    results = tmp_path / "out" / RESULTS
    while not _trained(results):  # the first step's result, written whole (os.replace)
        assert first.poll() is None, first.communicate()
        time.sleep(0.05)
    first.send_signal(signal.SIGTERM)
    out, _err = first.communicate(timeout=60)
    assert first.returncode != 0  # stopped, not finished
    assert "to train, 2 already done (2 from `hpo compare`)" in out  # the cost, said first
    kept = _trained(results)
    resumed = run_hpo(*ablate[1:], env=hpo_env, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    table = json.loads((tmp_path / "out" / "ablation.json").read_text())
    labels = [row["label"] for row in table["steps"]]
    assert labels[:2] == ["report's config", "+ label smoothing"] and len(labels) == 4
    assert labels[3].endswith(", architecture (= trial 1)") or "architecture" in labels[2]
    # Each (config, seed) trained once over both runs: the second only what the first left.
    again = re.findall(r"training step (\d+) ", resumed.stdout)
    assert again and not set(again) & {str(step) for step in _steps_trained(out, kept)}
    assert len(re.findall(r"training step", out)) - len(again) <= 1  # one cut short, at most
    assert f"{len(again)} to train, {4 - len(again)} already done" in resumed.stdout
    study = optuna.load_study(study_name="tiny", storage=open_storage(url))
    stored = study.user_attrs[attrs.ABLATION]
    assert stored["steps"] == table["steps"]
    assert "Which change bought the points" in get_note(study)
    assert "Best configs against the report's" in get_note(study)  # compare's table kept
    shown = Console(width=300, record=True)
    shown.print(study_table(study))
    text = shown.export_text()
    assert "measured path" in text and "+ label smoothing" in text
    assert set(stored["artifacts"]) == {"ablation-measured.png"}
    page = write_report(study, tmp_path / "report").page.read_text()
    assert "Measured path (1 epochs, seeds 0" in page and 'src="ablation.png"' in page


def _trained(results: Path) -> dict:
    """The trainings kept so far (compare's two taken ones aside: they have no train time)."""
    try:
        stored = json.loads(results.read_text())["results"]
    except (OSError, ValueError):
        return {}
    return {
        key: seeds
        for key, seeds in stored.items()
        if any("train_seconds" in run for run in seeds.values())
    }


def _steps_trained(out: str, kept: dict) -> list[str]:
    """The steps the first run trained to the end: the first len(kept) it began."""
    return re.findall(r"training step (\d+) ", out)[: len(kept)]
