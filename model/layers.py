"""The Backbone's building blocks: a ConvLayer, and a ConvBlock of M of them in sequence."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

from torch import Tensor, nn


class ConvLayer(nn.Module):
    """Conv2d -> BatchNorm2d -> ReLU -> MaxPool2d(2) -> Dropout; halves H and W."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int, dropout: float) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel_size, padding=kernel_size // 2)
        self.norm = nn.BatchNorm2d(c_out)
        # In place is safe: BatchNorm's backward needs its input, not its output.
        self.act = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(2)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.pool(self.act(self.norm(self.conv(x)))))


class ConvBlock(nn.Module):
    """M ConvLayers in sequence along one channel chain."""

    def __init__(self, widths: Sequence[int], kernel_size: int, dropout: float) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            ConvLayer(c_in, c_out, kernel_size, dropout) for c_in, c_out in pairwise(widths)
        )

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)
        return x
