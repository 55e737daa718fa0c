"""What a search costs: the cost cap, the budget without over-cap draws, estimates, pace."""

from __future__ import annotations

import re
import threading
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from optuna.trial import TrialState
from rich.console import Console

from data.dataset import load_dataset
from data.loader import search_data
from model.config import ModelConfig
from search.commands.launch import StudyRequest, create_study
from search.commands.progress import SearchProgress
from search.commands.status import study_table
from search.rules import attrs
from search.rules.cost import (
    SEARCH_TRAIN_IMAGES,
    TABLE1_GFLOPS,
    draw_costs,
    expected_epochs,
    is_over_cap,
    refuse_over_cap,
    study_cost,
    study_pace,
)
from search.rules.settings import StudySettings
from search.rules.space import DEFAULT_SPACE, TINY_SPACE
from search.rules.study import budget, create_or_join, join_as_worker
from search.training.objective import TrialRunner, WorkerInfo
from search.training.probe import probe_flops_per_s
from search.training.trainer import DeviceRecipe
from search.training.worker import run_worker
from storage import open_storage

# About the median tiny draw (0.45-10 MFLOP per image): the sampler's first draws cross it.
TINY_CAP_GFLOPS = 0.0022


@pytest.mark.slow
def test_over_cap_draws_never_train_nor_count_and_the_study_trains_exactly_n(
    data_dir: Path, tmp_path: Path
) -> None:
    space = replace(TINY_SPACE, max_gflops=TINY_CAP_GFLOPS, batch_size=(64,))
    settings = StudySettings(
        space=space.to_dict(), space_name="capped", epochs=1, dataset="synthetic", pruner="none"
    )
    storage = open_storage(f"sqlite:///{tmp_path / 'cap.db'}")
    create_or_join(storage, "cap", settings, 3)
    study = join_as_worker(storage, "cap", settings, "worker")
    recipe = DeviceRecipe.for_device("cpu")
    trained_epochs: list[int] = []
    runner = TrialRunner(
        settings=settings,
        data=search_data(load_dataset("synthetic", data_dir), recipe.device),
        recipe=recipe,
        worker=WorkerInfo(name="worker", host="host", gpu="cpu"),
        on_epoch=lambda trial, stats: trained_epochs.append(trial.number),
        compile_mode="off",
    )
    run_worker(study, runner, threading.Event())

    trials = study.get_trials()
    skipped = [t for t in trials if is_over_cap(t)]
    ran = [t for t in trials if not is_over_cap(t)]
    assert skipped, "the sampler drew nothing over the cap: move TINY_CAP_GFLOPS"
    assert [t.state for t in ran] == [TrialState.COMPLETE] * 3
    state = budget(study)
    assert (state.finished, state.running, state.waiting) == (3, 0, 0)
    # Only the trials in the budget trained; a skipped draw built no model, ran no epoch.
    assert trained_epochs == sorted(t.number for t in ran)
    for trial in skipped:
        assert trial.state == TrialState.PRUNED and trial.intermediate_values == {}
        assert trial.user_attrs[attrs.GFLOPS] > TINY_CAP_GFLOPS
        assert attrs.PARAMS not in trial.user_attrs and attrs.EPOCHS not in trial.user_attrs

    console = Console(width=200, record=True)
    console.print(study_table(study))
    shown = console.export_text()
    assert re.search(r"finished / target\W+3 / 3", shown)
    assert re.search(rf"skipped over max_gflops\W+{len(skipped)}\b", shown)
    assert re.search(r"elapsed \d+:\d\d:\d\d, [\d.]+ trials/h, done", shown)


def toy_share_over_cap(told: TrialState) -> float:
    """TPE on cost x in [0, 1], cap 0.5, best value at 0.3: share of the last 30 draws over."""
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0))
    over = []
    for _ in range(60):
        trial = study.ask()
        x = trial.suggest_float("x", 0, 1)
        try:
            refuse_over_cap(trial, gflops=x, max_gflops=0.5)
        except optuna.TrialPruned:
            study.tell(trial, state=told)
            over.append(True)
            continue
        study.tell(trial, (x - 0.3) ** 2)
        over.append(False)
    return float(np.mean(over[30:]))


