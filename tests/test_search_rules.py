"""The rules that make a search's winner real: a resumed trial scores what it would have
scored, the test split is never read, the last epoch is never pruned, `hpo best` picks the
best complete trial, and `hpo train` trains (and replays) what was exported."""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import threading
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
import yaml
from conftest import HPO, run_hpo
from optuna.trial import TrialState
from typer.testing import CliRunner

from data.batches import CACHE_FILE, TEST_FILE, write_batch
from data.dataset import load_dataset
from data.loader import search_data
from data.synthetic import synthetic_folder
from model.config import ModelConfig
from search.cli import app
from search.rules import attrs
from search.rules.config import StepArgs, TrainConfig
from search.rules.settings import StudySettings
from search.rules.space import sample_config
from search.rules.study import create_or_join, join_as_worker
from search.training.checkpoints import CheckpointStore
from search.training.objective import TrialRunner, WorkerInfo
from search.training.trainer import DeviceRecipe
from search.training.worker import run_worker
from storage import open_storage

EPOCHS = 4
# One fixed tiny config, so two studies train the same trial; every recipe lever on, so a
# resume restores SGD's momentum, the average of the weights and the augmentation generators.
PARAMS = {
    "backbones": 1, "blocks_0": 1, "layers_0": 1, "width_0_1": 8, "kernel_size": 3,
    "dropout": 0.2, "weight_decay": 1e-4, "grad_clip": 0.1, "batch_size": 64,
    "scheduler": "onecycle", "onecycle_pct_start": 0.3,
    "optimizer": "sgd", "sgd_lr": 0.05, "momentum": 0.9, "label_smoothing": 0.1,
    "weight_averaging": True, "ema_decay": 0.95, "cutout": True, "cutout_size": 4,
    "cutout_prob": 0.5, "mix": "mixup", "mix_alpha": 0.5, "mix_prob": 0.5, "tta": "flip",
}  # fmt: skip


def one_trial_study(
    url: str, name: str, epochs: int = EPOCHS
) -> tuple[optuna.Study, StudySettings]:
    """A study whose one ticket is PARAMS, opened as a worker opens it."""
    storage = open_storage(url)
    settings = StudySettings.for_space(
        "tiny", epochs=epochs, dataset="synthetic", pruner="none", heartbeat_s=60
    )
    create_or_join(storage, name, settings, 0)
    study = join_as_worker(storage, name, settings, "test")
    study.enqueue_trial(PARAMS)
    study.set_user_attr(attrs.TARGET, 1)
    return study, settings


def runner(settings: StudySettings, data_dir: Path, artifacts: Path, **extra) -> TrialRunner:
    return TrialRunner(
        settings,
        search_data(load_dataset("synthetic", data_dir), "cpu"),
        DeviceRecipe.for_device("cpu"),
        WorkerInfo("test", "host", "cpu"),
        checkpoints=CheckpointStore(artifacts),
        **extra,
    )


def scored(study: optuna.Study) -> optuna.trial.FrozenTrial:
    (done,) = study.get_trials(states=(TrialState.COMPLETE,))
    return done


