"""Behind PgBouncer in transaction mode (Debian's pgbouncer, the tests' own, on a free port):
prepared statements off through the URL, and the study row lock that keeps a retry single.
A whole study of real workers through it, with kill -9, is tests/test_fleet_scale.py's."""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from conftest import run_hpo
from optuna.trial import TrialState
from servers import OwnPgBouncer, OwnPostgres

from storage import RetryPolicy, StorageURLError, open_storage
from storage.optuna_private import RETRY_HISTORY_KEY, RETRY_OF_KEY

INSERTERS = 8


@pytest.fixture(scope="module")
def bouncer() -> Iterator[OwnPgBouncer]:
    # Not under pytest's tmp_path: the postgres user must reach it, and root's is private.
    folder = Path(tempfile.mkdtemp(prefix="hpo-own-server-"))
    postgres = OwnPostgres(folder)
    postgres.start()
    # Fewer server connections than inserters: transactions queue for them at the pooler.
    pooler = OwnPgBouncer(folder / "bouncer", postgres, default_pool_size=4)
    try:
        pooler.start()
        yield pooler
    finally:
        pooler.stop()
        postgres.stop()
        shutil.rmtree(folder, ignore_errors=True)


def test_the_url_turns_prepared_statements_off(bouncer: OwnPgBouncer) -> None:
    storage = open_storage(bouncer.url)
    with storage.engine.connect() as connection:
        assert connection.connection.driver_connection.prepare_threshold is None
    with pytest.raises(StorageURLError, match="prepare_threshold=often: a whole number"):
        open_storage(bouncer.url.replace("=none", "=often"))


def test_a_bad_prepare_threshold_is_one_line(bouncer: OwnPgBouncer, tmp_path: Path) -> None:
    url = bouncer.url.replace("=none", "=often")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HPO_")}
    result = run_hpo("status", "--storage", url, env=env, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "prepare_threshold=often" in result.stderr


def test_one_retry_however_many_insert_it_at_once(bouncer: OwnPgBouncer) -> None:
    """Eight workers queue the same retry at the same moment, each on its own connections:
    the check for an existing retry runs under the study row lock (SELECT ... FOR UPDATE),
    which holds through the pooler only because a transaction keeps its server connection."""
    study = optuna.create_study(storage=open_storage(bouncer.url))
    failed = study.ask()
    study.tell(failed, state=TrialState.FAIL)
    template = optuna.trial.create_trial(
        state=TrialState.WAITING,
        system_attrs={RETRY_OF_KEY: failed.number, RETRY_HISTORY_KEY: [failed.number]},
    )
    storages = [open_storage(bouncer.url, retry=RetryPolicy()) for _ in range(INSERTERS)]
    start = threading.Barrier(INSERTERS)
    made: list[int] = []

    def insert(storage: optuna.storages.BaseStorage) -> None:
        start.wait(timeout=60)
        made.append(storage.create_new_trial(study._study_id, template_trial=template))

    threads = [threading.Thread(target=insert, args=(storage,)) for storage in storages]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    retries = [t for t in study.get_trials() if t.system_attrs.get(RETRY_OF_KEY) is not None]
    assert len(made) == INSERTERS and len(set(made)) == 1, made
    assert [t.number for t in retries] == [1]
