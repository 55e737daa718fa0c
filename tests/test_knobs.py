"""Each searched knob does what its name says (issue 37): SGD's momentum under onecycle, a
negative study seed, the plateau's notion of a worse epoch, the border of a shifted view."""

from __future__ import annotations

import pytest
import torch
from test_trainer import batches, trainer_for

from search.rules.config import TrainConfig

# --- a onecycle trial's momentum is the drawn one ----------------------------------------------


def momentum_at_each_step(cfg: TrainConfig) -> tuple[list[float], dict[str, torch.Tensor]]:
    """SGD's momentum (AdamW's beta1) at each step of a 2-epoch run, and its final weights."""
    trainer = trainer_for(cfg)
    seen: list[float] = []
    trainer.optimizer.register_step_pre_hook(
        lambda optimizer, *_: seen.append(
            optimizer.param_groups[0].get("momentum") or optimizer.param_groups[0]["betas"][0]
        )
    )
    list(trainer.fit(batches(3), None))
    return seen, trainer.model.state_dict()


def test_sgd_momentum_under_onecycle_is_the_drawn_one_all_along() -> None:
    weights = {}
    for momentum in (0.80, 0.99):
        cfg = TrainConfig(
            optimizer="sgd", lr=0.05, momentum=momentum, scheduler="onecycle", epochs=2,
            grad_clip=0.0,
        )  # fmt: skip
        seen, weights[momentum] = momentum_at_each_step(cfg)
        assert seen == [momentum] * 6
    assert any(not torch.equal(weights[0.80][k], weights[0.99][k]) for k in weights[0.80])


def test_adamw_beta1_under_onecycle_stays_the_default() -> None:
    seen, _ = momentum_at_each_step(TrainConfig(lr=0.01, scheduler="onecycle", epochs=2))
    assert seen == pytest.approx([0.9] * 6)