# --- resume -------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("stop_after", [2])
def test_a_stopped_and_resumed_trial_scores_the_uninterrupted_run(
    stop_after: int, data_dir: Path, tmp_path: Path
) -> None:
    """Also: a stop during the last epoch completes the trial (the uninterrupted run here)."""
    url = f"sqlite:///{tmp_path / 'r.db'}"
    straight, settings = one_trial_study(url, "straight")
    last = threading.Event()

    def stop_in_last(trial: optuna.Trial, stats) -> None:
        if stats.epoch == EPOCHS:
            last.set()

    run_worker(
        straight, runner(settings, data_dir, tmp_path / "a", on_epoch=stop_in_last, stop=last), last
    )
    (want,) = straight.get_trials()  # complete, not failed and re-queued to train nothing
    assert want.state == TrialState.COMPLETE
    assert sorted(want.intermediate_values) == list(range(1, EPOCHS + 1))

    # The stop lands exactly after epoch `stop_after`, as a first Ctrl-C/SIGTERM does.
    cut, _ = one_trial_study(url, "cut")
    stop = threading.Event()

    def stop_at(trial: optuna.Trial, stats) -> None:
        if stats.epoch == stop_after:
            stop.set()

    run_worker(cut, runner(settings, data_dir, tmp_path / "b", on_epoch=stop_at, stop=stop), stop)
    assert cut.get_trials()[0].state == TrialState.FAIL
    run_worker(cut, runner(settings, data_dir, tmp_path / "b"), threading.Event())
    got = scored(cut)

    assert got.number != want.number == 0  # a retry, seeded by the trial it continues
    assert got.user_attrs[attrs.RESUMED_FROM_EPOCH] == stop_after
    assert got.value == pytest.approx(want.value, rel=1e-6)
    assert got.intermediate_values == pytest.approx(want.intermediate_values, rel=1e-6)
    assert got.user_attrs[attrs.BEST_VAL_LOSS] == pytest.approx(
        min(want.intermediate_values.values())
    )


