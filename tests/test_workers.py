"""Many workers on one study, on every storage, with crashes and stops: all real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest
from conftest import HPO, run_hpo
from optuna.trial import FrozenTrial, TrialState
from servers import PASSWORD, server_url

from search.rules import attrs
from search.rules.study import budget, fail_stale_trials, move_target
from storage import HeartbeatPolicy, StorageURLError, default_artifact_dir, open_storage

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


@pytest.mark.parametrize(
    ("backend", "workers", "trials"),
    [("postgresql", 4, 20), ("mysql", 2, 6), ("journal", 2, 6)],
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
    env: dict, cwd: Path, micro_space: Path, *extra: str, name: str = "long"
) -> optuna.Study:
    """Two trials of 12 epochs, heartbeat 1 s: long enough to interrupt one mid-way."""
    result = run_hpo(
        "create", "--study", name, "--trials", "2", "--space", str(micro_space),
        "--dataset", "synthetic", "--epochs", "12", "--pruner", "none", "--heartbeat", "1",
        *extra, env=env, cwd=cwd,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return optuna.load_study(study_name=name, storage=open_storage(env["HPO_STORAGE"]))


def assert_resumed(study: optuna.Study, failed_number: int, seen_epoch: int, output: str) -> None:
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
    assert (state.finished, state.target, state.running, state.waiting) == (2, 2, 0, 0)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite", "journal", "redis"])
def test_kill_9_mid_trial_is_retried_from_its_checkpoint(
    backend: str, hpo_env: dict, tmp_path: Path, micro_space: Path
) -> None:
    if backend != "sqlite":
        url = f"journal://{tmp_path / 'hpo.log'}" if backend == "journal" else server_url("redis")
        hpo_env = {**hpo_env, "HPO_STORAGE": url}
    name = f"long-{uuid.uuid4().hex[:8]}"  # the shared Redis outlives the test
    study = long_trials_study(
        hpo_env, tmp_path, micro_space, "--checkpoint-interval", "0", name=name
    )
    victim = spawn_worker(hpo_env, tmp_path, name)
    running = wait_for_checkpoint(study, epoch=2)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    epoch = study.get_trials()[running.number].user_attrs["checkpoint"]["epoch"]
    wait_for_status_line(hpo_env, tmp_path, name, f"{running.number} (stale)")

    survivor = spawn_worker(hpo_env, tmp_path, name)
    output = finish([survivor])[0]
    assert_resumed(study, running.number, epoch, output)


def wait_for_status_line(env: dict, cwd: Path, name: str, text: str) -> None:
    """`hpo status` says `text` within 60 s: a dead worker's trial shows as stale once the
    study's own heartbeat grace (2 s here) has passed, not the default's (120 s)."""
    deadline = time.monotonic() + 60
    while True:
        shown = run_hpo("status", "--study", name, env=env, cwd=cwd)
        assert shown.returncode == 0, shown.stderr
        if text in shown.stdout:
            return
        assert time.monotonic() < deadline, shown.stdout
        time.sleep(0.5)


@pytest.mark.slow
def test_sigterm_finishes_the_epoch_and_requeues_the_trial(
    hpo_env: dict, tmp_path: Path, micro_space: Path
) -> None:
    # The default interval (60 s) writes no checkpoint before the stop: the stop writes one.
    study = long_trials_study(hpo_env, tmp_path, micro_space)
    worker = spawn_worker(hpo_env, tmp_path, "long")
    running = wait_for_report(study, epoch=1)
    assert running.user_attrs.get("checkpoint") is None
    worker.send_signal(signal.SIGTERM)
    output = worker.communicate(timeout=60)[0]
    assert worker.returncode == 0, output
    assert "SIGTERM: stopping after this epoch" in output
    failed = study.get_trials()[running.number]
    assert failed.state == TrialState.FAIL
    assert failed.user_attrs["fail_reason"].startswith("interrupted")
    epoch = failed.user_attrs["checkpoint"]["epoch"]

    output = finish([spawn_worker(hpo_env, tmp_path, "long")])[0]
    assert_resumed(study, running.number, epoch, output)


@pytest.mark.slow
def test_a_config_that_raises_does_not_stop_its_worker(
    hpo_env: dict, tmp_path: Path, micro_space: Path
) -> None:
    create(hpo_env, tmp_path, "raises", 2, micro_space)
    study = optuna.load_study(study_name="raises", storage=open_storage(hpo_env["HPO_STORAGE"]))
    # Ticket 2 holds a config that raises inside the trial, like an OOM would; 3 more follow it.
    study.enqueue_trial({"dropout": 1.5})
    study.set_user_attr(attrs.TARGET, 3)
    move_target(study, 6)
    finish([spawn_worker(hpo_env, tmp_path, "raises")])
    trials = study.get_trials()
    failed = [t.number for t in trials if t.state == TrialState.FAIL]
    assert failed == [2] and "dropout" in trials[2].user_attrs["fail_reason"]
    # Trials 3-5 came after the failure and finished (complete or pruned), none failed.
    assert len(trials) == 6 and budget(study).finished == 6


def test_a_password_never_reaches_an_error_message(hpo_env: dict, tmp_path: Path) -> None:
    url = f"postgresql+psycopg://postgres:{PASSWORD}@127.0.0.1:1/nothing"
    result = run_hpo("status", "--storage", url, env=hpo_env, cwd=tmp_path)
    assert result.returncode == 2
    assert PASSWORD not in result.stdout + result.stderr
    assert "postgres:***@127.0.0.1:1" in result.stderr


@pytest.mark.slow
def test_journal_workers_in_other_time_zones_fail_only_a_dead_trial(
    hpo_env: dict, tmp_path: Path, micro_space: Path
) -> None:
    # Tokyo is 17 hours ahead of Los Angeles: a stamp either read in the other's zone would
    # make a live trial look 17 hours old, or a dead one alive for 17 hours.
    url = f"journal://{tmp_path / 'hpo.log'}"
    tokyo = {**hpo_env, "HPO_STORAGE": url, "TZ": "Asia/Tokyo"}
    los_angeles = {**tokyo, "TZ": "America/Los_Angeles"}
    create(tokyo, tmp_path, "zones", 6, micro_space, "--heartbeat", "1")
    finish([spawn_worker(env, tmp_path, "zones") for env in (tokyo, los_angeles)])
    study = optuna.load_study(study_name="zones", storage=open_storage(url))
    trials = assert_exactly(study, 6)  # each checked the other's live trials; none failed
    stamps = [t.system_attrs[key] for t in trials for key in ("hpo:claimed", "hpo:heartbeat")]
    assert all(stamp.endswith("+00:00") for stamp in stamps)  # UTC, whoever wrote it

    study = long_trials_study(tokyo, tmp_path, micro_space, "--checkpoint-interval", "0")
    victim = spawn_worker(tokyo, tmp_path, "long")
    running = wait_for_checkpoint(study, epoch=2)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    epoch = study.get_trials()[running.number].user_attrs["checkpoint"]["epoch"]
    output = finish([spawn_worker(los_angeles, tmp_path, "long")])[0]
    assert_resumed(study, running.number, epoch, output)


# `hpo worker`, its first trial pausing itself (SIGSTOP: a paused VM, a long outage: its
# heartbeats stop) as it reports epoch 2, and failing with a CUDA error once continued.
PAUSES_THEN_FAILS = """
import os, signal, sys, time
from search.cli import main
from search.training.objective import TrialRunner
record, paused = TrialRunner._record, []
def pause_then_fail(self, trial, history, new=None):
    if new and history[-1]["epoch"] == 2 and not paused:
        paused.append(trial.number)
        while not os.path.exists("go"):  # woken without it: the test frees SQLite's lock
            os.kill(os.getpid(), signal.SIGSTOP)
            time.sleep(0.5)  # for the transaction another thread was stopped in
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    return record(self, trial, history, new)
TrialRunner._record = pause_then_fail
sys.argv[0] = "hpo"
main()
"""


@pytest.mark.slow
def test_a_taken_over_copy_that_fails_leaves_the_checkpoint_to_its_retry(
    hpo_env: dict, tmp_path: Path, micro_space: Path
) -> None:
    url = hpo_env["HPO_STORAGE"]
    made = run_hpo(
        "create", "--study", "over", "--trials", "1", "--space", str(micro_space),
        "--dataset", "synthetic", "--epochs", "6", "--pruner", "none", "--heartbeat", "1",
        "--checkpoint-interval", "0", env=hpo_env, cwd=tmp_path,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    worker = subprocess.Popen(
        [sys.executable, "-c", PAUSES_THEN_FAILS, "worker", "--study", "over"], env=hpo_env,
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    _, status = os.waitpid(worker.pid, os.WUNTRACED)  # until it has paused itself
    assert os.WIFSTOPPED(status), worker.communicate()[0]
    # Another worker's stale check fails the trial and queues its retry.
    study = load_beside_a_paused_worker(worker, url, "over")
    while study.get_trials()[0].state == TrialState.RUNNING:
        fail_stale_trials(study)
        time.sleep(0.2)
    (tmp_path / "go").touch()
    worker.send_signal(signal.SIGCONT)
    output = finish([worker])[0]
    assert "dropping this copy" in output and "not discarded" not in output, output
    # The late copy's error left the checkpoint: its own worker ran the retry from it.
    failed, retry = study.get_trials()
    assert failed.state == TrialState.FAIL and retry.state == TrialState.COMPLETE, output
    assert retry.user_attrs.get("resumed_from_epoch", 0) >= 1, output
    files = [p.name for p in default_artifact_dir(url).iterdir() if p.is_file()]
    assert files == [retry.user_attrs["checkpoint"]["artifact_id"]]


def load_beside_a_paused_worker(worker: subprocess.Popen, url: str, name: str) -> optuna.Study:
    """The study, though the paused worker may have stopped with SQLite's write lock held (a
    heartbeat or checkpoint thread inside its transaction): woken without the go file, the
    worker lets that transaction end and pauses again."""
    while True:
        try:
            return optuna.load_study(study_name=name, storage=open_storage(url, HeartbeatPolicy(1)))
        except StorageURLError as err:
            if "database is locked" not in str(err):
                raise
        worker.send_signal(signal.SIGCONT)
        _, status = os.waitpid(worker.pid, os.WUNTRACED)
        assert os.WIFSTOPPED(status), worker.communicate()[0]
