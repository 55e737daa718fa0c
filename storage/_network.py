"""The network to a database server: a bound on every wait, and a refusal told from an outage.

A network that goes silent (a partition, a host that vanished, a hung proxy) sends no FIN and
no RST: without a bound of its own, a driver waits in a socket read forever. With these, a
call with no answer fails within NetworkBounds.call_s as a lost connection, which the worker's
RetryPolicy retries under --storage-retry-s (storage/_retry.py).

A server that answers "no" (wrong password, unknown database) is no outage: waiting would not
change its answer, so that error is raised at once.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import sqlalchemy.engine

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
        """A psycopg connection whose waits for the server end after `answer_s`."""

        answer_s = DEFAULT_STORAGE_TIMEOUT_S

        def wait(self, gen: Any, interval: float = 0.1, timeout: float | None = None) -> Any:
            bound = self.answer_s if timeout is None else timeout
            try:
                return super().wait(gen, interval=interval, timeout=bound)
            except psycopg.OperationalError as err:
                # A query left unanswered: its connection cannot be reused, so the pool
                # must drop it (a closed connection is a disconnect to SQLAlchemy).
                if self.pgconn.transaction_status == psycopg.pq.TransactionStatus.ACTIVE:
                    self.pgconn.finish()
                    raise psycopg.OperationalError(
                        f"no answer from the server in {self.answer_s:g} s"
                    ) from err
                raise

    return BoundedConnection


# PostgreSQL's refusals at connect carry no SQLSTATE, only the server's FATAL message; these
# FATALs are a server that is starting, stopping or full, which waiting does change.
POSTGRESQL_TRANSIENT = (
    "starting up",
    "shutting down",
    "not yet accepting connections",
    "recovery mode",
    "too many clients",
    "connection slots",
    "administrator command",
)
# MySQL's client-side errors (no server answer) are numbered from 2000; below are the server's,
# of which these two pass: too many connections, server shutdown in progress.
MYSQL_CLIENT_ERRORS_FROM = 2000
MYSQL_TRANSIENT = (1040, 1053)


def refused_by_server(err: BaseException) -> bool:
    """Whether the server itself answered and refused (credentials, database, permissions)."""
    module = type(err).__module__.split(".")[0]
    if module == "psycopg":
        message = str(err)
        return "FATAL:" in message and not any(text in message for text in POSTGRESQL_TRANSIENT)
    if module == "pymysql":
        code = err.args[0] if err.args and isinstance(err.args[0], int) else None
        return code is not None and code < MYSQL_CLIENT_ERRORS_FROM and code not in MYSQL_TRANSIENT
    return module == "redis" and type(err).__name__ == "AuthenticationError"
