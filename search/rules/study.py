"""Create or join a study, and keep its trial budget.

The budget is a queue of WAITING trials ("tickets"). A worker only runs a trial it claimed
from the queue (claiming is atomic in every Optuna storage). Tickets are ranked by trial
number; only the first N (the target) count, so workers together never run more than N,
and a retry of a crashed trial takes its place instead of adding one. A draw over the
space's cost cap (search/rules/cost.py) is no trial of the budget: it leaves the ranking, and the
next ticket, or a new one, takes its place. The queue is kept TICKET_WINDOW tickets ahead of
the workers rather than filled with all N at once: Optuna re-reads every unfinished trial on
each get_trials, so N waiting tickets would make every claim, pruner call and progress line
cost O(N) (docs/BENCHMARKS.md).

The invariant (tests/test_budget_machine.py checks it after every step):
- A chain is a ticket and its retries; each counts once, as its live member (the one not
  retried; of two retries of one trial, a lost answer's twin, the first). Counted are the
  first N chains by ticket number whose live member is not over the cap; a chain whose
  retry lands over the cap gives up its place, like a fresh over-cap draw. A one-off ticket
  (the report's Table 1 run) is one ticket: a later copy of it (a repeated insert) is none.
- A counted chain is finished when its live member is COMPLETE, PRUNED or FAIL with no
  retry owed (failed for good: its objective raised, or its crashes passed max_retry).
- Every counted ticket ends finished or replaced: a claimed trial either runs to an end or
  goes stale (storage/_retry.py marks a claim whose answer was lost), a stale trial is
  failed and its retry queued (fail_stale_trials, which also queues a retry still owed),
  and an over-cap chain's place passes to the next ticket, topped up while fewer than N
  exist. So the study ends at exactly N finished, and no worker waits for nothing.
"""

from __future__ import annotations

import random
import time
import uuid
import warnings
import zlib
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import optuna
from optuna.exceptions import DuplicatedStudyError
from optuna.trial import FrozenTrial, TrialState

from search.rules import attrs
from search.rules.cost import is_over_cap
from search.rules.settings import METRIC_NAME, StudySettings
from search.rules.space import DEFAULT_SPACE_NAME, report_table1_params
from storage import queue_retry
from storage.optuna_private import (
    TICKET_KEY,
    claim_waiting_trial,
    replaced_number,
    retried_numbers,
    retry_of,
    stale_trial_callback,
    stopped_numbers,
)

if TYPE_CHECKING:
    from storage._heartbeat import RetryCrashedTrial

# Tickets queued ahead of the workers; more than the workers of most studies (8 GPUs x 2).
TICKET_WINDOW = 16
# The TICKET_KEY of a study's first ticket, which names its creator (complete_creation).
FIRST_TICKET = "first-0"
# A joining process waits this long for the creator to finish writing the settings.
SETTINGS_WAIT_S = 60.0


class StudyError(ValueError):
    """A study that does not exist, or cannot be used as asked; the message is one line."""


@dataclass(frozen=True)
class Budget:
    target: int
    finished: int  # complete + pruned + failed for good; over-cap draws are not trials
    running: int
    waiting: int  # not started yet: queued, or not yet made
    given_up: int = 0  # of the finished: failed for good (an error, or too many crashes)

    @property
    def done(self) -> bool:
        return self.finished >= self.target


def check_study_name(name: str) -> str:
    """A study name a user can type back and read in a log: non-empty and printable."""
    if not name.strip() or not name.isprintable():
        raise StudyError(f"study name {name!r}: must be non-empty and printable")
    return name


def create_or_join(
    storage: optuna.storages.BaseStorage, name: str, settings: StudySettings, target: int
) -> tuple[StudySettings, bool]:
    """Create study `name` with `settings` and `target` tickets, or read the existing one's.
    Returns the study's settings, and whether this call's were the ones stored."""
    check_study_name(name)
    try:
        study = optuna.create_study(study_name=name, storage=storage, direction=settings.direction)
    except DuplicatedStudyError:
        return load_settings(storage, name), False
    return complete_creation(study, settings, target, uuid.uuid4().hex)


