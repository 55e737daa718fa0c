"""Workers that crash, are stopped or are taken over mid-trial, with real `hpo worker`
processes: killed -9, stopped by SIGTERM, paused past their heartbeat's grace, in other time
zones. The helpers are test_workers' (tests/test_stops.py and test_outages.py share them)."""

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
import test_workers
from click.testing import Result
from conftest import run_hpo
from optuna.trial import TrialState
from servers import server_url
from test_workers import (
    assert_exactly,
    assert_resumed,
    create,
    finish,
    long_trials_study,
    spawn_worker,
    wait_for_checkpoint,
    wait_for_report,
    wait_until_stale,
)
from typer.testing import CliRunner

from search.cli import app
from search.rules.study import budget, fail_stale_trials
from storage import HeartbeatPolicy, StorageURLError, default_artifact_dir, open_storage

micro_space = test_workers.micro_space  # the fixture, shared


def status_in_this_process(env: dict, study: str) -> Result:
    """`hpo status` through CliRunner (`hpo` is `app()` and nothing more: the same code
    without a process start of seconds). The time-zone test's status and best stay processes:
    their zone is the point."""
    runner = CliRunner(env={**{k: None for k in os.environ if k.startswith("HPO_")}, **env})
    shown = runner.invoke(app, ["status", "--study", study])
    assert shown.exit_code == 0, shown.output
    return shown


@pytest.mark.slow
# SQLite: the SIGTERM chain's test below; journal: the time-zone test kills a worker mid-trial.
def test_kill_9_mid_trial_is_retried_from_its_checkpoint_on_redis(
    hpo_env: dict, tmp_path: Path, micro_space: Path
) -> None:
    hpo_env = {**hpo_env, "HPO_STORAGE": server_url("redis")}
    name = f"long-{uuid.uuid4().hex[:8]}"  # the shared Redis outlives the test
    study = long_trials_study(
        hpo_env, tmp_path, micro_space, "--checkpoint-interval", "0", name=name, trials=1
    )
    victim = spawn_worker(hpo_env, tmp_path, name)
    running = wait_for_checkpoint(study, epoch=2)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    epoch = study.get_trials()[running.number].user_attrs["checkpoint"]["epoch"]
    wait_until_stale(study, running.number)
    shown = status_in_this_process(hpo_env, name)
    assert f"{running.number} (stale)" in shown.stdout, shown.stdout

    survivor = spawn_worker(hpo_env, tmp_path, name)
    output = finish([survivor])[0]
    assert_resumed(study, running.number, epoch, output, n_trials=1)


@pytest.mark.slow
def test_sigterm_finishes_the_epoch_and_requeues_and_a_kill_9_of_the_retry_resumes_it_too(
    hpo_env: dict, tmp_path: Path, micro_space: Path
) -> None:
    """One chain on SQLite (it was two tests, each its own study and workers): a SIGTERM stop,
    then its retry's worker killed -9 mid-epoch, then the retry of that crash completes."""
    # The default interval (60 s) writes no checkpoint before the stop: the stop writes one.
    study = long_trials_study(hpo_env, tmp_path, micro_space, trials=1)
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

    # The stop's retry resumes from the stop's checkpoint; its worker is killed -9 an epoch
    # later (the 60 s interval writes none of its own), and the trial goes stale.
    victim = spawn_worker(hpo_env, tmp_path, "long")
    crashed = wait_for_report(study, epoch=epoch + 1)
    assert crashed.system_attrs.get("failed_trial") == running.number
    assert crashed.user_attrs["resumed_from_epoch"] >= epoch
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    wait_until_stale(study, crashed.number)
    shown = status_in_this_process(hpo_env, "long")
    assert f"{crashed.number} (stale)" in shown.stdout, shown.stdout

    output = finish([spawn_worker(hpo_env, tmp_path, "long")])[0]
    # The crash's retry (a retry names its chain's first trial: not assert_resumed's pair).
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL] * 2 + [TrialState.COMPLETE], output
    retry = trials[-1]
    assert retry.system_attrs["retry_history"] == [running.number, crashed.number]
    assert retry.params == failed.params
    resumed = retry.user_attrs["resumed_from_epoch"]  # the stop's checkpoint, or a later one
    assert resumed >= epoch
    assert sorted(retry.intermediate_values) == list(range(1, 13))
    assert f"trial {retry.number:>4} epoch {resumed + 1:>3}/12" in output
    assert f"trial {retry.number:>4} epoch {resumed:>3}/12" not in output
    state = budget(study)
    assert (state.finished, state.target, state.running, state.waiting) == (1, 1, 0, 0)


@pytest.mark.slow
def test_journal_workers_in_other_time_zones_stop_at_exactly_n_and_fail_only_a_dead_trial(
    hpo_env: dict, tmp_path: Path, micro_space: Path
) -> None:
    """Also the journal case of test_workers' exactly-n test: two workers, six trials, each
    trial named by its worker, `hpo status` and `hpo best` on the study."""
    # Tokyo is 17 hours ahead of Los Angeles: a stamp either read in the other's zone would
    # make a live trial look 17 hours old, or a dead one alive for 17 hours.
    url = f"journal://{tmp_path / 'hpo.log'}"
    tokyo = {**hpo_env, "HPO_STORAGE": url, "TZ": "Asia/Tokyo"}
    los_angeles = {**tokyo, "TZ": "America/Los_Angeles"}
    create(tokyo, tmp_path, "zones", 6, micro_space, "--heartbeat", "1")
    spawned = [spawn_worker(env, tmp_path, "zones") for env in (tokyo, los_angeles)]
    outputs = finish(spawned)
    study = optuna.load_study(study_name="zones", storage=open_storage(url))
    trials = assert_exactly(study, 6)  # each checked the other's live trials; none failed
    stamps = [t.system_attrs[key] for t in trials for key in ("hpo:claimed", "hpo:heartbeat")]
    assert all(stamp.endswith("+00:00") for stamp in stamps)  # UTC, whoever wrote it
    names = {f"pid{worker.pid}" for worker in spawned}
    assert {t.user_attrs["worker"].split("/")[-1] for t in trials} <= names
    for command in ("status", "best"):
        shown = run_hpo(command, "--study", "zones", env=tokyo, cwd=tmp_path)
        assert shown.returncode == 0, shown.stderr
        outputs.append(shown.stdout + shown.stderr)
    assert all("Traceback" not in output for output in outputs)

    study = long_trials_study(tokyo, tmp_path, micro_space, "--checkpoint-interval", "0", trials=1)
    victim = spawn_worker(tokyo, tmp_path, "long")
    running = wait_for_checkpoint(study, epoch=2)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    epoch = study.get_trials()[running.number].user_attrs["checkpoint"]["epoch"]
    output = finish([spawn_worker(los_angeles, tmp_path, "long")])[0]
    assert_resumed(study, running.number, epoch, output, n_trials=1)


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
