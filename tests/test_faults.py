"""Faults a real network makes, injected by tests/faultproxy.py between real `hpo worker`
processes and a PostgreSQL of the tests' own: resets, a silent partition (blackhole),
refused connections, and answers lost after the commit; on a MariaDB of their own, resets.
After each: exactly N finished."""

from __future__ import annotations

import io
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import optuna
import pytest
import sqlalchemy
from faultproxy import FaultProxy
from rich.console import Console
from servers import OwnMariaDB, OwnPostgres, OwnServer
from test_outages import assert_study_done, logs, spawn, wait_for_line, wait_for_running
from test_workers import MICRO_SPACE

import search.rules.study
from search.commands.launch import StudyRequest, create_study, stored_settings
from search.commands.progress import SearchProgress
from search.rules.space import load_space, report_table1_params, sample_config
from search.rules.study import budget, claim_trial, fail_stale_trials, queue_owed_retries
from storage import HeartbeatPolicy, NetworkBounds, RetryPolicy, open_storage, optuna_private
from storage._network import server_engine_kwargs, with_redis_timeouts

TRIALS = 3
# A deadline for a worker that should finish (not a timing assertion: a hung one fails by it).
FINISH_S = 240


def running(server_class: type[OwnServer]) -> Iterator[OwnServer]:
    """A server of the module's own (never stopped mid-test: the proxy makes the faults)."""
    folder = Path(tempfile.mkdtemp(prefix="hpo-faults-"))
    server = server_class(folder)
    server.start()
    yield server
    server.stop()
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def postgres() -> Iterator[OwnPostgres]:
    yield from running(OwnPostgres)


@pytest.fixture
def proxy(postgres: OwnPostgres, request: pytest.FixtureRequest) -> Iterator[FaultProxy]:
    seed = sum(request.node.name.encode())  # seeded per test: a failure replays
    with FaultProxy(postgres.port, seed=seed) as faults:
        yield faults


@pytest.fixture(scope="module")
def mariadb() -> Iterator[OwnMariaDB]:
    yield from running(OwnMariaDB)


def via(proxy: FaultProxy, server: OwnServer) -> str:
    return server.url.replace(f":{server.port}/", f":{proxy.port}/")


# Trials long enough (about 4 s here) that both workers are mid-trial together, whichever
# of them started first: a worker that finishes the study alone would never see the fault.
MID_TRIAL_EPOCHS = 12


def new_study(server: OwnServer, cwd: Path, epochs: int = 3, trials: int = TRIALS):
    """Made directly (not through the proxy): a micro space, heartbeat 1 s, a checkpoint every
    epoch. Returns the name and a study handle the test reads without faults."""
    name = f"faults-{uuid.uuid4().hex[:8]}"
    space = cwd / "micro.yaml"
    space.write_text(MICRO_SPACE)
    request = StudyRequest(
        study=name, trials=trials, storage=server.url, space=str(space), epochs=epochs,
        dataset="synthetic", pruner="none", heartbeat=1, checkpoint_interval=0,
    )  # fmt: skip
    create_study(request, SearchProgress())
    return name, optuna.load_study(study_name=name, storage=open_storage(server.url))


SPAWNED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def no_worker_left() -> Iterator[None]:
    """A worker a failed test leaves waiting (a trial RUNNING forever) is killed."""
    yield
    while SPAWNED:
        process = SPAWNED.pop()
        if process.poll() is None:
            process.kill()
            process.wait()


def workers(
    env: dict, cwd: Path, url: str, name: str, count: int, *extra: str, first: int = 0
) -> list[subprocess.Popen]:
    env = {**env, "HPO_STORAGE": url}
    started = [
        spawn(env, cwd, f"w{i}", "worker", "--study", name, *extra)
        for i in range(first, first + count)
    ]
    SPAWNED.extend(started)
    return started