def complete_creation(
    study: optuna.Study, settings: StudySettings, target: int, token: str
) -> tuple[StudySettings, bool]:
    """Complete a new study as creator `token`.

    A creation whose answer was lost is taken for this one's (storage/_retry.py); where
    another's landed in between, both complete the study, their steps interleaved. So every
    step is one a second creator may repeat: the first ticket is a one-off (one counts), and
    the settings are those proposed by the creator whose first ticket came first (trial
    numbers are the one order every storage keeps): each creator writes the same ones, and
    exactly one is told it created the study. Only that one sets the target: the other is a
    joiner, whose flags are checked before it raises the target (move_target); its tickets
    past the target wait unclaimed.
    """
    name_objective(study)
    study.set_user_attr(
        f"{attrs.PROPOSED_SETTINGS}{token}", settings.to_dict()
    )  # before its ticket
    first = [report_table1_params()] if settings.space_name == DEFAULT_SPACE_NAME else [{}]
    _add_tickets(study, min(target, TICKET_WINDOW), first, creator=token)
    # No ticket at all (a target of 0, made by tests only): this creator's stand.
    winner = _first_creator(study.get_trials(deepcopy=False)) or token
    chosen = StudySettings.from_dict(study.user_attrs[f"{attrs.PROPOSED_SETTINGS}{winner}"])
    if winner == token:  # the target people and scripts read; _target is the largest of it
        study.set_user_attr(attrs.TARGET, target)  # and the raises
        study.set_user_attr(f"{attrs.TARGET_RAISED}{target}", target)
    # Written last: a study with settings is ready for joining workers.
    study.set_user_attr(attrs.SETTINGS, chosen.to_dict())
    return chosen, winner == token


def _first_creator(trials: list[FrozenTrial]) -> str | None:
    """The creator token on the study's first one-off ticket (its later copies are none)."""
    firsts = [t for t in trials if t.user_attrs.get(TICKET_KEY) == FIRST_TICKET]
    return min(firsts, key=lambda t: t.number).user_attrs[attrs.CREATOR] if firsts else None


def name_objective(study: optuna.Study) -> None:
    """Call the objective "validation loss" where the study has no name for it yet (studies
    made before it was named), so the dashboard does not say "Objective 0"."""
    if study.metric_names is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([METRIC_NAME])


def join(
    storage: optuna.storages.BaseStorage,
    name: str,
    sampler: optuna.samplers.BaseSampler | None = None,
    pruner: optuna.pruners.BasePruner | None = None,
) -> optuna.Study:
    check_study_name(name)
    try:
        return optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)
    except KeyError:
        raise StudyError(f"no study named {name!r} in this storage") from None


