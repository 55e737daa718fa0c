"""A Backbone's K parallel ConvBlocks run as one stack of wider layers.

The first conv maps C_in -> K*C_1 (all blocks read the same X); later convs use groups=K, so
block k's channels only ever see block k's channels. BatchNorm, ReLU, max-pool and dropout are
per channel, so they run on the K*C channels at once. The result, reshaped to (B, K, C, H, W),
is the per-block outputs stacked: the same function with fewer, larger kernels.

Parameters stay in the canonical per-block modules and are concatenated on every forward, so
the state_dict (and every checkpoint) is the same whichever form ran. Concatenation is cheap
next to the convolutions, and autograd routes the gradients back to each block's tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.layers import ConvBlock, ConvLayer


def fused_blocks(blocks: Sequence[ConvBlock], x: Tensor) -> Tensor:
    """Run ``blocks`` (same widths) on ``x`` as one stack; returns (B, K, C, H, W)."""
    k = len(blocks)
    for depth, layers in enumerate(zip(*(block.layers for block in blocks), strict=True)):
        x = _fused_layer(layers, x, groups=1 if depth == 0 else k)
    return x.unflatten(1, (k, -1))


def _fused_layer(layers: Sequence[ConvLayer], x: Tensor, groups: int) -> Tensor:
    """The K blocks' ConvLayers at one depth, as one ConvLayer over K*C channels."""
    convs = [layer.conv for layer in layers]
    weight = torch.cat([conv.weight for conv in convs])
    bias = torch.cat([conv.bias for conv in convs])
    x = F.conv2d(x, weight, bias, padding=convs[0].padding, groups=groups)
    x = _fused_batch_norm([layer.norm for layer in layers], x)
    first = layers[0]  # act, pool and drop hold no parameters: any block's will do
    return first.drop(first.pool(first.act(x)))


def _fused_batch_norm(norms: Sequence[nn.BatchNorm2d], x: Tensor) -> Tensor:
    """BatchNorm over the concatenated channels. In training, the running statistics are
    updated as each block's BatchNorm2d.forward would, then copied back into each block."""
    first = norms[0]
    mean = torch.cat([norm.running_mean for norm in norms])
    var = torch.cat([norm.running_var for norm in norms])
    momentum = _count_batch(norms) if first.training else 0.0
    x = F.batch_norm(
        x,
        mean,
        var,
        torch.cat([norm.weight for norm in norms]),
        torch.cat([norm.bias for norm in norms]),
        training=first.training,
        momentum=momentum,
        eps=first.eps,
    )
    if first.training:
        # F.batch_norm updated the concatenated copies in place; hand each block its slice.
        k = len(norms)
        with torch.no_grad():
            for norm, m, v in zip(norms, mean.chunk(k), var.chunk(k), strict=True):
                norm.running_mean.copy_(m)
                norm.running_var.copy_(v)
    return x


def _count_batch(norms: Sequence[nn.BatchNorm2d]) -> float:
    """Count one more training batch; return the running-average factor BatchNorm2d would use."""
    for norm in norms:
        norm.num_batches_tracked.add_(1)
    momentum = norms[0].momentum
    if momentum is not None:
        return momentum
    return 1.0 / float(norms[0].num_batches_tracked)  # momentum=None: a cumulative average