def finish(
    processes: list[subprocess.Popen],
    cwd: Path,
    codes: list[int],
    first: int = 0,
    timeout: float = FINISH_S,
) -> list[str]:
    """Each worker exits with its expected code; no traceback in any log."""
    got = [p.wait(timeout=timeout) for p in processes]
    outputs = [logs(cwd, f"w{i}") for i in range(first, first + len(processes))]
    assert got == codes, outputs
    assert not [o for o in outputs if "Traceback" in o], outputs
    return outputs


# Short network bounds ($HPO_STORAGE_TIMEOUT_S): a silence outlasts them in seconds, not in
# the default's 40 s; the same code paths run as with the default.
SHORT_BOUNDS = NetworkBounds(answer_s=3)


def short_bounds(env: dict) -> dict:
    return {**env, "HPO_STORAGE_TIMEOUT_S": str(SHORT_BOUNDS.answer_s)}


def test_every_driver_takes_its_bounds_from_the_storage_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert NetworkBounds.from_env().call_s == 40  # the default: 30 s an answer, 10 s a connect
    monkeypatch.setenv("HPO_STORAGE_TIMEOUT_S", "3")
    assert NetworkBounds.from_env() == SHORT_BOUNDS and SHORT_BOUNDS.call_s == 6
    mysql = server_engine_kwargs("mysql+pymysql://root@h/db", "mysql")["connect_args"]
    assert (mysql["connect_timeout"], mysql["read_timeout"], mysql["write_timeout"]) == (3, 3, 3)
    psycopg = server_engine_kwargs("postgresql+psycopg://u@h/db", "postgresql")["creator"]
    assert (psycopg.answer_s, psycopg.params["tcp_user_timeout"]) == (3, 3000)
    redis = parse_qs(urlsplit(with_redis_timeouts("redis://h/0?socket_timeout=9")).query)
    assert (redis["socket_timeout"], redis["socket_connect_timeout"]) == (["9"], ["3.0"])


@pytest.mark.slow
def test_a_blackhole_is_ridden_out_within_the_limit_and_ends_a_worker_past_it(
    postgres: OwnPostgres, proxy: FaultProxy, hpo_env: dict, tmp_path: Path
) -> None:
    """A silence longer than one call's bound: the unanswered calls fail and are retried.
    w1 (--storage-retry-s 5, less than the silence) exits 75 with one line; w0 (60 s) carries
    on once the network answers again, then fails w1's abandoned trial and runs its retry.
    (One study for both limits: a worker that starts after the outage is
    test_outages.py's test_past_the_retry_limit_a_worker_exits_and_the_next_one_finishes.)"""
    limit = 5
    name, study = new_study(postgres, tmp_path, epochs=MID_TRIAL_EPOCHS, trials=2)
    env, url = short_bounds(hpo_env), via(proxy, postgres)
    riding = workers(env, tmp_path, url, name, 1, "--storage-retry-s", "60")
    ending = workers(env, tmp_path, url, name, 1, "--storage-retry-s", str(limit), first=1)
    wait_for_running(study, count=2)
    proxy.blackhole()
    # The silence lasts until w1 gives up: within the limit and one call's bound (slack for
    # two loaded cores); w0's 60 s outlast it.
    assert ending[0].wait(timeout=limit + SHORT_BOUNDS.call_s + 60) == 75, logs(tmp_path, "w1")
    error = (tmp_path / "w1.err").read_text()
    assert error.startswith("error: storage unreachable for ") and error.count("\n") == 1, error
    assert f"--storage-retry-s {limit}" in error and "Traceback" not in logs(tmp_path, "w1")
    proxy.passing()
    output = finish(riding, tmp_path, [0])[0]
    assert "storage reachable again" in output, output
    assert_study_done(study, 2)  # w1's abandoned trial failed, and its retry finished


@pytest.mark.slow
def test_a_worker_started_while_the_database_is_unreachable_waits_for_it(
    postgres: OwnPostgres, proxy: FaultProxy, hpo_env: dict, tmp_path: Path
) -> None:
    name, study = new_study(postgres, tmp_path, epochs=1, trials=1)
    proxy.refuse()
    waiting = workers(hpo_env, tmp_path, via(proxy, postgres), name, 1, "--storage-retry-s", "60")
    wait_for_line(tmp_path, "w0", "storage unreachable")
    time.sleep(2)  # the database stays down a while: refused attempts at 0.5 s and 1.5 s
    proxy.passing()
    output = finish(waiting, tmp_path, [0])[0]
    assert "storage reachable again" in output
    assert_study_done(study, 1)


