"""CIFAR-10 on disk and on the device: download, cache, split, augment, load."""

from .augment import AugmentConfig, augment_batch, flip_batch, rotate_batch, translate_batch
from .batches import ImageSet
from .cifar import (
    ArchiveSource,
    DatasetMissingError,
    cifar10_source,
    default_data_dir,
    download_cifar10,
    require_cifar10,
)
from .dataset import DATASETS, dataset_folder, load_dataset
from .loader import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    DeviceLoader,
    Labelled,
    RunData,
    final_data,
    search_data,
)
from .split import stratified_split
from .synthetic import make_synthetic_archive, write_synthetic

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "DATASETS",
    "ArchiveSource",
    "AugmentConfig",
    "DatasetMissingError",
    "DeviceLoader",
    "ImageSet",
    "Labelled",
    "RunData",
    "augment_batch",
    "cifar10_source",
    "dataset_folder",
    "default_data_dir",
    "download_cifar10",
    "flip_batch",
    "final_data",
    "load_dataset",
    "make_synthetic_archive",
    "require_cifar10",
    "rotate_batch",
    "search_data",
    "stratified_split",
    "translate_batch",
    "write_synthetic",
]
