"""What a config costs to train, and the trials that no cheaper trial beats on accuracy."""

from __future__ import annotations

import torch
from optuna.trial import FrozenTrial, TrialState

from model import BackboneNet, ModelConfig, count_parameters, train_step_flops
from search import attrs
from search.config import TrialConfig


def train_gflop_per_image(model: ModelConfig, batch_size: int) -> float:
    """GFLOP of one training step (forward + backward) per image, counted on a batch of
    `batch_size`."""
    return train_step_flops(_meta_twin(model), batch_size) / batch_size / 1e9


def parameter_count(model: ModelConfig) -> int:
    return count_parameters(_meta_twin(model))


def _meta_twin(model: ModelConfig) -> BackboneNet:
    # On the meta device: nothing is allocated or computed, even for the 18M-parameter Table 1.
    with torch.device("meta"):
        return BackboneNet(model)


def trial_gflop(trial: FrozenTrial) -> float | None:
    """The trial's recorded GFLOP per image; counted from its config for trials recorded
    before the count was (None if it has no config)."""
    if attrs.TRAIN_GFLOP in trial.user_attrs:
        return trial.user_attrs[attrs.TRAIN_GFLOP]
    if attrs.CONFIG not in trial.user_attrs:
        return None
    cfg = TrialConfig.from_dict(trial.user_attrs[attrs.CONFIG])
    return train_gflop_per_image(cfg.model, cfg.train.batch_size)


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
