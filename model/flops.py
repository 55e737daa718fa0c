"""Train FLOPs of a Backbone config in closed form (torch-free: the space prices draws with it)."""

from __future__ import annotations

import itertools

from model.config import ModelConfig


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
