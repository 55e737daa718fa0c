"""How a batch is augmented, as data (torch-free: the search space and exports use it)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

# Mixing two training images and their labels: none, mixup (a blend), cutmix (a pasted box).
MIXES = ("none", "mixup", "cutmix")
# Test-time augmentation: the mean logits of the image, of its mirror, and of both shifted one
# pixel each way (6 views). Evaluation only; the first is none.
TTA_MODES = ("none", "flip", "flip_shift")


@dataclass(frozen=True)
class AugmentConfig:
    """Random crop (as a shift of up to `crop_padding` pixels), mirror, rotation, cutout and
    mixing of training batches; and the test-time augmentation of evaluation.

    Every default past rotation is off, so a config written before those existed is unchanged.
    """

    crop_padding: int = 4
    flip: bool = True
    rotation_degrees: float = 0.0  # angles are drawn from [-rotation_degrees, rotation_degrees]
    cutout_size: int = 0  # side of the square blacked out (pixels); 0: no cutout
    cutout_prob: float = 1.0  # share of the images cut
    mix: str = MIXES[0]
    mix_alpha: float = 1.0  # the mixing weight is drawn from Beta(alpha, alpha)
    mix_prob: float = 1.0  # share of the batches mixed
    tta: str = TTA_MODES[0]

    def __post_init__(self) -> None:
        self._check_recipe()
        if not (_is_number(self.crop_padding, int) and 0 <= self.crop_padding < 16):
            raise ValueError(f"crop_padding must be an int in [0, 16), got {self.crop_padding!r}")
        if not isinstance(self.flip, bool):
            raise ValueError(f"flip must be true or false, got {self.flip!r}")
        if not (
            _is_number(self.rotation_degrees, (int, float)) and 0 <= self.rotation_degrees <= 45
        ):
            raise ValueError(
                f"rotation_degrees must be a number in [0, 45], got {self.rotation_degrees!r}"
            )

    def _check_recipe(self) -> None:
        if not (_is_number(self.cutout_size, int) and 0 <= self.cutout_size <= 32):
            raise ValueError(f"cutout_size must be an int in [0, 32], got {self.cutout_size!r}")
        for name in ("cutout_prob", "mix_prob"):
            value = getattr(self, name)
            if not (_is_number(value, (int, float)) and 0 <= value <= 1):
                raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
        if not (_is_number(self.mix_alpha, (int, float)) and self.mix_alpha > 0):
            raise ValueError(f"mix_alpha must be a number > 0, got {self.mix_alpha!r}")
        if self.mix not in MIXES:
            raise ValueError(f"mix must be one of {', '.join(MIXES)}, got {self.mix!r}")
        if self.tta not in TTA_MODES:
            raise ValueError(f"tta must be one of {', '.join(TTA_MODES)}, got {self.tta!r}")

    @property
    def cuts(self) -> bool:
        return self.cutout_size > 0 and self.cutout_prob > 0

    @property
    def mixes(self) -> bool:
        return self.mix != "none" and self.mix_prob > 0

    @property
    def is_identity(self) -> bool:
        """Whether training images pass unchanged (test-time augmentation aside)."""
        moves = self.crop_padding or self.flip or self.rotation_degrees
        return not (moves or self.cuts or self.mixes)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, object]) -> AugmentConfig:
        if not isinstance(values, dict):
            raise ValueError(f"augment: must be a mapping, got {type(values).__name__}")
        known = [f.name for f in fields(cls)]
        unknown = sorted(str(key) for key in values if key not in known)
        if unknown:
            raise ValueError(
                f"augment: unknown key(s) {', '.join(unknown)}; known: {', '.join(known)}"
            )
        return cls(**values)


def _is_number(value: object, kinds: type | tuple[type, ...]) -> bool:
    return isinstance(value, kinds) and not isinstance(value, bool)  # True is an int in Python
