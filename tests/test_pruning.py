"""A trial that does badly is pruned on its validation loss, with the real trainer."""

from __future__ import annotations

import threading
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

from data.dataset import load_dataset
from data.loader import search_data
from search.commands.launch import StudyRequest
from search.rules import attrs
from search.rules.pruners import build_pruner, next_rung
from search.rules.study import create_or_join, join_as_worker
from search.training.objective import TrialRunner, WorkerInfo
from search.training.trainer import DeviceRecipe
from search.training.worker import run_worker, stop_trial
from storage import open_storage

# A tiny-space trial that learns, every parameter fixed: a lever left to the sampler could
# draw SGD, whose own sgd_lr would then stand in for the bad trial's lr (test_trackers met
# that once in a few runs, its workers' samplers seeded by their pids).
GOOD = {
    "backbones": 1, "blocks_0": 1, "layers_0": 1, "width_0_1": 8, "kernel_size": 3,
    "dropout": 0.0, "lr": 0.02, "weight_decay": 1e-4, "grad_clip": 0.1, "batch_size": 64,
    "scheduler": "constant", "optimizer": "adamw", "weight_averaging": False, "cutout": False,
    "mix": "none", "tta": "none", "label_smoothing": 0.0,
}  # fmt: skip


# The bad trial fixes lr below the space on purpose.
@pytest.mark.slow
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


def _prune_steps(name: str, epochs: int, min_epochs: int) -> set[int]:
    """Steps at which the real pruner stops a trial that is worse than every other at each
    epoch: 12 good trials complete first, then 6 bad ones report every epoch and ask at each
    (Hyperband puts trials in brackets by number; several bad ones reach each bracket)."""
    study = optuna.create_study(
        study_name=f"rungs-{name}-{min_epochs}", pruner=build_pruner(name, epochs, min_epochs)
    )
    for good in range(12):
        trial = study.ask()
        for step in range(1, epochs + 1):
            trial.report(1.0 + good / 100, step)
            trial.should_prune()  # Hyperband records the rungs a trial completes
        study.tell(trial, 1.0 + good / 100)
    steps = set()
    for _ in range(6):
        trial = study.ask()
        for step in range(1, epochs + 1):
            trial.report(10.0, step)
            if trial.should_prune():
                steps.add(step)
        study.tell(trial, state=TrialState.PRUNED)
    return steps


@pytest.mark.parametrize("name", ["median", "hyperband"])
@pytest.mark.parametrize("min_epochs", [1, 3, 5])
def test_no_trial_is_pruned_before_min_epochs(name: str, min_epochs: int) -> None:
    epochs = 3 * min_epochs + 1
    steps = _prune_steps(name, epochs, min_epochs)
    assert min(steps) == min_epochs  # judged at --min-epochs, never before
    # next_rung names each epoch the pruner judges: from the one before it, it is the next.
    assert all(next_rung(name, step - 1, epochs, min_epochs) == step for step in steps)
    rungs = {next_rung(name, 0, epochs, min_epochs)}
    while max(rungs) < epochs:
        rungs.add(next_rung(name, max(rungs), epochs, min_epochs))
    assert steps <= rungs and min(rungs) == min_epochs


def test_no_pruner_never_prunes() -> None:
    assert _prune_steps("none", 6, 3) == set()
    assert next_rung("none", 0, 6, 3) == 6


# Hyperband from epoch 3 of 8 is one bracket judging at epoch 3. Validation loss at every epoch
# of six chains run one after another: four middling, then a good one, then a fair one that
# is second of six at epoch 3 (kept: a third of six go on), third of seven were the good one
# there twice (pruned).
CHAINS = [[0.5] * 8] * 4 + [[0.1] * 8, [0.2] * 8]


def _hyperband_outcomes(stop: tuple[int, int] | None) -> list[TrialState]:
    """How each chain of CHAINS ends under the study's Hyperband, run as the worker runs a
    trial (report, then prune or stop); stop (chain, epoch): that chain is stopped after that
    epoch (SIGTERM) and its retry, which inherits its reports, goes on."""
    study = optuna.create_study(pruner=build_pruner("hyperband", 8, 3))
    outcomes = []
    for chain, losses in enumerate(CHAINS):
        trial = study.ask()
        for epoch, loss in enumerate(losses, 1):
            trial.report(loss, epoch)
            if (chain, epoch) == stop:
                stop_trial(study, trial, "SIGTERM")
                trial = study.ask()  # the retry, resumed after this epoch
            elif trial.should_prune():
                outcomes.append(study.tell(trial, state=TrialState.PRUNED).state)
                break
        else:
            outcomes.append(study.tell(trial, losses[-1]).state)
    return outcomes


def test_a_stopped_chain_competes_once_at_each_rung() -> None:
    uninterrupted = _hyperband_outcomes(stop=None)
    assert uninterrupted == [TrialState.COMPLETE] * 6
    # Stopped after the rung it passed, its retry carries the rung's record.
    assert _hyperband_outcomes(stop=(4, 5)) == uninterrupted
