"""Database outages waited out, and crash recovery on the journal storages: real servers of the
tests' own (stopped and started again), real worker processes, real kill -9."""

from __future__ import annotations

import contextlib
import subprocess
import time
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
import redis
import sqlalchemy
from conftest import HPO
from optuna.exceptions import DuplicatedStudyError, StorageInternalError, UpdateFinishedTrialError
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState
from servers import (
    DATABASE,
    NO_RETRY,
    OwnMariaDB,
    OwnPostgres,
    OwnRedis,
    OwnServer,
    free_port,
    server_url,
)
from test_workers import MICRO_SPACE, assert_resumed, wait_for_checkpoint

from search.commands.launch import StudyRequest
from search.commands.launch import create_study as create
from search.commands.progress import SearchProgress
from search.rules.study import budget
from storage import RetryPolicy, StorageUnavailable, StorageURLError, open_storage

# Longer than the heartbeat's grace (2 s: OUTAGE_HEARTBEAT_S): when the server is back,
# every running trial's last heartbeat is older than the grace.
OUTAGE_HEARTBEAT_S = 1
OUTAGE_S = 3
# One trial for each of the two workers, and one more: a worker that finishes its first
# trial before the other has started still leaves the other one a trial.
TRIALS = 3


@contextlib.contextmanager
def running(server: OwnServer) -> Iterator[OwnServer]:
    server.start()
    try:
        yield server
    finally:
        with contextlib.suppress(Exception):
            server.stop()


@pytest.fixture
def own_postgres(own_folder: Path) -> Iterator[OwnServer]:
    with running(OwnPostgres(own_folder)) as server:
        yield server


@pytest.fixture
def own_mariadb(own_folder: Path) -> Iterator[OwnServer]:
    with running(OwnMariaDB(own_folder)) as server:
        yield server


@pytest.fixture
def own_redis(own_folder: Path) -> Iterator[OwnServer]:
    with running(OwnRedis(own_folder)) as server:
        yield server


def create_study(
    url: str, cwd: Path, name: str, trials: int = TRIALS, epochs: int = 6, heartbeat: int = 2
) -> optuna.Study:
    """Trials of 6 epochs, heartbeat 2 s, a checkpoint every epoch: an outage lands
    mid-trial. Made in this process: on two shared cores, each `hpo` process costs seconds
    to start."""
    space = cwd / "micro.yaml"
    space.write_text(MICRO_SPACE)
    request = StudyRequest(
        study=name, trials=trials, storage=url, space=str(space), epochs=epochs,
        dataset="synthetic", pruner="none", heartbeat=heartbeat, checkpoint_interval=0,
    )  # fmt: skip
    create(request, SearchProgress())
    return optuna.load_study(study_name=name, storage=open_storage(url))


