"""What a study knows of its data, and the `--dataset` names: torch-free, for the control plane.

A `--dataset` value is one of `cifar10`, `cifar100` (the 100 fine labels), `cifar100-coarse`
(the same images with the 20 superclass labels), `synthetic`, or `folder:PATH` (a folder of
labelled images, `PATH/train/CLASS/*.png` and an optional `PATH/test/CLASS/...`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

NAMED = ("cifar10", "synthetic", "cifar100", "cifar100-coarse")
FOLDER_PREFIX = "folder:"


class DatasetError(ValueError):
    """A `--dataset` the service cannot use; the message is one line that says why."""

    def __init__(self, message: str) -> None:
        super().__init__(message.replace("\n", " "))  # one line, paths left as they are


@dataclass(frozen=True)
class DatasetSpec:
    """A parsed `--dataset` value: `kind` is one of NAMED or "folder" (then `path` is set)."""

    kind: str
    path: Path | None = None

    @property
    def name(self) -> str:
        """The canonical value: what a study stores and `parse_dataset` reads back."""
        return f"{FOLDER_PREFIX}{self.path}" if self.kind == "folder" else self.kind


def parse_dataset(value: str) -> DatasetSpec:
    """`cifar10`, `cifar100`, `cifar100-coarse`, `synthetic` or `folder:PATH` (PATH with `~`
    expanded and made absolute; whether it holds images is checked when it is loaded)."""
    if value in NAMED:
        return DatasetSpec(value)
    if value.startswith(FOLDER_PREFIX) and value[len(FOLDER_PREFIX) :].strip():
        path = Path(value[len(FOLDER_PREFIX) :].strip()).expanduser().resolve()
        return DatasetSpec("folder", path)
    raise DatasetError(f"unknown dataset {value!r}; choose one of: {', '.join(NAMED)}, folder:PATH")


@dataclass(frozen=True)
class DatasetIdentity:
    """Which data a study trains on, and how to normalise it: stored with the study, compared
    by every worker and final run (`mismatch`).

    `fingerprint` is the archive's md5 for CIFAR, and a hash of the decoded pixels, labels,
    class names and split for a folder or the synthetic set: another copy of the same images
    (other paths, other file times) has the same fingerprint, a changed one does not.
    """

    name: str  # the canonical --dataset value
    kind: str  # cifar10 | cifar100 | cifar100-coarse | synthetic | folder
    fingerprint: str
    classes: tuple[str, ...]
    image_size: int
    channels: int
    train_count: int
    test_count: int
    test_split: str  # where the test images come from: the published set, test/, or carved
    mean: tuple[float, ...]  # per channel, of the training split in [0, 1]
    std: tuple[float, ...]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_dict(self) -> dict:
        """Plain JSON-able values (lists for tuples), for a study's user attrs or a YAML."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict) -> DatasetIdentity:
        tuples = ("classes", "mean", "std")
        return cls(**{k: tuple(v) if k in tuples else v for k, v in values.items()})

    def mismatch(self, other: DatasetIdentity) -> str | None:
        """One line saying how `other` (the data at hand) differs from this (the study's),
        or None when they are the same data. Paths may differ: a copy elsewhere is fine."""
        if self.kind != other.kind:
            return f"the study trains on {self.name}, not {other.name}"
        if self.classes != other.classes:
            return (
                f"{other.name} has {other.num_classes} classes "
                f"({_preview(other.classes)}); the study expects {self.num_classes} "
                f"({_preview(self.classes)})"
            )
        if (self.image_size, self.channels) != (other.image_size, other.channels):
            return (
                f"{other.name} is {other.channels}x{other.image_size}x{other.image_size}; "
                f"the study expects {self.channels}x{self.image_size}x{self.image_size}"
            )
        if self.fingerprint != other.fingerprint:
            return (
                f"{other.name} holds other images than the study's "
                f"(fingerprint {other.fingerprint[:12]}, expected {self.fingerprint[:12]})"
            )
        return None


def _preview(classes: tuple[str, ...], limit: int = 4) -> str:
    shown = ", ".join(classes[:limit])
    return shown + (", ..." if len(classes) > limit else "")