# Optuna's schema version read at open, then the study's settings (user attributes) read at
# start-up; not the table checks before them, which the open's own schema retry covers. One
# worker meets both resets, in that order (the proxy's rules apply one after the other).
STARTUP_READS = (b"FROM version_info", b"FROM study_user_attributes")


@pytest.mark.slow
def test_resets_while_a_worker_starts_are_waited_out(
    postgres: OwnPostgres, proxy: FaultProxy, hpo_env: dict, tmp_path: Path
) -> None:
    name, study = new_study(postgres, tmp_path, epochs=1, trials=1)
    for needle in STARTUP_READS:
        proxy.reset_on(needle)
    finish(workers(hpo_env, tmp_path, via(proxy, postgres), name, 1), tmp_path, [0])
    assert not proxy.rules  # both resets happened
    assert_study_done(study, 1)


def test_a_server_that_refuses_is_one_line_and_exit_2_at_once(
    postgres: OwnPostgres, hpo_env: dict, tmp_path: Path
) -> None:
    """Not an outage: waiting would not change the server's answer (an unknown database)."""
    url = postgres.url.replace("/postgres", "/no_such_database")
    env = {**hpo_env, "HPO_STORAGE": url}
    refused = spawn(env, tmp_path, "w0", "worker", "--study", "s", "--storage-retry-s", "600")
    SPAWNED.append(refused)
    assert refused.wait(timeout=120) == 2, logs(tmp_path, "w0")  # not after 600 s
    error = (tmp_path / "w0.err").read_text()
    assert error.startswith("error: cannot open storage") and error.count("\n") == 1, error
    assert "no_such_database" in error and "storage unreachable" not in logs(tmp_path, "w0")


def test_right_after_an_outage_no_heartbeat_counts_as_stale(
    postgres: OwnPostgres, proxy: FaultProxy, tmp_path: Path
) -> None:
    """A trial whose worker is alive but whose beats stopped with the network is not failed
    the moment the network is back: the workers get a grace period to beat again."""
    name, study = new_study(postgres, tmp_path)
    heartbeat = HeartbeatPolicy(interval_s=1)
    other = open_storage(postgres.url, heartbeat)  # the live worker, beating once
    trial_id = other.create_new_trial(study._study_id)
    other.set_trial_state_values(trial_id, optuna.trial.TrialState.RUNNING)
    other.record_heartbeat(trial_id)
    number = other.get_trial(trial_id).number
    mine = open_storage(via(proxy, postgres), heartbeat, retry=RetryPolicy(limit_s=60))
    mine.get_all_studies()  # connected, then the network goes
    proxy.refuse()
    threading.Timer(heartbeat.grace_s + 1, proxy.passing).start()
    mine.get_all_studies()  # waits out the outage: longer than the grace
    mine_study = optuna.load_study(study_name=name, storage=mine)
    optuna.storages.fail_stale_trials(mine_study)
    assert study.get_trials()[number].state == optuna.trial.TrialState.RUNNING
    time.sleep(heartbeat.grace_s + 0.5)  # and the other worker stays silent past the grace
    optuna.storages.fail_stale_trials(mine_study)
    assert study.get_trials()[number].state == optuna.trial.TrialState.FAIL


# Answers lost after the commit: the worker must learn what happened before it repeats a write.
# What each write's transaction holds (PostgreSQL's messages carry the SQL and the values).
CLAIM = (b"UPDATE trials SET state", b"RUNNING")
COMPLETE = (b"UPDATE trials SET state", b"COMPLETE")
STALE_FAIL = (b"UPDATE trials SET state", b"FAIL")
RETRY_INSERT = (b"INSERT INTO trials", b"failed_trial")
HEARTBEAT = (b"trial_heartbeats",)
# Before the fixes some of these left a worker waiting for good (a trial RUNNING forever).
LOST_ANSWER_S = 60


