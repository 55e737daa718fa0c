"""What a long search meets besides good input: a checkpoint someone tampered with, and inputs
that must be refused before anything is stored. (Logs read by machines, not terminals: the
piped `hpo start` of tests/test_naming.py.)"""

from __future__ import annotations

import os
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


def test_a_refused_start_or_train_stores_nothing(hpo_env: dict, tmp_path: Path) -> None:
    """Data, GPUs, study names, flags and folders are checked before a study or a trial is
    written."""
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

    # Bad GPUs and study names: not even the database file. This machine has no CUDA GPU:
    # naming one is a mistake, not a CPU run as "gpu7".
    expect_refused(hpo(*tiny_start("new", 1, "--gpus", "7")), "--gpus 7", "no CUDA GPU")
    expect_refused(hpo(*tiny_start("new", 1, "--gpus", "all")), "no CUDA GPU")
    for name in ("", "  ", "tab\there"):
        expect_refused(hpo(*tiny_start(name, 1)), "study name", "printable")
    assert not Path(url.removeprefix("sqlite:///")).exists()

    bad_data = ("--data-dir", str(not_a_folder))
    # A new study: nothing but the database file (no network needed: the folder is a file).
    for extra, words in [
        (bad_data, ("synthetic set", str(not_a_folder))),
        (("--dataset", "cifar10", *bad_data), ("CIFAR-10",)),
    ]:
        expect_refused(hpo(*tiny_start("new", 2, *extra)), *words)
        assert stored() == {}
    # An existing study keeps its trials and target.
    created = hpo("create", "--study", "old", "--trials", "2", "--space", "tiny",
                  "--dataset", "synthetic", "--epochs", "2")  # fmt: skip
    assert created.returncode == 0, created.stderr
    before = stored()
    assert before == {"old": (2, 2)}
    # A conflicting flag names both values (test_cli's study moves its target after this).
    contradicts = ("contradicts", "--epochs 3", "epochs 2")
    for extra, words in [(bad_data, ("synthetic set",)), (("--epochs", "3"), contradicts)]:
        expect_refused(hpo(*tiny_start("old", 5, *extra)), *words)
        assert stored() == before
    config = tmp_path / "tiny.yaml"
    config.write_text("model: {channels: [[3, 8]], blocks: [1]}\n")
    train = ("train", "--config", str(config), "--dataset", "synthetic", "--epochs", "1")
    expect_refused(hpo(*train, "--output-dir", "/proc/x"), "--output-dir /proc/x")
    expect_refused(hpo(*train, "--output-dir", str(not_a_folder / "x")), "--output-dir")
    assert stored() == before
