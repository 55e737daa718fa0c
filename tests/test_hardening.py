"""What a long search meets besides good input: a checkpoint someone tampered with, inputs
that must be refused before anything is stored, and logs read by machines, not terminals."""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path

import optuna
import pytest
import torch
from conftest import run_hpo, tiny_start
from optuna.trial import TrialState
from test_search_rules import EPOCHS, one_trial_study, runner

from search.rules import attrs
from search.training.worker import run_worker
from storage import open_storage

# Each test trains or runs several real `hpo` processes: the quick tier leaves them out.
pytestmark = pytest.mark.slow


class RunsCode:
    """Unpickled without weights_only, this would run a command in the worker."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_that_would_run_code_is_refused_and_the_trial_starts_over(
    data_dir: Path, tmp_path: Path
) -> None:
    study, settings = one_trial_study(f"sqlite:///{tmp_path / 'h.db'}", "h")
    stop = threading.Event()
    stopping = runner(
        settings, data_dir, tmp_path / "a", on_epoch=lambda t, s: stop.set(), stop=stop
    )
    run_worker(study, stopping, stop)  # one epoch, checkpointed, then re-queued
    record = study.get_trials()[0].user_attrs[attrs.CHECKPOINT]
    marker = tmp_path / "code-ran"
    torch.save({"epoch": 1, "model": RunsCode(marker)}, tmp_path / "a" / record["artifact_id"])

    said: list[str] = []
    resuming = runner(settings, data_dir, tmp_path / "a")
    resuming.checkpoints.say = said.append
    run_worker(study, resuming, threading.Event())
    assert not marker.exists()
    assert len(said) == 1 and record["artifact_id"] in said[0] and "refused" in said[0]
    retry = study.get_trials(states=(TrialState.COMPLETE,))[0]
    assert attrs.RESUMED_FROM_EPOCH not in retry.user_attrs  # from epoch 1, not the file
    assert [r["epoch"] for r in retry.user_attrs[attrs.EPOCHS]] == list(range(1, EPOCHS + 1))


def expect_refused(result, *words: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    for word in words:
        assert word in result.stderr


def test_bad_gpus_and_study_names_are_refused_before_anything_is_stored(
    hpo_env: dict, tmp_path: Path
) -> None:
    def hpo(*args: str):
        return run_hpo(*args, env=hpo_env, cwd=tmp_path)

    # This machine has no CUDA GPU: naming one is a mistake, not a CPU run as "gpu7".
    expect_refused(hpo(*tiny_start("g", 1, "--gpus", "7")), "--gpus 7", "no CUDA GPU")
    expect_refused(hpo(*tiny_start("g", 1, "--gpus", "all")), "no CUDA GPU")
    for name in ("", "  ", "tab\there"):
        expect_refused(hpo(*tiny_start(name, 1)), "study name", "printable")
    assert not Path(hpo_env["HPO_STORAGE"].removeprefix("sqlite:///")).exists()


def test_a_piped_worker_log_has_one_event_per_line(hpo_env: dict, tmp_path: Path) -> None:
    env = {k: v for k, v in hpo_env.items() if k != "COLUMNS"}  # as under Docker or Slurm
    result = run_hpo(
        *tiny_start("a-study-with-a-rather-long-name-for-a-log", 2), env=env, cwd=tmp_path
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    epochs = [line for line in lines if " epoch " in line]
    ends = [line for line in lines if line.startswith("[")]
    assert len(epochs) >= 2 and len(ends) == 2
    epoch_line = (
        r"trial +\d+ epoch +\d+/2  lr \S+  train \S+  val_ce \S+(  calibrated_ce \S+)?  "
        r"acc +\S+%  \S+ img/s  \S+s"
    )
    assert all(re.fullmatch(epoch_line, line) for line in epochs), epochs
    trial_end = r"\[\d/2\] trial \d .*  best score \S+ \(trial \d\)(, val acc \S+%)?"
    assert all(re.fullmatch(trial_end, line) for line in ends), ends
    assert any(
        line.startswith("created study 'a-study") and "target 2 trials" in line for line in lines
    )


def test_a_refused_start_or_train_stores_nothing(hpo_env: dict, tmp_path: Path) -> None:
    """Data, GPUs, flags and folders are checked before a study or a trial is written."""
    url = hpo_env["HPO_STORAGE"]
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")

    def hpo(*args: str):
        return run_hpo(*args, env=hpo_env, cwd=tmp_path)

    def stored() -> dict[str, tuple[int, object]]:
        storage = open_storage(url)
        return {
            s.study_name: (s.n_trials, s.user_attrs.get(attrs.TARGET))
            for s in optuna.get_all_study_summaries(storage)
        }

    bad_data = ("--data-dir", str(not_a_folder))
    # A new study: nothing but the database file (no network needed: the folder is a file).
    for extra, words in [
        (bad_data, ("synthetic set", str(not_a_folder))),
        (("--dataset", "cifar10", *bad_data), ("CIFAR-10",)),
        (("--gpus", "all"), ("no CUDA GPU",)),
    ]:
        expect_refused(hpo(*tiny_start("new", 2, *extra)), *words)
        assert stored() == {}
    # An existing study keeps its trials and target.
    created = hpo("create", "--study", "old", "--trials", "2", "--space", "tiny",
                  "--dataset", "synthetic", "--epochs", "2")  # fmt: skip
    assert created.returncode == 0, created.stderr
    before = stored()
    assert before == {"old": (2, 2)}
    for extra, words in [(bad_data, ("synthetic set",)), (("--epochs", "3"), ("contradicts",))]:
        expect_refused(hpo(*tiny_start("old", 5, *extra)), *words)
        assert stored() == before
    config = tmp_path / "tiny.yaml"
    config.write_text("model: {channels: [[3, 8]], blocks: [1]}\n")
    train = ("train", "--config", str(config), "--dataset", "synthetic", "--epochs", "1")
    expect_refused(hpo(*train, "--output-dir", "/proc/x"), "--output-dir /proc/x")
    expect_refused(hpo(*train, "--output-dir", str(not_a_folder / "x")), "--output-dir")
    assert stored() == before