def one_stale_trial(postgres: OwnPostgres, hpo_env: dict, cwd: Path, name: str) -> int:
    """A worker killed -9 mid-trial (directly, not through the proxy): its trial goes stale."""
    victim = workers(hpo_env, cwd, postgres.url, name, 1, first=9)[0]
    study = optuna.load_study(study_name=name, storage=open_storage(postgres.url))
    running = wait_for_running(study, count=1)[0]
    victim.kill()
    victim.wait()
    return running.number


def assert_each_failure_retried_once(study: optuna.Study) -> None:
    retries = [t.system_attrs.get("failed_trial") for t in study.get_trials()]
    retries = [number for number in retries if number is not None]
    assert len(retries) == len(set(retries)), retries


@pytest.mark.slow
def test_a_claim_and_a_tell_whose_answers_are_lost(
    postgres: OwnPostgres, proxy: FaultProxy, hpo_env: dict, tmp_path: Path
) -> None:
    """One worker loses a claim's answer, with the one heartbeat that would mark the lost
    claim, and later a COMPLETE's answer: the rules apply in that order."""
    name, study = new_study(postgres, tmp_path, epochs=1, trials=2)
    proxy.lose_answer(*CLAIM)
    proxy.reset_on(*HEARTBEAT)
    proxy.lose_answer(*COMPLETE)
    one = workers(hpo_env, tmp_path, via(proxy, postgres), name, 1)
    output = finish(one, tmp_path, [0], timeout=LOST_ANSWER_S)[0]
    assert proxy.answers_lost == 2 and not proxy.rules
    assert "re-queued by another worker" not in output, output  # the told trial is COMPLETE
    assert_study_done(study, 2)


@pytest.mark.slow
def test_a_stale_trial_fail_and_its_retry_insert_whose_answers_are_lost(
    postgres: OwnPostgres, proxy: FaultProxy, hpo_env: dict, tmp_path: Path
) -> None:
    """The worker that fails the stale trial loses the FAIL's answer (settled: the trial is
    FAIL, so Optuna's callback runs as after an answer), then the answer of the callback's
    insert of the retry: the rules apply in that order, on one stale trial."""
    name, study = new_study(postgres, tmp_path, epochs=4, trials=1)  # the stale one's
    stale = one_stale_trial(postgres, hpo_env, tmp_path, name)
    proxy.lose_answer(*STALE_FAIL)
    proxy.lose_answer(*RETRY_INSERT)
    one = workers(hpo_env, tmp_path, via(proxy, postgres), name, 1)
    finish(one, tmp_path, [0], timeout=LOST_ANSWER_S)
    assert proxy.answers_lost == 2 and not proxy.rules
    assert study.get_trials()[stale].state == optuna.trial.TrialState.FAIL
    assert_study_done(study, 1)  # the failed trial has its retry
    assert_each_failure_retried_once(study)  # one retry, not two from the same checkpoint


# Creating a study: through the proxy, in this process (nothing to train).
STUDY_INSERT = (b"INSERT INTO studies",)
REPORT_TICKET_INSERT = (b"INSERT INTO trials", b"backbones")  # the Table 1 run's parameters


def create_through(proxy: FaultProxy, server: OwnServer, space: str | None) -> tuple:
    """`hpo start`'s creation of a study of 3 trials, through the proxy, waiting out losses."""
    name = f"faults-{uuid.uuid4().hex[:8]}"
    request = StudyRequest(study=name, trials=3, storage=via(proxy, server), space=space)
    quiet = SearchProgress(Console(file=io.StringIO()))
    settings = create_study(request, quiet, RetryPolicy(limit_s=60, say=lambda _: None))
    return name, settings, optuna.load_study(study_name=name, storage=open_storage(server.url))


