"""A storage's "not now", told from its "no" (DEPLOY.md §8, "Whose fault is it"): a full
PgBouncer is waited out like an outage, at start-up and mid-study, with the suite's own
PgBouncer and real `hpo` processes."""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import optuna
import psycopg
import pymysql
import pytest
from conftest import run_hpo
from faultproxy import FaultProxy
from optuna.trial import TrialState
from servers import DATABASE, OwnPgBouncer, OwnPostgres, OwnRedis, free_port, server_url
from test_network import BOUND_S, ROW_BYTES, _large_study, postgres_proxy  # noqa: F401
from test_outages import create_study, logs, running, spawn, wait_for_line

from storage import RetryPolicy, open_storage
from storage._network import TIMEOUT_ENV
from storage._open import SERVER_CONNECTIONS

# Client connections the pooler takes: the tests fill them all.
MAX_CLIENTS = 3


@pytest.fixture
def small_bouncer() -> Iterator[OwnPgBouncer]:
    """The suite's PgBouncer in front of an own PostgreSQL, taking MAX_CLIENTS clients."""
    folder = Path(tempfile.mkdtemp(prefix="hpo-own-server-"))
    postgres = OwnPostgres(folder)
    postgres.start()
    pooler = OwnPgBouncer(folder / "bouncer", postgres, max_client_conn=MAX_CLIENTS)
    try:
        pooler.start()
        pooler.postgres_url = postgres.url
        yield pooler
    finally:
        pooler.stop()
        postgres.stop()
        shutil.rmtree(folder, ignore_errors=True)


def fill(pooler: OwnPgBouncer, stack: ExitStack) -> None:
    """Take every client slot the pooler has left; closing `stack` gives them back."""
    plain = pooler.plain_url.replace("postgresql+psycopg", "postgresql")
    for _ in range(MAX_CLIENTS + 1):
        try:
            stack.enter_context(psycopg.connect(plain))
        except psycopg.OperationalError as err:
            assert "no more connections allowed" in str(err)
            return
    raise AssertionError(f"the pooler took more than {MAX_CLIENTS} clients")


def test_a_full_pooler_is_waited_out_mid_study(small_bouncer: OwnPgBouncer) -> None:
    said: list[str] = []
    slots = ExitStack()

    def say(line: str) -> None:  # the pooler's slots come back once the wait is said
        said.append(line)
        if "storage unreachable" in line:
            slots.close()

    storage = open_storage(small_bouncer.url, retry=RetryPolicy(limit_s=60, say=say))
    study = optuna.create_study(storage=storage)
    storage.engine.dispose()  # the next call opens a new connection, as a pool does
    fill(small_bouncer, slots)
    study.set_user_attr("after", "the pooler had room again")
    assert study.user_attrs["after"] == "the pooler had room again"
    assert "no more connections allowed" in said[0], said


def test_a_worker_starting_behind_a_full_pooler_waits(
    small_bouncer: OwnPgBouncer, hpo_env: dict, tmp_path: Path
) -> None:
    create_study(small_bouncer.postgres_url, tmp_path, "pooler", trials=1)
    with ExitStack() as slots:
        fill(small_bouncer, slots)
        worker = spawn(hpo_env, tmp_path, "worker", "worker", "--study", "pooler",
                       "--storage", small_bouncer.url, "--storage-retry-s", "120")  # fmt: skip
        wait_for_line(tmp_path, "worker", "no more connections allowed")
    assert worker.wait(timeout=300) == 0, logs(tmp_path, "worker")
    study = optuna.load_study(study_name="pooler", storage=open_storage(small_bouncer.postgres_url))
    assert [t.state.name for t in study.get_trials()] == ["COMPLETE"], logs(tmp_path, "worker")
    # Whoever watches the study sees why its worker waited.
    shown = run_hpo("status", "--study", "pooler", "--storage", small_bouncer.postgres_url,
                    env=hpo_env, cwd=tmp_path)  # fmt: skip
    assert "last machine fault" in shown.stdout, shown.stdout
    assert "no more connections allowed" in shown.stdout, shown.stdout


