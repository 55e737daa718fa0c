"""Checkpoints: one artifact per trial, rewritten in place, inherited by a retry."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import torch
from optuna.trial import TrialState

from search.checkpoints import CheckpointStore
from search.worker import requeue
from storage import open_storage


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
    requeue(study, failed)
    retry = study.ask()
    state = store.load(retry)
    assert state["epoch"] == 3 and torch.equal(state["weights"], torch.full((3,), 3.0))
    store.save(retry, {"epoch": 4})
    assert retry.user_attrs["checkpoint"]["owner"] == retry.number
    assert store.load(retry)["epoch"] == 4
    assert store.load(study.trials[0])["epoch"] == 3  # the failed trial's file is kept


def test_a_checkpoint_from_another_machine_means_starting_over(tmp_path: Path) -> None:
    study = optuna.create_study()
    trial = study.ask()
    CheckpointStore(tmp_path / "machine-a").save(trial, {"epoch": 1})
    assert CheckpointStore(tmp_path / "machine-b").load(trial) is None


def test_a_pruned_trial_drops_its_checkpoint_but_not_an_inherited_one(tmp_path: Path) -> None:
    study = optuna.create_study(storage=open_storage(f"sqlite:///{tmp_path / 'c.db'}"))
    store = CheckpointStore(tmp_path / "artifacts")
    crashed = study.ask()
    store.save(crashed, {"epoch": 2})
    requeue(study, study.tell(crashed, state=TrialState.FAIL))
    retry = study.ask()
    inherited = retry.user_attrs["checkpoint"]["artifact_id"]
    store.discard(retry)  # failed before its own first save: the file is the crashed trial's
    assert store.load(retry)["epoch"] == 2

    store.save(retry, {"epoch": 3})
    own = retry.user_attrs["checkpoint"]["artifact_id"]
    store.discard(retry)
    study.tell(retry, state=TrialState.PRUNED)
    assert [p.name for p in checkpoint_files(tmp_path)] == [inherited]
    pruned = study.trials[retry.number]
    assert pruned.user_attrs["checkpoint"] is None
    # The dashboard's own deletion mark: a listing set to null is not shown.
    assert json.loads(pruned.system_attrs[f"artifacts:{own}"]) is None


def checkpoint_files(tmp_path: Path) -> list[Path]:
    return [p for p in (tmp_path / "artifacts").iterdir() if p.is_file()]
