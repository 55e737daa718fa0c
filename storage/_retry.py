"""Wait out a lost database: a worker's storage calls retried with capped exponential backoff.

Only a lost connection is retried (server down, restarting, failing over, network gone);
logic errors (a finished trial, a duplicate study) are raised at once. A call blocks while it
waits: the trial's training pauses and resumes, its reports land in order, and nothing is
held in memory that a crash during the outage would lose.
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import sqlalchemy.exc
from optuna.storages import BaseStorage
from optuna.trial import TrialState

from storage._network import refused_by_server
from storage.optuna_private import RDB_CACHE_CALLS, STALE_TRIAL_IDS

try:
    import redis.exceptions

    REDIS_LOST = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
except ImportError:  # the [redis] extra is not installed
    REDIS_LOST = ()

# Seconds a worker waits out a database it lost (a restart, a fail-over) before giving up.
DEFAULT_STORAGE_RETRY_S = 300.0
# Exceptions that mean "the connection is gone", not "the request was wrong". Optuna's RDB
# storage re-raises SQLAlchemy's as StorageInternalError, so causes are searched too.
CONNECTION_LOST = (
    sqlalchemy.exc.OperationalError,
    sqlalchemy.exc.InterfaceError,
    sqlalchemy.exc.DisconnectionError,
    ConnectionError,
    *REDIS_LOST,
)

StorageClass = TypeVar("StorageClass", bound=type)


class StorageUnavailable(RuntimeError):
    """The storage stayed unreachable past the retry limit; the message is one line."""


@dataclass(frozen=True)
class RetryPolicy:
    """How long a worker waits out a lost storage, and where it says so."""

    limit_s: float = DEFAULT_STORAGE_RETRY_S
    say: Callable[[str], None] = print
    first_delay_s: float = 0.5
    max_delay_s: float = 5.0

    def call(self, name: str, function: Callable[[], Any], on_loss: Callable[[], None]) -> Any:
        """`function()`, retried while the connection is lost, up to `limit_s`.

        `on_loss()` is called at each lost attempt, and once more when the storage answers.
        """
        delay, lost_at = self.first_delay_s, None
        while True:
            started = time.monotonic()
            try:
                result = function()
            except Exception as err:
                if not is_connection_lost(err):
                    raise
                on_loss()
                now = time.monotonic()
                if lost_at is None:
                    # Since the call that got no answer began: a silent network takes up to
                    # STORAGE_CALL_BOUND_S to say so, and that time counts against the limit.
                    lost_at = started
                    self.say(f"storage unreachable ({describe(err)}); retrying for up to "
                             f"{self.limit_s:g} s")  # fmt: skip
                if now - lost_at >= self.limit_s:
                    raise StorageUnavailable(
                        f"storage unreachable for {now - lost_at:.0f} s (--storage-retry-s "
                        f"{self.limit_s:g}), at {name}: {describe(err)}; giving up"
                    ) from None
                time.sleep(min(delay, self.limit_s - (now - lost_at)))
                delay = min(2 * delay, self.max_delay_s)
                continue
            if lost_at is not None:
                on_loss()  # the outage ends now: a grace counted from here (stale_trial_ids)
                self.say(f"storage reachable again after {time.monotonic() - lost_at:.0f} s")
            return result


def is_connection_lost(err: BaseException | None) -> bool:
    """A connection lost or never made; not a server that answered and refused it."""
    seen, lost = 0, False
    while err is not None and seen < 10:
        if refused_by_server(err):
            return False
        lost = lost or isinstance(err, CONNECTION_LOST)
        err, seen = err.__cause__ or err.__context__, seen + 1
    return lost


def describe(err: BaseException) -> str:
    """The lost connection's type and first line (drivers do not print a URL's password)."""
    lost: BaseException | None = err
    while lost is not None and not isinstance(lost, CONNECTION_LOST):
        lost = lost.__cause__ or lost.__context__
    lost = lost or err
    # SQLAlchemy prefixes the driver's class, "(psycopg.OperationalError) ...": once is enough.
    lines = re.sub(r"^\([\w.]+\) ", "", str(lost).strip()).splitlines()
    return f"{type(lost).__name__}: {lines[0]}"[:200] if lines else type(lost).__name__


def with_retries(storage_class: StorageClass) -> StorageClass:
    """A subclass of an Optuna storage class whose every storage call waits out an outage.

    Its constructor takes `retry=RetryPolicy(...)` besides the class's own arguments.
    Heartbeats are not retried: a missed one is followed by the next, and the heartbeat
    thread must stay free to stop when its trial ends.
    """
    public = [name for name, value in vars(BaseStorage).items() if _is_call(name, value)]
    names = [*public, *(name for name in RDB_CACHE_CALLS if hasattr(storage_class, name))]

    def __init__(self: Any, *args: Any, retry: RetryPolicy, **kwargs: Any) -> None:
        self._retry, self._last_loss = retry, float("-inf")
        storage_class.__init__(self, *args, **kwargs)

    def retried(name: str) -> Callable[..., Any]:
        method = getattr(storage_class, name)

        @functools.wraps(method)
        def call(self: Any, *args: Any, **kwargs: Any) -> Any:
            return self._retry.call(name, lambda: method(self, *args, **kwargs), self._lost)

        return call

    def _lost(self: Any) -> None:
        self._last_loss = time.monotonic()

    def record_heartbeat(self: Any, trial_id: int) -> None:
        try:
            storage_class.record_heartbeat(self, trial_id)
        except Exception as err:
            if not is_connection_lost(err):
                raise
            self._lost()

    def stale_trial_ids(self: Any, study_id: int) -> list[int]:
        # Right after an outage every heartbeat looks stale: they stopped with the storage,
        # not with their workers. Give the others a grace period to send their next one.
        grace = self.grace_period or 2 * self.get_heartbeat_interval()
        if time.monotonic() - self._last_loss < grace:
            return []
        stale = getattr(storage_class, STALE_TRIAL_IDS)
        asked = time.monotonic()
        found = self._retry.call("stale-trial check", lambda: stale(self, study_id), self._lost)
        # An answer held up by a silent network is no better: the others' beats were held too.
        return [] if time.monotonic() - asked >= grace else found

    def set_trial_state_values(
        self: Any, trial_id: int, state: TrialState, values: Any = None
    ) -> bool:
        losses = []

        def lost() -> None:
            self._lost()
            losses.append(1)

        def attempt() -> bool:
            return storage_class.set_trial_state_values(self, trial_id, state, values)

        updated = self._retry.call("set_trial_state_values", attempt, lost)
        if state == TrialState.RUNNING and not updated and losses:
            # The first attempt may have claimed the trial with its answer lost, leaving it
            # RUNNING with no worker. One heartbeat makes it go stale, and so be retried,
            # unless a worker really runs it (then this beat is one among its own).
            self.record_heartbeat(trial_id)
        return updated

    namespace: dict[str, Any] = {name: retried(name) for name in names}
    namespace.update(__init__=__init__, _lost=_lost)
    if hasattr(storage_class, STALE_TRIAL_IDS):
        namespace.update({STALE_TRIAL_IDS: stale_trial_ids, "record_heartbeat": record_heartbeat})
        namespace["set_trial_state_values"] = set_trial_state_values
    return type(f"Retrying{storage_class.__name__}", (storage_class,), namespace)


def _is_call(name: str, value: object) -> bool:
    return callable(value) and not name.startswith("_")
