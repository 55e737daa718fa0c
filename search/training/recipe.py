"""The recipe levers the trainer applies beside the report's: the optimizer, the average of
the weights, and the temperature-fair validation score."""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import get_ema_multi_avg_fn

from search.rules.config import TrainConfig

# log(1/T) is searched in [-LOG_TEMPERATURE_RANGE, LOG_TEMPERATURE_RANGE]: T from 0.0025 to 400.
LOG_TEMPERATURE_RANGE = 6.0
TEMPERATURE_STEPS = 40  # golden-section steps: the bracket shrinks to 12 * 0.618**40 ~ 5e-8
GOLDEN = (math.sqrt(5) - 1) / 2


def build_optimizer(
    model: nn.Module, cfg: TrainConfig, device: torch.device
) -> torch.optim.Optimizer:
    """AdamW (decoupled weight decay, the report's) or SGD with Nesterov momentum (L2 decay)."""
    fused = device.type in ("cuda", "cpu")
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(),
            lr=cfg.lr,
            momentum=cfg.momentum,
            nesterov=True,
            weight_decay=cfg.weight_decay,
            fused=fused,
        )
    return torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused
    )


class WeightAverage:
    """An exponential moving average of a model's weights and buffers, updated after each step.

    The decay warms up as min(decay, (1 + n) / (10 + n)) after n updates, so a short run's
    average is not held near the initial weights (as TensorFlow's ExponentialMovingAverage
    with num_updates). Integer buffers (BatchNorm's batch count) are copied, not averaged.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.module = copy.deepcopy(model).requires_grad_(False).eval()
        averaged = [*self.module.parameters(), *self.module.buffers()]
        live = [*model.parameters(), *model.buffers()]
        floats = [i for i, tensor in enumerate(averaged) if tensor.is_floating_point()]
        self._floats = ([averaged[i] for i in floats], [live[i] for i in floats])
        self._copied = [(averaged[i], live[i]) for i in range(len(live)) if i not in floats]

    @torch.no_grad()
    def update(self) -> None:
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        get_ema_multi_avg_fn(decay)(*self._floats, None)
        for averaged, live in self._copied:
            averaged.copy_(live)
        self.updates += 1

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = state["updates"]


def calibrated_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Cross-entropy on the true labels at the one temperature T that minimises it on these
    predictions; returns (loss, T).

    Why this score: plain cross-entropy charges a model for the confidence scale of its logits,
    which label smoothing and mixup shrink on purpose, so it would rank those levers down for
    a scale any deployment can re-fit. Minimised over T, the loss depends only on the ranking
    and spread of the predictions: logits c * z score the same as z, for any c > 0. One
    scalar fitted on 5,000 images cannot overfit them, and it stays a proper loss (unlike
    accuracy, it tells apart confident right from hesitant right). CE(z / T) is convex in 1/T,
    so log(1/T) has one minimum: a golden-section search finds it without leaving the device.
    """
    logits, labels = logits.float(), labels.to(logits.device)

    def loss(log_inverse_t: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits * log_inverse_t.exp(), labels)

    low = torch.tensor(-LOG_TEMPERATURE_RANGE, device=logits.device)
    high = torch.tensor(LOG_TEMPERATURE_RANGE, device=logits.device)
    left, right = high - GOLDEN * (high - low), low + GOLDEN * (high - low)
    at_left, at_right = loss(left), loss(right)
    for _ in range(TEMPERATURE_STEPS):  # one new loss per step: the other point carries over
        go_left = at_left < at_right
        low, high = torch.where(go_left, low, left), torch.where(go_left, right, high)
        kept, at_kept = torch.where(go_left, left, right), torch.where(go_left, at_left, at_right)
        new = torch.where(go_left, high - GOLDEN * (high - low), low + GOLDEN * (high - low))
        at_new = loss(new)
        left, at_left = torch.where(go_left, new, kept), torch.where(go_left, at_new, at_kept)
        right, at_right = torch.where(go_left, kept, new), torch.where(go_left, at_kept, at_new)
    best = (low + high) / 2
    value, temperature = torch.stack([loss(best), (-best).exp()]).tolist()  # one wait
    return value, temperature
