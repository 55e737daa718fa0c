"""A Redis URL naming a replica is the user's mistake, told at connect by the role the server
reports: one line, exit 2, nothing stored. A replica refuses writes for good, where a primary
a fail-over demoted does so for a while (waited out: test_storage_faults.py)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import run_hpo, tiny_start
from servers import OwnRedis

# Each `hpo` here is a real process on real servers of the test's own.
pytestmark = pytest.mark.slow


@pytest.fixture
def primary_and_replica(own_folder: Path) -> Iterator[tuple[OwnRedis, OwnRedis]]:
    (own_folder / "primary").mkdir()
    (own_folder / "replica").mkdir()
    primary = OwnRedis(own_folder / "primary")
    replica = OwnRedis(own_folder / "replica", replica_of=primary)
    primary.start()
    replica.start()
    try:
        wait_until_following(replica)
        yield primary, replica
    finally:
        replica.stop()
        primary.stop()


def wait_until_following(replica: OwnRedis, timeout: float = 60) -> None:
    """Until the replica's link to its primary is up (its first sync done)."""
    deadline = time.monotonic() + timeout
    while replica.client().execute_command("ROLE")[3] != b"connected":
        assert time.monotonic() < deadline, "the replica never synced with its primary"
        time.sleep(0.05)


def expect_replica_refused(result, replica: OwnRedis, primary: OwnRedis) -> None:
    said = result.stdout + result.stderr
    assert result.returncode == 2, said
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, said
    assert f"read-only replica (of 127.0.0.1:{primary.port})" in result.stderr, said
    assert str(replica.port) in result.stderr and "Traceback" not in said, said


def test_a_replica_s_url_is_refused_in_one_line_and_a_reader_may_use_it(
    primary_and_replica: tuple[OwnRedis, OwnRedis], hpo_env: dict, tmp_path: Path
) -> None:
    primary, replica = primary_and_replica

    def hpo(*args: str, storage: OwnRedis):
        env = {**hpo_env, "HPO_STORAGE": storage.url}
        return run_hpo(*args, env=env, cwd=tmp_path)

    create = ("create", "--study", "s", "--trials", "2", "--space", "tiny",
              "--dataset", "synthetic", "--epochs", "1")  # fmt: skip
    expect_replica_refused(hpo(*create, storage=replica), replica, primary)
    # A short wait for an outage: the old code waited the replica out, then exited 75.
    start = (*tiny_start("s", 2), "--storage-retry-s", "3")
    expect_replica_refused(hpo(*start, storage=replica), replica, primary)
    assert primary.client().dbsize() == 0  # nothing stored

    # The primary's URL is the one that works; a look through the replica is fine.
    created = hpo(*create, storage=primary)
    assert created.returncode == 0, created.stdout + created.stderr
    assert primary.client().execute_command("WAIT", 1, 30_000) == 1  # the replica has it
    shown = hpo("status", "--study", "s", storage=replica)
    assert shown.returncode == 0 and "target" in shown.stdout, shown.stdout + shown.stderr
