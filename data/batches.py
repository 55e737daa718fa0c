"""The CIFAR pickle formats (`cifar-10-batches-py`, `cifar-100-python`): read them, write them,
and cache them as uint8 tensors."""

from __future__ import annotations

import hashlib
import os
import pickle
import pickletools
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

BASE_FOLDER = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
META_FILE = "batches.meta"
BATCH_FILES = (*TRAIN_FILES, TEST_FILE, META_FILE)
CACHE_FILE = "uint8-cache.pt"
IMAGE_SHAPE = (3, 32, 32)

CIFAR100_FOLDER = "cifar-100-python"
CIFAR100_FILES = ("train", "test", "meta")
# Which labels of CIFAR-100 to train on: the pickles' label key and the meta's names key.
CIFAR100_LABELS = {
    "fine": ("fine_labels", "fine_label_names"),  # 100 classes
    "coarse": ("coarse_labels", "coarse_label_names"),  # 20 superclasses
}


@dataclass
class ImageSet:
    """A labelled train and test set: uint8 images (N, C, H, W), int64 labels (N,)."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: list[str]


def has_batches(folder: Path) -> bool:
    return all((folder / name).is_file() for name in BATCH_FILES)


def load_folder(folder: Path) -> ImageSet:
    """Read a batches folder, through `<folder>/uint8-cache.pt` once that has been written."""
    return load_cached(folder / CACHE_FILE, lambda: read_folder(folder))


def load_cifar100(folder: Path, labels: str = "fine") -> ImageSet:
    """Read a `cifar-100-python` folder with its fine (100) or coarse (20) labels, through
    `<folder>/uint8-cache-<labels>.pt` once that has been written."""
    return load_cached(folder / f"uint8-cache-{labels}.pt", lambda: read_cifar100(folder, labels))


def read_cifar100(folder: Path, labels: str = "fine") -> ImageSet:
    """Parse CIFAR-100's `train`, `test` and `meta` pickles (slow path, before the cache)."""
    label_key, names_key = CIFAR100_LABELS[labels]
    train_images, train_labels = _read_batch(folder / "train", label_key)
    test_images, test_labels = _read_batch(folder / "test", label_key)
    meta = _unpickle(folder / "meta")
    return ImageSet(
        train_images,
        train_labels,
        test_images,
        test_labels,
        classes=[_text(name) for name in meta[names_key]],
    )


