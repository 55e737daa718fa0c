"""A fleet on one database: the connections one worker holds, and 32 real `hpo worker`
processes through PgBouncer in transaction mode on a PostgreSQL that admits fewer than they
are, with kill -9 and restarts mid-run (bench/fleet.py runs 128, with figures)."""

from __future__ import annotations

import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from fleetrun import Fleet, check_study, create_fleet_study, fleet_servers, torch_loaded

WORKERS = 32
TRIALS = 200
KILLS = 2


@pytest.fixture
def own_folder() -> Iterator[Path]:
    # Not under pytest's tmp_path: the postgres user must reach it, and root's is private.
    folder = Path(tempfile.mkdtemp(prefix="hpo-own-server-"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.timeout(600)
def test_a_fleet_through_pgbouncer_ends_at_exactly_n(own_folder: Path) -> None:
    # 32 workers hold 64 client connections; the server admits 20, the pooler uses 10.
    with fleet_servers(own_folder, max_connections=20, pool_size=10) as (_, bouncer):
        name = f"fleet-{uuid.uuid4().hex[:8]}"
        study = create_fleet_study(bouncer.url, name, TRIALS)
        fleet = Fleet(bouncer.url, name, own_folder / "fleet")
        fleet.spawn_hpo_workers(WORKERS)
        fleet.wait_until_running(study, WORKERS, timeout=300)
        assert not any(torch_loaded(pid) for pid in fleet.workers)
        fleet.open_gate()
        for _ in range(KILLS):
            fleet.kill_mid_trial()
        codes = fleet.wait(timeout=300)
        assert set(codes.values()) == {0}, (codes, fleet.outputs())
        check_study(study, TRIALS, fleet.killed)