@pytest.mark.slow
def test_a_wait_for_a_pooled_connection_is_waited_out(
    postgres_proxy: tuple[FaultProxy, str],  # noqa: F811 (the fixture, imported)
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two calls streaming large answers on a slow link hold both pooled connections past a
    third thread's pool wait (POOL_WAIT_CALLS x call_s, 6 s here): the heartbeat survives
    it, and the third call is retried, not raised into the trial."""
    proxy, url = postgres_proxy
    study, _ = _large_study(rows=16)
    monkeypatch.setenv(TIMEOUT_ENV, str(BOUND_S))
    said: list[str] = []
    storage = open_storage(url, retry=RetryPolicy(limit_s=120, say=said.append))
    trial_id = storage.create_new_trial(study._study_id)
    proxy.trickle(ROW_BYTES, 0.9)  # 3.2 MB in 16 pieces: about 14 s per read
    readers = [
        threading.Thread(target=storage.get_all_trials, args=(study._study_id,))
        for _ in range(SERVER_CONNECTIONS)
    ]
    for reader in readers:
        reader.start()
    deadline = time.monotonic() + 60
    while storage.engine.pool.checkedout() < SERVER_CONNECTIONS:  # both held: the squeeze
        assert time.monotonic() < deadline, "the readers never held both connections"
        time.sleep(0.05)
    storage.record_heartbeat(trial_id)  # never raises: a heartbeat thread must not die
    storage.set_trial_user_attr(trial_id, "after", "a connection came back")
    for reader in readers:
        reader.join()
    assert storage.get_trial(trial_id).user_attrs["after"] == "a connection came back"
    assert any("TimeoutError" in line for line in said), said


def write(study: optuna.Study) -> None:
    study.set_user_attr("after", "the fail-over")


def read(study: optuna.Study) -> None:
    study.get_trials()


@pytest.mark.parametrize(
    ("serve_stale_data", "call", "answer"),
    [("yes", write, "ReadOnlyError"), ("no", read, "MasterDownError")],
    ids=["READONLY", "MASTERDOWN"],
)
def test_a_redis_fail_over_is_waited_out(
    own_folder: Path, serve_stale_data: str, call, answer: str
) -> None:
    """The journal's redis-server demoted (REPLICAOF a primary that is not there: it keeps
    its data and answers READONLY to a write, or MASTERDOWN to any call where it serves no
    stale data), then promoted back once the storage has said it waits."""
    server = OwnRedis(own_folder)
    with running(server):
        admin = server.client()
        said: list[str] = []

        def say(line: str) -> None:
            said.append(line)
            if "storage unreachable" in line:
                admin.replicaof("NO", "ONE")  # promoted back

        storage = open_storage(server.url, retry=RetryPolicy(limit_s=60, say=say))
        study = optuna.create_study(storage=storage)
        admin.config_set("replica-serve-stale-data", serve_stale_data)
        admin.replicaof("127.0.0.1", free_port())
        call(study)
        assert answer in said[0], said
        write(study)  # the promoted server takes writes again, with its data
        assert study.user_attrs["after"] == "the fail-over"


def test_a_mariadb_lock_wait_timeout_is_retried() -> None:
    """A finish waits for its trial's row, which another transaction holds past the pool's
    connections' lock wait (1 s here): MariaDB's 1205 rolls the statement back, and the
    worker repeats it, as it does a deadlock; the holder lets go once the wait is said."""
    url = server_url("mysql")  # creates this worker's database where it is missing
    holder = pymysql.connect(host="127.0.0.1", user="root", database=DATABASE)

    def say(line: str) -> None:
        said.append(line)
        if "storage unreachable" in line:
            holder.rollback()

    said: list[str] = []
    storage = open_storage(url, retry=RetryPolicy(limit_s=60, say=say))
    study = optuna.create_study(storage=storage, study_name=f"lock-{uuid.uuid4().hex[:8]}")
    trial_id = study.ask()._trial_id
    pooled = [storage.engine.connect() for _ in range(storage.engine.pool.checkedin())]
    for connection in pooled:
        connection.exec_driver_sql("SET SESSION innodb_lock_wait_timeout = 1")
        connection.close()
    try:
        with holder.cursor() as cursor:
            cursor.execute("SELECT * FROM trials WHERE trial_id = %s FOR UPDATE", (trial_id,))
        assert storage.set_trial_state_values(trial_id, TrialState.COMPLETE, [0.5])
    finally:
        holder.close()
    assert "1205" in said[0], said
    assert storage.get_trial(trial_id).state == TrialState.COMPLETE
