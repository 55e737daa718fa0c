"""CIFAR-10 on disk and on the device: download, cache, split, augment, load.

Names are loaded on first use (PEP 562), so `from data import DATASETS` or `AugmentConfig`
does not import torch; the tensor modules load when one of their names is asked for.
"""

from importlib import import_module
from typing import Any

_HOME = {
    "AugmentConfig": "augment_config",
    "augment_batch": "augment",
    "flip_batch": "augment",
    "rotate_batch": "augment",
    "translate_batch": "augment",
    "ImageSet": "batches",
    "ArchiveSource": "cifar",
    "DatasetMissingError": "cifar",
    "cifar10_source": "cifar",
    "default_data_dir": "cifar",
    "download_cifar10": "cifar",
    "require_cifar10": "cifar",
    "DATASETS": "dataset",
    "dataset_folder": "dataset",
    "load_dataset": "dataset",
    "CIFAR10_MEAN": "loader",
    "CIFAR10_STD": "loader",
    "DeviceLoader": "loader",
    "Labelled": "loader",
    "RunData": "loader",
    "final_data": "loader",
    "search_data": "loader",
    "stratified_split": "split",
    "make_synthetic_archive": "synthetic",
    "write_synthetic": "synthetic",
}

__all__ = sorted(_HOME)


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.{_HOME[name]}"), name)
    globals()[name] = value  # once loaded, a plain attribute
    return value


def __dir__() -> list[str]:
    return __all__
