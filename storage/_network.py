"""The network to a database server: a bound on every wait, and a refusal told from an outage.

A network that goes silent (a partition, a host that vanished, a hung proxy) sends no FIN and
no RST: without a bound of its own, a driver waits in a socket read forever. With these, a
call with no answer fails within NetworkBounds.call_s as a lost connection, which the worker's
RetryPolicy retries under --storage-retry-s (storage/_retry.py).

A server that answers "no" (wrong password, unknown database) is no outage: waiting would not
change its answer, so that error is raised at once. One that answers "not now" (full, a
deadlock, read-only or a standby in a fail-over) is waited out like an outage.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import sqlalchemy.engine
import sqlalchemy.event

from storage._urls import with_prepare_threshold

# Longest a storage call waits with no byte from the server (per wait, not per query: a long
# answer that streams in never hits it). It must exceed any legitimate silence: Optuna's
# largest read (every trial of a study of thousands, with their intermediate values) starts
# answering within seconds, a claim's row lock is held for milliseconds, and the schema check
# at open is one query; 30 s leaves a slow server (a fail-over, a cold cache) its time.
# $HPO_STORAGE_TIMEOUT_S sets another (a link with long stalls; a test's short partition).
DEFAULT_STORAGE_TIMEOUT_S = 30.0
TIMEOUT_ENV = "HPO_STORAGE_TIMEOUT_S"
# Longest a new connection takes to be accepted (TCP and the server's greeting), or the
# storage timeout where that is shorter.
CONNECT_TIMEOUT_S = 10.0
# Kernel keepalives on an idle connection: first probe after 10 s, then every 5 s, 3 lost
# probes close it (25 s in all). TCP_USER_TIMEOUT closes one whose sent data stays unacked.
KEEPALIVE_IDLE_S, KEEPALIVE_INTERVAL_S, KEEPALIVE_COUNT = 10, 5, 3


@dataclass(frozen=True)
class NetworkBounds:
    """The waits of one storage connection; a call on a silent network fails within
    `call_s`: an unanswered read on a pooled connection, then a new one not accepted."""

    answer_s: float = DEFAULT_STORAGE_TIMEOUT_S

    @classmethod
    def from_env(cls) -> NetworkBounds:
        """The bounds $HPO_STORAGE_TIMEOUT_S asks for; ValueError names a bad value."""
        text = os.environ.get(TIMEOUT_ENV)
        if text is None:
            return cls()
        try:
            seconds = float(text)
        except ValueError:
            seconds = 0.0
        if not 0 < seconds < math.inf:
            raise ValueError(f"{TIMEOUT_ENV} must be a positive number, not {text!r} (seconds)")
        return cls(seconds)

    @property
    def connect_s(self) -> float:
        return min(CONNECT_TIMEOUT_S, self.answer_s)

    @property
    def call_s(self) -> float:
        return self.answer_s + self.connect_s

    def postgresql_args(self) -> dict[str, Any]:
        return {
            "connect_timeout": max(1, round(self.connect_s)),  # libpq takes whole seconds
            "keepalives": 1,
            "keepalives_idle": KEEPALIVE_IDLE_S,
            "keepalives_interval": KEEPALIVE_INTERVAL_S,
            "keepalives_count": KEEPALIVE_COUNT,
            "tcp_user_timeout": round(self.answer_s * 1000),  # milliseconds
        }

    def mysql_args(self) -> dict[str, Any]:
        return {
            "connect_timeout": self.connect_s,
            "read_timeout": self.answer_s,
            "write_timeout": self.answer_s,
        }

    def redis_args(self) -> dict[str, Any]:
        # redis-py reads these from the URL; Optuna's JournalRedisBackend keeps the URL.
        return {
            "socket_timeout": self.answer_s,
            "socket_connect_timeout": self.connect_s,
            "socket_keepalive": "true",
            "health_check_interval": KEEPALIVE_IDLE_S,
        }


def server_engine_kwargs(url: str, backend: str) -> dict[str, Any]:
    """Engine arguments that bound every connection to a PostgreSQL or MySQL server."""
    bounds = NetworkBounds.from_env()
    if backend == "mysql":
        _quiet_connections_dropped_on_return()
        _drop_mysql_connections_answered_read_only()
        return {"connect_args": bounds.mysql_args()}
    parsed = sqlalchemy.engine.make_url(url)
    driver = parsed.get_driver_name()
    if driver != "psycopg":
        # psycopg2 speaks libpq too: its bounds, without psycopg's per-wait read bound below.
        # Other drivers (pg8000) take none of these arguments (README: postgresql+psycopg).
        return {"connect_args": bounds.postgresql_args()} if driver == "psycopg2" else {}
    # libpq has keepalives and tcp_user_timeout but no read timeout, which a hung proxy or
    # server (one that still acks every packet) needs: the connection class adds one.
    args, params = parsed.get_dialect()().create_connect_args(parsed)
    connect = {**bounds.postgresql_args(), **with_prepare_threshold(params)}
    return {"creator": _PostgresConnector(tuple(args), connect, bounds.answer_s)}


def with_redis_timeouts(url: str) -> str:
    """The redis URL with the bounds added, where the user's URL does not set its own."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    bounds = NetworkBounds.from_env().redis_args()
    return urlunsplit(parts._replace(query=urlencode({**bounds, **query})))


