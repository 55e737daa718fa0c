"""Wait out a lost database: a worker's storage calls retried with capped exponential backoff.

Only a lost connection is retried (server down, restarting, failing over, network gone);
logic errors (a finished trial, a duplicate study) are raised at once. A call blocks while it
waits: the trial's training pauses and resumes, its reports land in order, and nothing is
held in memory that a crash during the outage would lose.

A write whose answer was lost may have committed. Before it is repeated, the storage is
asked what happened (`_settle_*`): a trial already in the state asked for was this write's;
a retry already queued with the same history, or the one-off ticket with the same key, is
this insert's; a study of the name asked for is this creation's. On RDB, Optuna repeats a
trial insert itself, and the keyed insert is made idempotent inside its loop
(optuna_private.retry_insert_once). Other writes are safe to repeat as they are
(attributes, reports and heartbeats set a value; a trial's params, repeated, break their
unique key and are rolled back; a second plain ticket is one more ticket).
A claim cannot be told from another worker's, so the heartbeat that makes a claimed trial go
stale is written, and waited for, before it.
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import sqlalchemy.exc
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState

from storage._network import refused_by_server
from storage.optuna_private import (
    PARAMS_WRITE,
    RDB_CACHE_CALLS,
    RDB_CREATE_TRIAL,
    RDB_PREPARE_TRIAL,
    STALE_TRIAL_IDS,
    STATE_QUERY,
    insert_key,
    retry_insert_once,
    same_insert,
)

try:
    import redis.exceptions

    # A fail-over's answers are "not now" too: READONLY (a primary demoted to a replica),
    # MASTERDOWN (a replica that lost its primary), LOADING (BusyLoadingError, a restart
    # reading its data back: a ConnectionError to redis-py).
    REDIS_LOST = (
        redis.exceptions.ConnectionError,
        redis.exceptions.TimeoutError,
        redis.exceptions.ReadOnlyError,
        redis.exceptions.MasterDownError,
    )
except ImportError:  # the [redis] extra is not installed
    REDIS_LOST = ()

# Seconds a worker waits out a database it lost (a restart, a fail-over) before giving up.
DEFAULT_STORAGE_RETRY_S = 300.0
# Exceptions that mean "the connection is gone" (or "no connection now"), not "the request
# was wrong". Optuna's RDB storage re-raises SQLAlchemy's as StorageInternalError, so causes
# are searched too. A wait for one of the pool's connections that ran out (two calls streaming
# large answers on a slow link hold both) is the link's fault, not the trial's: waited out too.
CONNECTION_LOST = (
    sqlalchemy.exc.OperationalError,
    sqlalchemy.exc.InterfaceError,
    sqlalchemy.exc.DisconnectionError,
    sqlalchemy.exc.TimeoutError,
    ConnectionError,
    *REDIS_LOST,
)

StorageClass = TypeVar("StorageClass", bound=type)


class StorageUnavailable(RuntimeError):
    """The storage stayed unreachable past the retry limit; the message is one line."""


@dataclass
class RetryPolicy:
    """How long a worker waits out a lost storage, and where it says so.

    Once it has given up, a call that finds the storage still lost raises at once, with the
    same line: the clean-up on the way out (the trial's summary) must not open a second
    window, and whichever thread's error is printed says what the give-up said.
    """

    limit_s: float = DEFAULT_STORAGE_RETRY_S
    say: Callable[[str], None] = print
    first_delay_s: float = 0.5
    max_delay_s: float = 5.0
    gave_up: str = field(default="", compare=False)  # the give-up's line, until an answer
    # The last outage waited out, as one line, and who is told of it once it has ended (the
    # worker records it where `hpo status` shows it).
    last_outage: str = field(default="", compare=False)
    on_back: Callable[[str], None] | None = field(default=None, compare=False)
    _telling: bool = field(default=False, compare=False, repr=False)

    def __getstate__(self) -> dict[str, Any]:
        # `say` is a progress console's bound method in `hpo` (a lock inside, which does not
        # pickle); a copy says its lines on stdout instead, and tells no one of an outage.
        return {**self.__dict__, "say": print, "on_back": None}

    def call(self, name: str, function: Callable[[], Any], on_loss: Callable[[], None]) -> Any:
        """`function()`, retried while the connection is lost, up to `limit_s`.

        `on_loss()` is called at each lost attempt, and once more when the storage answers.
        """
        delay, lost_at, first_error = self.first_delay_s, None, ""
        while True:
            started = time.monotonic()
            try:
                result = function()
            except Exception as err:
                if not is_connection_lost(err):
                    raise
                on_loss()
                now = time.monotonic()
                if lost_at is None and not self.gave_up:
                    # Since the call that got no answer began: a silent network takes up to
                    # NetworkBounds.call_s to say so, and that time counts against the limit.
                    lost_at, first_error = started, describe(err)
                    self.say(f"storage unreachable ({first_error}); retrying for up to "
                             f"{self.limit_s:g} s")  # fmt: skip
                if self.gave_up:
                    raise StorageUnavailable(self.gave_up) from None
                if now - lost_at >= self.limit_s:
                    self.gave_up = (
                        f"storage unreachable for {now - lost_at:.0f} s (--storage-retry-s "
                        f"{self.limit_s:g}), at {name}: {describe(err)}; giving up"
                    )
                    raise StorageUnavailable(self.gave_up) from None
                time.sleep(min(delay, self.limit_s - (now - lost_at)))
                delay = min(2 * delay, self.max_delay_s)
                continue
            self.gave_up = ""
            if lost_at is not None:
                on_loss()  # the outage ends now: a grace counted from here (stale_trial_ids)
                waited = time.monotonic() - lost_at
                self.say(f"storage reachable again after {waited:.0f} s")
                self._tell_back(f"storage unreachable for {waited:.0f} s ({first_error})")
            return result

    def _tell_back(self, outage: str) -> None:
        """Keep the outage and tell `on_back`, whose own storage call is not told again."""
        self.last_outage = outage
        if self.on_back is None or self._telling:
            return
        self._telling = True
        try:
            self.on_back(outage)
        finally:
            self._telling = False


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


def with_retries(storage_class: StorageClass, module: str) -> StorageClass:
    """A subclass of an Optuna storage class whose every storage call waits out an outage.

    Its constructor takes `retry=RetryPolicy(...)` besides the class's own arguments.
    `module` is where the subclass is bound to its name, so that pickle finds it.
    The heartbeat thread's beats are not retried: a missed one is followed by the next, and
    the thread must stay free to stop when its trial ends.
    """
    public = [name for name, value in vars(BaseStorage).items() if _is_call(name, value)]
    private = [*RDB_CACHE_CALLS, STATE_QUERY, PARAMS_WRITE]
    names = [*public, *(name for name in private if hasattr(storage_class, name))]

    def __init__(self: Any, *args: Any, retry: RetryPolicy, **kwargs: Any) -> None:
        self._retry, self._last_loss = retry, float("-inf")
        storage_class.__init__(self, *args, **kwargs)

    def retried(name: str) -> Callable[..., Any]:
        method = getattr(storage_class, name)
        settle = SETTLERS.get(name)

        @functools.wraps(method)
        def call(self: Any, *args: Any, **kwargs: Any) -> Any:
            lost = []

            def attempt() -> Any:
                if lost and settle is not None:
                    known = settle(storage_class, self, *args, **kwargs)
                    if known is not UNKNOWN:
                        return known
                return method(self, *args, **kwargs)

            def on_loss() -> None:
                self._lost()
                lost.append(1)

            return self._retry.call(name, attempt, on_loss)

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

    state_change = retried("set_trial_state_values")

    def set_trial_state_values(
        self: Any, trial_id: int, state: TrialState, values: Any = None
    ) -> bool:
        if state == TrialState.RUNNING:
            # A claimed trial must end up run or stale, and one without a heartbeat is never
            # stale: a worker that dies right after its claim, or whose claim's answer was
            # lost, would leave it RUNNING for good. So the heartbeat comes first, waited for
            # like any call; the claimer's heartbeat thread follows it (a claim that loses
            # to another worker's adds a beat to that worker's trial).
            beat = functools.partial(storage_class.record_heartbeat, self, trial_id)
            self._retry.call("heartbeat of a claim", beat, self._lost)
        return state_change(self, trial_id, state, values)

    namespace: dict[str, Any] = {name: retried(name) for name in names}
    namespace.update(__init__=__init__, _lost=_lost, __module__=module)
    if hasattr(storage_class, STALE_TRIAL_IDS):
        namespace.update({STALE_TRIAL_IDS: stale_trial_ids, "record_heartbeat": record_heartbeat})
        namespace["set_trial_state_values"] = set_trial_state_values
    if hasattr(storage_class, RDB_PREPARE_TRIAL):
        namespace[RDB_PREPARE_TRIAL] = retry_insert_once(getattr(storage_class, RDB_PREPARE_TRIAL))
    name = f"Retrying{storage_class.__name__}"
    return type(name, (storage_class,), {**namespace, "__qualname__": name})


# What a settler returns when the storage cannot say whether the lost write committed.
UNKNOWN = object()


def _settle_state(
    storage_class: type, storage: Any, trial_id: int, state: TrialState, values: Any = None
) -> Any:
    """A lost finish (COMPLETE, PRUNED, FAIL): done if the trial is in that state; finished
    otherwise means another worker did it first. A lost claim cannot be told from another
    worker's claim (see set_trial_state_values): repeated, it answers False."""
    if state == TrialState.RUNNING:
        return UNKNOWN
    trial: FrozenTrial = storage_class.get_trial(storage, trial_id)
    if trial.state == state:
        return True
    if trial.state.is_finished():
        raise UpdateFinishedTrialError(f"trial {trial.number} was finished elsewhere")
    return UNKNOWN


def _same_insert(
    storage_class: type, storage: Any, study_id: int, template: FrozenTrial | None
) -> FrozenTrial | None:
    """The trial a lost keyed insert made (a retry, a one-off ticket: insert_key)."""
    key = insert_key(template)
    if key is None:
        return None
    return same_insert(storage_class.get_all_trials(storage, study_id, deepcopy=False), key)


# Named as Optuna names them: Study.add_trial passes `template_trial=` by keyword.
def _settle_new_trial(
    storage_class: type, storage: Any, study_id: int, template_trial: Any = None
) -> Any:
    made = _same_insert(storage_class, storage, study_id, template_trial)
    if made is None:
        return UNKNOWN
    return storage_class.get_trial_id_from_study_id_trial_number(storage, study_id, made.number)


def _settle_rdb_new_trial(
    storage_class: type, storage: Any, study_id: int, template_trial: Any = None
) -> Any:
    made = _same_insert(storage_class, storage, study_id, template_trial)
    return UNKNOWN if made is None else made


def _settle_new_study(
    storage_class: type, storage: Any, directions: Any, study_name: str | None = None
) -> Any:
    """A lost creation: a study of that name now is this one's. It cannot be told from
    another process's, made after this request was lost on its way; both then complete it,
    which search/rules/study.py makes safe."""
    if study_name is None:
        return UNKNOWN
    try:
        return storage_class.get_study_id_from_name(storage, study_name)
    except KeyError:
        return UNKNOWN


SETTLERS: dict[str, Callable[..., Any]] = {
    "create_new_study": _settle_new_study,
    "set_trial_state_values": _settle_state,
    "create_new_trial": _settle_new_trial,
    RDB_CREATE_TRIAL: _settle_rdb_new_trial,
}


def _is_call(name: str, value: object) -> bool:
    return callable(value) and not name.startswith("_")
