"""The real servers the tests talk to; skipped where absent, required in CI."""

from __future__ import annotations

import os

import pytest
import redis
import sqlalchemy

PASSWORD = "s3cret-pw"  # trust auth ignores it; it must never be printed
SERVERS = {
    "postgresql": f"postgresql+psycopg://postgres:{PASSWORD}@127.0.0.1:5432/hpo_test",
    "mysql": "mysql+pymysql://root@127.0.0.1:3306/hpo_test",
    "redis": "redis://127.0.0.1:6379/15",
}


def server_url(kind: str) -> str:
    """The server's URL once it answers; a skip (a failure in CI) when it does not."""
    url = SERVERS[kind]
    try:
        _ping(kind, url)
    except Exception as err:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{kind} must be running in CI: {type(err).__name__}: {err}")
        pytest.skip(f"no {kind} server at {url.split('@')[-1]}")
    return url


def _ping(kind: str, url: str) -> None:
    if kind == "redis":
        redis.Redis.from_url(url, socket_connect_timeout=2).ping()
        return
    with sqlalchemy.create_engine(url, connect_args={"connect_timeout": 2}).connect():
        pass
