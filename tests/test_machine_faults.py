"""Faults of the machine, not of the config (DEPLOY.md §8, "Whose fault is it"): a full,
read-only or vanished disk is never charged to a trial. Real small file systems (a 64 KiB
tmpfs, mounted here as root), real `hpo` processes."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
import torch
from conftest import run_hpo, tiny_start
from optuna.trial import TrialState

from search.rules import attrs
from search.rules.faults import EXIT_MACHINE_FAULT, last_machine_fault
from search.training.checkpoints import CheckpointStore, TrialCheckpoints
from storage import open_storage


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs of the test's own, unmounted after it."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path) -> None:
    with (disk / "filler").open("wb", buffering=0) as f, pytest.raises(OSError):
        while True:
            f.write(b"\0" * 4096)


def make_read_only(disk: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)


@pytest.mark.parametrize("break_disk", [fill, make_read_only], ids=["full", "read-only"])
def test_a_checkpoint_the_disk_refuses_is_said_and_the_trial_goes_on(
    small_disk: Path, tmp_path: Path, break_disk
) -> None:
    study = optuna.create_study(storage=open_storage(f"sqlite:///{tmp_path / 'c.db'}"))
    said: list[str] = []
    store = CheckpointStore(small_disk / "artifacts", say=said.append)
    trial = study.ask()
    trial.set_user_attr(attrs.WORKER, "w1")
    break_disk(small_disk)
    with TrialCheckpoints(store, trial, interval_s=0) as checkpoints:
        for epoch in (1, 2):  # told once, not once per epoch
            checkpoints.offer(lambda e=epoch: {"epoch": e, "w": torch.zeros(50_000)}, force=True)
            checkpoints.wait()  # raises nothing: not the trial's fault
    assert len(said) == 1 and "checkpoint not written to" in said[0], said
    assert "the machine's fault" in said[0]
    fault = last_machine_fault(study.user_attrs)
    assert fault is not None and "worker w1" in fault, study.user_attrs
    assert trial.user_attrs.get(attrs.CHECKPOINT) is None
    assert list((small_disk / "artifacts").iterdir()) == []  # no scratch left either


@pytest.mark.slow
def test_a_study_on_a_full_checkpoint_disk_scores_every_trial(
    small_disk: Path, hpo_env: dict, tmp_path: Path
) -> None:
    fill(small_disk)
    artifacts = small_disk / "artifacts"
    start = tiny_start(
        "full-disk", 4, "--checkpoint-interval", "0", "--artifact-dir", str(artifacts)
    )
    result = run_hpo(*start, env=hpo_env, cwd=tmp_path, timeout=900)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "failed for good" not in output, output
    assert f"checkpoint not written to {artifacts}: No space left on device" in output, output
    study = optuna.load_study(study_name="full-disk", storage=open_storage(hpo_env["HPO_STORAGE"]))
    states = [t.state for t in study.get_trials()]
    assert states.count(TrialState.COMPLETE) + states.count(TrialState.PRUNED) == 4, states
    shown = run_hpo("status", "--study", "full-disk", env=hpo_env, cwd=tmp_path)
    assert "No space left on device" in shown.stdout, shown.stdout


@pytest.mark.slow
def test_hpo_train_on_a_full_disk_still_tells_its_test_accuracy(
    small_disk: Path, hpo_env: dict, tmp_path: Path
) -> None:
    config = tmp_path / "tiny.yaml"
    config.write_text("model: {channels: [[3, 8]], blocks: [1]}\n")
    fill(small_disk)
    output = small_disk / "final"
    result = run_hpo("train", "--config", str(config), "--dataset", "synthetic", "--epochs", "1",
                     "--output-dir", str(output), env=hpo_env, cwd=tmp_path)  # fmt: skip
    said = result.stdout + result.stderr
    assert result.returncode == 75 and "Traceback" not in said, said  # EXIT_MACHINE_FAULT
    assert f"model-seed0.pt not written to {output}: No space left on device" in said, said
    assert "test accuracy" in said and f"wrote nothing in {output}" in said, said
    assert list(output.iterdir()) == []  # no half-written file left
    # Every unwritten file named in one line at the end, no traceback (issue 37).
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("error: model-seed0.pt, metrics.json, learning-rate.png")
    assert f"not written in {output}" in result.stderr
    assert "test accuracy" in result.stdout  # the run's result is still told


def test_hpo_report_on_a_full_disk_is_the_machines_fault(
    small_disk: Path, hpo_env: dict, tmp_path: Path
) -> None:
    """One line and exit 75, as compare's and train's: a full disk is no mistake of the
    user's (a folder that cannot be one is: test_report, exit 2)."""
    study = optuna.create_study(study_name="r", storage=open_storage(hpo_env["HPO_STORAGE"]))
    study.optimize(lambda t: t.suggest_float("x", 0, 1) ** 2, n_trials=4)
    fill(small_disk)
    result = run_hpo("report", "--study", "r", "-o", str(small_disk / "r"), env=hpo_env,
                     cwd=tmp_path)  # fmt: skip
    assert result.returncode == EXIT_MACHINE_FAULT, result.stdout + result.stderr
    assert result.stderr == (
        f"error: report.html and its figures not written to {small_disk / 'r'}: "
        "No space left on device\n"
    )
