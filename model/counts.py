"""Parameter and FLOP counts of a Backbone network."""

from __future__ import annotations

import itertools

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from model.config import ModelConfig
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


def train_flops_per_image(config: ModelConfig) -> int:
    """What ``train_step_flops`` counts for one image, in closed form (microseconds, not a
    trace): a search prices thousands of draws. tests/test_model.py checks the two agree."""
    flops, side, first = 0, config.image_size, True
    for chain, k in zip(config.channels, config.blocks, strict=True):
        # Gate Linear(C_in -> K): forward and weight gradient, and the input's gradient
        # except on the image, which needs none.
        flops += (2 if first else 3) * 2 * chain[0] * k
        for c_in, c_out in itertools.pairwise(chain):
            conv = 2 * c_in * c_out * config.kernel_size**2 * side * side
            flops += k * (2 if first else 3) * conv  # forward, weight and input gradients
            side, first = side // 2, False
        if k > 1:  # the gated sum over K blocks is a batched matmul: forward, two gradients
            flops += 3 * 2 * k * chain[-1] * side * side
    return flops + 3 * 2 * config.channels[-1][-1] * config.num_classes  # classifier
