"""Checkpoints: one artifact per trial, rewritten in place, inherited by a retry."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import threading
import time
from contextlib import suppress
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState

from data.dataset import load_dataset
from data.loader import search_data
from search.rules.settings import StudySettings
from search.training import objective
from search.training.checkpoints import CheckpointStore, to_host
from search.training.objective import TrialInterrupted, TrialRunner, WorkerInfo
from search.training.trainer import DeviceRecipe, DivergedError
from storage import open_storage, queue_retry


def test_one_artifact_per_trial_and_a_retry_resumes_from_it(tmp_path: Path) -> None:
    study = optuna.create_study(storage=open_storage(f"sqlite:///{tmp_path / 'c.db'}"))
    store = CheckpointStore(tmp_path / "artifacts")
    trial = study.ask()
    for epoch in (1, 2, 3):
        store.save(trial, {"epoch": epoch, "weights": torch.full((3,), float(epoch))})
    files = [p for p in (tmp_path / "artifacts").iterdir() if p.is_file()]
    assert len(files) == 1  # rewritten, not piled up
    listed = [k for k in study.trials[0].system_attrs if k.startswith("artifacts:")]
    assert len(listed) == 1  # the dashboard lists one live checkpoint

    failed = study.tell(trial, state=optuna.trial.TrialState.FAIL)
    queue_retry(study, failed)
    retry = study.ask()
    state = store.load(retry)
    assert state["epoch"] == 3 and torch.equal(state["weights"], torch.full((3,), 3.0))
    store.save(retry, {"epoch": 4})
    assert retry.user_attrs["checkpoint"]["owner"] == retry.number
    assert store.load(retry)["epoch"] == 4
    # The failed trial's file went with the retry's first own checkpoint: one per chain.
    assert store.load(study.trials[0]) is None and len(checkpoint_files(tmp_path)) == 1


def test_a_checkpoint_from_another_machine_means_starting_over(tmp_path: Path) -> None:
    study = optuna.create_study()
    trial = study.ask()
    CheckpointStore(tmp_path / "machine-a").save(trial, {"epoch": 1})
    assert CheckpointStore(tmp_path / "machine-b").load(trial) is None


def test_a_retry_chain_that_ends_leaves_no_checkpoint_but_a_complete_trials(
    tmp_path: Path,
) -> None:
    study = optuna.create_study(storage=open_storage(f"sqlite:///{tmp_path / 'c.db'}"))
    store = CheckpointStore(tmp_path / "artifacts")
    checkpointed_then_failed(study, store, epoch=2)
    retry = study.ask()
    inherited = retry.user_attrs["checkpoint"]["artifact_id"]
    store.save(retry, {"epoch": 3})  # its own: nothing resumes from the crashed trial's now
    own = retry.user_attrs["checkpoint"]["artifact_id"]
    assert [p.name for p in checkpoint_files(tmp_path)] == [own]
    store.discard(retry)
    study.tell(retry, state=TrialState.PRUNED)
    assert checkpoint_files(tmp_path) == []
    pruned = study.trials[retry.number]
    assert pruned.user_attrs["checkpoint"] is None
    # The dashboard's own deletion mark: a listing set to null is not shown.
    assert json.loads(pruned.system_attrs[f"artifacts:{own}"]) is None
    assert json.loads(pruned.system_attrs[f"artifacts:{inherited}"]) is None

    # A retry that ends before its own first save takes the inherited file with it.
    checkpointed_then_failed(study, store, epoch=1)
    retry = study.ask()
    store.discard(retry)
    study.tell(retry, state=TrialState.FAIL)
    assert checkpoint_files(tmp_path) == []


def test_a_chain_failed_for_good_leaves_no_file_a_kill_cut_loose(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker killed between its retry's new record and its removal of the inherited file
    left that file named by no record; the chain's end removes it all the same (each file
    the chain still lists goes)."""
    study = optuna.create_study(storage=open_storage(f"sqlite:///{tmp_path / 'c.db'}"))
    store = CheckpointStore(tmp_path / "artifacts")
    checkpointed_then_failed(study, store, epoch=1)
    retry = study.ask()
    with monkeypatch.context() as killed:  # the kill: nothing after the new record runs
        killed.setattr(store, "_remove", lambda *args: None)
        store.save(retry, {"epoch": 2})
    assert len(checkpoint_files(tmp_path)) == 2
    last = study.tell(retry, state=TrialState.FAIL)  # failed for good, say
    deleted = store.remove_given_up([last])
    assert deleted == [last.number] and checkpoint_files(tmp_path) == []


