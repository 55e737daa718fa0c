"""A fleet on one database: the connections one worker holds, and 16 real `hpo worker`
processes through PgBouncer in transaction mode on a PostgreSQL that admits fewer connections
than they hold, with kill -9 and restarts mid-run (bench/fleet.py runs 128, with figures)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest
from conftest import HPO, run_hpo
from fleetrun import (
    Fleet,
    check_study,
    connections_of,
    create_fleet_study,
    fleet_servers,
    torch_loaded,
)
from servers import server_url
from test_workers import MICRO_SPACE

from search.commands.launch import BENCH_OBJECTIVE_ENV
from storage import open_storage
from storage._open import SERVER_CONNECTIONS

WORKERS = 16  # each start imports Optuna and SQLAlchemy: ~1.5 CPU s a worker
TRIALS = 120
KILLS = 2


# Five threads wanting a connection at once, in a process of their own: the suite's process
# holds other tests' pools, which the collector may close mid-count.
SHARED_CONNECTIONS = """
import os, sys, threading, time
import sqlalchemy
from fleetrun import connections_of
from storage import open_storage
url = sys.argv[1]
port = sqlalchemy.engine.make_url(url).port
storage = open_storage(url)
peak, served = [], []
def hold():
    with storage.engine.connect():
        peak.append(connections_of(os.getpid(), port))
        time.sleep(0.2)
    served.append(1)
threads = [threading.Thread(target=hold) for _ in range(5)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join(timeout=60)
print(len(served), max(peak))
"""


def test_threads_of_one_process_share_its_two_connections() -> None:
    """Five threads wanting a connection at once: two hold one, the others wait their turn."""
    tests = str(Path(__file__).parent)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [tests, os.environ.get("PYTHONPATH")])),
    }
    done = subprocess.run(
        [sys.executable, "-c", SHARED_CONNECTIONS, server_url("postgresql")],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    served, peak = map(int, done.stdout.split())
    assert served == 5
    assert peak == SERVER_CONNECTIONS == 2


@pytest.mark.slow
def test_a_training_worker_holds_two_connections(hpo_env: dict, tmp_path: Path) -> None:
    """A real `hpo worker` training on PostgreSQL (heartbeat and checkpoint threads beside
    its trial), its connections counted from start to exit: two, never more."""
    url = server_url("postgresql")
    name = f"conns-{uuid.uuid4().hex[:8]}"
    (tmp_path / "micro.yaml").write_text(MICRO_SPACE)
    env = {**hpo_env, "HPO_STORAGE": url}
    subprocess.run(
        [HPO, "create", "--study", name, "--trials", "2", "--space", "micro.yaml", "--dataset",
         "synthetic", "--epochs", "8", "--pruner", "none", "--heartbeat", "1",
         "--checkpoint-interval", "0"],
        env=env, cwd=tmp_path, check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    worker = subprocess.Popen(
        [HPO, "worker", "--study", name], env=env, cwd=tmp_path,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    study = optuna.load_study(study_name=name, storage=open_storage(url))
    port = study._storage._backend.engine.url.port
    counts, mid_trial = [], []
    while worker.poll() is None:
        counts.append(connections_of(worker.pid, port))
        if study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            mid_trial.append(counts[-1])
        time.sleep(0.02)
    assert worker.wait() == 0, worker.stdout.read()
    assert mid_trial and max(mid_trial) == 2 and max(counts) == 2, (max(counts), mid_trial[-5:])


@pytest.mark.slow
def test_a_bench_objective_that_is_not_there_is_one_line(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HPO_")}
    env[BENCH_OBJECTIVE_ENV] = "stand_in:no_such_objective"
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")])
    env["HPO_STORAGE"] = f"sqlite:///{tmp_path / 'hpo.db'}"
    made = run_hpo(
        "create", "--study", "x", "--trials", "1", "--space", "tiny", env=env, cwd=tmp_path
    )
    assert made.returncode == 0, made.stderr
    result = run_hpo("worker", "--study", "x", env=env, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "no_such_objective" in result.stderr


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_fleet_through_pgbouncer_ends_at_exactly_n(own_folder: Path) -> None:
    # 16 workers hold 32 client connections; the server admits 12, the pooler uses 6.
    with fleet_servers(own_folder, max_connections=12, pool_size=6) as (_, bouncer):
        name = f"fleet-{uuid.uuid4().hex[:8]}"
        study = create_fleet_study(bouncer.url, name, TRIALS)
        fleet = Fleet(bouncer.url, name, own_folder / "fleet")
        fleet.spawn_hpo_workers(WORKERS)
        fleet.wait_until_running(study, WORKERS, timeout=300)
        assert not any(torch_loaded(pid) for pid in fleet.workers)
        # Each holds at most two client connections of PgBouncer's (one while it waits).
        assert max(connections_of(pid, bouncer.port) for pid in fleet.workers) <= 2
        fleet.open_gate()
        for _ in range(KILLS):
            fleet.kill_mid_trial()
        codes = fleet.wait(timeout=300)
        assert set(codes.values()) == {0}, (codes, fleet.outputs())
        check_study(study, TRIALS, fleet.killed)
