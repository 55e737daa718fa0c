"""Load a dataset by name: the real CIFAR-10, or the synthetic stand-in, through one reader."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .cifar import default_data_dir, download_cifar10, require_cifar10

if TYPE_CHECKING:
    from .batches import ImageSet

DATASETS = ("cifar10", "synthetic")


def load_dataset(name: str, data_dir: Path | str | None = None, download: bool = True) -> ImageSet:
    """The named dataset as uint8 tensors; fetched (cifar10) or written (synthetic) if missing."""
    # Here, not at the top: DATASETS is read by commands that never load images (no torch).
    from .batches import has_batches, load_folder
    from .synthetic import synthetic_folder, write_synthetic

    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    data_dir = default_data_dir() if data_dir is None else Path(data_dir).expanduser()
    if name == "synthetic":
        folder = synthetic_folder(data_dir)
        if not has_batches(folder):
            write_synthetic(data_dir)
    else:
        folder = download_cifar10(data_dir) if download else require_cifar10(data_dir)
    return load_folder(folder)
