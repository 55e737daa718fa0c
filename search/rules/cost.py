"""What a search costs: each draw's price and the space's cap, before a study and during it.

A draw over the space's `max_gflops` is told PRUNED before it builds anything: nothing is
built, allocated or trained. TPE ranks pruned trials after complete ones, and one with no
reported epoch after every other pruned trial, so it learns to avoid that corner of the
space (tests/test_cost.py: told PRUNED, under 20% of late draws land over the cap; told
FAIL, which TPE ignores, over half). Optuna's `constraints_func` would need the trial
COMPLETE with a made-up value, which best_trial and the pruners would read, and the same
function in every worker's sampler. The budget (search/rules/study.py) does not count a skipped
draw and makes a ticket in its place, so a study still trains exactly its target.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from model.config import REPORT_TABLE1, ModelConfig
from model.flops import train_flops_per_image
from search.rules import attrs
from search.rules.config import TrialConfig
from search.rules.settings import StudySettings
from search.rules.space import IMAGE_SIZE, SearchSpace, sample_config

if TYPE_CHECKING:
    from model.network import BackboneNet

# A measurement of the GPU the study will train on: its name and train FLOP/s on Table 1.
GpuProbe = Callable[[], tuple[str, float]]
TABLE1_GFLOPS = train_flops_per_image(REPORT_TABLE1) / 1e9
# Images a search epoch trains on: the training set less the 10% validation split
# (data.search_data); tests/test_cost.py checks the synthetic figure against the split.
SEARCH_TRAIN_IMAGES = {"cifar10": 45_000, "synthetic": 4_500}
SEARCH_VAL_FRACTION = 0.1
# Draws of the space priced before a study (RandomSampler: what TPE draws before it learns).
COST_DRAWS = 300
# Hyperband's share of long trials settles within a few hundred; more only costs time.
MAX_SIMULATED_TRIALS = 200


def gflops_per_image(model: ModelConfig) -> float:
    """Train FLOPs (forward + backward) per image, in GFLOP."""
    return train_flops_per_image(model) / 1e9


def refuse_over_cap(trial: optuna.Trial, gflops: float, max_gflops: float) -> None:
    """Record the draw's cost; one over the cap raises TrialPruned before it trains."""
    trial.set_user_attr(attrs.GFLOPS, float(f"{gflops:.4g}"))  # 4 digits, tiny nets too
    if gflops > max_gflops:
        trial.set_user_attr(attrs.OVER_CAP, True)
        raise optuna.TrialPruned(f"{gflops:.3g} GFLOP per image is over max_gflops {max_gflops}")


def is_over_cap(trial: FrozenTrial) -> bool:
    return bool(trial.user_attrs.get(attrs.OVER_CAP))


@dataclass(frozen=True)
class StudyCost:
    trials: int
    mean_gflops: float  # per image, of the draws that train
    over_cap: float  # share of draws skipped untrained
    epochs_per_trial: float
    images_per_epoch: int

    @property
    def pflop(self) -> float:
        return self.trials * self.epochs_per_trial * self.images_per_epoch * self.mean_gflops / 1e6


def study_cost(settings: StudySettings, trials: int) -> StudyCost:
    space = settings.search_space()
    costs = draw_costs(space, settings.epochs, image_size=settings.image_size)
    trains = costs[costs <= space.max_gflops]
    return StudyCost(
        trials=trials,
        mean_gflops=float(trains.mean()),
        over_cap=1 - len(trains) / len(costs),
        epochs_per_trial=expected_epochs(settings, min(trials, MAX_SIMULATED_TRIALS)),
        images_per_epoch=search_train_images(settings),
    )


def search_train_images(settings: StudySettings) -> int:
    """Images a search epoch trains on: the stored identity's training split less the
    validation split, or the figure of CIFAR-10 and the synthetic set (stored without one)."""
    identity = settings.identity
    if identity is None:
        return SEARCH_TRAIN_IMAGES[settings.dataset]
    return identity["train_count"] - round(identity["train_count"] * SEARCH_VAL_FRACTION)