def join_as_worker(
    storage: optuna.storages.BaseStorage, name: str, settings: StudySettings, worker_name: str
) -> optuna.Study:
    """The study with this worker's own seeded TPE sampler and the study's pruner."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.TPESampler(
            seed=worker_seed(settings.seed, worker_name),
            multivariate=True,
            group=True,
            # Running trials count as bad guesses, so parallel workers spread out.
            constant_liar=True,
        )
    return join(storage, name, sampler=sampler, pruner=settings.build_pruner())


def load_settings(storage: optuna.storages.BaseStorage, name: str) -> StudySettings:
    """The stored settings, waiting briefly for a creator that is still writing them."""
    deadline = time.monotonic() + SETTINGS_WAIT_S
    while True:
        stored = join(storage, name).user_attrs
        if attrs.SETTINGS in stored:
            return StudySettings.from_dict(stored[attrs.SETTINGS])
        if time.monotonic() > deadline:
            raise StudyError(f"study {name!r} was not created by hpo (it has no stored settings)")
        time.sleep(0.5)


@dataclass(frozen=True)
class StudyView:
    """The study as read once: its target and its trials. Optuna's cache keeps the finished
    trials, so a read fetches only the unfinished ones, with their params and attributes; a
    worker reads one view per trial boundary and takes the owed retries, the claim and the
    budget and best-trial lines from it (docs/BENCHMARKS.md, "Exactly N at bare Optuna's
    speed")."""

    target: int
    trials: list[FrozenTrial]
    target_read: bool = True  # False: the target as read at an earlier boundary

    @cached_property
    def budget(self) -> Budget:
        counted = _counted(self.trials, self.target)
        finished = sum(t.state.is_finished() for t in counted)
        running = sum(t.state == TrialState.RUNNING for t in counted)
        given_up = sum(t.state == TrialState.FAIL for t in counted)
        return Budget(self.target, finished, running, self.target - finished - running, given_up)


def read_study(study: optuna.Study, target: int | None = None) -> StudyView:
    """The study's view; `target`: its target as read before, taken instead of a read."""
    trials = study.get_trials(deepcopy=False)
    if target is None:
        return StudyView(_target(study), trials)
    return StudyView(target, trials, target_read=False)


def budget(study: optuna.Study) -> Budget:
    return read_study(study).budget


def move_target(study: optuna.Study, target: int) -> Budget:
    """Raise the study's target to `target` trials; a target is never lowered.

    Each raise writes its own attribute, and the target is the largest: two raises at once
    cannot undo each other, and a raise repeated after a lost answer writes the same value.
    """
    current = _target(study)
    if target < current:
        raise StudyError(
            f"--trials {target} is below the study's target {current}; "
            "a search is extended, never shortened"
        )
    if target > current:
        study.set_user_attr(f"{attrs.TARGET_RAISED}{target}", target)  # claims add tickets
    return budget(study)


def claim_trial(study: optuna.Study, view: StudyView | None = None) -> optuna.Trial | None:
    """Atomically take one WAITING ticket, retries first; None when none is left to start.
    From `view` where given (a worker's read of this trial boundary), else read now."""
    if view is None:
        view = read_study(study)
    added = _top_up(study, view.trials, view.target)
    trial = _claim_first(study, view)
    # The tickets a top-up adds rank behind those queued: the study is read again for them
    # only where the others' tickets were all taken.
    if trial is None and added:
        trial = _claim_first(study, StudyView(view.target, study.get_trials(deepcopy=False)))
    return trial


def _claim_first(study: optuna.Study, view: StudyView) -> optuna.Trial | None:
    """Claim the first ticket of the view's queue that no one else takes first."""
    queue = _queue(view)
    while queue:
        # The sampler starts the trial from the view, read just now, not from a read of its own.
        trial = claim_waiting_trial(study, queue.pop(0), view.trials)
        if trial is not None:
            return trial
        # Another worker took it, as the others of a fleet, trying the same order, will take
        # the next: the rest in random order spreads them over the queue, where they queued
        # behind one row lock after another (docs/BENCHMARKS.md, "A fleet on one database").
        random.shuffle(queue)
        queue.sort(key=lambda trial: not _is_retry(trial))
    return None


def _queue(view: StudyView) -> list[FrozenTrial]:
    """The WAITING tickets of the budget, retries first: a retry resumes from a checkpoint."""
    queue = [t for t in _counted(view.trials, view.target) if t.state == TrialState.WAITING]
    queue.sort(key=lambda trial: not _is_retry(trial))
    return queue


def _top_up(study: optuna.Study, trials: list[FrozenTrial], target: int) -> int:
    """Keep TICKET_WINDOW tickets queued until the target's worth exist; returns how many
    it added.

    Workers topping up at once may make a few too many: those rank past the target, are
    never claimed or counted, and wait in case the target is raised.
    """
    fresh = _tickets(trials)
    queued = sum(t.state == TrialState.WAITING for t in fresh)
    count = max(0, min(TICKET_WINDOW - queued, target - len(fresh)))
    _add_tickets(study, count, [])
    return count


def _add_tickets(
    study: optuna.Study, count: int, first: list[dict], creator: str | None = None
) -> None:
    """`count` tickets, the first ones with these parameters. Those are one-off tickets
    (TICKET_KEY), marked with their `creator`: an insert repeated after a lost answer adds no
    second copy, and a copy that a storage made anyway (redis-py repeats a command itself, or
    a second creator raced this one) is no ticket (_tickets). The others are bare WAITING
    trials: enqueue_trial({}) would also write an empty `fixed_params` attribute, two more
    statements under the study row's lock, which every worker's top-up takes."""
    for i in range(count):
        if i < len(first):
            one_off = {TICKET_KEY: f"first-{i}", **({attrs.CREATOR: creator} if creator else {})}
            study.enqueue_trial(first[i], user_attrs=one_off, skip_if_exists=False)
        else:
            study.add_trial(optuna.trial.create_trial(state=TrialState.WAITING))


def _counted(trials: list[FrozenTrial], target: int) -> list[FrozenTrial]:
    """The trials that fill the budget: each chain's live member, for the first `target`
    tickets (the invariant in this module's docstring)."""
    dropped = retried_numbers(trials) | _twins(trials)
    in_budget = {t.number for t in _tickets(trials)[:target]}
    return [
        t
        for t in trials
        if t.number not in dropped
        and not is_over_cap(t)
        and (retry_of(t) if _is_retry(t) else t.number) in in_budget
    ]


def _tickets(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """Fresh trials that hold a place in the budget, by number: not a retry, not an over-cap
    draw, and no retry of theirs over the cap (a retry copies its original's draw)."""
    over_cap_chains = {retry_of(t) for t in trials if _is_retry(t) and is_over_cap(t)}
    fresh = sorted(filter(lambda t: not _is_retry(t), trials), key=lambda t: t.number)
    copies = _copies(fresh)
    return [
        t
        for t in fresh
        if not is_over_cap(t) and t.number not in over_cap_chains and t.number not in copies
    ]


def _copies(fresh: list[FrozenTrial]) -> set[int]:
    """Later copies of a one-off ticket (TICKET_KEY), fresh trials taken by number."""
    seen: set[str] = set()
    copies: set[int] = set()
    for trial in fresh:
        key = trial.user_attrs.get(TICKET_KEY)
        if key in seen:
            copies.add(trial.number)
        elif key is not None:
            seen.add(key)
    return copies


def _twins(trials: list[FrozenTrial]) -> set[int]:
    """Retries of a trial that already had one (two workers queued it at once): never run."""
    replaced: set[int] = set()
    twins: set[int] = set()
    for trial in sorted(filter(_is_retry, trials), key=lambda t: t.number):
        number = replaced_number(trial)
        if number in replaced:
            twins.add(trial.number)
        replaced.add(number)
    return twins


def _is_retry(trial: FrozenTrial) -> bool:
    return retry_of(trial) is not None


def _target(study: optuna.Study) -> int:
    """The largest target written: the creator's, or a raise's (move_target)."""
    stored = study.user_attrs
    raised = [value for key, value in stored.items() if key.startswith(attrs.TARGET_RAISED)]
    return int(max([stored.get(attrs.TARGET, 0), *raised]))


def fail_stale_trials(study: optuna.Study) -> list[FrozenTrial]:
    """Fail (and so retry) trials whose worker stopped sending heartbeats, then queue any
    retry still owed (a worker died, or lost its storage, between a FAIL and its retry).
    Returns the failed trials owed no retry (queue_owed_retries)."""
    return read_at_boundary(study, fail_stale=True)[1]


def read_at_boundary(
    study: optuna.Study, fail_stale: bool, target: int | None = None
) -> tuple[StudyView, list[FrozenTrial]]:
    """A worker's one read of the study between two trials: the stale trials failed first
    (where `fail_stale`), then the view, with every retry owed queued (read again only where
    one was). `target`: the target as the worker read it before, taken instead of a read (a
    target is only ever raised: an older one shows fewer tickets, never more). Returns the
    view and the failed trials owed no retry (queue_owed_retries)."""
    if fail_stale:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
    view = read_study(study, target)
    queued, given_up = _queue_owed_retries(study, view.trials)
    return (read_study(study, target) if queued else view), given_up


def queue_owed_retries(study: optuna.Study) -> list[FrozenTrial]:
    """Queue every retry owed (owes_retry) that is not queued yet. Returns the failed trials
    that no trial retries and none is owed: their chains have failed for good."""
    return _queue_owed_retries(study, study.get_trials(deepcopy=False))[1]


def _queue_owed_retries(
    study: optuna.Study, trials: list[FrozenTrial]
) -> tuple[int, list[FrozenTrial]]:
    """queue_owed_retries on these trials; also returns how many retries it queued."""
    retried = retried_numbers(trials)
    callback = stale_trial_callback(study)
    queued, given_up = 0, []
    for trial in trials:
        if trial.state != TrialState.FAIL or trial.number in retried:
            continue
        if owes_retry(trial, callback):
            queue_retry(study, trial)
            queued += 1
        else:
            given_up.append(trial)
    return queued, given_up


def owes_retry(trial: FrozenTrial, crash_policy: RetryCrashedTrial | None = None) -> bool:
    """Whether a failed trial is owed a retry: a stop is; a first run out of memory is (the
    memory may be back); a crash is while `crash_policy` (the storage's stale-trial callback;
    none without heartbeats) allows; a failure of its own objective is not. A retry inherits
    its original's fail_reason until it runs (the objective clears it): a stop or an
    out-of-memory reason is the trial's own only where the chain's record of those lists
    the trial."""
    if trial.number in stopped_numbers(trial):
        return True
    ran_out = trial.user_attrs.get(attrs.OUT_OF_MEMORY) or []
    if trial.number in ran_out:
        return len(ran_out) == 1
    reason = trial.user_attrs.get(attrs.FAIL_REASON)
    crashed = reason is None or reason.startswith(
        (attrs.STOPPED_PREFIX, attrs.OUT_OF_MEMORY_PREFIX)
    )
    return crashed and crash_policy is not None and crash_policy.owes_retry(trial)


def worker_seed(study_seed: int, worker_name: str) -> int:
    """Distinct, reproducible sampler seeds per worker, so no two replay the same proposals."""
    return (study_seed * 1_000_003 + zlib.crc32(worker_name.encode())) % 2**32
