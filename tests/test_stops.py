"""Stops are not crashes, with real `hpo worker` processes on SQLite: a trial stopped by SIGTERM
again and again is still resumed, and may still crash max_retry times after; one more crash
(a second Ctrl-C, kill -9) fails it for good, and says so. (A stopped trial resumed to its
end: tests/test_worker_crashes.py's SIGTERM test.)"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import optuna
import pytest
from conftest import run_hpo
from optuna.trial import FrozenTrial, TrialState
from test_checkpoints import run_one_trial
from test_workers import MICRO_SPACE, spawn_worker

from search.commands.progress import _ending
from search.rules import attrs
from search.rules.study import budget
from search.training.worker import stop_trial
from storage import DEFAULT_MAX_RETRY, default_artifact_dir, open_storage

# Many short epochs: each of the seven runs is stopped a few epochs in, before the chain's end.
EPOCHS = 60
STUDY = "stops"


def one_trial_study(env: dict, cwd: Path) -> optuna.Study:
    """One trial of the micro space, a checkpoint every epoch, heartbeat 1 s (grace 2 s)."""
    space = cwd / "micro.yaml"
    space.write_text(MICRO_SPACE)
    result = run_hpo(
        "create", "--study", STUDY, "--trials", "1", "--space", str(space),
        "--dataset", "synthetic", "--epochs", str(EPOCHS), "--pruner", "none",
        "--heartbeat", "1", "--checkpoint-interval", "0", env=env, cwd=cwd,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return optuna.load_study(study_name=STUDY, storage=open_storage(env["HPO_STORAGE"]))


def wait_for_progress(
    study: optuna.Study, worker: subprocess.Popen, done: set[int], timeout: float = 120
) -> FrozenTrial:
    """A trial not seen before, running, once it has written a checkpoint of its own (a
    retry starts with its original's record: that one names its original as owner)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert worker.poll() is None, worker.communicate()[0]
        for trial in study.get_trials(states=(TrialState.RUNNING,)):
            record = trial.user_attrs.get(attrs.CHECKPOINT) or {}
            if trial.number not in done and record.get("owner") == trial.number:
                return trial
        time.sleep(0.1)
    raise AssertionError(f"no new trial checkpointed an epoch within {timeout} s")


def interrupt(
    study: optuna.Study, env: dict, cwd: Path, how: signal.Signals, done: set[int], again=False
):
    """Start a worker, let its trial train an epoch, send it `how` (`again`: a second time once
    it has taken the first, as Slurm's and a fleet parent's SIGTERM reach a child), wait for
    its exit."""
    worker = spawn_worker(env, cwd, STUDY)
    trial = wait_for_progress(study, worker, done)
    worker.send_signal(how)
    heard = ""
    if again:
        assert worker.stdout is not None
        while f"{how.name}: stopping" not in heard:
            line = worker.stdout.readline()
            assert line, heard
            heard += line
        worker.send_signal(how)
    output = heard + worker.communicate(timeout=120)[0]
    done.add(trial.number)
    return worker.returncode, output


def chain(study: optuna.Study) -> list[FrozenTrial]:
    """The study's trials in order: each a retry of the one before it (Optuna's record)."""
    trials = study.get_trials()
    history = [t.system_attrs.get("retry_history", []) for t in trials]
    assert history == [list(range(n)) for n in range(len(trials))], history
    return trials


def last_worker_run(study: optuna.Study, env: dict, cwd: Path) -> tuple[list[FrozenTrial], str]:
    """One more worker runs to its end; the chain it leaves, each run begun later than the
    one before (from its own checkpoint), and the worker's output."""
    last = spawn_worker(env, cwd, STUDY)
    output = last.communicate(timeout=300)[0]
    assert last.returncode == 0, output
    trials = chain(study)
    began = [t.user_attrs.get(attrs.RESUMED_FROM_EPOCH, 0) for t in trials]
    assert began == sorted(set(began)), began
    return trials, output


@pytest.mark.slow
def test_stops_leave_every_crash_retry_and_a_chain_crashed_past_max_retry_is_failed_for_good(
    hpo_env: dict, tmp_path: Path
) -> None:
    """One chain: three SIGTERM stops, then max_retry + 1 crashes (the first a second Ctrl-C).
    A stop counted as a crash would end the chain for good at its first crash, and the next
    worker would find nothing to run (`interrupt` fails); a second Ctrl-C counted as a stop
    would leave it a crash retry at the end."""
    study = one_trial_study(hpo_env, tmp_path)
    done: set[int] = set()
    for run in range(3):
        # The first stop's SIGTERM comes twice: still one stop, not an exit at once.
        code, output = interrupt(study, hpo_env, tmp_path, signal.SIGTERM, done, again=run == 0)
        assert code == 0, output
        assert "SIGTERM: stopping after this epoch" in output
    # The stops used up none of max_retry: the chain may still crash that many times, and
    # once more. The first crash: Ctrl-C twice. The worker exits now (130), without finishing
    # its epoch, stopping its trial or queuing a retry; the trial is left RUNNING to go stale
    # and be retried as a crash (a repeated SIGTERM, by contrast, is one stop: above).
    code, output = interrupt(study, hpo_env, tmp_path, signal.SIGINT, done, again=True)
    assert code == 128 + signal.SIGINT, output
    assert "SIGINT: stopping after this epoch" in output
    assert study.get_trials()[-1].state == TrialState.RUNNING, output
    for _ in range(DEFAULT_MAX_RETRY):
        code, output = interrupt(study, hpo_env, tmp_path, signal.SIGKILL, done)
        assert code == -signal.SIGKILL, output
    # The next worker finds the last crash stale, retries it no more, and the study is done.
    trials, output = last_worker_run(study, hpo_env, tmp_path)
    crashes = DEFAULT_MAX_RETRY + 1
    assert [t.state for t in trials] == [TrialState.FAIL] * (3 + crashes)
    reasons = [t.user_attrs[attrs.FAIL_REASON] for t in trials[:3]]
    assert all(r.startswith(attrs.STOPPED_PREFIX) for r in reasons), reasons
    # The crashes wrote no reason of their own: the first, a retry of the last stop, may still
    # hold the one it inherited (naming that stop's epoch, not a later one of its own).
    crash_reasons = [t.user_attrs.get(attrs.FAIL_REASON) for t in trials[3:]]
    assert crash_reasons[0] in (None, reasons[-1]), crash_reasons
    assert crash_reasons[1:] == [None] * DEFAULT_MAX_RETRY, crash_reasons
    # Its last checkpoint (~225 MB for Table 1) went with it, deleted by that worker.
    last = trials[-1].number
    assert f"trial {last} failed for good: deleted its chain's checkpoint" in output, output
    artifacts = default_artifact_dir(hpo_env["HPO_STORAGE"])
    # Nothing at all: no file, and no scratch folder of a write the kills cut short.
    assert [p.name for p in artifacts.iterdir()] == []
    state = budget(study)
    assert (state.finished, state.given_up, state.running, state.waiting) == (1, 1, 0, 0)
    shown = run_hpo("status", "--study", STUDY, env=hpo_env, cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert "failed for good" in shown.stdout, shown.stdout


def test_a_retry_that_completes_reads_complete_not_its_originals_stop(
    tmp_path: Path, data_dir: Path
) -> None:
    """A stopped trial's retry inherits its attributes, the stop's reason among them; once
    it has run to its end, nothing of it says "interrupted" (the compose smoke's status did)."""
    study = optuna.create_study(storage=open_storage(f"sqlite:///{tmp_path / 's.db'}"))
    stop_trial(study, study.ask(), "stopped after epoch 1")
    retry = study.ask()  # the queued retry
    assert retry.user_attrs[attrs.FAIL_REASON].startswith(attrs.STOPPED_PREFIX)
    _, retry = run_one_trial(tmp_path, data_dir, interval_s=3600, trial=retry)
    finished = study.tell(retry, retry.user_attrs["value"])
    assert finished.user_attrs.get(attrs.FAIL_REASON) is None
    assert "interrupted" not in _ending(finished)
