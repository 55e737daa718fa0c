"""Turn a storage URL into an Optuna storage tuned for many worker processes."""

from __future__ import annotations

import sqlite3
import time
import warnings
from collections.abc import Callable

import optuna
import sqlalchemy.engine
import sqlalchemy.event
import sqlalchemy.exc
from optuna.storages import RDBStorage
from optuna.storages.journal import BaseJournalBackend, JournalFileBackend, JournalRedisBackend

from storage._heartbeat import HeartbeatJournalStorage, HeartbeatPolicy
from storage._network import NetworkBounds, server_engine_kwargs, with_redis_timeouts
from storage._retry import RetryPolicy, StorageUnavailable, with_retries
from storage._urls import (
    StorageURLError,
    backend_of,
    journal_file_path,
    redact_url,
    scrub,
    sqlite_file,
)
from storage.optuna_private import ParamsWrite, RetryInsert, StateQuery

# Seconds a SQLite writer waits for the lock before "database is locked".
SQLITE_BUSY_TIMEOUT_S = 60
# Opens of a new database, while another process may be creating its tables.
SCHEMA_ATTEMPTS = 3
# Connections one process opens to a server, at most (docs/DEPLOY.md): a worker's trial and
# its heartbeat thread each need one at once. A third thread (a checkpoint writer) waits for
# one: a call holds it for milliseconds.
SERVER_CONNECTIONS = 2
SERVER_POOL = {
    "pool_size": SERVER_CONNECTIONS,
    "max_overflow": 0,
    "pool_pre_ping": True,  # checked before use: a server restart left it dead
    "pool_recycle": 1800,
}
# A thread waits for a free connection longer than another thread's call can hold one (each
# wait of that call for the server is bounded, storage/_network.py).
POOL_WAIT_CALLS = 3
# Backends reached over a network, which may not be up yet when a worker starts.
SERVER_BACKENDS = ("postgresql", "mysql", "journal-redis")


def _begin_immediate(connection: sqlalchemy.engine.Connection) -> None:
    """Take SQLite's write lock when a transaction starts, not at its first write.

    Optuna claims a WAITING trial with SELECT ... FOR UPDATE, which SQLite ignores: two
    processes could both read WAITING and both run the trial. An immediate transaction
    makes the read and the write one step; it also avoids "database is locked" when a
    read transaction later tries to write after another process committed.
    """
    connection.exec_driver_sql("BEGIN IMMEDIATE")


class HpoRDBStorage(StateQuery, RetryInsert, ParamsWrite, RDBStorage):
    """An RDBStorage that reads a ticket's state alone (StateQuery), for a claim's look,
    inserts a retry in a few statements (RetryInsert) and writes a trial's params in one
    transaction (ParamsWrite)."""


class SQLiteStorage(HpoRDBStorage):
    """An RDBStorage on SQLite whose transactions begin immediately (_begin_immediate),
    also once unpickled: RDBStorage.__setstate__ makes a new engine without the listener."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        sqlalchemy.event.listen(self.engine, "begin", _begin_immediate)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        sqlalchemy.event.listen(self.engine, "begin", _begin_immediate)


# Storage classes of a worker: every call waits out a lost connection (storage/_retry.py).
RetryingHpoRDBStorage = with_retries(HpoRDBStorage, __name__)
RetryingSQLiteStorage = with_retries(SQLiteStorage, __name__)
RetryingHeartbeatJournalStorage = with_retries(HeartbeatJournalStorage, __name__)


def open_storage(
    url: str,
    heartbeat: HeartbeatPolicy | None = None,
    reader: bool = False,
    retry: RetryPolicy | None = None,
) -> optuna.storages.BaseStorage:
    """Open the storage a URL names. Raises StorageURLError with a printable message.

    `heartbeat`: running trials send heartbeats, and silent ones are failed and retried.
    `reader` is for tools that only look (status, dashboard, report): on SQLite they do
    not take the write lock, so they never make a worker wait. `retry`: the open and every
    call wait out a lost connection (workers), and StorageUnavailable says when they gave up;
    without it an outage raises at once.
    """
    backend = backend_of(url)

    def attempt() -> optuna.storages.BaseStorage:
        if backend.startswith("journal"):
            return _open_journal(url, backend, heartbeat, reader, retry)
        return _open_rdb(url, backend, heartbeat, reader, retry)

    try:
        if retry is None or backend not in SERVER_BACKENDS:
            return attempt()
        # A worker may start before its server is up or reachable: it waits as in an outage.
        return retry.call("opening the storage", attempt, on_loss=lambda: None)
    except (StorageURLError, StorageUnavailable):
        raise
    except (sqlalchemy.exc.SQLAlchemyError, OSError, ImportError, ValueError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise StorageURLError(
            f"cannot open storage {redact_url(url)!r}: {scrub(reason, url)}"
        ) from err
    except Exception as err:  # redis and DB drivers raise their own connection errors
        raise StorageURLError(
            f"cannot open storage {redact_url(url)!r}: {type(err).__name__}"
        ) from err


def close_storage(storage: optuna.storages.BaseStorage) -> None:
    """Close the connections a database storage pools. A process that opened one for a look
    (the settings, before a worker opens its own) would hold them until the collector finds
    the storage, which after gc.freeze may be never: a worker's connections would double."""
    if isinstance(storage, RDBStorage):
        storage.engine.dispose()