def draw_costs(
    space: SearchSpace, epochs: int, draws: int = COST_DRAWS, image_size: int = IMAGE_SIZE
) -> np.ndarray:
    """GFLOP per image of `draws` configs from RandomSampler through the real sample_config,
    for images of `image_size` (FLOPs grow with its square)."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    costs = []
    for _ in range(draws):
        trial = study.ask()
        costs.append(gflops_per_image(sample_config(trial, space, epochs, image_size).model))
        study.tell(trial, 1.0)
    return np.array(costs)


def expected_epochs(settings: StudySettings, trials: int) -> float:
    """Mean epochs a trial trains under the study's own pruner, from `trials` sequential
    trials with synthetic learning curves, run as the objective runs them (report every
    epoch, ask the pruner before the last). Parallel workers prune later: more epochs."""
    rng = np.random.default_rng(settings.seed % 2**64)  # NumPy takes no negative seed
    study = optuna.create_study(
        # Hyperband picks a trial's bracket from a hash of the study name: fix it, so the
        # estimate is the same every time.
        study_name="expected-epochs",
        pruner=settings.build_pruner(),
        sampler=optuna.samplers.RandomSampler(seed=0),
    )
    trained = 0
    for _ in range(trials):
        trial, curve = study.ask(), synthetic_curve(rng, settings.epochs)
        for epoch, loss in enumerate(curve, start=1):
            trial.report(loss, epoch)
            trained += 1
            if epoch < settings.epochs and trial.should_prune():
                study.tell(trial, state=TrialState.PRUNED)
                break
        else:
            study.tell(trial, float(curve.min()))
    return trained / max(trials, 1)


def synthetic_curve(rng: np.random.Generator, epochs: int) -> np.ndarray:
    """Validation loss falling exponentially from ~2.3 (chance on 10 classes) to a floor
    that differs per trial, at a per-trial pace, with noise: slow starters cross fast ones."""
    floor, pace = rng.uniform(0.3, 1.2), rng.uniform(1.0, max(2.0, epochs / 3))
    steps = np.arange(epochs)
    return floor + (2.3 - floor) * np.exp(-steps / pace) + rng.normal(0, 0.03, epochs)


def cost_lines(settings: StudySettings, trials: int, gpu_probe: GpuProbe | None) -> list[str]:
    """What `hpo create`/`hpo start` print about the study's cost before it runs; the hours
    where the command could hand a probe of this machine's GPU (None: no GPU here)."""
    cost = study_cost(settings, trials)
    cap = settings.search_space().max_gflops
    return [
        f"expected cost: {cost.mean_gflops:.3g} GFLOP per image on average "
        f"({cost.mean_gflops / TABLE1_GFLOPS:.3g}x Table 1); the {cost.over_cap:.0%} of draws "
        f"over max_gflops {cap:g} are skipped untrained",
        f"  {cost.epochs_per_trial:.1f} epochs per trial under {settings.pruner} (simulated) x "
        f"{cost.images_per_epoch:,} images x {trials} trials = {cost.pflop:.3g} PFLOP",
        "  " + hours_line(cost, gpu_probe),
    ]


def hours_line(cost: StudyCost, gpu_probe: GpuProbe | None) -> str:
    if gpu_probe is None:
        return "no GPU here: hours not estimated (a probe of the GPU gives them)"
    try:
        name, rate = gpu_probe()
    except RuntimeError as err:  # a GPU busy with other work (out of memory): say, go on
        return f"GPU probe failed, hours not estimated: {str(err).splitlines()[0]}"
    hours = cost.pflop * 1e15 / rate / 3600
    return (
        f"{name}: {rate / 1e12:.0f} TFLOP/s on Table 1 (eager "
        f"probe) -> about {hours:.1f} GPU-hours of training steps (small networks use a GPU "
        "less well; evaluation and overheads come on top)"
    )


@dataclass(frozen=True)
class Pace:
    elapsed_s: float
    per_hour: float | None  # finished trials per hour; None before the first
    eta_s: float | None


def study_pace(trials: list[FrozenTrial], finished: int, target: int, now: datetime) -> Pace:
    """Time since the first trial started (to the last end once done), and the ETA of the
    rest at the pace so far. Optuna stamps trials with the workers' local clock."""
    starts = [t.datetime_start for t in trials if t.datetime_start is not None]
    if not starts:
        return Pace(0.0, None, None)
    if finished >= target:
        now = max((t.datetime_complete for t in trials if t.datetime_complete), default=now)
    elapsed = max((now - min(starts)).total_seconds(), 0.0)
    if finished == 0 or elapsed == 0:
        return Pace(elapsed, None, None)
    per_hour = finished / elapsed * 3600
    return Pace(elapsed, per_hour, max(target - finished, 0) / per_hour * 3600)


def format_duration(seconds: float) -> str:
    """h:mm:ss"""
    minutes, secs = divmod(math.floor(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


# --- what the trials bought: the accuracy-against-cost front -----------------------------


def parameter_count(model: ModelConfig) -> int:
    from model.counts import count_parameters  # torch: called where a training runs

    return count_parameters(_meta_twin(model))


def _meta_twin(model: ModelConfig) -> BackboneNet:
    import torch

    from model.network import BackboneNet

    # On the meta device: nothing is allocated or computed, even for the 18M-parameter Table 1.
    with torch.device("meta"):
        return BackboneNet(model)


def trial_gflop(trial: FrozenTrial) -> float | None:
    """The trial's recorded GFLOP per image; counted from its config for trials recorded
    before the count was (None if it has no config)."""
    if attrs.GFLOPS in trial.user_attrs:
        return trial.user_attrs[attrs.GFLOPS]
    if attrs.CONFIG not in trial.user_attrs:
        return None
    return gflops_per_image(TrialConfig.from_dict(trial.user_attrs[attrs.CONFIG]).model)


def pareto_front(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """Complete trials that no other complete trial beats on validation accuracy at the same
    or lower cost (GFLOP per image), cheapest first. Ties on both count once (the first)."""
    points = [
        (trial_gflop(t), t.user_attrs[attrs.VAL_ACC], t)
        for t in trials
        if t.state == TrialState.COMPLETE and attrs.VAL_ACC in t.user_attrs
    ]
    points = [p for p in points if p[0] is not None]
    # Cheapest first, the more accurate first at equal cost: a trial is on the front exactly
    # when it is more accurate than every trial before it.
    points.sort(key=lambda p: (p[0], -p[1], p[2].number))
    front, best_acc = [], float("-inf")
    for _gflop, acc, trial in points:
        if acc > best_acc:
            front.append(trial)
            best_acc = acc
    return front
