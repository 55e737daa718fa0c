"""ModelConfig: the Backbone's architecture hyperparameters, validated when created."""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, dataclass, fields
from typing import Any


class ModelConfigError(ValueError):
    """An architecture that cannot be built; the message starts with the field's path."""


@dataclass(frozen=True)
class ModelConfig:
    """N Backbones; backbone i has K = blocks[i] parallel ConvBlocks of M = len(channels[i]) - 1
    ConvLayers mapping channels[i][0] -> ... -> channels[i][-1]. Every ConvLayer halves H and W.
    """

    channels: tuple[tuple[int, ...], ...]
    blocks: tuple[int, ...]
    kernel_size: int = 3
    dropout: float = 0.0
    num_classes: int = 10
    in_channels: int = 3
    image_size: int = 32

    def __post_init__(self) -> None:
        # Frozen, so normalised values (lists -> tuples) go in through object.__setattr__.
        set_ = object.__setattr__
        set_(self, "channels", _channels(self.channels))
        set_(self, "blocks", _int_tuple("blocks", self.blocks))
        set_(self, "kernel_size", _int("kernel_size", self.kernel_size))
        set_(self, "dropout", _fraction("dropout", self.dropout))
        for name in ("num_classes", "in_channels", "image_size"):
            set_(self, name, _int(name, getattr(self, name)))
        if self.kernel_size % 2 == 0:
            # An even kernel with padding k // 2 grows the map by one pixel, breaking the halving.
            raise ModelConfigError(f"kernel_size: must be odd, got {self.kernel_size}")
        if len(self.blocks) != len(self.channels):
            raise ModelConfigError(
                f"blocks: needs one K per backbone ({len(self.channels)}), got {len(self.blocks)}"
            )
        self._check_chain()
        self._check_poolings()

    def _check_chain(self) -> None:
        if self.channels[0][0] != self.in_channels:
            raise ModelConfigError(
                f"channels[0][0]: must equal in_channels ({self.in_channels}), "
                f"got {self.channels[0][0]}"
            )
        for i in range(1, len(self.channels)):
            want, got = self.channels[i - 1][-1], self.channels[i][0]
            if got != want:
                raise ModelConfigError(
                    f"channels[{i}][0]: must be {want} to connect to backbone {i - 1}'s output, "
                    f"got {got}"
                )

    def _check_poolings(self) -> None:
        layers = sum(self.layers_per_block)
        if self.image_size // 2**layers < 1:
            fit = self.image_size.bit_length() - 1
            raise ModelConfigError(
                f"channels: {layers} ConvLayers each halve the image, but a "
                f"{self.image_size}x{self.image_size} image allows at most {fit}"
            )

    @property
    def n_backbones(self) -> int:
        return len(self.channels)

    @property
    def layers_per_block(self) -> tuple[int, ...]:
        """M, the ConvLayers in each block of each backbone."""
        return tuple(len(c) - 1 for c in self.channels)

    @property
    def spatial_sizes(self) -> tuple[tuple[int, ...], ...]:
        """Per backbone: the input's side, then the side after each ConvLayer."""
        sizes, side = [], self.image_size
        for m in self.layers_per_block:
            sizes.append(tuple(side // 2**j for j in range(m + 1)))
            side //= 2**m
        return tuple(sizes)

    def to_dict(self) -> dict[str, Any]:
        """Plain lists, ints and floats, for YAML and Optuna user attrs."""
        return {
            "channels": [list(c) for c in self.channels],
            "blocks": list(self.blocks),
            "kernel_size": self.kernel_size,
            "dropout": self.dropout,
            "num_classes": self.num_classes,
            "in_channels": self.in_channels,
            "image_size": self.image_size,
        }

    # Shaped like data's AugmentConfig.from_dict: model/ and data/ import neither each other
    # nor a common module (ARCHITECTURE's arrows), so the few lines of the key check repeat.
    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelConfig:
        if not isinstance(data, Mapping):
            raise ModelConfigError(f"model: must be a mapping, got {type(data).__name__}")
        names = [f.name for f in fields(cls)]
        unknown = sorted(str(key) for key in data if key not in names)
        if unknown:
            raise ModelConfigError(
                f"{', '.join(unknown)}: unknown key(s); known: {', '.join(names)}"
            )
        required = [f.name for f in fields(cls) if f.default is MISSING]
        missing = [name for name in required if name not in data]
        if missing:
            raise ModelConfigError(f"{', '.join(missing)}: required key(s) missing")
        return cls(**data)


def _int(path: str, value: object) -> int:
    # bool is an Integral, but True as a width or a count is a mistake, not a 1.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ModelConfigError(f"{path}: must be an int, got {value!r} ({type(value).__name__})")
    if value < 1:
        raise ModelConfigError(f"{path}: must be >= 1, got {value}")
    return int(value)


def _fraction(path: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ModelConfigError(f"{path}: must be a number, got {value!r} ({type(value).__name__})")
    if not 0.0 <= value < 1.0:
        raise ModelConfigError(f"{path}: must be in [0, 1), got {value}")
    return float(value)


def _int_tuple(path: str, value: object) -> tuple[int, ...]:
    # A str is a Sequence too; "abc" as a list of widths is a mistake.
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ModelConfigError(f"{path}: must be a list of ints, got {value!r}")
    if not value:
        raise ModelConfigError(f"{path}: must not be empty")
    return tuple(_int(f"{path}[{i}]", v) for i, v in enumerate(value))


def _channels(value: object) -> tuple[tuple[int, ...], ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ModelConfigError(f"channels: must be a list of channel lists, got {value!r}")
    if not value:
        raise ModelConfigError("channels: needs at least one backbone, got []")
    chains = tuple(_int_tuple(f"channels[{i}]", c) for i, c in enumerate(value))
    for i, chain in enumerate(chains):
        if len(chain) < 2:
            raise ModelConfigError(
                f"channels[{i}]: needs an input width and at least one layer width, "
                f"got {list(chain)}"
            )
    return chains


REPORT_TABLE1 = ModelConfig(
    channels=((3, 128, 256), (256, 512, 1028)),
    blocks=(3, 3),
    kernel_size=3,
    dropout=0.2,
)
"""The architecture of the report's Table 1 (90.51% test accuracy); 18,676,077 parameters."""