def test_a_taken_over_copy_neither_deletes_nor_rewrites_the_chains_checkpoint(
    tmp_path: Path,
) -> None:
    # Worker X's trial went stale (a long outage, a paused VM); another worker failed it and
    # queued its retry, which inherits the record of X's file.
    study = optuna.create_study(storage=open_storage(f"sqlite:///{tmp_path / 'c.db'}"))
    store = CheckpointStore(tmp_path / "artifacts")
    late = checkpointed_then_failed(study, store, epoch=2)
    # X's copy (RUNNING, as it knows it) then fails, a CUDA error say, and discards its file.
    with pytest.raises(UpdateFinishedTrialError):
        store.discard(late)
    retry = study.ask()
    assert store.load(retry)["epoch"] == 2  # the retry resumes where X's copy left it
    store.save(retry, {"epoch": 3})  # its own: the inherited file goes
    # X's late checkpoint write does not bring the removed file back.
    with pytest.raises(UpdateFinishedTrialError):
        store.save(late, {"epoch": 3})
    assert [p.name for p in checkpoint_files(tmp_path)] == [
        retry.user_attrs["checkpoint"]["artifact_id"]
    ]


def checkpointed_then_failed(study: optuna.Study, store: CheckpointStore, epoch: int) -> Any:
    """A trial that checkpointed `epoch`, then failed as a crash does, its retry queued; the
    Trial as its worker holds it (RUNNING, as far as that worker knows)."""
    trial = study.ask()
    store.save(trial, {"epoch": epoch})
    queue_retry(study, study.tell(trial, state=TrialState.FAIL))
    return trial


def checkpoint_files(tmp_path: Path) -> list[Path]:
    return [p for p in (tmp_path / "artifacts").iterdir() if p.is_file()]


class RecordingStore(CheckpointStore):
    """The real store, noting the epoch of every checkpoint it writes."""

    def __init__(self, directory: Path):
        super().__init__(directory)
        self.epochs: list[int] = []

    def save(self, trial: optuna.Trial, state: dict[str, Any], *args: Any) -> None:
        super().save(trial, state, *args)
        self.epochs.append(state["epoch"])


def run_one_trial(
    tmp_path: Path, data_dir: Path, interval_s: int, stop_after: int = 0, trial: Any = None
) -> Any:
    """A 3-epoch tiny trial through the objective; `stop_after` N: a stop after epoch N."""
    settings = StudySettings.for_space(
        "tiny", epochs=3, dataset="synthetic", pruner="none", checkpoint_interval_s=interval_s
    )
    stop = threading.Event()
    recipe = DeviceRecipe.for_device("cpu")
    runner = TrialRunner(
        settings=settings,
        data=search_data(load_dataset("synthetic", data_dir), recipe.device),
        recipe=recipe,
        worker=WorkerInfo("test", "host", "cpu"),
        checkpoints=RecordingStore(tmp_path / "artifacts"),
        on_epoch=lambda _, stats: stop.set() if stats.epoch == stop_after else None,
        stop=stop,
    )
    trial = trial or optuna.create_study().ask()
    with suppress(TrialInterrupted):
        trial.set_user_attr("value", runner(trial))
    return runner.checkpoints.epochs, trial


@pytest.mark.parametrize(
    ("interval_s", "stop_after", "written"),
    [(3600, 0, [3]), (0, 0, [1, 2, 3]), (3600, 1, [1]), (3600, 3, [3])],
    ids=["interval-then-last-epoch", "every-epoch", "on-stop", "stop-in-last-epoch"],
)
@pytest.mark.slow
def test_a_trial_checkpoints_once_per_interval_and_at_its_last_epoch_or_stop(
    tmp_path: Path, data_dir: Path, interval_s: int, stop_after: int, written: list[int]
) -> None:
    epochs, trial = run_one_trial(tmp_path, data_dir, interval_s, stop_after)
    assert epochs == written
    # Written (and recorded) before the objective returned: the trial may be told now.
    assert trial.user_attrs["checkpoint"]["epoch"] == written[-1]
    phases = trial.user_attrs["seconds"]
    assert phases["train"] > 0 and phases["checkpoint"] > 0
    # Stopped before its last epoch it is interrupted (and re-queued); during it, it completes.
    assert ("value" in trial.user_attrs) == (stop_after in (0, 3))


