"""The `cifar-10-batches-py` pickle format: read it, write it, and cache it as uint8 tensors."""

from __future__ import annotations

import os
import pickle
import pickletools
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


@dataclass
class ImageSet:
    """A labelled train and test set: uint8 images (N, 3, 32, 32), int64 labels (N,)."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: list[str]


def has_batches(folder: Path) -> bool:
    return all((folder / name).is_file() for name in BATCH_FILES)


def load_folder(folder: Path) -> ImageSet:
    """Read a batches folder, through `<folder>/uint8-cache.pt` once that has been written."""
    cache = folder / CACHE_FILE
    cached = _read_cache(cache)
    if cached is not None:
        return cached
    imageset = read_folder(folder)
    _write_cache(cache, imageset)
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


def _read_batch(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    batch = _unpickle(path)
    images = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, *IMAGE_SHAPE)
    labels = np.asarray(batch["labels"], dtype=np.int64)
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


def _write_cache(path: Path, imageset: ImageSet) -> None:
    # Write then rename, so a worker reading concurrently never sees half a file; a read-only
    # dataset folder just means every load parses the pickles.
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        with partial.open("wb") as f:  # open here: torch.save would wrap OSError in RuntimeError
            torch.save(asdict(imageset), f)
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
