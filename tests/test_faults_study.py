"""The whole-study scenarios of tests/test_faults.py (random resets through a study, on
PostgreSQL and MariaDB of the module's own), in a file of their own so that pytest-xdist
runs them beside the rest of the faults (a worker takes a whole file)."""

from __future__ import annotations

from pathlib import Path

import pytest
import test_faults
from faultproxy import FaultProxy
from servers import OwnMariaDB, OwnPostgres
from test_faults import finish, new_study, via, workers
from test_outages import assert_study_done

# test_faults' fixtures (its servers, its proxy, the clean-up of workers), found by name here.
mariadb, postgres, proxy = test_faults.mariadb, test_faults.postgres, test_faults.proxy
no_worker_left = test_faults.no_worker_left

# A trial for each worker, of 2 epochs: every kind of call a study makes (start-up, claim,
# heartbeats, reports, tell, stale checks) still meets resets (about ten a study here), and
# each reset costs a retry's backoff; more trials only repeat the same calls.
TRIALS, EPOCHS = 2, 2


@pytest.mark.slow
def test_random_resets_for_a_whole_study(
    postgres: OwnPostgres, proxy: FaultProxy, hpo_env: dict, tmp_path: Path
) -> None:
    name, study = new_study(postgres, tmp_path, EPOCHS, TRIALS)
    proxy.random_resets(0.02)
    finish(workers(hpo_env, tmp_path, via(proxy, postgres), name, 2), tmp_path, [0, 0])
    assert proxy.resets > 0
    assert_study_done(study, TRIALS)


@pytest.mark.slow
def test_random_resets_for_a_whole_study_on_mariadb(
    mariadb: OwnMariaDB, hpo_env: dict, tmp_path: Path
) -> None:
    """Resets only: the proxy's statement rules read PostgreSQL's messages."""
    name, study = new_study(mariadb, tmp_path, EPOCHS, TRIALS)
    with FaultProxy(mariadb.port, seed=3306) as proxy:
        proxy.random_resets(0.02)
        finish(workers(hpo_env, tmp_path, via(proxy, mariadb), name, 2), tmp_path, [0, 0])
        assert proxy.resets > 0
    assert_study_done(study, TRIALS)