class Tripwire(dict):
    """A user attr that notes which threads deep-copy the trial's attrs, and makes the
    checkpoint thread's copy slow: wide open for a key added meanwhile, if one can be."""

    def __deepcopy__(self, memo: dict) -> dict:
        if threading.current_thread().name == "checkpoint":
            time.sleep(0.5)
        return dict(self)


@pytest.mark.slow
def test_the_checkpoint_thread_and_the_training_thread_take_turns_on_the_attrs(
    tmp_path: Path, data_dir: Path
) -> None:
    # Every epoch is checkpointed while the training thread reports it and adds attrs.
    trial = optuna.create_study().ask()
    trial.set_user_attr("tripwire", Tripwire(armed=True))
    epochs, trial = run_one_trial(tmp_path, data_dir, interval_s=0, trial=trial)
    assert epochs == [1, 2, 3] and "value" in trial.user_attrs


def test_the_host_copy_shares_nothing_with_the_training_state() -> None:
    weights = torch.zeros(3)
    history = [{"epoch": 1}]
    state = {"model": {"w": weights}, "history": history, "rng": (torch.ones(2),)}
    copy = to_host(state)
    weights += 1  # the next optimizer step, in place
    history.append({"epoch": 2})
    assert torch.equal(copy["model"]["w"], torch.zeros(3))
    assert copy["history"] == [{"epoch": 1}] and isinstance(copy["rng"], tuple)


@pytest.mark.slow
def test_a_nan_last_validation_loss_fails_the_trial_and_discards_its_checkpoint(
    tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Told as its value, Optuna would fail the trial with no reason: a crash, retried.
    record = objective.epoch_record
    monkeypatch.setattr(
        objective,
        "epoch_record",
        lambda stats, calibrated: (
            {**record(stats, calibrated), "val_loss": math.nan}
            if stats.epoch == 3
            else record(stats, calibrated)
        ),
    )
    study = optuna.create_study(storage=open_storage(f"sqlite:///{tmp_path / 'c.db'}"))
    with pytest.raises(DivergedError, match="validation loss is nan after the last epoch"):
        run_one_trial(tmp_path, data_dir, interval_s=0, trial=study.ask())
    assert checkpoint_files(tmp_path) == []


SCRATCH_THEN = """
import os, sys, time
from pathlib import Path
from search.training.checkpoints import owned_scratch
with owned_scratch(Path(sys.argv[1])) as scratch:
    (scratch / "trial-0-checkpoint.pt").write_bytes(b"PK half a checkpoint")
    print(scratch, flush=True)
    {then}
"""


def scratch_of_a_process(directory: Path, then: str) -> tuple[subprocess.Popen, Path]:
    """A real process that starts a checkpoint write in `directory`, then runs `then`."""
    process = subprocess.Popen(
        [sys.executable, "-c", SCRATCH_THEN.format(then=then), str(directory)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    return process, Path(process.stdout.readline().strip())


@pytest.mark.slow
def test_a_write_killed_midway_leaves_no_scratch_past_the_next_start(tmp_path: Path) -> None:
    directory = tmp_path / "artifacts"
    directory.mkdir()
    killed, left = scratch_of_a_process(directory, "os.kill(os.getpid(), 9)")
    assert killed.wait(timeout=60) == -signal.SIGKILL and left.is_dir()
    alive, in_flight = scratch_of_a_process(directory, "time.sleep(600)")
    try:
        CheckpointStore(directory)  # the next worker's start on this host
        assert not left.exists()  # its process is gone: nobody finishes that write
        assert in_flight.is_dir()  # another live worker's write in flight is left alone
    finally:
        alive.kill()
        alive.wait()
    CheckpointStore(directory)
    assert list(directory.iterdir()) == []


@pytest.mark.parametrize("keep", [0.5, 10], ids=["half", "ten-bytes"])
def test_a_truncated_checkpoint_is_refused_as_damaged(tmp_path: Path, keep: float) -> None:
    """A file cut short (a full disk, a copy interrupted) reads as damaged, not as a file
    refused for what it would run."""
    study = optuna.create_study(storage=open_storage(f"sqlite:///{tmp_path / 'c.db'}"))
    said: list[str] = []
    store = CheckpointStore(tmp_path / "artifacts", say=said.append)
    trial = study.ask()
    store.save(trial, {"epoch": 1, "weights": torch.zeros(1000)})
    [path] = checkpoint_files(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep) if keep < 1 else int(keep)])
    queue_retry(study, study.tell(trial, state=TrialState.FAIL))
    assert store.load(study.ask()) is None
    assert len(said) == 1 and "damaged or truncated" in said[0], said