@pytest.mark.slow
def test_a_sigterm_mid_trial_through_real_workers_resumes_to_the_same_score_and_no_test_split(
    hpo_env: dict, data_dir: Path, tmp_path: Path
) -> None:
    """Also the rule that the search never reads the test split: the uninterrupted worker reads
    a copy of the synthetic set whose test images are noise, the stopped and resumed ones the
    set itself; were either split read, the scores would differ (it was two more workers)."""
    noisy = with_noise_for_test_images(data_dir, tmp_path / "noisy")
    assert (load_dataset("synthetic", noisy).test_images != 0).any()
    url = hpo_env["HPO_STORAGE"]
    one_trial_study(url, "straight")
    cut, _ = one_trial_study(url, "cut")
    noisy_env = {**hpo_env, "HPO_DATA_DIR": str(noisy)}
    straight = run_hpo("worker", "--study", "straight", env=noisy_env, cwd=tmp_path)
    assert straight.returncode == 0, straight.stdout + straight.stderr

    worker = subprocess.Popen(
        [HPO, "worker", "--study", "cut"], env=hpo_env, cwd=tmp_path,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    assert worker.stdout is not None
    for line in worker.stdout:  # the event: epoch 1 was trained (and checkpointed)
        if "epoch   1/4" in line:
            worker.send_signal(signal.SIGTERM)
            break
    output = worker.communicate(timeout=120)[0]
    assert worker.returncode == 0, output
    failed = cut.get_trials()[0]
    assert failed.state == TrialState.FAIL, output  # stopped after whichever epoch ran on
    resumed = run_hpo("worker", "--study", "cut", env=hpo_env, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr

    want = scored(optuna.load_study(study_name="straight", storage=open_storage(url)))
    got = scored(cut)
    assert got.user_attrs[attrs.RESUMED_FROM_EPOCH] == failed.last_step
    assert got.value == pytest.approx(want.value, rel=1e-6)
    assert got.intermediate_values == pytest.approx(want.intermediate_values, rel=1e-6)
    # Validation comes from the training images only: noise in the test set changes nothing.
    assert got.user_attrs[attrs.VAL_ACC] == pytest.approx(want.user_attrs[attrs.VAL_ACC])


# --- what a trial may read, and when it may be pruned --------------------------------------


def with_noise_for_test_images(data_dir: Path, copy: Path) -> Path:
    """The synthetic set with its test images replaced by noise (and random labels)."""
    shutil.copytree(data_dir, copy)
    folder = synthetic_folder(copy)
    (folder / CACHE_FILE).unlink(missing_ok=True)
    rng = np.random.default_rng(1)
    n = len(load_dataset("synthetic", data_dir).test_labels)
    fields = {
        "batch_label": "noise",
        "labels": rng.integers(0, 10, n).tolist(),
        "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
    }
    write_batch(folder / TEST_FILE, fields, {"noise"})
    return copy


@pytest.mark.slow
@pytest.mark.parametrize("epochs", [1, 2])
def test_no_trial_is_pruned_at_its_last_epoch(epochs: int, data_dir: Path, tmp_path: Path) -> None:
    study, settings = one_trial_study(f"sqlite:///{tmp_path / 'p.db'}", "p", epochs=epochs)
    # A real Optuna pruner that says "prune" at every step where it is asked.
    always = optuna.load_study(
        study_name="p",
        storage=open_storage(f"sqlite:///{tmp_path / 'p.db'}"),
        pruner=optuna.pruners.ThresholdPruner(upper=0.0),
    )
    run_worker(always, runner(settings, data_dir, tmp_path / "a"), threading.Event())
    (trial,) = always.get_trials()
    if epochs == 1:
        assert trial.state == TrialState.COMPLETE  # its only epoch is its last
    else:
        assert (trial.state, trial.last_step) == (TrialState.PRUNED, 1)


# --- choosing and exporting the best -------------------------------------------------------


@pytest.mark.slow
def test_best_exports_the_best_complete_trial_not_a_lower_pruned_or_failed_one(
    hpo_env: dict, tmp_path: Path
) -> None:
    url = hpo_env["HPO_STORAGE"]
    storage = open_storage(url)
    settings = StudySettings.for_space("tiny", epochs=3, dataset="synthetic")
    create_or_join(storage, "b", settings, 0)
    study = optuna.load_study(study_name="b", storage=storage)
    told = [
        (TrialState.COMPLETE, [1.0, 0.9, 0.8]),
        (TrialState.PRUNED, [0.5, 0.1]),  # lower than any complete trial
        (TrialState.FAIL, [0.05]),
        (TrialState.COMPLETE, [0.9, 0.7, 0.6]),
        (TrialState.COMPLETE, [0.95, 0.5, 0.65]),  # lowest point mid-run, higher at the end
    ]
    for state, losses in told:
        trial = study.ask()
        trial.set_user_attr(
            attrs.CONFIG, sample_config(trial, settings.search_space(), 3).to_dict()
        )
        for epoch, loss in enumerate(losses, start=1):
            trial.report(loss, epoch)
        study.tell(trial, losses[-1] if state == TrialState.COMPLETE else None, state=state)

    exported = run_hpo("best", "--study", "b", env=hpo_env, cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
    document = yaml.safe_load(exported.stdout)
    complete = [(losses[-1], n) for n, (s, losses) in enumerate(told) if s == TrialState.COMPLETE]
    assert document["source"]["trial"] == min(complete)[1] == 3
    assert document["metrics"]["score"] == 0.6 and document["metrics"]["epoch"] == 3


def final_config(tmp_path: Path, train: dict) -> Path:
    """A config file as `hpo best` writes one (its extra sections included)."""
    document = {
        "model": {"channels": [[3, 8]], "blocks": [1], "kernel_size": 3, "dropout": 0.0},
        "train": {"lr": 0.01, "batch_size": 64, **train},
        "augment": {"crop_padding": 2, "flip": True, "rotation_degrees": 0.0},
        "metrics": {"val_loss": 1.0},
        "source": {"study": "nowhere", "trial": 0},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def lr_per_epoch(output: str) -> list[float]:
    return [
        float(line.split(" lr ")[1].split()[0]) for line in output.splitlines() if " lr " in line
    ]


@pytest.mark.slow
def test_train_replays_the_plateau_lr_its_trial_followed_stretched_over_its_epochs(
    hpo_env: dict, tmp_path: Path
) -> None:
    trace = [0.01, 0.01, 0.001, 0.0001]
    config = final_config(tmp_path, {"epochs": 4, "scheduler": "plateau", "lr_by_epoch": trace})
    trained = run_hpo(
        "train", "--config", str(config), "--dataset", "synthetic", "--epochs", "8",
        "--output-dir", "final", env=hpo_env, cwd=tmp_path,
    )  # fmt: skip
    assert trained.returncode == 0, trained.stdout + trained.stderr
    assert lr_per_epoch(trained.stdout) == pytest.approx([0.01] * 4 + [0.001] * 2 + [0.0001] * 2)
    # What was trained is what the file says, over the epochs asked for.
    saved = torch.load(tmp_path / "final" / "model-seed0.pt", weights_only=True)["config"]
    written = yaml.safe_load(config.read_text())
    assert saved["model"] == ModelConfig.from_dict(written["model"]).to_dict()
    assert (saved["train"]["epochs"], saved["train"]["lr_by_epoch"]) == (8, trace)


def _decays(step_size: int, epochs: int) -> int:
    """LR changes of a real StepLR run of `epochs`, stepped after each epoch as the trainer
    steps it (not after the last)."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=step_size, gamma=0.5)
    lrs = []
    for _ in range(epochs):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    return sum(a != b for a, b in itertools.pairwise(lrs))


def test_a_step_schedule_keeps_its_number_of_decays_over_the_final_run() -> None:
    # 5 over 20 epochs decays 3 times; 22 over 90 (22.5 rounded to even) would decay 4 times.
    five = TrainConfig(epochs=20, scheduler="step", scheduler_args={"step_size": 5, "gamma": 0.5})
    assert five.with_epochs(90).schedule == StepArgs(step_size=23, gamma=0.5)
    for epochs in range(2, 21):
        for step_size in range(1, max(1, epochs // 2) + 1):  # the space's range
            trial = TrainConfig(
                epochs=epochs, scheduler="step", scheduler_args={"step_size": step_size}
            )
            for final in (epochs, 90, 91):
                scaled = trial.with_epochs(final).schedule.step_size
                wanted = _decays(step_size, epochs)
                # As many decays as the trial had; else the nearest count any step size makes.
                nearest = min(abs((final - 1) // size - wanted) for size in range(1, final + 1))
                assert abs(_decays(scaled, final) - wanted) == nearest, (step_size, epochs)
                assert abs(scaled - step_size * final / epochs) <= final / epochs  # still its share
    step = TrainConfig(epochs=4, scheduler="step", scheduler_args={"step_size": 2})
    assert step.with_epochs(1).schedule.step_size == 1  # a 1-epoch run has no room for a decay


def test_a_plateau_schedule_keeps_its_lr_changes_and_patience_share() -> None:
    trace = (0.01,) * 7 + (0.001,) * 6 + (0.0001,) * 7
    plateau = TrainConfig(
        lr=0.01, epochs=20, scheduler="plateau", scheduler_args={"patience": 5}, lr_by_epoch=trace
    )
    final = plateau.with_epochs(90)
    replayed = [final.replayed_lr(epoch) for epoch in range(90)]
    assert [lr for lr, _ in itertools.groupby(replayed)] == [0.01, 0.001, 0.0001]
    assert replayed.index(0.001) / 90 == pytest.approx(7 / 20, abs=1 / 90)  # at the same share
    assert final.schedule.patience == 23  # 22.5, rounded half up
    assert plateau.with_epochs(2).schedule.patience == 1
    assert plateau.with_epochs(1).schedule.patience == 0


@pytest.mark.parametrize(
    ("scheduler", "misspelt"),
    [("onecycle", "pct_strat"), ("plateau", "patiense"), ("plateau", "factr")],
)
def test_a_misspelt_scheduler_argument_is_refused(
    scheduler: str, misspelt: str, hpo_env: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = final_config(tmp_path, {"scheduler": scheduler, "scheduler_args": {misspelt: 1}})
    # `hpo train` through CliRunner in this process (`hpo` is `app()` and nothing more: the
    # same code without a process start of seconds), run from tmp_path as a shell would.
    monkeypatch.chdir(tmp_path)
    runner = CliRunner(env={**{k: None for k in os.environ if k.startswith("HPO_")}, **hpo_env})
    refused = runner.invoke(app, ["train", "--config", str(config), "--dataset", "synthetic"])
    assert refused.exit_code == 2, refused.output
    assert refused.stderr.count("\n") == 1 and misspelt in refused.stderr
    assert "known:" in refused.stderr and not (tmp_path / "runs").exists()
