"""How a batch is augmented, as data (torch-free: the search space and exports use it)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields


@dataclass(frozen=True)
class AugmentConfig:
    """Random crop (as a shift of up to `crop_padding` pixels), mirror, and rotation."""

    crop_padding: int = 4
    flip: bool = True
    rotation_degrees: float = 0.0  # angles are drawn from [-rotation_degrees, rotation_degrees]

    def __post_init__(self) -> None:
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

    @property
    def is_identity(self) -> bool:
        return self.crop_padding == 0 and not self.flip and self.rotation_degrees == 0

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
