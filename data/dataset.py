"""Load a dataset by its `--dataset` value (data/identity.py parses them), with its identity.

- `cifar10`: CIFAR-10, downloaded and md5-checked on first use; normalised by its constants.
- `cifar100`: CIFAR-100's 100 fine labels; `cifar100-coarse`: the same images with the 20
  superclass labels (`coarse_labels` of the same pickles: one cache file each). Downloaded
  and checked like CIFAR-10, with the same offline instructions; normalised by the training
  split's own per-channel mean and std.
- `synthetic`: the CIFAR-10-format stand-in (data/synthetic.py), normalised as CIFAR-10.
- `folder:PATH`: a folder of labelled images (data/folder.py), decoded once into a cache in
  the data dir; normalised by its training split.

A bad value raises DatasetError, CIFAR missing and not fetched DatasetMissingError: both one
line. CIFAR and the synthetic set are 32x32 only; a folder is resized to `image_size`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .cifar import (
    DatasetMissingError,
    cifar10_source,
    cifar100_source,
    default_data_dir,
    download_archive,
    require_archive,
)
from .identity import DatasetError, DatasetIdentity, DatasetSpec, parse_dataset

if TYPE_CHECKING:
    from .batches import ImageSet

DATASETS = ("cifar10", "synthetic")  # what a study may name today (the CLI's choices)
CIFAR_SIZE = 32


def load_dataset(
    name: str, data_dir: Path | str | None = None, download: bool = True, image_size: int = 32
) -> ImageSet:
    """The named dataset as uint8 tensors; fetched (CIFAR), written (synthetic) or decoded
    (folder: cached in `data_dir`) if needed."""
    return load_with_identity(name, data_dir, download, image_size, identity=False)[0]


def dataset_identity(
    name: str, data_dir: Path | str | None = None, download: bool = True, image_size: int = 32
) -> DatasetIdentity:
    """The dataset's identity, loading it first (so every bad input is raised here)."""
    return load_with_identity(name, data_dir, download, image_size)[1]


def load_with_identity(
    name: str,
    data_dir: Path | str | None = None,
    download: bool = True,
    image_size: int = 32,
    identity: bool = True,
) -> tuple[ImageSet, DatasetIdentity | None]:
    """The ImageSet and (unless `identity` is False) its DatasetIdentity. Raises DatasetError
    (bad name or folder) or DatasetMissingError (CIFAR not on disk and not fetched)."""
    from .batches import ImageSet, channel_stats, content_fingerprint, load_cifar100, load_folder
    from .folder import load_image_folder
    from .loader import CIFAR10_MEAN, CIFAR10_STD

    spec = parse_dataset(name)
    data_dir = default_data_dir() if data_dir is None else Path(data_dir).expanduser()
    if spec.kind == "folder":
        data = load_image_folder(spec.path, data_dir, image_size)
        imageset = ImageSet(
            data.train_images, data.train_labels, data.test_images, data.test_labels, data.classes
        )
        if not identity:
            return imageset, None
        return imageset, _identity(spec, imageset, data.fingerprint, data.test_split)
    _check_cifar_size(spec, image_size)
    folder = dataset_folder(name, data_dir, download)
    if spec.kind.startswith("cifar100"):
        imageset = load_cifar100(folder, "coarse" if spec.kind.endswith("coarse") else "fine")
    else:
        imageset = load_folder(folder)
    if not identity:
        return imageset, None
    if spec.kind == "synthetic":
        fingerprint = content_fingerprint(imageset)
    else:
        fingerprint = (cifar10_source() if spec.kind == "cifar10" else cifar100_source()).md5
    # CIFAR-10's constants stay for CIFAR-10 and the synthetic set, so their studies score
    # exactly as before; every other dataset is normalised by its own training split.
    stats = (CIFAR10_MEAN, CIFAR10_STD) if spec.kind in DATASETS else channel_stats(imageset)
    return imageset, _identity(spec, imageset, fingerprint, "published test set", stats)


def _identity(
    spec: DatasetSpec,
    imageset: ImageSet,
    fingerprint: str,
    test_split: str,
    stats: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
) -> DatasetIdentity:
    from .batches import channel_stats

    mean, std = stats or channel_stats(imageset)
    channels, size = imageset.train_images.shape[1:3]
    return DatasetIdentity(
        name=spec.name,
        kind=spec.kind,
        fingerprint=fingerprint,
        classes=tuple(imageset.classes),
        image_size=int(size),
        channels=int(channels),
        train_count=len(imageset.train_labels),
        test_count=len(imageset.test_labels),
        test_split=test_split,
        mean=tuple(mean),
        std=tuple(std),
    )


def _check_cifar_size(spec: DatasetSpec, image_size: int) -> None:
    if image_size != CIFAR_SIZE:
        raise DatasetError(f"{spec.name} images are {CIFAR_SIZE}x{CIFAR_SIZE}, not {image_size}")


def dataset_folder(
    name: str, data_dir: Path | str | None = None, download: bool = True, image_size: int = 32
) -> Path:
    """The named dataset's folder, fetched (CIFAR), written (synthetic) or validated and
    decoded into the cache (an image folder) first if needed: what a command checks before it
    stores anything."""
    from .batches import has_batches
    from .synthetic import synthetic_folder, write_synthetic

    spec = parse_dataset(name)
    data_dir = default_data_dir() if data_dir is None else Path(data_dir).expanduser()
    if spec.kind == "folder":
        from .folder import load_image_folder

        load_image_folder(spec.path, data_dir, image_size)
        return spec.path
    if spec.kind == "synthetic":
        folder = synthetic_folder(data_dir)
        if not has_batches(folder):
            try:
                write_synthetic(data_dir)
            except OSError as err:
                raise DatasetMissingError(
                    f"cannot write the synthetic set in {data_dir}: {err.strerror or err}"
                ) from err
        return folder
    source = cifar10_source() if spec.kind == "cifar10" else cifar100_source()
    return download_archive(data_dir, source) if download else require_archive(data_dir, source)
