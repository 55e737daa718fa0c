"""A real SQLite storage that loses answers: the write commits, then the call raises as a
connection dropped before its reply would. Fault injection for the retrying storages
(storage/_retry.py), at function level; the suite's TCP proxy does the same on a server.

A trial insert's answer is lost where a server's is: at the commit inside Optuna's own
insert loop (RDBStorage._create_new_trial tries five times), so the loop repeats the insert
and optuna_private.retry_insert_once is what must hold. OUTSIDE_THE_LOOP loses it after the
loop instead, as when all its tries fail, which the retrying storage's settle step answers.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import sqlalchemy.exc
import sqlalchemy.orm
from optuna.trial import TrialState

from storage import HeartbeatPolicy, RetryPolicy
from storage._open import SQLiteStorage
from storage._retry import with_retries

# The writes whose answers a worker may lose (Optuna's cache inserts with _create_new_trial).
WRITES = (
    "create_new_study",
    "set_trial_state_values",
    "_create_new_trial",
    "set_study_user_attr",
    "set_trial_user_attr",
    "set_trial_system_attr",
    "record_heartbeat",
    "set_trial_params",
)
# A loss of _create_new_trial's answer after Optuna's insert loop (`lose(OUTSIDE_THE_LOOP)`).
OUTSIDE_THE_LOOP = "_create_new_trial after its loop"
# Heartbeats never go stale by the clock in these tests: age_heartbeats makes them stale.
GRACE_S = 3600


def lost_answer() -> sqlalchemy.exc.OperationalError:
    return sqlalchemy.exc.OperationalError(
        "COMMIT", None, ConnectionResetError("connection reset by peer (after commit)")
    )


class LossySQLiteStorage(SQLiteStorage):
    """Loses the answer of each write named by `lose` once (a state narrows
    set_trial_state_values to that state), or with `before`, the request (nothing is
    written); `lost` lists what it lost."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.to_lose: list[tuple[str, TrialState | None]] = []
        self.to_refuse: list[tuple[str, TrialState | None]] = []
        self.lost: list[tuple[str, TrialState | None]] = []
        self.lose_next_commit = False
        sessions = sqlalchemy.orm.sessionmaker(
            bind=self.engine, class_=_CommitLosingSession, info={"lossy": self}
        )
        self.scoped_session = sqlalchemy.orm.scoped_session(sessions)

    def lose(self, name: str, state: TrialState | None = None, before: bool = False) -> None:
        (self.to_refuse if before else self.to_lose).append((name, state))

    def take(self, pending: list, name: str, state: TrialState | None) -> bool:
        for key in {(name, state), (name, None)} & set(pending):
            pending.remove(key)
            self.lost.append(key)
            return True
        return False


class _CommitLosingSession(sqlalchemy.orm.Session):
    """Optuna's sessions on the lossy storage: a commit that lands, then raises once asked."""

    def commit(self) -> None:
        super().commit()
        lossy = self.info["lossy"]
        if lossy.lose_next_commit:
            lossy.lose_next_commit = False
            raise lost_answer()


def _losing(name: str) -> Callable[..., Any]:
    write = getattr(SQLiteStorage, name)

    def call(self: LossySQLiteStorage, *args: Any, **kwargs: Any) -> Any:
        state = None
        if name == "set_trial_state_values":
            state = kwargs.get("state", args[1] if len(args) > 1 else None)
        if self.take(self.to_refuse, name, state):
            raise lost_answer()
        if name == "_create_new_trial" and self.take(self.to_lose, name, state):
            self.lose_next_commit = True  # inside Optuna's insert loop
        result = write(self, *args, **kwargs)
        after = OUTSIDE_THE_LOOP if name == "_create_new_trial" else name
        if self.take(self.to_lose, after, state):
            raise lost_answer()
        return result

    return call


for _name in WRITES:
    setattr(LossySQLiteStorage, _name, _losing(_name))

RetryingLossySQLiteStorage = with_retries(LossySQLiteStorage, __name__)


def lossy_storage(
    path: Path, max_retry: int = 3, say: Callable[[str], None] = lambda _: None
) -> RetryingLossySQLiteStorage:
    """A worker's storage (heartbeats, retries) on the SQLite file `path`, losing on demand."""
    policy = HeartbeatPolicy(interval_s=1, max_retry=max_retry)
    return RetryingLossySQLiteStorage(
        f"sqlite:///{path}",
        engine_kwargs={"connect_args": {"timeout": 60, "isolation_level": None}},
        heartbeat_interval=policy.interval_s,
        grace_period=GRACE_S,
        heartbeat_stale_trial_callback=policy.stale_trial_callback(),
        retry=RetryPolicy(first_delay_s=0.0, say=say),
    )


def age_heartbeats(path: Path, trial_ids: list[int] | None = None) -> None:
    """Let a day pass for these trials' heartbeats (all if None), as if their workers died;
    the storage's own post-outage grace is let pass too (see storage/_retry.py)."""
    with sqlite3.connect(path, timeout=60) as db:
        where = "" if trial_ids is None else f" WHERE trial_id IN ({','.join(map(str, trial_ids))})"
        db.execute(f"UPDATE trial_heartbeats SET heartbeat = datetime(heartbeat, '-1 day'){where}")


def forget_losses(storage: RetryingLossySQLiteStorage) -> None:
    """As if the heartbeat grace after the last lost answer had passed."""
    storage._last_loss = float("-inf")
