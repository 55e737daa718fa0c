"""What the network and the server answer, told apart (storage/_network.py), with real servers:
a large answer on a slow link is no silence; a deadlock, a read-only server in a fail-over, a
standby and a full server are waited out; a refusal stays a refusal (tests/test_outages.py)."""

from __future__ import annotations

import secrets
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import optuna
import psycopg
import pymysql
import pytest
from faultproxy import FaultProxy
from optuna.trial import TrialState
from servers import DATABASE, OwnPostgres, server_url
from test_outages import (
    assert_study_done,
    create_study,
    logs,
    running,
    spawn,
    wait_for_running,
)

from storage import RetryPolicy, StorageUnavailable, open_storage
from storage._network import TIMEOUT_ENV

# The network bound in these tests ($HPO_STORAGE_TIMEOUT_S), and a large answer: six user
# attributes of 200 kB, read in one query (every trial's attributes at once).
BOUND_S = 1
ROWS, ROW_BYTES = 6, 200_000
# A deadline for a worker that should finish (not a timing assertion: a hung one fails by it).
FINISH_S = 240


def _said_until(said: list[str], text: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not any(text in line for line in said):
        assert time.monotonic() < deadline, f"never said {text!r}: {said}"
        time.sleep(0.05)


def _new_study(storage: optuna.storages.BaseStorage) -> optuna.Study:
    return optuna.create_study(storage=storage, study_name=f"network-{uuid.uuid4().hex[:8]}")


@pytest.fixture
def postgres_proxy() -> Iterator[tuple[FaultProxy, str]]:
    """A fault proxy in front of the suite's PostgreSQL, and the storage URL through it."""
    url = server_url("postgresql")
    with FaultProxy(5432) as proxy:
        yield proxy, url.replace(":5432/", f":{proxy.port}/")


def _large_study(rows: int = ROWS) -> tuple[optuna.Study, list[str]]:
    study = _new_study(open_storage(server_url("postgresql")))
    blobs = [secrets.token_hex(ROW_BYTES // 2) for _ in range(rows)]
    for blob in blobs:
        study.ask().set_user_attr("blob", blob)
    return study, blobs


def test_a_large_answer_slower_than_the_bound_streams_in(
    postgres_proxy: tuple[FaultProxy, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """1.2 MB at 200 kB per 0.4 s takes 2.4 s, more than twice the 1 s bound: the bound is
    on silence, not on the answer; the read succeeds at its first try."""
    proxy, url = postgres_proxy
    study, blobs = _large_study()
    monkeypatch.setenv(TIMEOUT_ENV, str(BOUND_S))
    said: list[str] = []
    storage = open_storage(url, retry=RetryPolicy(limit_s=5, say=said.append))
    proxy.trickle(ROW_BYTES, 0.4)
    trials = storage.get_all_trials(study._study_id)
    assert [trial.user_attrs["blob"] for trial in trials] == blobs
    assert said == []


def test_a_silence_inside_an_answer_still_ends_the_call(
    postgres_proxy: tuple[FaultProxy, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same answer with gaps of 1.5 s between its 64 kB pieces: a silence longer than
    the bound fails the call, as a blackhole does (tests/test_faults.py)."""
    proxy, url = postgres_proxy
    study, _ = _large_study(rows=1)
    monkeypatch.setenv(TIMEOUT_ENV, str(BOUND_S))
    said: list[str] = []
    storage = open_storage(url, retry=RetryPolicy(limit_s=0.1, say=said.append))
    proxy.trickle(65536, 1.5)
    with pytest.raises(StorageUnavailable):
        storage.get_all_trials(study._study_id)
    assert f"no answer from the server in {BOUND_S} s" in said[0], said


def _lock_waits(connection: pymysql.Connection) -> int:
    """Transactions waiting for a lock in this suite's database (other suites share the server)."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT COUNT(*) FROM information_schema.INNODB_TRX t "
                       "JOIN information_schema.PROCESSLIST p ON p.ID = t.trx_mysql_thread_id "
                       "WHERE t.trx_state = 'LOCK WAIT' AND p.DB = %s", (DATABASE,))  # fmt: skip
        return cursor.fetchone()[0]


def test_a_mariadb_deadlock_is_retried() -> None:
    """A real InnoDB deadlock on a worker's tell: the tell locks its trial row, then inserts
    its value; the test's transaction holds the gap the value goes in, then asks for the
    trial row. The server rolls the tell back (the lighter transaction), and it is retried."""
    said: list[str] = []
    storage = open_storage(server_url("mysql"), retry=RetryPolicy(limit_s=60, say=said.append))
    study = _new_study(storage)
    trial_id = study.ask()._trial_id
    other = pymysql.connect(host="127.0.0.1", user="root", database=DATABASE)
    told: list[object] = []

    def tell() -> None:
        try:
            told.append(storage.set_trial_state_values(trial_id, TrialState.COMPLETE, [0.5]))
        except Exception as err:  # raised, not retried: the test fails on it below
            told.append(err)

    telling = threading.Thread(target=tell)
    try:
        with other.cursor() as cursor:
            for i in range(20):  # rows changed: the heavier side, so not the victim
                cursor.execute(
                    "INSERT INTO study_system_attributes (study_id, `key`, value_json) "
                    "VALUES (%s, %s, '0')", (study._study_id, f"weight-{i}"),
                )  # fmt: skip
            cursor.execute("SELECT * FROM trial_values WHERE trial_id = %s FOR UPDATE", (trial_id,))
            telling.start()
            probe = pymysql.connect(host="127.0.0.1", user="root", database=DATABASE)
            deadline = time.monotonic() + 30
            while _lock_waits(probe) == 0:  # the tell holds its row, waits for our gap
                assert time.monotonic() < deadline, "the tell never waited for the gap lock"
                time.sleep(0.05)
            probe.close()
            try:  # closes the cycle; the server breaks it at once
                cursor.execute("SELECT * FROM trials WHERE trial_id = %s FOR UPDATE", (trial_id,))
            except pymysql.OperationalError as err:
                pytest.fail(f"the server chose the test's transaction as the victim: {err}")
            deadline = time.monotonic() + 60
            while not any("1213" in line for line in said) and telling.is_alive():
                assert time.monotonic() < deadline, said
                time.sleep(0.05)
        other.rollback()
        telling.join(timeout=60)
    finally:
        other.close()
    assert told == [True], said
    assert said[-1].startswith("storage reachable again"), said
    trial = storage.get_trial(trial_id)
    assert (trial.state, trial.values) == (TrialState.COMPLETE, [0.5])


@pytest.mark.parametrize(
    "kind, read_only",
    [
        ("postgresql", "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY"),
        ("mysql", "SET SESSION TRANSACTION READ ONLY"),
    ],
)
def test_a_read_only_answer_is_retried_on_a_new_connection(kind: str, read_only: str) -> None:
    """A primary demoted in a fail-over answers writes "read-only" on the connections made
    before; the address reaches the new primary. Here the pool's connections are made
    read-only: the write is retried once, on a new connection, which is not."""
    said: list[str] = []
    storage = open_storage(server_url(kind), retry=RetryPolicy(limit_s=10, say=said.append))
    trial_id = _new_study(storage).ask()._trial_id
    pooled = [storage.engine.connect() for _ in range(storage.engine.pool.checkedin())]
    for connection in pooled:
        connection.exec_driver_sql(read_only)
        connection.commit()
        connection.close()
    storage.set_trial_user_attr(trial_id, "written", "after the fail-over")
    assert storage.get_trial(trial_id).user_attrs == {"written": "after the fail-over"}
    assert len(said) == 2 and "read" in said[0].lower(), said
    assert said[1].startswith("storage reachable again"), said


def test_a_standby_is_waited_for_until_it_is_promoted(own_folder: Path) -> None:
    """A standby with hot_standby off answers "the database system is not accepting
    connections": a worker opening the storage waits, and opens it once promoted."""
    server = OwnPostgres(own_folder, hot_standby="off")
    (own_folder / "data" / "standby.signal").touch()
    with running(server):
        said: list[str] = []
        opened: list[optuna.storages.BaseStorage] = []
        retry = RetryPolicy(limit_s=60, say=said.append, max_delay_s=0.5)
        opening = threading.Thread(
            target=lambda: opened.append(open_storage(server.url, retry=retry))
        )
        opening.start()
        _said_until(said, "not accepting connections")
        server._run("pg_ctl", "-D", str(own_folder / "data"), "-w", "promote")
        opening.join(timeout=60)
        assert opened and said[-1].startswith("storage reachable again"), said
        assert _new_study(opened[0]).ask().number == 0


# A server this small: the worker needs two or three connections, the test fills the rest.
MAX_CONNECTIONS = 8
FULL = "sorry, too many clients already"


class Filler:
    """Idle connections of the test's own that take every free slot of a server."""

    def __init__(self, server: OwnPostgres):
        self.conninfo = f"host=127.0.0.1 port={server.port} user=postgres dbname=postgres"
        self.held: list[psycopg.Connection] = []

    def fill(self, leave_none_to: str) -> None:
        """Until the server turns the next one away and role `leave_none_to` has no session
        left (one the proxy reset is gone only once its server process has seen it)."""
        while True:
            try:
                self.held.append(psycopg.connect(self.conninfo, autocommit=True))
                continue
            except psycopg.OperationalError as err:
                assert FULL in str(err), err
            if not self.held or not self._sessions_of(leave_none_to):
                return
            time.sleep(0.05)  # its server processes are exiting: their slots come free

    def _sessions_of(self, role: str) -> int:
        query = "SELECT count(*) FROM pg_stat_activity WHERE usename = %s"
        return self.held[0].execute(query, (role,)).fetchone()[0]

    def release(self) -> None:
        while self.held:
            self.held.pop().close()


def _wait_while_alive(worker: subprocess.Popen, cwd: Path, text: str) -> None:
    deadline = time.monotonic() + 60
    while text not in logs(cwd, "w"):
        assert worker.poll() is None, f"the worker exited {worker.returncode}: {logs(cwd, 'w')}"
        assert time.monotonic() < deadline, logs(cwd, "w")
        time.sleep(0.1)


def _turned_away(server: OwnPostgres, role: str) -> int:
    """How many connections of `role` the server turned away as full (its log says)."""
    return (server.folder / "log").read_text().count(f"{role} FATAL:  {FULL}")


@pytest.mark.slow
def test_a_full_server_is_waited_out_at_start_and_mid_study(
    own_folder: Path, hpo_env: dict, tmp_path: Path
) -> None:
    """max_connections 8, every slot taken by the test: a worker waits at start-up; later,
    its connections reset while the server is full again, it waits mid-study; each time the
    slots are freed it carries on, and the study ends with exactly N finished."""
    server = OwnPostgres(
        own_folder, max_connections=MAX_CONNECTIONS, superuser_reserved_connections=0,
        log_line_prefix="'%u '",
    )  # fmt: skip
    filler = Filler(server)
    with running(server), FaultProxy(server.port) as proxy:
        name = "full"
        study = create_study(server.url, tmp_path, name, trials=3)
        with psycopg.connect(filler.conninfo, autocommit=True) as admin:
            admin.execute("CREATE ROLE worker LOGIN SUPERUSER")
        url = f"postgresql+psycopg://worker@127.0.0.1:{proxy.port}/postgres"
        env = {**hpo_env, "HPO_STORAGE": url}
        worker: subprocess.Popen | None = None
        try:
            filler.fill(leave_none_to="worker")
            worker = spawn(
                env, tmp_path, "w", "worker", "--study", name, "--storage-retry-s", "120"
            )
            _wait_while_alive(worker, tmp_path, "storage unreachable")
            assert "too many clients" in logs(tmp_path, "w")
            filler.release()
            wait_for_running(study, count=1)

            filler.fill(leave_none_to="nobody")  # the slots the worker does not hold
            proxy.refuse()  # its connections reset: it must open new ones
            filler.fill(leave_none_to="worker")
            before = _turned_away(server, "worker")
            proxy.passing()
            deadline = time.monotonic() + 60
            while _turned_away(server, "worker") == before:
                assert worker.poll() is None, f"the worker exited: {logs(tmp_path, 'w')}"
                assert time.monotonic() < deadline, "the worker never met the full server"
                time.sleep(0.1)
            filler.release()
            assert worker.wait(timeout=FINISH_S) == 0, logs(tmp_path, "w")
        finally:
            filler.release()
            if worker is not None and worker.poll() is None:  # a failed test's worker
                worker.kill()
                worker.wait()
        output = logs(tmp_path, "w")
        assert "Traceback" not in output and "storage reachable again" in output, output
        assert_study_done(study, 3)
