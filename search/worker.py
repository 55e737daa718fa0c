"""The worker loop: claim a trial from the study's queue, run it, record how it ended."""

from __future__ import annotations

import gc
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import optuna
import torch
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from search import attrs
from search.objective import TrialInterrupted, TrialRunner
from search.optuna_private import has_heartbeat, heartbeat
from search.study import budget, claim_trial, fail_stale_trials

# How often an idle worker looks for new, retried or stale trials.
IDLE_POLL_S = 2.0


@dataclass
class WorkerSummary:
    ran: int = 0
    interrupted: bool = False


def run_worker(
    study: optuna.Study,
    runner: TrialRunner,
    stop: threading.Event,
    on_trial_end: Callable[[FrozenTrial], None] | None = None,
    timeout_s: float | None = None,
) -> WorkerSummary:
    """Run trials until the study's queue is empty and nothing is running, a stop, or timeout.

    A worker with nothing to claim while others still run waits for them: a trial whose
    worker dies is failed by its heartbeat and re-queued, and someone must run the retry.
    Journal storages have no heartbeat, so there a worker with nothing to claim exits.
    """
    summary = WorkerSummary()
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    retries_possible = has_heartbeat(study)
    while not stop.is_set() and (deadline is None or time.monotonic() < deadline):
        # A dead worker's trial is re-queued here, and claimed first, by whoever looks next.
        fail_stale_trials(study)
        trial = claim_trial(study)
        if trial is None:
            state = budget(study)
            # Waiting pays only where a dead worker's trial can come back (heartbeats).
            if state.waiting == 0 and (state.running == 0 or not retries_possible):
                break
            stop.wait(IDLE_POLL_S)
            continue
        finished = run_trial(study, trial, runner)
        summary.ran += 1
        if on_trial_end is not None:
            on_trial_end(finished)
    summary.interrupted = stop.is_set()
    return summary


def run_trial(study: optuna.Study, trial: optuna.Trial, runner: TrialRunner) -> FrozenTrial:
    """Run one claimed trial to a final state; only a bug in this loop escapes."""
    with heartbeat(study, trial):
        try:
            value = runner(trial)
        except optuna.TrialPruned:
            return study.tell(trial, state=TrialState.PRUNED)
        except TrialInterrupted as stop:
            trial.set_user_attr(attrs.FAIL_REASON, f"interrupted: {stop}")
            failed = study.tell(trial, state=TrialState.FAIL)
            requeue(study, failed)
            return failed
        except Exception as err:  # one bad config (OOM, NaN, bug in it) must not stop the worker
            trial.set_user_attr(attrs.FAIL_REASON, f"{type(err).__name__}: {err}"[:500])
            _free_memory()
            return study.tell(trial, state=TrialState.FAIL)
    return study.tell(trial, value)


def requeue(study: optuna.Study, failed: FrozenTrial) -> None:
    """Queue a retry of `failed` with its parameters, checkpoint and reported epochs."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = RetryHeartbeatStaleTrialCallback(inherit_intermediate_values=True)
    retry(study, failed)


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