def channel_stats(imageset: ImageSet) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of the training images in [0, 1] (population std)."""
    images = imageset.train_images
    total = torch.zeros(images.shape[1], dtype=torch.float64)
    squares = torch.zeros_like(total)
    for chunk in images.split(4096):  # float64 a chunk at a time, not the whole set
        x = chunk.to(torch.float64).div_(255).transpose(0, 1).reshape(images.shape[1], -1)
        total += x.sum(1)
        squares += x.square().sum(1)
    n = images.numel() // images.shape[1]
    mean = total / n
    std = (squares / n - mean.square()).clamp_min(0).sqrt()
    return tuple(round(v, 6) for v in mean.tolist()), tuple(round(v, 6) for v in std.tolist())


def content_fingerprint(imageset: ImageSet) -> str:
    """A hash of the pixels, labels and class names: equal for any copy of the same data."""
    digest = hashlib.blake2b(digest_size=32)
    digest.update("\0".join(imageset.classes).encode())
    for part in (
        imageset.train_images,
        imageset.train_labels,
        imageset.test_images,
        imageset.test_labels,
    ):
        digest.update(part.contiguous().numpy().tobytes())
    return digest.hexdigest()


def load_cached(path: Path, read: Callable[[], ImageSet]) -> ImageSet:
    """The ImageSet cached at `path`, else `read()` and cached there."""
    cached = _read_cache(path)
    if cached is not None:
        return cached
    imageset = read()
    save_atomic(path, asdict(imageset))
    return imageset


def read_folder(folder: Path) -> ImageSet:
    """Parse the pickled batches (slow path: used once, before the cache exists)."""
    train = [_read_batch(folder / name) for name in TRAIN_FILES]
    test_images, test_labels = _read_batch(folder / TEST_FILE)
    meta = _unpickle(folder / META_FILE)
    return ImageSet(
        train_images=torch.cat([images for images, _ in train]),
        train_labels=torch.cat([labels for _, labels in train]),
        test_images=test_images,
        test_labels=test_labels,
        classes=[_text(name) for name in meta["label_names"]],
    )


def _read_batch(path: Path, label_key: str = "labels") -> tuple[torch.Tensor, torch.Tensor]:
    batch = _unpickle(path)
    images = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, *IMAGE_SHAPE)
    labels = np.asarray(batch[label_key], dtype=np.int64)
    return torch.from_numpy(images.copy()), torch.from_numpy(labels)


def _unpickle(path: Path) -> dict:
    # The real files are Python 2 pickles of numpy arrays: latin1 is the encoding numpy (and
    # torchvision) read them with. Keys written as bytes by other tools are decoded too.
    with path.open("rb") as f:
        raw = pickle.load(f, encoding="latin1")
    return {_text(key): value for key, value in raw.items()}


def _text(value: str | bytes) -> str:
    return value.decode("latin1") if isinstance(value, bytes) else value


def _read_cache(path: Path) -> ImageSet | None:
    try:
        imageset = ImageSet(**torch.load(path, weights_only=True))
    except Exception:  # missing, truncated or foreign: rebuild it from the batches
        return None
    return imageset if _looks_valid(imageset) else None


def _looks_valid(s: ImageSet) -> bool:
    pairs = ((s.train_images, s.train_labels), (s.test_images, s.test_labels))
    return all(
        images.dtype == torch.uint8
        and tuple(images.shape[1:]) == IMAGE_SHAPE
        and labels.dtype == torch.int64
        and labels.shape == images.shape[:1]
        for images, labels in pairs
    )


def save_atomic(path: Path, payload: dict) -> None:
    """torch.save `payload` to `path`, or nothing where it cannot be written."""
    # Write then rename, so a worker reading concurrently never sees half a file; a read-only
    # dataset folder just means every load parses the pickles.
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        with partial.open("wb") as f:  # open here: torch.save would wrap OSError in RuntimeError
            torch.save(payload, f)
        partial.replace(path)
    except OSError:
        partial.unlink(missing_ok=True)


def write_batch(path: Path, fields: dict[str, object], texts: set[str]) -> None:
    """Pickle `fields` the way the real files are: a Python 2 pickle with str keys.

    `texts` are the str values (keys, label names...) to store as Python 2 str, so the file
    loads with bytes keys under encoding="bytes" and str keys under "latin1", like the original.
    """
    stream = _as_python2_str(pickle.dumps(fields, protocol=2), texts | set(fields))
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_bytes(stream)
    partial.replace(path)  # readers see the old file or the new one, never half of one


def _as_python2_str(stream: bytes, texts: set[str]) -> bytes:
    # Swap the unicode opcodes of the listed strings for Python 2 str opcodes. Only those:
    # numpy's own reduce arguments (e.g. the codec name) must stay unicode.
    ops = list(pickletools.genops(stream))
    ends = [pos for _, _, pos in ops[1:]] + [len(stream)]
    out = bytearray()
    for (op, arg, pos), end in zip(ops, ends, strict=True):
        is_listed = op.name == "BINUNICODE" and arg in texts
        out += _python2_str(arg) if is_listed else stream[pos:end]
    return bytes(out)


def _python2_str(text: str) -> bytes:
    raw = text.encode("latin1")
    if len(raw) < 256:
        return b"U" + bytes([len(raw)]) + raw  # SHORT_BINSTRING
    return b"T" + len(raw).to_bytes(4, "little") + raw  # BINSTRING