@functools.cache
def _quiet_connections_dropped_on_return() -> None:
    """PyMySQL sends a ROLLBACK each time the pool takes a connection back (psycopg sends none
    when no transaction is open); on a connection the network has cut, it fails and the pool
    logs a traceback, though it just drops the connection and the next call opens another."""
    import pymysql  # the [mysql] extra: imported only for a MySQL storage

    lost = {pymysql.constants.CR.CR_SERVER_GONE_ERROR, pymysql.constants.CR.CR_SERVER_LOST}

    def keep(record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        cut = isinstance(error, pymysql.OperationalError) and error.args[:1] in [(c,) for c in lost]
        return not (cut and record.msg == "Exception during reset or similar")

    logging.getLogger("sqlalchemy.pool.impl.QueuePool").addFilter(keep)


class _PostgresConnector:
    """Opens psycopg connections whose every wait for the server ends (picklable, unlike a
    lambda, so a storage holding it can still go to a process pool)."""

    def __init__(self, args: tuple, params: dict[str, Any], answer_s: float):
        self.args, self.params, self.answer_s = args, params, answer_s

    def __call__(self) -> Any:
        connection = _bounded_connection_class().connect(*self.args, **self.params)
        connection.answer_s = self.answer_s
        return connection


@functools.cache
def _bounded_connection_class() -> type:
    import psycopg  # the [postgres] extra: imported only by a PostgreSQL storage

    class BoundedConnection(psycopg.Connection):
        """A psycopg connection on which no wait for the server lasts past `answer_s` of
        silence, and a read-only answer (a standby) drops the connection."""

        answer_s = DEFAULT_STORAGE_TIMEOUT_S

        def wait(self, gen: Any, interval: float = 0.1, timeout: float | None = None) -> Any:
            if timeout is not None:  # psycopg's own deadline (cancelling a query): its own
                return super().wait(gen, interval=interval, timeout=timeout)
            try:
                return super().wait(_until_silent(gen, self.answer_s), interval=interval)
            except _Silence:
                # A query left unanswered: its connection cannot be reused, so the pool must
                # drop it (a closed connection is a disconnect to SQLAlchemy).
                self.pgconn.finish()
                raise psycopg.OperationalError(
                    f"no answer from the server in {self.answer_s:g} s"
                ) from None
            except psycopg.errors.ReadOnlySqlTransaction as err:
                # A standby, or a primary demoted in a fail-over: waited out like an outage
                # (an OperationalError), on a new connection, which may reach the new primary.
                self.pgconn.finish()
                raise psycopg.OperationalError(f"the server is read-only: {err}") from err

    return BoundedConnection


class _Silence(Exception):
    """No byte to or from the server for the connection's bound."""


def _until_silent(gen: Any, bound_s: float) -> Any:
    """psycopg's generator `gen`, ended by _Silence once the socket has been silent for
    `bound_s`. psycopg's own timeout is one deadline for the whole query, transfer included,
    which would cut a large answer still streaming in. Its wait functions send `gen` a
    READY_NONE (0) every interval the socket stays quiet: that is how silence is seen."""
    heard = time.monotonic()
    try:
        waiting_for = next(gen)
        while True:
            ready = yield waiting_for
            if ready:
                heard = time.monotonic()
            elif time.monotonic() - heard >= bound_s:
                raise _Silence
            waiting_for = gen.send(ready)
    except StopIteration as done:
        return done.value


# PostgreSQL's refusals at connect carry no SQLSTATE, only the server's FATAL message; these
# FATALs are a server (or pooler) that is starting, stopping, full or a standby, which
# waiting changes.
POSTGRESQL_TRANSIENT = (
    "starting up",
    "shutting down",
    "not yet accepting connections",  # a standby before its consistent state
    "not accepting connections",  # a standby with hot_standby off ("the database system is")
    "recovery mode",
    "too many clients",
    "connection slots",
    "too many connections for",  # a role's or database's CONNECTION LIMIT
    "administrator command",
    "conflict with recovery",
    # PgBouncer's "not now": full, its server unreachable or refusing it for a while, a
    # client queued past query_wait_timeout, a database PAUSEd or DISABLEd for maintenance.
    "no more connections allowed",  # past max_client_conn (or max_db/user_connections)
    "pgbouncer cannot connect to server",
    "query_wait_timeout",
    "server login has been failing",
    "database does not allow connections",  # DISABLE
    "is paused",
    "is disabled",
)
# MySQL's and MariaDB's answers that refuse this user for good: credentials, the database,
# permissions. Any other error is about this moment (a deadlock, a lock wait timeout, a full
# server, a server read-only in a fail-over) and is retried like an outage.
MYSQL_REFUSALS = frozenset(
    {
        1044,  # access denied to the database
        1045,  # access denied (user or password)
        1049,  # unknown database
        1129,  # host blocked after many connection errors (needs FLUSH HOSTS)
        1130,  # host not allowed to connect
        1142,  # command denied on a table
        1143,  # command denied on a column
        1227,  # access denied: a privilege is needed
        1251,  # authentication method the client does not support
        1698,  # access denied (no password given)
        1820,  # the password must be reset first
        1862,  # the password has expired
        3118,  # MySQL: the account is locked
        4151,  # MariaDB: the account is locked
    }
)
# A server's "read-only" answers in a fail-over (--read-only, a read-only transaction,
# read-only mode): the connection is dropped, as its server may no longer be the primary.
MYSQL_READ_ONLY = (1290, 1792, 1836)


def refused_by_server(err: BaseException) -> bool:
    """Whether the server itself answered and refused (credentials, database, permissions)."""
    module = type(err).__module__.split(".")[0]
    if module == "psycopg":
        message = str(err)
        return "FATAL:" in message and not any(text in message for text in POSTGRESQL_TRANSIENT)
    if module == "pymysql":
        return _mysql_code(err) in MYSQL_REFUSALS
    return module == "redis" and type(err).__name__ == "AuthenticationError"


def _mysql_code(err: BaseException) -> int | None:
    return err.args[0] if err.args and isinstance(err.args[0], int) else None


@functools.cache
def _drop_mysql_connections_answered_read_only() -> None:
    """A MySQL connection that got a read-only answer is dropped (for psycopg, see
    BoundedConnection), with the rest of its pool: after a fail-over, the address reaches
    the new primary, while connections made before stay on the demoted server."""
    from sqlalchemy.dialects.mysql.base import MySQLDialect

    def drop(context: sqlalchemy.engine.ExceptionContext) -> None:
        if _mysql_code(context.original_exception) in MYSQL_READ_ONLY:
            context.is_disconnect = True

    sqlalchemy.event.listen(MySQLDialect, "handle_error", drop)
