"""The worker loop: claim a trial from the study's queue, run it, record how it ended."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING, NoReturn

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

from search.rules import attrs
from search.rules.faults import (
    MachineFault,
    compile_disk_fault,
    compile_fault_line,
    record_machine_fault,
)
from search.rules.study import StudyView, claim_trial, owes_retry, read_at_boundary
from search.training.memory import device_out_of_memory, memory_note, release_trial_memory
from search.training.stops import TrialInterrupted
from storage import StorageUnavailable, queue_retry
from storage.optuna_private import (
    has_heartbeat,
    heartbeat,
    heartbeat_interval_s,
    mark_stopped,
    sample_relative_params,
)

if TYPE_CHECKING:  # the loop itself needs no torch: only the objective that trains does
    from search.training.objective import TrialRunner

# How often an idle worker looks for new, retried or stale trials.
IDLE_POLL_S = 2.0
# How often a busy worker reads the study's target (two statements) rather than taking the
# one it read before: a raise by `hpo start --trials` reaches its top-ups within this.
TARGET_READ_S = 2.0


@dataclass
class WorkerSummary:
    ran: int = 0
    interrupted: bool = False


def run_worker(
    study: optuna.Study,
    runner: TrialRunner,
    stop: threading.Event,
    on_trial_end: Callable[[FrozenTrial, StudyView], None] | None = None,
    timeout_s: float | None = None,
    say: Callable[[str], None] = print,
) -> WorkerSummary:
    """Run trials until the study's queue is empty and nothing is running, a stop, or timeout.

    A worker with nothing to claim while others still run waits for them: a trial whose
    worker dies is failed by its heartbeat and re-queued, and someone must run the retry.
    Every storage has heartbeats; a study opened without them exits when nothing is left
    to claim. StorageUnavailable (an outage past the retry limit) is raised to the caller.
    Between two trials the study is read once (read_at_boundary): `on_trial_end` gets the
    ended trial and that read, which the next claim uses too.
    """
    summary = WorkerSummary()
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    retries_possible = has_heartbeat(study)
    stale_check, target_check = Every(heartbeat_interval_s(study)), Every(TARGET_READ_S)
    # A dead worker's trial is re-queued here, and claimed first, by whoever looks next.
    view, given_up = read_at_boundary(study, stale_check.due())
    while not stop.is_set() and (deadline is None or time.monotonic() < deadline):
        forget_given_up(runner, given_up, say)
        close_given_up_runs(runner, study, given_up)
        trial = claim_trial(study, view)
        if trial is None and not view.target_read:
            # None to claim under a target read a while ago: a raise may have made more.
            view, given_up = read_at_boundary(study, stale_check.due())
            continue
        if trial is None:
            state = view.budget
            # Waiting pays only where a dead worker's trial can come back (heartbeats).
            if state.waiting == 0 and (state.running == 0 or not retries_possible):
                break
            if stop.wait(IDLE_POLL_S):
                break
            # An idle worker waits for the stale trials: it looks at every turn.
            view, given_up = read_at_boundary(study, fail_stale=True)
            continue
        finished = run_trial(study, trial, runner, say)
        # Out here nothing refers to the trial's frames any more: its memory can go back.
        release_trial_memory()
        if finished is not None and ran_out_of_memory(finished):
            retry_out_of_memory(study, finished, say)
        summary.ran += 1
        target = None if target_check.due() else view.target
        view, given_up = read_at_boundary(study, stale_check.due(), target)
        if on_trial_end is not None and finished is not None:
            on_trial_end(finished, view)
    summary.interrupted = stop.is_set()
    return summary


class Every:
    """Due once per `interval_s` (never where None). The stale check: a trial is stale after
    a grace of more than one heartbeat interval, so a look per trial finds it no sooner, and
    each look reads every running trial. The target: a raise reaches a busy worker's top-ups
    within TARGET_READ_S, and a worker reads it afresh before it decides nothing is left."""

    def __init__(self, interval_s: float | None) -> None:
        self.interval_s = interval_s
        self.last = -float("inf")

    def due(self) -> bool:
        now = time.monotonic()
        if self.interval_s is None or now - self.last < self.interval_s:
            return False
        self.last = now
        return True


def run_trial(
    study: optuna.Study,
    trial: optuna.Trial,
    runner: TrialRunner,
    say: Callable[[str], None] = print,
) -> FrozenTrial | None:
    """Run one claimed trial to a final state; None if another worker took it over.

    Only StorageUnavailable, MachineFault and a bug in this loop escape. After an outage
    longer than the heartbeat grace, another worker may have failed and re-queued this trial:
    its retry resumes from the checkpoint, and this copy is dropped. (A write whose answer
    was lost is settled by the storage, storage/_retry.py: it does not land here.)
    """
    try:
        with heartbeat(study, trial):
            sample_relative_params(study, trial)
            return _run_and_tell(study, trial, runner)
    except UpdateFinishedTrialError:
        say(
            f"trial {trial.number} was failed and re-queued by another worker (its heartbeat "
            "looked stale, as after a long storage outage); dropping this copy"
        )
        return None


def _run_and_tell(study: optuna.Study, trial: optuna.Trial, runner: TrialRunner) -> FrozenTrial:
    try:
        value = runner(trial)
    except StorageUnavailable:
        # A stop too, if the storage is back in time (the policy tries once); else the trial
        # stays RUNNING, goes stale, and is retried as a crash.
        with suppress(Exception):
            stop_trial(study, trial, "storage unreachable past --storage-retry-s")
        raise
    except UpdateFinishedTrialError:
        raise  # not the trial's fault: it stays as it is, for its retry
    except optuna.TrialPruned:
        return _tell(study, trial, state=TrialState.PRUNED)
    except TrialInterrupted as stop:
        return stop_trial(study, trial, str(stop))
    except device_out_of_memory():
        # What the device had, read now; the memory itself is released once this has returned.
        ran_out = trial.user_attrs.get(attrs.OUT_OF_MEMORY, [])
        trial.set_user_attr(attrs.OUT_OF_MEMORY, [*ran_out, trial.number])
        note = memory_note(runner.recipe.device)
        trial.set_user_attr(attrs.FAIL_REASON, f"{attrs.OUT_OF_MEMORY_PREFIX}{note}")
        return _tell(study, trial, state=TrialState.FAIL)
    except Exception as err:  # one bad config (NaN, bug in it) must not stop the worker
        fault = compile_disk_fault(err)
        if fault is not None:
            hand_back(study, trial, compile_fault_line(fault))
        trial.set_user_attr(attrs.FAIL_REASON, f"{type(err).__name__}: {err}"[:500])
        return _tell(study, trial, state=TrialState.FAIL)
    return _tell(study, trial, value)


def hand_back(study: optuna.Study, trial: optuna.Trial, fault: str) -> NoReturn:
    """The machine's fault, which the next trial here would meet too (its disk stays full):
    the trial goes back to the queue as a stop, for a worker whose disk takes it, and this
    one exits, recording why where `hpo status` shows it."""
    record_machine_fault(study, trial.user_attrs.get(attrs.WORKER, "?"), fault)
    stop_trial(study, trial, f"the machine's fault: {fault}")
    raise MachineFault(f"trial {trial.number}: {fault}; handed back, and this worker stops")


def _tell(
    study: optuna.Study,
    trial: optuna.Trial,
    value: float | None = None,
    state: TrialState | None = None,
) -> FrozenTrial:
    """study.tell; UpdateFinishedTrialError when another worker finished the trial first."""
    try:
        return study.tell(trial, value, state=state)
    except ValueError:  # "Cannot tell a FAIL trial", or a value Optuna refuses
        if trial.number in {t.number for t in study.get_trials(states=(TrialState.RUNNING,))}:
            raise
        raise UpdateFinishedTrialError(f"trial {trial.number} was finished elsewhere") from None


def stop_trial(study: optuna.Study, trial: optuna.Trial, why: str) -> FrozenTrial:
    """End a stopped trial FAIL and queue its retry, which resumes from its checkpoint.

    A stop is no failure: it is counted as a stop, which does not use up max_retry. Were
    this worker to die between the FAIL and the retry, fail_stale_trials queues it.
    """
    mark_stopped(trial)
    trial.set_user_attr(attrs.FAIL_REASON, f"{attrs.STOPPED_PREFIX}{why}")
    failed = _tell(study, trial, state=TrialState.FAIL)
    queue_retry(study, failed)
    return failed


def ran_out_of_memory(trial: FrozenTrial) -> bool:
    ran_out = trial.user_attrs.get(attrs.OUT_OF_MEMORY) or []
    return trial.state == TrialState.FAIL and trial.number in ran_out


def retry_out_of_memory(
    study: optuna.Study, failed: FrozenTrial, say: Callable[[str], None]
) -> None:
    """Say so; re-queue the trial once at its parameters, from its checkpoint (memory is back
    now: another process sharing the GPU may have held it), fail it for good if its retry ran
    out of memory too. Were this worker to die before the retry, fail_stale_trials queues it."""
    params = failed.user_attrs.get(attrs.PARAMS)
    batch = (failed.user_attrs.get(attrs.CONFIG) or {}).get("train", {}).get("batch_size")
    size = "before it was built" if params is None else f"{params:,} parameters, batch {batch}"
    retried = owes_retry(failed)
    verdict = "retrying it once" if retried else "failed for good: its retry ran out too"
    had = failed.user_attrs[attrs.FAIL_REASON].removeprefix(attrs.OUT_OF_MEMORY_PREFIX)
    say(f"trial {failed.number} ran out of memory ({size}; {had}); {verdict}")
    if retried:
        queue_retry(study, failed)


def forget_given_up(
    runner: TrialRunner, given_up: list[FrozenTrial], say: Callable[[str], None]
) -> None:
    """Delete the checkpoints of chains the study shows failed for good (crashed past
    max_retry, or out of memory twice): nobody else would."""
    store = getattr(runner, "checkpoints", None)  # any objective will do, one without too
    if store is None:
        return
    for number in store.remove_given_up(given_up):
        say(f"trial {number} failed for good: deleted its chain's checkpoint")


def close_given_up_runs(
    runner: TrialRunner, study: optuna.Study, given_up: list[FrozenTrial]
) -> None:
    """End the tracker runs of chains the study shows failed for good (search/training/
    trackers.py): a dead worker's run would stay running forever."""
    trackers = getattr(runner, "trackers", None)  # any objective will do, one without too
    if trackers:
        trackers.given_up(study, given_up)
