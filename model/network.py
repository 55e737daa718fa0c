"""The Backbone network of the report, section 2: N gated Backbones, then a linear classifier."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from model.config import ModelConfig
from model.fused import fused_blocks
from model.layers import ConvBlock


class Backbone(nn.Module):
    """K ConvBlocks on the same input X, mixed by a = sigmoid(Linear(SpatialAvgPool(X))):
    O = BatchNorm2d(a_1 Block_1(X) + ... + a_K Block_K(X)).

    ``fused`` runs the K blocks as one grouped stack (model/fused.py): same function, same
    parameters, same state_dict.
    """

    def __init__(
        self, widths: Sequence[int], k: int, kernel_size: int, dropout: float, fused: bool = False
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(ConvBlock(widths, kernel_size, dropout) for _ in range(k))
        self.gate = nn.Linear(widths[0], k)
        self.norm = nn.BatchNorm2d(widths[-1])
        self.fused = fused

    def gate_weights(self, x: Tensor) -> Tensor:
        """a, shape (B, K): how much each block contributes for each image."""
        return torch.sigmoid(self.gate(x.mean(dim=(2, 3))))

    def block_outputs(self, x: Tensor) -> Tensor:
        """Every block's output, stacked: (B, K, C, H, W)."""
        if self.fused:
            return fused_blocks(self.blocks, x)
        return torch.stack([block(x) for block in self.blocks], dim=1)

    def forward(self, x: Tensor) -> Tensor:
        mixed = torch.einsum("bk,bkchw->bchw", self.gate_weights(x), self.block_outputs(x))
        return self.norm(mixed)


class BackboneNet(nn.Module):
    """N Backbones in sequence, then SpatialAvgPool and Linear(C_last -> num_classes)."""

    def __init__(self, config: ModelConfig, fused: bool = False) -> None:
        super().__init__()
        self.config = config
        self.backbones = nn.ModuleList(
            Backbone(widths, k, config.kernel_size, config.dropout)
            for widths, k in zip(config.channels, config.blocks, strict=True)
        )
        self.classifier = nn.Linear(config.channels[-1][-1], config.num_classes)
        self.fused = fused
        self.apply(_xavier_init)

    @property
    def fused(self) -> bool:
        """Whether the backbones run their blocks as one grouped stack; switchable any time."""
        return all(backbone.fused for backbone in self.backbones)

    @fused.setter
    def fused(self, value: bool) -> None:
        for backbone in self.backbones:
            backbone.fused = value

    def forward(self, x: Tensor) -> Tensor:
        for backbone in self.backbones:
            x = backbone(x)
        return self.classifier(x.mean(dim=(2, 3)))


def _xavier_init(module: nn.Module) -> None:
    # The report initialises conv and linear weights with Xavier uniform.
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def build_model(cfg: ModelConfig, fused: bool = False) -> BackboneNet:
    """The Backbone network for ``cfg``, on the current default device."""
    return BackboneNet(cfg, fused=fused)
