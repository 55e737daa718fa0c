"""A trial that does badly is pruned on its validation loss, with the real trainer."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from optuna.trial import TrialState

from data import load_dataset, search_data
from search import attrs
from search.launch import StudyRequest
from search.objective import TrialRunner, WorkerInfo
from search.study import create_or_join, join_as_worker
from search.trainer import DeviceRecipe
from search.worker import run_worker
from storage import open_storage

GOOD = {
    "backbones": 1, "blocks_0": 1, "layers_0": 1, "width_0_1": 8, "kernel_size": 3,
    "dropout": 0.0, "lr": 0.02, "weight_decay": 1e-4, "grad_clip": 0.1, "batch_size": 64,
    "scheduler": "constant",
}  # fmt: skip


# The bad trial fixes lr below the space on purpose.
@pytest.mark.filterwarnings("ignore:Fixed parameter lr")
def test_a_bad_trial_is_pruned_after_its_first_epoch(data_dir: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    storage = open_storage(f"sqlite:///{tmp_path / 'p.db'}")
    request = StudyRequest(
        "p", 0, "", space="tiny", epochs=4, dataset="synthetic", pruner="median", min_epochs=1
    )
    settings, _ = create_or_join(storage, "p", request.new_settings(), 0)
    study = join_as_worker(storage, "p", settings, "test")
    for _ in range(4):
        study.enqueue_trial(GOOD)
    study.enqueue_trial({**GOOD, "lr": 1e-6})  # learns next to nothing
    study.set_user_attr(attrs.TARGET, 5)

    runner = TrialRunner(
        settings,
        search_data(load_dataset("synthetic", data_dir), "cpu"),
        DeviceRecipe.for_device("cpu"),
        WorkerInfo("t", "h", "cpu"),
    )
    run_worker(study, runner, threading.Event())
    trials = study.get_trials()
    assert [t.state for t in trials[:4]] == [TrialState.COMPLETE] * 4
    assert trials[4].state == TrialState.PRUNED
    assert trials[4].last_step == 1
    assert trials[4].intermediate_values[1] > max(t.intermediate_values[1] for t in trials[:4])
