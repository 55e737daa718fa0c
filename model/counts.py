"""Parameter and FLOP counts of a Backbone network."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from model.network import BackboneNet


def count_parameters(module: nn.Module) -> int:
    """All parameters, trainable or not (every Backbone parameter is trainable)."""
    return sum(p.numel() for p in module.parameters())


def train_step_flops(model: BackboneNet, batch_size: int, image_size: int = 32) -> int:
    """FLOPs of one training step (forward + backward) on a batch of ``image_size`` images.

    Counted on a twin of ``model`` on the meta device: no arithmetic runs, and the model's
    weights, gradients and BatchNorm statistics are left alone. Counts convolutions and matrix
    products, which dominate; normalisation, pooling and element-wise ops are not counted.
    The twin uses the separate form, which does the same arithmetic as the fused one: torch's
    counter ignores groups in a conv's weight gradient and would overcount the fused form.
    """
    with torch.device("meta"):
        twin = BackboneNet(model.config, fused=False)
        images = torch.zeros(batch_size, model.config.in_channels, image_size, image_size)
    with FlopCounterMode(display=False) as counter:
        twin(images).sum().backward()
    return counter.get_total_flops()
