"""Many workers on one study, on every storage: all real processes. The helpers the crash and
stop tests share live here too (tests/test_worker_crashes.py, test_stops.py, test_outages.py)."""

from __future__ import annotations

import subprocess
import time
import uuid
from pathlib import Path

import optuna
import pytest
from conftest import HPO, run_hpo
from optuna.trial import FrozenTrial, TrialState
from servers import PASSWORD, server_url

from search.rules import attrs
from search.rules.study import budget, move_target
from storage import HeartbeatPolicy, open_storage
from storage.optuna_private import stale_trial_numbers

# One small ConvLayer per trial: a trial takes about a second, so the tests are about workers.
MICRO_SPACE = """base: tiny
backbones: [1, 1]
blocks: [1, 1]
layers: [1, 1]
width: [4, 8]
batch_size: [64]
"""


@pytest.fixture
def micro_space(tmp_path: Path) -> Path:
    path = tmp_path / "micro.yaml"
    path.write_text(MICRO_SPACE)
    return path


def create(env: dict, cwd: Path, study: str, trials: int, space: Path, *extra: str) -> None:
    result = run_hpo(
        "create", "--study", study, "--trials", str(trials), "--space", str(space),
        "--dataset", "synthetic", "--epochs", "2", *extra, env=env, cwd=cwd,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


def spawn_worker(env: dict, cwd: Path, study: str) -> subprocess.Popen:
    return subprocess.Popen(
        [HPO, "worker", "--study", study], env=env, cwd=cwd,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def finish(workers: list[subprocess.Popen]) -> list[str]:
    outputs = [worker.communicate(timeout=600)[0] for worker in workers]
    assert [worker.returncode for worker in workers] == [0] * len(workers), outputs
    return outputs


def assert_exactly(study: optuna.Study, n: int) -> list[FrozenTrial]:
    # Racing top-ups may leave a few tickets past the target: queued, never run.
    trials = [t for t in study.get_trials() if t.state != TrialState.WAITING]
    assert all(t.number >= n for t in study.get_trials(states=(TrialState.WAITING,)))
    assert sorted(t.number for t in trials) == list(range(n))
    assert {t.state for t in trials} <= {TrialState.COMPLETE, TrialState.PRUNED}, [
        (t.number, t.state, t.user_attrs.get("fail_reason")) for t in trials
    ]
    state = budget(study)
    assert (state.finished, state.running, state.waiting) == (n, 0, 0)
    return trials


# Two journal workers on one study are test_worker_crashes' time-zone test (6 trials, exactly
# n, the same worker, status and best checks): no journal case here.
@pytest.mark.parametrize(
    ("backend", "workers", "trials"),
    [("postgresql", 4, 8), ("mysql", 2, 6)],
)
@pytest.mark.slow
def test_workers_on_one_study_stop_at_exactly_n(
    backend: str, workers: int, trials: int, hpo_env: dict, tmp_path: Path, micro_space: Path
) -> None:
    url = f"journal://{tmp_path / 'hpo.log'}" if backend == "journal" else server_url(backend)
    env = {**hpo_env, "HPO_STORAGE": url}
    study = f"w-{uuid.uuid4().hex[:8]}"
    create(env, tmp_path, study, trials, micro_space)
    spawned = [spawn_worker(env, tmp_path, study) for _ in range(workers)]
    outputs = finish(spawned)
    result = assert_exactly(optuna.load_study(study_name=study, storage=open_storage(url)), trials)
    # Which worker wins which trial is the scheduler's business; each trial names its own.
    names = {f"pid{worker.pid}" for worker in spawned}
    assert {t.user_attrs["worker"].split("/")[-1] for t in result} <= names
    for extra in (["status", "--study", study], ["best", "--study", study]):
        shown = run_hpo(*extra, env=env, cwd=tmp_path)
        assert shown.returncode == 0, shown.stderr
        outputs.append(shown.stdout + shown.stderr)
    assert all("Traceback" not in output and PASSWORD not in output for output in outputs)


@pytest.mark.slow
def test_start_with_jobs_per_gpu_runs_four_workers_on_sqlite(
    hpo_env: dict, tmp_path: Path, micro_space: Path
) -> None:
    result = run_hpo(
        "start", "--study", "fleet", "--trials", "8", "--space", str(micro_space),
        "--dataset", "synthetic", "--epochs", "2", "--jobs-per-gpu", "4",
        env=hpo_env, cwd=tmp_path, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all workers done" in result.stdout
    study = optuna.load_study(study_name="fleet", storage=open_storage(hpo_env["HPO_STORAGE"]))
    trials = assert_exactly(study, 8)
    slots = {f"slot{i}" for i in range(4)}
    assert {t.user_attrs["worker"].split("/")[-1] for t in trials} <= slots
    assert all(f"worker{i}| " in result.stdout for i in range(4))  # all four ran


@pytest.mark.slow
def test_a_config_that_raises_does_not_stop_its_worker(
    hpo_env: dict, tmp_path: Path, micro_space: Path
) -> None:
    create(hpo_env, tmp_path, "raises", 1, micro_space)
    study = optuna.load_study(study_name="raises", storage=open_storage(hpo_env["HPO_STORAGE"]))
    # Ticket 1 holds a config that raises inside the trial, like an OOM would; one follows it.
    study.enqueue_trial({"dropout": 1.5})
    study.set_user_attr(attrs.TARGET, 2)
    move_target(study, 3)
    finish([spawn_worker(hpo_env, tmp_path, "raises")])
    trials = study.get_trials()
    failed = [t.number for t in trials if t.state == TrialState.FAIL]
    assert failed == [1] and "dropout" in trials[1].user_attrs["fail_reason"]
    # Trial 2 came after the failure and finished (complete or pruned), not failed.
    assert len(trials) == 3 and budget(study).finished == 3


def test_a_password_never_reaches_an_error_message(hpo_env: dict, tmp_path: Path) -> None:
    url = f"postgresql+psycopg://postgres:{PASSWORD}@127.0.0.1:1/nothing"
    result = run_hpo("status", "--storage", url, env=hpo_env, cwd=tmp_path)
    assert result.returncode == 2
    assert PASSWORD not in result.stdout + result.stderr
    assert "postgres:***@127.0.0.1:1" in result.stderr


def wait_for_checkpoint(study: optuna.Study, epoch: int, timeout: float = 120) -> FrozenTrial:
    """The running trial once it has checkpointed `epoch` (polled, as a user would)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for trial in study.get_trials(states=(TrialState.RUNNING,)):
            if trial.user_attrs.get("checkpoint", {}).get("epoch", 0) >= epoch:
                return trial
        time.sleep(0.1)
    raise AssertionError(f"no trial checkpointed epoch {epoch} within {timeout} s")


def wait_for_report(study: optuna.Study, epoch: int, timeout: float = 120) -> FrozenTrial:
    """The running trial once it has reported `epoch`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for trial in study.get_trials(states=(TrialState.RUNNING,)):
            if epoch in trial.intermediate_values:
                return trial
        time.sleep(0.1)
    raise AssertionError(f"no trial reported epoch {epoch} within {timeout} s")


def long_trials_study(
    env: dict, cwd: Path, micro_space: Path, *extra: str, name: str = "long", trials: int = 2
) -> optuna.Study:
    """`trials` trials of 12 epochs, heartbeat 1 s: long enough to interrupt one mid-way."""
    result = run_hpo(
        "create", "--study", name, "--trials", str(trials), "--space", str(micro_space),
        "--dataset", "synthetic", "--epochs", "12", "--pruner", "none", "--heartbeat", "1",
        *extra, env=env, cwd=cwd,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return optuna.load_study(study_name=name, storage=open_storage(env["HPO_STORAGE"]))


def assert_resumed(
    study: optuna.Study, failed_number: int, seen_epoch: int, output: str, n_trials: int = 2
) -> None:
    trials = study.get_trials()
    failed = trials[failed_number]
    assert failed.state == TrialState.FAIL
    retry = next(t for t in trials if t.system_attrs.get("failed_trial") == failed_number)
    assert retry.state == TrialState.COMPLETE
    assert retry.params == failed.params
    # At least the checkpoint seen before the stop; a later one may have landed since.
    epoch = retry.user_attrs["resumed_from_epoch"]
    assert epoch >= seen_epoch
    assert sorted(retry.intermediate_values) == list(range(1, 13))
    # The retry trained only the epochs after the checkpoint.
    assert f"trial {retry.number:>4} epoch {epoch + 1:>3}/12" in output
    assert f"trial {retry.number:>4} epoch {epoch:>3}/12" not in output
    state = budget(study)
    finished_of_target = (n_trials, n_trials, 0, 0)
    assert (state.finished, state.target, state.running, state.waiting) == finished_of_target


def wait_until_stale(study: optuna.Study, number: int, timeout: float = 60) -> None:
    """Trial `number` is stale by the rule `hpo status` reads (the study's heartbeat of 1 s,
    grace 2 s; not the default's 120 s), checked in this process: then one `hpo status`
    must say so."""
    policy = HeartbeatPolicy(interval_s=1)
    deadline = time.monotonic() + timeout
    while number not in stale_trial_numbers(study, policy.interval_s, policy.grace_s):
        assert time.monotonic() < deadline, f"trial {number} not stale within {timeout} s"
        time.sleep(0.2)
