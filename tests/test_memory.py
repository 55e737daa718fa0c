"""A trial's memory is back before the next trial, however it ended; an OOM is retried once.

A real worker loop, storage and objective on the CPU; only the out-of-memory error is
raised by the test, where a GPU would raise it: in the trial's training.
"""

from __future__ import annotations

import gc
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState
from test_workers import MICRO_SPACE

from data.dataset import load_dataset
from data.loader import search_data
from search.rules import attrs
from search.rules.settings import StudySettings
from search.rules.study import claim_trial, create_or_join, join_as_worker, queue_owed_retries
from search.training.checkpoints import CheckpointStore
from search.training.objective import TrialRunner, WorkerInfo
from search.training.trainer import DeviceRecipe
from search.training.worker import run_trial, run_worker
from storage import open_storage


@dataclass
class OutOfMemoryRunner(TrialRunner):
    """The real objective; its calls numbered in `oom_calls` run out of memory in training."""

    oom_calls: set[int] = field(default_factory=set)
    models: list[weakref.ref] = field(default_factory=list)
    # Per call: whether any earlier trial's model was still alive when it started.
    leftovers: list[bool] = field(default_factory=list)

    def __call__(self, trial: optuna.Trial) -> float:
        self.leftovers.append(any(model() is not None for model in self.models))
        return super().__call__(trial)

    def _train(self, trial, run, *args):  # type: ignore[no-untyped-def]
        model = run.trainer.model
        self.models.append(weakref.ref(model))
        # Held in a reference cycle, as compiled code and autograd graphs hold a model; the
        # collections during training move it to the oldest generation (done here at once),
        # which only a full collection frees.
        cycle: list = [model]
        cycle.append(cycle)
        gc.collect()
        if len(self.models) in self.oom_calls:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return super()._train(trial, run, *args)


@pytest.mark.slow
def test_memory_is_back_before_the_next_trial_and_an_oom_is_retried_once(
    data_dir: Path, tmp_path: Path
) -> None:
    # Trial 0 and its retry run out; so does trial 1, whose retry then completes.
    study, runner = _small_worker(data_dir, tmp_path, 2, 1, oom_calls={1, 2, 3})
    said: list[str] = []
    run_worker(study, runner, threading.Event(), say=said.append)

    assert runner.leftovers == [False] * 4  # no trial started beside a predecessor's model
    assert all(model() is None for model in runner.models)
    trials = study.get_trials()
    retry_of = {t.system_attrs.get("failed_trial"): t for t in trials}
    first, second = trials[0], trials[1]
    assert first.state == second.state == TrialState.FAIL
    assert retry_of[0].params == first.params and retry_of[0].state == TrialState.FAIL
    assert retry_of[0].user_attrs[attrs.OUT_OF_MEMORY] == [0, retry_of[0].number]
    assert retry_of[0].number not in retry_of  # failed for good: not retried again
    assert retry_of[1].params == second.params and retry_of[1].state == TrialState.COMPLETE
    assert len(trials) == 4
    out_of_memory = [line for line in said if "ran out of memory" in line]
    assert len(out_of_memory) == 3, said
    assert out_of_memory[0].endswith("retrying it once") and "parameters, batch" in out_of_memory[0]
    assert out_of_memory[1].endswith("failed for good: its retry ran out too")


def _small_worker(data_dir: Path, tmp_path: Path, target: int, epochs: int, **extra: object):
    """A study of `target` micro trials, each checkpointed every epoch, and a worker's runner."""
    space = tmp_path / "micro.yaml"
    space.write_text(MICRO_SPACE)
    settings = StudySettings.for_space(
        str(space), epochs=epochs, dataset="synthetic", pruner="none", checkpoint_interval_s=0
    )
    storage = open_storage(f"sqlite:///{tmp_path / 'oom.db'}")
    create_or_join(storage, "oom", settings, target)
    recipe = DeviceRecipe.for_device("cpu")
    runner = OutOfMemoryRunner(
        settings=settings,
        data=search_data(load_dataset("synthetic", data_dir), recipe.device),
        recipe=recipe,
        worker=WorkerInfo(name="worker", host="host", gpu="cpu"),
        checkpoints=CheckpointStore(tmp_path / "artifacts"),
        compile_mode="off",
        **extra,
    )
    return join_as_worker(storage, "oom", settings, "worker"), runner


@pytest.mark.slow
def test_an_oom_retry_resumes_from_the_checkpoint_and_a_second_oom_deletes_it(
    data_dir: Path, tmp_path: Path
) -> None:
    def out_of_memory_in_epoch_2(trial: optuna.Trial, stats: object) -> None:
        # Trials 0 and 1 run out in epoch 2, and so does 3, the retry of 1 (2 retries 0).
        if stats.epoch == 2 and trial.number in (0, 1, 3):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    study, runner = _small_worker(data_dir, tmp_path, 2, 2, on_epoch=out_of_memory_in_epoch_2)
    said: list[str] = []
    run_worker(study, runner, threading.Event(), say=said.append)
    first, second, first_retry, second_retry = study.get_trials()
    assert [t.system_attrs.get("failed_trial") for t in (first_retry, second_retry)] == [0, 1]
    # From epoch 1's checkpoint, as the pruner reads the epochs the original reported.
    assert first_retry.state == TrialState.COMPLETE
    assert first_retry.user_attrs[attrs.RESUMED_FROM_EPOCH] == 1
    assert second_retry.state == TrialState.FAIL
    assert second_retry.user_attrs[attrs.OUT_OF_MEMORY] == [1, 3]
    # The chain that failed for good left no checkpoint; the complete one keeps its own.
    files = [p.name for p in (tmp_path / "artifacts").iterdir() if p.is_file()]
    assert files == [first_retry.user_attrs[attrs.CHECKPOINT]["artifact_id"]]
    assert "trial 3 failed for good: deleted its chain's checkpoint" in said, said


def test_an_oom_retry_is_queued_by_the_next_worker_when_its_own_died_first(
    data_dir: Path, tmp_path: Path
) -> None:
    study, runner = _small_worker(data_dir, tmp_path, 1, 1, oom_calls={1})
    # The worker records the OOM and fails the trial, then dies before queuing the retry.
    failed = run_trial(study, claim_trial(study), runner)
    assert failed.state == TrialState.FAIL and failed.user_attrs[attrs.OUT_OF_MEMORY] == [0]
    for _ in range(2):  # the next worker's stale check, again and again: one retry
        assert queue_owed_retries(study) == []
    retries = [t for t in study.get_trials() if t.system_attrs.get("failed_trial") == 0]
    assert len(retries) == 1 and retries[0].params == failed.params
