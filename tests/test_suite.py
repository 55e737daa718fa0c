"""The suite's own rules: under pytest-xdist each worker has its own database, Redis db and
ports (tests/servers.py), and the smoke test runs only where a -m expression names it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from servers import PORTS_PER_WORKER, WORKER_PORTS, free_port

TESTS = Path(__file__).parent
SMOKE_TEST = "tests/test_deploy.py::test_the_compose_stack_runs_for_real_with_podman"
WORKER_SETUP = """
import json, servers
print(json.dumps([servers.DATABASE, servers.REDIS_DB, list(servers.WORKER_PORTS)[::999]]))
"""


def setup_of(worker: str | None) -> tuple[str, int, list[int]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HPO_TEST_", "PYTEST_X"))}
    env.update(HPO_TEST_DATABASE="hpo_base", HPO_TEST_REDIS_DB="12", PYTHONPATH=str(TESTS))
    if worker:
        env["PYTEST_XDIST_WORKER"] = worker
    done = subprocess.run(
        [sys.executable, "-c", WORKER_SETUP], env=env, capture_output=True, text=True, check=True
    )
    return tuple(json.loads(done.stdout))


def test_each_xdist_worker_has_its_own_database_redis_db_and_ports() -> None:
    alone, first, fourth = setup_of(None), setup_of("gw0"), setup_of("gw3")
    assert alone[:2] == ("hpo_base", 12)
    assert first[:2] == ("hpo_base_gw0", 12) and fourth[:2] == ("hpo_base_gw3", 9)
    assert max(first[2]) < min(fourth[2]) and max(fourth[2]) < 32768  # below the ephemeral


def test_free_ports_are_this_workers_and_not_handed_out_twice_in_a_row() -> None:
    ports = [free_port() for _ in range(PORTS_PER_WORKER // 2)]
    assert len(set(ports)) == len(ports)
    assert all(port in WORKER_PORTS for port in ports)


def collected(*args: str) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:xdist",
         "tests/test_deploy.py", *args],
        cwd=TESTS.parent, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return [line for line in done.stdout.splitlines() if "::" in line]


@pytest.mark.slow
def test_the_smoke_test_runs_only_where_a_marker_expression_names_it() -> None:
    assert SMOKE_TEST not in collected()
    assert SMOKE_TEST not in collected("-m", "not slow")
    assert collected("-m", "smoke") == [SMOKE_TEST]
