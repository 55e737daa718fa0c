"""The real servers the tests talk to: skipped only where a server does not answer (a
failure in CI, where .ci/run starts them); the test database is created when missing."""

from __future__ import annotations

import os

import pytest
import redis
import sqlalchemy

PASSWORD = "s3cret-pw"  # trust auth ignores it; it must never be printed
DATABASE = "hpo_test"
SERVERS = {
    "postgresql": f"postgresql+psycopg://postgres:{PASSWORD}@127.0.0.1:5432/{DATABASE}",
    "mysql": f"mysql+pymysql://root@127.0.0.1:3306/{DATABASE}",
    "redis": "redis://127.0.0.1:6379/15",
}
# The database each server has before ours exists, to connect to while creating it.
ADMIN_DATABASE = {"postgresql": "postgres", "mysql": ""}
# Where the suite runs in CI (.ci/run sets it): a missing server is a failure there.
IN_CI = os.environ.get("CI") == "true"


def server_url(kind: str) -> str:
    """The server's URL, its test database created if needed; a skip when it does not answer."""
    url = SERVERS[kind]
    try:
        _ping(kind, url)
    except (redis.ConnectionError, sqlalchemy.exc.OperationalError) as err:
        if IN_CI:
            pytest.fail(f"{kind} must be running in CI: {type(err).__name__}: {err}")
        pytest.skip(f"no {kind} server at {url.split('@')[-1]}")
    if kind != "redis":
        _create_database(kind, url)
    return url


def _ping(kind: str, url: str) -> None:
    if kind == "redis":
        redis.Redis.from_url(url, socket_connect_timeout=2).ping()
        return
    admin = sqlalchemy.engine.make_url(url).set(database=ADMIN_DATABASE[kind])
    with sqlalchemy.create_engine(admin, connect_args={"connect_timeout": 2}).connect():
        pass


def _create_database(kind: str, url: str) -> None:
    admin = sqlalchemy.engine.make_url(url).set(database=ADMIN_DATABASE[kind])
    # CREATE DATABASE cannot run inside a transaction on PostgreSQL.
    engine = sqlalchemy.create_engine(admin, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        if kind == "mysql":
            connection.exec_driver_sql(f"CREATE DATABASE IF NOT EXISTS {DATABASE}")
            return
        exists = connection.exec_driver_sql(
            f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE}'"
        ).scalar()
        if not exists:
            connection.exec_driver_sql(f"CREATE DATABASE {DATABASE}")
    engine.dispose()