def _open_journal(
    url: str,
    backend: str,
    heartbeat: HeartbeatPolicy | None,
    reader: bool,
    retry: RetryPolicy | None,
) -> HeartbeatJournalStorage:
    log: BaseJournalBackend
    if backend == "journal-file":
        log = JournalFileBackend(journal_file_path(url))
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            log = JournalRedisBackend(with_redis_timeouts(url))
        if not reader:
            _refuse_redis_replica(url)
    if retry is None:
        return HeartbeatJournalStorage(log, heartbeat)
    return RetryingHeartbeatJournalStorage(log, heartbeat, retry=retry)


def _refuse_redis_replica(url: str) -> None:
    """A replica answers every write READONLY for good; a primary a fail-over demoted does so
    until it ends (waited out, storage/_retry.py). Only the role the server has when a writer
    connects tells them apart: a URL naming a replica is the user's mistake."""
    import redis  # the [redis] extra: only a redis URL needs it

    with redis.Redis.from_url(with_redis_timeouts(url)) as client:
        try:
            role, *primary = client.execute_command("ROLE")
        except redis.exceptions.ResponseError:  # ROLE not granted: the first write will tell
            return
    if role in (b"slave", "slave"):
        host, port = (part.decode() if isinstance(part, bytes) else part for part in primary[:2])
        raise StorageURLError(
            f"storage {redact_url(url)!r} is a read-only replica (of {host}:{port}): "
            "give the primary's URL"
        )


def _open_rdb(
    url: str,
    backend: str,
    heartbeat: HeartbeatPolicy | None,
    reader: bool,
    retry: RetryPolicy | None,
) -> RDBStorage:
    if backend == "sqlite":
        if reader:
            _require_sqlite_file(url)  # and no WAL set-up: the writers set it, in the file
        else:
            _enable_sqlite_wal(url)
        # isolation_level=None: pysqlite leaves BEGIN to us (see _begin_immediate).
        connect_args = {"timeout": SQLITE_BUSY_TIMEOUT_S, "isolation_level": None}
        engine_kwargs: dict = {"connect_args": connect_args}
    else:
        pool_wait_s = POOL_WAIT_CALLS * NetworkBounds.from_env().call_s
        engine_kwargs = {**SERVER_POOL, "pool_timeout": pool_wait_s}
        engine_kwargs.update(server_engine_kwargs(url, backend))
    writer = backend == "sqlite" and not reader
    if writer:
        storage_class = SQLiteStorage if retry is None else RetryingSQLiteStorage
    else:
        storage_class = HpoRDBStorage if retry is None else RetryingHpoRDBStorage
    return _create_schema_once(
        lambda: _rdb_storage(storage_class, url, engine_kwargs, heartbeat, retry)
    )


def _create_schema_once(open_rdb: Callable[[], RDBStorage]) -> RDBStorage:
    """Open, retrying while another process creates the tables of a new database.

    Optuna creates missing tables on open; two workers opening a new database at once race
    ("table studies already exists"). The loser finds the tables there on its next try.
    """
    for attempt in range(1, SCHEMA_ATTEMPTS):
        try:
            return open_rdb()
        except sqlalchemy.exc.SQLAlchemyError:
            time.sleep(0.5 * attempt)
    return open_rdb()


def _rdb_storage(
    storage_class: type[RDBStorage],
    url: str,
    engine_kwargs: dict,
    heartbeat: HeartbeatPolicy | None,
    retry: RetryPolicy | None,
) -> RDBStorage:
    # Optuna's schema check at open holds a transaction open while it takes a second
    # connection: behind a pooler in transaction mode, workers opening at once can hold every
    # server connection that way, each waiting for another. _check_schema asks one at a time.
    kwargs: dict = {"engine_kwargs": engine_kwargs, "skip_compatibility_check": True}
    if retry is not None:
        kwargs["retry"] = retry
    if heartbeat is not None:
        kwargs.update(
            heartbeat_interval=heartbeat.interval_s,
            grace_period=heartbeat.grace_s,
            heartbeat_stale_trial_callback=heartbeat.stale_trial_callback(),
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = storage_class(url, **kwargs)
    _check_schema(storage)
    return storage


def _check_schema(storage: RDBStorage) -> None:
    """The tables must be at the schema this Optuna writes (Optuna's own check, unnested)."""
    current, head = storage.get_current_version(), storage.get_head_version()
    if current != head:
        raise StorageURLError(
            f"the study database's tables are at Optuna schema {current}, this Optuna "
            f"{optuna.__version__} needs {head}: `optuna storage upgrade --storage URL`"
        )


def _require_sqlite_file(url: str) -> None:
    """A tool that only looks must not leave an empty database where the user mistyped."""
    database = sqlite_file(url)
    if database is not None and not database.exists():
        raise StorageURLError(
            f"no SQLite database at {database}; `hpo start` or `hpo create` makes one"
        )


def _enable_sqlite_wal(url: str) -> None:
    """WAL lets readers (status, dashboard) run beside a writer; it persists in the file."""
    database = sqlite_file(url)
    if database is None:
        return
    database.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(database, timeout=SQLITE_BUSY_TIMEOUT_S) as connection:
        connection.execute("PRAGMA journal_mode=WAL")
