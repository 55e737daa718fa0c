"""Heartbeats of running trials on every storage, so a dead worker's trial is retried.

Optuna keeps heartbeats on its RDB storage only. On the journal storages (file and Redis) a
running trial's last heartbeat is a system attribute written through the journal itself,
and the stale check reads it back: the same contract as Optuna's heartbeat interface, so its
heartbeat thread, `fail_stale_trials` and the retry callback work unchanged.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import BaseJournalBackend, JournalStorage
from optuna.trial import FrozenTrial, TrialState

from storage.optuna_private import Heartbeat

# Seconds between a running trial's heartbeats, unless a study sets its own.
DEFAULT_HEARTBEAT_S = 60
# The trial system attributes that hold a journal trial's last heartbeat and its claim, as
# ISO 8601 times in UTC: machines in other time zones read the same instant.
HEARTBEAT_ATTR = "hpo:heartbeat"
CLAIMED_ATTR = "hpo:claimed"


@dataclass(frozen=True)
class HeartbeatPolicy:
    """Heartbeat of running trials; a trial silent for `grace_s` is failed and retried."""

    interval_s: int = DEFAULT_HEARTBEAT_S
    max_retry: int = 3

    @property
    def grace_s(self) -> int:
        return 2 * self.interval_s

    def stale_trial_callback(self) -> Callable[[optuna.Study, FrozenTrial], None]:
        """Re-queue a failed trial with its parameters, checkpoint record and epochs."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return RetryHeartbeatStaleTrialCallback(
                max_retry=self.max_retry, inherit_intermediate_values=True
            )


class HeartbeatJournalStorage(JournalStorage, Heartbeat):
    """A journal storage whose running trials send heartbeats (none when `policy` is None).

    Heartbeats compare wall clocks of different machines: keep them in sync (NTP), well
    within the grace; their time zones may differ, every stamp is UTC. Each heartbeat is one
    journal entry, one per interval per running trial.
    """

    def __init__(self, backend: BaseJournalBackend, policy: HeartbeatPolicy | None) -> None:
        super().__init__(backend)
        self._policy = policy
        self.grace_period = policy.grace_s if policy is not None else None

    def record_heartbeat(self, trial_id: int) -> None:
        # The trial may have ended (or another worker failed it) since the last beat. Written
        # once, never retried (see storage/_retry.py): the next beat follows anyway.
        with contextlib.suppress(UpdateFinishedTrialError):
            JournalStorage.set_trial_system_attr(self, trial_id, HEARTBEAT_ATTR, utc_now())

    def set_trial_state_values(
        self, trial_id: int, state: TrialState, values: Sequence[float] | None = None
    ) -> bool:
        # Stamped before the claim, so no trial is RUNNING without a stamp in UTC (Optuna's
        # datetime_start reaches a reader as a naive time in the reader's zone).
        if state == TrialState.RUNNING and self._policy is not None:
            JournalStorage.set_trial_system_attr(self, trial_id, CLAIMED_ATTR, utc_now())
        return super().set_trial_state_values(trial_id, state, values)

    def stale_trial_ids(self, study_id: int) -> list[int]:
        assert self.grace_period is not None
        now = datetime.now(timezone.utc).timestamp()
        return [
            self.get_trial_id_from_study_id_trial_number(study_id, trial.number)
            for trial in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,))
            if now - last_sign_of_life(trial) > self.grace_period
        ]

    def get_heartbeat_interval(self) -> int | None:
        return self._policy.interval_s if self._policy is not None else None

    def get_heartbeat_stale_trial_callback(
        self,
    ) -> Callable[[optuna.Study, FrozenTrial], None] | None:
        return self._policy.stale_trial_callback() if self._policy is not None else None


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat()


def last_sign_of_life(trial: FrozenTrial) -> float:
    """Its last heartbeat, or its claim (Unix time): a retry inherits its failed trial's old
    heartbeat, and a worker that died before its first heartbeat still leaves a trial to
    recover. Only a trial created RUNNING (a plain `study.ask()`) has no claim stamp: its start
    is read as Optuna gives it, converted to this process's zone."""
    stamps = [trial.system_attrs.get(key) for key in (HEARTBEAT_ATTR, CLAIMED_ATTR)]
    if not any(stamps) and trial.datetime_start is not None:
        return trial.datetime_start.timestamp()
    return max(_unix_time(stamp) for stamp in stamps)


def _unix_time(stamp: str | float | None) -> float:
    """A stamp in UTC; Unix time as written before stamps were ISO 8601, 0 for none."""
    if stamp is None:
        return 0.0
    if isinstance(stamp, int | float):
        return float(stamp)
    return datetime.fromisoformat(stamp).timestamp()