def wait_for_running(study: optuna.Study, count: int, timeout: float = 120) -> list[FrozenTrial]:
    """Once `count` trials run and have checkpointed an epoch (the workers are mid-trial)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        trials = study.get_trials(states=(TrialState.RUNNING,))
        started = [t for t in trials if t.user_attrs.get("checkpoint", {}).get("epoch", 0) >= 1]
        if len(started) >= count:
            return started
        time.sleep(0.1)
    raise AssertionError(f"{count} trials were not running within {timeout} s")


def spawn(env: dict, cwd: Path, log: str, *args: str) -> subprocess.Popen:
    """`hpo ARGS` with stdout in cwd/LOG.out and stderr in cwd/LOG.err, read while it runs."""
    return subprocess.Popen(
        [HPO, *args], env=env, cwd=cwd,
        stdout=(cwd / f"{log}.out").open("w"), stderr=(cwd / f"{log}.err").open("w"),
    )  # fmt: skip


def logs(cwd: Path, log: str) -> str:
    return (cwd / f"{log}.out").read_text() + (cwd / f"{log}.err").read_text()


def wait_for_line(cwd: Path, log: str, text: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while text not in logs(cwd, log):
        if time.monotonic() > deadline:
            raise AssertionError(f"{log} did not say {text!r} in {timeout} s:\n{logs(cwd, log)}")
        time.sleep(0.1)


def outage(server: OwnServer, seconds: float, cwd: Path, *noticed_by: str) -> None:
    """Stop the server for `seconds`, and check each worker noticed while it was away."""
    stopped_at = time.monotonic()
    server.stop()
    for log in noticed_by:
        wait_for_line(cwd, log, "storage unreachable")
    time.sleep(max(0.0, seconds - (time.monotonic() - stopped_at)))  # the outage itself
    server.start()
    server.wait_until_up()


def assert_study_done(study: optuna.Study, n: int) -> None:
    """Exactly n finished trials, none running; a trial failed by heartbeat has its retry."""
    state = budget(study)
    assert (state.finished, state.running, state.waiting) == (n, 0, 0), state
    trials = study.get_trials()
    assert not [t.number for t in trials if t.state == TrialState.RUNNING]
    retried = {t.system_attrs.get("failed_trial") for t in trials}
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert all(t.number in retried for t in failed), [t.user_attrs for t in failed]


def two_workers_ride_out_an_outage(server: OwnServer, env: dict, cwd: Path) -> None:
    env = {**env, "HPO_STORAGE": server.url}
    name = f"outage-{uuid.uuid4().hex[:8]}"
    study = create_study(server.url, cwd, name, heartbeat=OUTAGE_HEARTBEAT_S)
    workers = [
        spawn(env, cwd, "start", "start", "--study", name, "--trials", str(TRIALS)),
        spawn(env, cwd, "worker", "worker", "--study", name),
    ]
    wait_for_running(study, count=2)
    outage(server, OUTAGE_S, cwd, "start", "worker")
    codes = [worker.wait(timeout=300) for worker in workers]
    outputs = [logs(cwd, "start"), logs(cwd, "worker")]
    assert codes == [0, 0], outputs
    assert all("Traceback" not in output for output in outputs), outputs
    assert all("storage reachable again" in output for output in outputs), outputs
    assert_study_done(study, TRIALS)


@pytest.mark.slow
def test_a_postgresql_outage_is_waited_out(
    own_postgres: OwnServer, hpo_env: dict, tmp_path: Path
) -> None:
    two_workers_ride_out_an_outage(own_postgres, hpo_env, tmp_path)


@pytest.mark.slow
def test_a_mariadb_outage_is_waited_out(
    own_mariadb: OwnServer, hpo_env: dict, tmp_path: Path
) -> None:
    two_workers_ride_out_an_outage(own_mariadb, hpo_env, tmp_path)


@pytest.mark.slow
def test_a_redis_outage_is_waited_out(own_redis: OwnServer, hpo_env: dict, tmp_path: Path) -> None:
    two_workers_ride_out_an_outage(own_redis, hpo_env, tmp_path)


@pytest.mark.slow
def test_past_the_retry_limit_a_worker_exits_and_the_next_one_finishes(
    own_postgres: OwnServer, hpo_env: dict, tmp_path: Path
) -> None:
    env = {**hpo_env, "HPO_STORAGE": own_postgres.url}
    study = create_study(own_postgres.url, tmp_path, "limit", 1, heartbeat=OUTAGE_HEARTBEAT_S)
    worker = spawn(env, tmp_path, "gave-up", "worker", "--study", "limit", "--storage-retry-s", "3")
    running = wait_for_running(study, count=1)[0]
    own_postgres.stop()
    assert worker.wait(timeout=120) == 75
    error = (tmp_path / "gave-up.err").read_text()
    assert error.startswith("error: storage unreachable for ") and error.count("\n") == 1, error
    assert "--storage-retry-s 3" in error and "Traceback" not in logs(tmp_path, "gave-up")
    own_postgres.start()
    own_postgres.wait_until_up()

    # The abandoned trial's heartbeat has stopped: the next worker fails it and resumes it.
    later = spawn(env, tmp_path, "later", "worker", "--study", "limit")
    assert later.wait(timeout=300) == 0, logs(tmp_path, "later")
    assert "Traceback" not in logs(tmp_path, "later")
    assert_study_done(study, 1)
    trials = study.get_trials()
    assert trials[running.number].state == TrialState.FAIL
    retry = next(t for t in trials if t.system_attrs.get("failed_trial") == running.number)
    assert retry.state == TrialState.COMPLETE and retry.user_attrs["resumed_from_epoch"] >= 1


@pytest.mark.slow
def test_a_trial_failed_by_another_worker_meanwhile_is_dropped_cleanly(
    hpo_env: dict, tmp_path: Path
) -> None:
    """What another worker does to a trial whose heartbeat stopped in a long outage, done here
    while its own worker still trains it: that worker drops its copy with one line and then
    runs the retry, from the checkpoint its copy left."""
    # As test_workers' long_trials_study (12 epochs, heartbeat 1 s), made in this process, of
    # one trial: its retry is the worker's next trial.
    study = create_study(hpo_env["HPO_STORAGE"], tmp_path, "taken", 1, epochs=12, heartbeat=1)
    worker = spawn(hpo_env, tmp_path, "worker", "worker", "--study", "taken")
    running = wait_for_checkpoint(study, epoch=2)
    failed = study.tell(running.number, state=TrialState.FAIL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        RetryHeartbeatStaleTrialCallback(inherit_intermediate_values=True)(study, failed)
    assert worker.wait(timeout=300) == 0, logs(tmp_path, "worker")
    output = logs(tmp_path, "worker")
    assert "Traceback" not in output
    assert output.count("dropping this copy") == 1, output
    retry = next(t for t in study.get_trials() if t.system_attrs.get("failed_trial") is not None)
    assert_resumed(study, running.number, retry.user_attrs["resumed_from_epoch"], output, 1)


def refused_by(kind: str) -> Exception:
    """The error each real driver raises for a server that is not there (a closed port)."""
    port = free_port()
    urls = {
        "postgresql": f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres",
        "mysql": f"mysql+pymysql://root@127.0.0.1:{port}/hpo",
    }
    try:
        if kind == "redis":
            redis.Redis(port=port, retry=NO_RETRY).ping()
        else:
            sqlalchemy.create_engine(urls[kind]).connect()
    except Exception as err:
        return err
    raise AssertionError(f"something answers on port {port}")


@pytest.mark.parametrize("kind", ["postgresql", "mysql", "redis"])
def test_a_lost_connection_is_retried_until_it_comes_back_or_the_limit(kind: str) -> None:
    said: list[str] = []
    policy = RetryPolicy(limit_s=1, say=said.append, first_delay_s=0.05)
    outcomes = iter([refused_by(kind), refused_by(kind), "answer"])

    def flaky() -> str:
        outcome = next(outcomes)
        if isinstance(outcome, Exception):
            raise StorageInternalError("as Optuna re-raises it") from outcome
        return outcome

    assert policy.call("get_trial", flaky, on_loss=lambda: None) == "answer"
    assert said[0].startswith("storage unreachable (") and said[1].startswith("storage reachable")

    def down() -> None:
        raise refused_by(kind)

    with pytest.raises(StorageUnavailable) as gave_up:
        policy.call("get_trial", down, on_loss=lambda: None)
    assert "--storage-retry-s 1" in str(gave_up.value) and "\n" not in str(gave_up.value)


@pytest.mark.parametrize("kind", ["postgresql", "mysql"])
def test_a_server_that_refuses_is_not_waited_for(kind: str) -> None:
    """An unknown database is the server's answer, not an outage: raised at once, unretried."""
    url = server_url(kind).replace(f"/{DATABASE}", "/no_such_database")
    said: list[str] = []
    with pytest.raises(StorageURLError, match="no_such_database"):
        open_storage(url, retry=RetryPolicy(limit_s=600, say=said.append))
    assert said == []


def test_a_rejected_request_is_not_retried() -> None:
    said: list[str] = []
    policy = RetryPolicy(limit_s=60, say=said.append)
    for error in (UpdateFinishedTrialError("finished"), DuplicatedStudyError("exists")):

        def rejected(error: Exception = error) -> None:
            raise error

        with pytest.raises(type(error)):
            policy.call("set_trial_user_attr", rejected, on_loss=lambda: None)
    assert said == []