def test_tpe_learns_to_avoid_draws_told_pruned_before_epoch_one() -> None:
    # Told FAIL (as a crashed trial is), TPE never sees them and keeps drawing there.
    assert toy_share_over_cap(TrialState.FAIL) > 0.5
    assert toy_share_over_cap(TrialState.PRUNED) < 0.2


def test_default_space_is_centred_on_table1_cost_and_keeps_table1() -> None:
    costs = draw_costs(DEFAULT_SPACE, epochs=20)
    trains = costs[costs <= DEFAULT_SPACE.max_gflops]
    assert trains.mean() <= 1.5 * TABLE1_GFLOPS
    assert np.percentile(trains, 90) >= 2 * TABLE1_GFLOPS
    assert costs.mean() <= 1.5 * TABLE1_GFLOPS  # the cap trims a tail, not the centre
    assert DEFAULT_SPACE.max_gflops >= TABLE1_GFLOPS


@pytest.mark.parametrize(("pruner", "low", "high"), [("none", 8, 8), ("hyperband", 3, 6)])
def test_expected_epochs_come_from_the_studys_own_pruner(
    pruner: str, low: float, high: float
) -> None:
    settings = StudySettings.for_space("tiny", epochs=8, pruner=pruner, min_epochs=3)
    assert low <= expected_epochs(settings, trials=60) <= high


def test_search_epoch_sizes_match_the_split(tmp_path: Path) -> None:
    images = load_dataset("synthetic", tmp_path)  # the default synthetic set: 5,000 training
    split = search_data(images, "cpu")
    assert len(split.train.labels) == SEARCH_TRAIN_IMAGES["synthetic"]
    assert SEARCH_TRAIN_IMAGES["cifar10"] == 10 * SEARCH_TRAIN_IMAGES["synthetic"]  # 50,000


def test_the_device_probe_measures_a_rate_with_the_real_trainer() -> None:
    small = ModelConfig(channels=((3, 8),), blocks=(1,))
    rate = probe_flops_per_s(torch.device("cpu"), small, batch_size=8, steps=2)
    assert 0 < rate < float("inf")


def test_pace_and_eta_from_the_trials_times() -> None:
    start = datetime(2026, 1, 1, 12, 0)
    trials = [optuna.trial.create_trial(state=TrialState.COMPLETE, value=1.0) for _ in range(3)]
    for i, trial in enumerate(trials):
        trial.datetime_start = start + timedelta(minutes=20 * i)
        trial.datetime_complete = start + timedelta(minutes=20 * i + 20)
    pace = study_pace(trials, finished=3, target=9, now=start + timedelta(hours=1))
    assert (pace.elapsed_s, pace.per_hour, pace.eta_s) == (3600, 3, 2 * 3600)
    done = study_pace(trials, finished=3, target=3, now=start + timedelta(hours=5))
    assert done.elapsed_s == 3600 and done.eta_s == 0
    assert study_pace([], 0, 3, start).per_hour is None


def test_create_prints_the_expected_cost(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'c.db'}"
    request = StudyRequest("c", 4, url, space="tiny", dataset="synthetic")
    console = Console(width=200, record=True)
    settings = create_study(request, SearchProgress(console))
    shown = console.export_text()
    cost = study_cost(settings, 4)  # the same figures again: the estimate is reproducible
    assert f"{cost.epochs_per_trial:.1f} epochs per trial under hyperband" in shown
    assert f"4,500 images x 4 trials = {cost.pflop:.3g} PFLOP" in shown
    assert cost.pflop == pytest.approx(4 * cost.epochs_per_trial * 4_500 * cost.mean_gflops / 1e6)
    if not torch.cuda.is_available():
        assert "no GPU here: hours not estimated" in shown
