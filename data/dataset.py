"""Load a dataset by name: the real CIFAR-10, or the synthetic stand-in, through one reader."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .cifar import DatasetMissingError, default_data_dir, download_cifar10, require_cifar10

if TYPE_CHECKING:
    from .batches import ImageSet

DATASETS = ("cifar10", "synthetic")


def load_dataset(name: str, data_dir: Path | str | None = None, download: bool = True) -> ImageSet:
    """The named dataset as uint8 tensors; fetched (cifar10) or written (synthetic) if missing."""
    # Here, not at the top: DATASETS is read by commands that never load images (no torch).
    from .batches import load_folder

    return load_folder(dataset_folder(name, data_dir, download))


def dataset_folder(name: str, data_dir: Path | str | None = None, download: bool = True) -> Path:
    """The named dataset's folder, fetched (cifar10) or written (synthetic) first if missing:
    what a command checks before it stores anything."""
    from .batches import has_batches
    from .synthetic import synthetic_folder, write_synthetic

    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    data_dir = default_data_dir() if data_dir is None else Path(data_dir).expanduser()
    if name == "synthetic":
        folder = synthetic_folder(data_dir)
        if not has_batches(folder):
            try:
                write_synthetic(data_dir)
            except OSError as err:
                raise DatasetMissingError(
                    f"cannot write the synthetic set in {data_dir}: {err.strerror or err}"
                ) from err
        return folder
    return download_cifar10(data_dir) if download else require_cifar10(data_dir)
