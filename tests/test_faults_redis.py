"""The faults of tests/test_faults.py on the journal storage on Redis, in a file of their own
so that pytest-xdist runs them beside the PostgreSQL ones (a worker takes a whole file)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from faultproxy import FaultProxy
from servers import OwnRedis
from test_faults import (  # the module's servers, its proxy and its helpers
    LOST_ANSWER_S,
    MID_TRIAL_EPOCHS,
    SHORT_BOUNDS,
    assert_each_failure_retried_once,
    create_through,
    finish,
    new_study,
    no_worker_left,  # noqa: F401  (fixtures: pytest finds them here by name)
    one_stale_study_trial,
    running,
    short_bounds,
    via,
    workers,
)
from test_outages import assert_study_done, wait_for_running

from search.rules.space import load_space, report_table1_params, sample_config
from search.rules.study import claim_trial, fail_stale_trials, queue_owed_retries
from storage import HeartbeatPolicy, RetryPolicy, open_storage, optuna_private

# Redis (the journal storage on a redis-server of the module's own), through the same proxy
# reading Redis commands: each journal entry is one EVAL whose argument is the entry's JSON.
REDIS_COMPLETE = (b"EVAL", b'"op_code": 6', b'"state": 1')  # a trial set COMPLETE


@pytest.fixture(scope="module")
def own_redis() -> Iterator[OwnRedis]:
    yield from running(OwnRedis)


@pytest.fixture
def redis_proxy(own_redis: OwnRedis, request: pytest.FixtureRequest) -> Iterator[FaultProxy]:
    with FaultProxy(own_redis.port, seed=sum(request.node.name.encode()), redis=True) as faults:
        yield faults


@pytest.mark.slow
def test_random_resets_for_a_whole_study_on_redis(
    own_redis: OwnRedis, redis_proxy: FaultProxy, hpo_env: dict, tmp_path: Path
) -> None:
    name, study = new_study(own_redis, tmp_path, epochs=2, trials=2)  # as test_faults_study's
    redis_proxy.random_resets(0.02)
    finish(workers(hpo_env, tmp_path, via(redis_proxy, own_redis), name, 2), tmp_path, [0, 0])
    assert redis_proxy.resets > 0
    assert_study_done(study, 2)
    assert_each_failure_retried_once(study)


@pytest.mark.slow
def test_a_tell_whose_answer_is_lost_on_redis(
    own_redis: OwnRedis, redis_proxy: FaultProxy, hpo_env: dict, tmp_path: Path
) -> None:
    """The server applied the entry; redis-py or the worker sends it again."""
    name, study = new_study(own_redis, tmp_path, epochs=1, trials=2)
    redis_proxy.lose_answer(*REDIS_COMPLETE)
    one = workers(hpo_env, tmp_path, via(redis_proxy, own_redis), name, 1)
    output = finish(one, tmp_path, [0], timeout=LOST_ANSWER_S)[0]
    assert redis_proxy.answers_lost == 1
    assert "re-queued by another worker" not in output, output  # it is COMPLETE
    assert_study_done(study, 2)
    assert_each_failure_retried_once(study)


@pytest.mark.slow
def test_a_short_blackhole_is_ridden_out_on_redis(
    own_redis: OwnRedis, redis_proxy: FaultProxy, hpo_env: dict, tmp_path: Path
) -> None:
    name, study = new_study(own_redis, tmp_path, epochs=MID_TRIAL_EPOCHS, trials=2)
    url = via(redis_proxy, own_redis)
    running = workers(short_bounds(hpo_env), tmp_path, url, name, 2, "--storage-retry-s", "60")
    wait_for_running(study, count=2)
    redis_proxy.blackhole()
    time.sleep(2 * SHORT_BOUNDS.call_s)  # the outage itself, not a wait for a process
    redis_proxy.passing()
    outputs = finish(running, tmp_path, [0, 0])
    assert any("storage reachable again" in output for output in outputs), outputs
    assert_study_done(study, 2)
    assert_each_failure_retried_once(study)


def test_a_lost_insert_of_the_report_ticket_is_one_ticket_on_redis(
    own_redis: OwnRedis, redis_proxy: FaultProxy
) -> None:
    """The retrying storage repeats it: it first asks the journal for the ticket's key."""
    redis_proxy.lose_answer(b"EVAL", b'"op_code": 4', b"backbones")  # its CREATE_TRIAL entry
    name, settings, study = create_through(redis_proxy, own_redis, None)
    assert redis_proxy.answers_lost == 1
    space = load_space(settings.space_name)
    while (trial := claim_trial(study)) is not None:
        sample_config(trial, space, settings.epochs)
        study.tell(trial, 1.0)
    assert_study_done(study, 3)
    finished = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert [t.number for t in finished if t.params == report_table1_params()] == [0]


def test_twins_arise_on_redis_and_only_the_first_runs(
    own_redis: OwnRedis, redis_proxy: FaultProxy, tmp_path: Path
) -> None:
    """Two workers queue one retry at once: B fails a stale trial and reads no retry of it,
    and its insert of the retry is delayed in the network while A queues the same retry.
    The journal has no lock to refuse the second (RDB's keyed insert does: no twin there),
    so twins arise; only the first counts or runs (search/rules/study.py, _twins)."""
    name, study = new_study(own_redis, tmp_path, epochs=1, trials=2)
    retry, heartbeat = RetryPolicy(limit_s=60, say=lambda _: None), HeartbeatPolicy(interval_s=1)
    a, b = (
        optuna.load_study(study_name=name, storage=open_storage(url, heartbeat, retry=retry))
        for url in (own_redis.url, via(redis_proxy, own_redis))
    )
    crashed = one_stale_study_trial(a)
    redis_proxy.hold(b"EVAL", b'"op_code": 4', b"retry_history")  # B's insert of the retry
    failing = threading.Thread(target=fail_stale_trials, args=(b,))
    failing.start()
    assert redis_proxy.holding.wait(timeout=30)
    queue_owed_retries(a)  # A sees the FAIL and no retry: it queues one
    redis_proxy.release()
    failing.join(timeout=30)
    retries = [t for t in study.get_trials() if optuna_private.retry_of(t) == crashed.number]
    assert len(retries) == 2  # twins
    while (trial := claim_trial(a)) is not None:
        a.tell(trial, 1.0)
    assert_study_done(study, 2)
    states = [t.state for t in study.get_trials() if optuna_private.retry_of(t) == crashed.number]
    assert states == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.WAITING]
