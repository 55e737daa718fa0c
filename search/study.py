"""Create or join a study, and keep its trial budget.

The budget is a queue of WAITING trials ("tickets"): a study with target N holds N trials
that are not retries of a failed one. A worker only runs a trial it claimed from the queue
(claiming is atomic in every Optuna storage), so workers together never run more than N,
and a retry of a crashed trial takes its place in the queue instead of adding one.
"""

from __future__ import annotations

import time
import warnings
import zlib
from dataclasses import dataclass

import optuna
from optuna.exceptions import DuplicatedStudyError, UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

from search.dashboard import write_study_note
from search.settings import SETTINGS_ATTR, StudySettings
from search.space import report_table1_params

TARGET_ATTR = "hpo:target"
# A joining process waits this long for the creator to finish writing the settings.
SETTINGS_WAIT_S = 60.0


class StudyError(ValueError):
    """A study that does not exist, or cannot be used as asked; the message is one line."""


@dataclass(frozen=True)
class Budget:
    target: int
    finished: int  # complete + pruned + failed and not retried
    running: int
    waiting: int

    @property
    def done(self) -> bool:
        return self.finished >= self.target


def create_or_join(
    storage: optuna.storages.BaseStorage, name: str, settings: StudySettings, target: int
) -> tuple[StudySettings, bool]:
    """Create study `name` with `settings` and `target` tickets, or read the existing one's."""
    try:
        study = optuna.create_study(study_name=name, storage=storage, direction=settings.direction)
    except DuplicatedStudyError:
        return load_settings(storage, name), False
    study.set_user_attr(TARGET_ATTR, target)
    first = [report_table1_params()] if settings.space_name == "default" else []
    _add_tickets(study, target, first)
    write_study_note(study, settings, target)
    # Written last: a study with settings is ready for joining workers.
    study.set_user_attr(SETTINGS_ATTR, settings.to_dict())
    return settings, True


def join(
    storage: optuna.storages.BaseStorage,
    name: str,
    sampler: optuna.samplers.BaseSampler | None = None,
    pruner: optuna.pruners.BasePruner | None = None,
) -> optuna.Study:
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
    return join(
        storage, name, sampler=sampler, pruner=build_pruner(settings.pruner, settings.epochs)
    )


def build_pruner(name: str, epochs: int) -> optuna.pruners.BasePruner:
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=epochs)
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=1)
    return optuna.pruners.NopPruner()


def load_settings(storage: optuna.storages.BaseStorage, name: str) -> StudySettings:
    """The stored settings, waiting briefly for a creator that is still writing them."""
    deadline = time.monotonic() + SETTINGS_WAIT_S
    while True:
        attrs = join(storage, name).user_attrs
        if SETTINGS_ATTR in attrs:
            return StudySettings.from_dict(attrs[SETTINGS_ATTR])
        if time.monotonic() > deadline:
            raise StudyError(f"study {name!r} was not created by hpo (it has no stored settings)")
        time.sleep(0.5)


def study_names(storage: optuna.storages.BaseStorage) -> list[str]:
    return [summary.study_name for summary in optuna.get_all_study_summaries(storage)]


def budget(study: optuna.Study) -> Budget:
    trials = study.get_trials(deepcopy=False)
    retried = _retried_numbers(trials)
    counted = [t for t in trials if t.number not in retried]
    return Budget(
        target=int(study.user_attrs.get(TARGET_ATTR, 0)),
        finished=sum(t.state.is_finished() for t in counted),
        running=sum(t.state == TrialState.RUNNING for t in counted),
        waiting=sum(t.state == TrialState.WAITING for t in counted),
    )


def move_target(study: optuna.Study, target: int) -> Budget:
    """Raise the study's target to `target` trials; a target is never lowered."""
    current = budget(study)
    if target < current.target:
        raise StudyError(
            f"--trials {target} is below the study's target {current.target}; "
            "a search is extended, never shortened"
        )
    if target > current.target:
        study.set_user_attr(TARGET_ATTR, target)
        _add_tickets(study, target - current.target, [])
    return budget(study)


def _add_tickets(study: optuna.Study, count: int, first: list[dict]) -> None:
    for i in range(count):
        params = first[i] if i < len(first) else {}
        study.enqueue_trial(params, skip_if_exists=False)


def claim_trial(study: optuna.Study) -> optuna.Trial | None:
    """Atomically take one WAITING trial, retries first; None when the queue is empty."""
    queue = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    # A retry resumes from a checkpoint: run it before fresh trials.
    queue.sort(key=lambda trial: "failed_trial" not in trial.system_attrs)
    for waiting in queue:
        try:
            # False when another worker claimed it first (the storage compares and sets).
            if study._storage.set_trial_state_values(waiting._trial_id, TrialState.RUNNING):
                return optuna.Trial(study, waiting._trial_id)
        except UpdateFinishedTrialError:
            continue
    return None


def fail_stale_trials(study: optuna.Study) -> None:
    """Fail (and so retry) trials whose worker stopped sending heartbeats."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def worker_seed(study_seed: int, worker_name: str) -> int:
    """Distinct, reproducible sampler seeds per worker, so no two replay the same proposals."""
    return (study_seed * 1_000_003 + zlib.crc32(worker_name.encode())) % 2**32


def _retried_numbers(trials: list[FrozenTrial]) -> set[int]:
    retried: set[int] = set()
    for trial in trials:
        retried.update(trial.system_attrs.get("retry_history", []))
    return retried