def test_a_study_creation_whose_answer_is_lost(
    postgres: OwnPostgres, proxy: FaultProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: the repeat took the study for another's, waited for its settings and failed,
    and so did every later start ("was not created by hpo")."""
    monkeypatch.setattr(search.rules.study, "SETTINGS_WAIT_S", 1.0)  # fail fast, not in 60 s
    proxy.lose_answer(*STUDY_INSERT)
    space = tmp_path / "micro.yaml"
    space.write_text(MICRO_SPACE)
    name, settings, study = create_through(proxy, postgres, str(space))
    assert proxy.answers_lost == 1
    assert stored_settings(name, postgres.url) == settings  # what every later start reads
    assert budget(study).target == 3 and len(study.get_trials()) == 3
    while (trial := claim_trial(study)) is not None:
        study.tell(trial, 1.0)
    assert_study_done(study, 3)


def test_a_lost_insert_of_the_report_ticket_is_one_ticket(
    postgres: OwnPostgres, proxy: FaultProxy
) -> None:
    """Optuna's own insert loop repeats it (RDBStorage._create_new_trial). Before: trials 0
    and 1 were both the report's Table 1 run, and both counted."""
    proxy.lose_answer(*REPORT_TICKET_INSERT)
    name, settings, study = create_through(proxy, postgres, None)  # the default space
    assert proxy.answers_lost == 1
    space = load_space(settings.space_name)
    while (trial := claim_trial(study)) is not None:  # each samples, as the objective does
        sample_config(trial, space, settings.epochs)
        study.tell(trial, 1.0)
    assert_study_done(study, 3)
    finished = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert [t.number for t in finished if t.params == report_table1_params()] == [0]


def test_two_workers_queue_one_retry_at_once_on_postgresql_and_make_one(
    postgres: OwnPostgres, proxy: FaultProxy, tmp_path: Path
) -> None:
    """The same race on PostgreSQL: B's insert holds the study's lock while the network
    delays it, A's waits for the lock, and then finds B's retry (retry_insert_once)."""
    name, study = new_study(postgres, tmp_path, epochs=1, trials=2)
    retry, heartbeat = RetryPolicy(limit_s=60, say=lambda _: None), HeartbeatPolicy(interval_s=1)
    a, b = (
        optuna.load_study(study_name=name, storage=open_storage(url, heartbeat, retry=retry))
        for url in (postgres.url, via(proxy, postgres))
    )
    crashed = one_stale_study_trial(a)
    proxy.hold(b"FOR UPDATE", b"retry_history")  # B's insert of the retry, under the lock
    failing = threading.Thread(target=fail_stale_trials, args=(b,))
    failing.start()
    assert proxy.holding.wait(timeout=30)
    queuing = threading.Thread(target=queue_owed_retries, args=(a,))
    queuing.start()
    wait_for_a_lock_wait(postgres)  # A's insert waits for B's lock on the study
    proxy.release()
    failing.join(timeout=30)
    queuing.join(timeout=30)
    retries = [t for t in study.get_trials() if optuna_private.retry_of(t) == crashed.number]
    assert len(retries) == 1
    while (trial := claim_trial(a)) is not None:
        a.tell(trial, 1.0)
    assert_study_done(study, 2)


def one_stale_study_trial(study: optuna.Study) -> optuna.trial.FrozenTrial:
    """A claimed trial whose worker beat once and died: stale after the 2 s grace."""
    crashed = claim_trial(study)
    with optuna_private.heartbeat(study, crashed):
        pass
    deadline = time.monotonic() + 30
    while not optuna_private.stale_trial_numbers(study, 1, 2) and time.monotonic() < deadline:
        time.sleep(0.2)
    return study.trials[crashed.number]


def wait_for_a_lock_wait(postgres: OwnPostgres) -> None:
    engine = sqlalchemy.create_engine(postgres.url)
    query = "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
    deadline = time.monotonic() + 30
    with engine.connect() as connection:
        while not connection.exec_driver_sql(query).scalar() and time.monotonic() < deadline:
            time.sleep(0.05)
    engine.dispose()
