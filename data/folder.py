"""A folder of labelled images (torchvision ImageFolder's layout), decoded once and cached.

    PATH/train/CLASS/any/depth/IMAGE     the training images, one folder per class
    PATH/test/CLASS/...                  optional; the same class folders as train/

Every file not hidden (a name starting with ".") under a class folder must be an image Pillow
reads; its extension does not matter. Without test/, a stratified `test_fraction` of each
class is carved out of train/ with a fixed seed, and the chosen files are recorded in the
cache: the search never sees them.

Each image is decoded with Pillow, converted to RGB as torchvision's ImageFolder loader does
(grayscale becomes three identical channels, so every dataset has three channels and the
network's input never changes; alpha is dropped; 16-bit grayscale is scaled to 8 bits), and
resized to `image_size` x `image_size` whole (the aspect ratio is not kept: nothing is cropped
away). The uint8 arrays are cached in `<data_dir>/folders/`, keyed by the folder's absolute
path and the image size, never inside the user's folder (it may be read-only), together with a
fingerprint of the files (relative path, size, mtime_ns of each): a changed folder is decoded
again, never served stale. Decoding runs in a thread pool where there are more than two cores
(see DECODE_WORKERS for why not processes, and not on two cores).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, UnidentifiedImageError

from .identity import DatasetError

if TYPE_CHECKING:  # torch only where tensors are made: this module is imported by decoders
    import torch

CACHE_FOLDER = "folders"
CHUNK = 256  # images per decode task: few enough tasks, and small ones for the tail
# Pillow releases the GIL while it decodes and resizes, but for small images most of the time
# is Python's, per file. bench/folder.py on 2 busy cores: 2 threads 0.6x-1.4x one thread,
# no steady gain; 2 processes 1.3x once started, but starting them (forkserver: each imports
# the entry module, torch included) took 8 s. So: threads, and only with more than two cores.
_CPUS = len(os.sched_getaffinity(0))
DECODE_WORKERS = min(8, _CPUS) if _CPUS > 2 else 1
_FILE_LISTS = ("train_files", "test_files")
_SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


@dataclass(frozen=True)
class FolderLayout:
    """The files of a valid image folder: classes, and (relative path, label) per split."""

    root: Path
    classes: tuple[str, ...]
    train: tuple[tuple[str, int], ...]
    test: tuple[tuple[str, int], ...] | None  # None: no test/ folder; carve one from train
    files_fingerprint: str  # every file's relative path, size and mtime_ns, hashed


@dataclass
class FolderData:
    """A decoded folder: its ImageSet fields plus what says where they came from."""

    train_images: torch.Tensor  # uint8 (N, 3, size, size)
    train_labels: torch.Tensor  # int64 (N,)
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: list[str]
    image_size: int
    files_fingerprint: str
    fingerprint: str  # of the decoded pixels, labels, classes and split: same for any copy
    test_split: str
    train_files: list[str]  # relative paths of the images, in order
    test_files: list[str]

    def image(self, path: str) -> torch.Tensor:
        """The decoded image of a file (its path relative to the folder)."""
        if path in self.test_files:
            return self.test_images[self.test_files.index(path)]
        return self.train_images[self.train_files.index(path)]


def scan_folder(root: Path | str) -> FolderLayout:
    """The folder's classes and files, checked without decoding: raises DatasetError with
    one line for a missing path, not a folder, no train/, fewer than two classes, an empty
    class, a file outside a class folder, or a test/ with other classes than train/'s."""
    root = Path(root).expanduser().resolve()
    if not root.exists():
        raise DatasetError(f"dataset folder {root} does not exist")
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} is not a folder")
    if not (root / "train").is_dir():
        raise DatasetError(f"{root} has no train/ folder: expected {root}/train/CLASS/IMAGE")
    classes, train, train_stamps = _scan_split(root, "train")
    if len(classes) < 2:
        raise DatasetError(
            f"{root / 'train'} has {len(classes)} class folder(s); a classifier needs two or more"
        )
    test, test_stamps = None, []
    if (root / "test").is_dir():
        test_classes, test, test_stamps = _scan_split(root, "test")
        if test_classes != classes:
            extra = sorted(set(test_classes) - set(classes))
            lacking = sorted(set(classes) - set(test_classes))
            raise DatasetError(
                f"{root / 'test'} has other classes than train/: "
                f"only in test/: {', '.join(extra) or 'none'}; "
                f"missing from test/: {', '.join(lacking) or 'none'}"
            )
    digest = hashlib.sha256()
    for line in train_stamps + test_stamps:
        digest.update(line.encode())
    return FolderLayout(root, classes, tuple(train), test and tuple(test), digest.hexdigest())


def _scan_split(root: Path, split: str) -> tuple[tuple[str, ...], list[tuple[str, int]], list]:
    """Class names, (relative path, label) per file, and a line per file of its path, size
    and mtime_ns (the folder's fingerprint). Strings and os.scandir, not Path and os.walk:
    this runs on every load, and it is most of a cached load's time."""
    top = root / split
    classes, files, stamps = [], [], []
    for entry in sorted(os.scandir(top), key=lambda e: e.name):
        if entry.name.startswith("."):
            continue
        if not entry.is_dir():
            raise DatasetError(f"{entry.path} is not in a class folder: expected {top}/CLASS/")
        found = sorted(_files_under(entry.path, f"{split}/{entry.name}"))
        if not found:
            raise DatasetError(f"class folder {entry.path} holds no images")
        files += [(path, len(classes)) for path, _ in found]
        stamps += [f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n" for path, st in found]
        classes.append(entry.name)
    return tuple(classes), files, stamps


def _files_under(folder: str, relative: str) -> Iterator[tuple[str, os.stat_result]]:
    for entry in os.scandir(folder):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            yield from _files_under(entry.path, f"{relative}/{entry.name}")
        else:
            yield f"{relative}/{entry.name}", entry.stat()


def cache_path(root: Path, image_size: int, data_dir: Path) -> Path:
    """Where the decoded folder is cached: keyed by its absolute path and the image size."""
    key = hashlib.sha256(str(root).encode()).hexdigest()[:16]
    return Path(data_dir) / CACHE_FOLDER / f"{root.name}-{key}-{image_size}px.pt"


def load_image_folder(
    root: Path | str,
    data_dir: Path | str,
    image_size: int = 32,
    test_fraction: float = 0.2,
    split_seed: int = 0,
    workers: int = DECODE_WORKERS,
) -> FolderData:
    """The folder's images as uint8 (N, 3, size, size) tensors: from the cache while the
    folder's files are unchanged, else decoded (DatasetError names a bad image) and cached."""
    from .batches import save_atomic

    if image_size < 1:
        raise DatasetError(f"image size must be positive, got {image_size}")
    layout = scan_folder(root)
    cache = cache_path(layout.root, image_size, Path(data_dir).expanduser())
    split = (
        "test/"
        if layout.test is not None
        else f"carved from train/: {test_fraction:g} of each class, seed {split_seed}"
    )
    cached = _read_cache(cache)
    if (
        cached is not None
        and cached.files_fingerprint == layout.files_fingerprint
        and cached.image_size == image_size
        and cached.test_split == split
    ):
        return cached
    data = _decode_folder(layout, image_size, split, test_fraction, split_seed, workers)
    with contextlib.suppress(OSError):  # a read-only data dir: decode on every load
        cache.parent.mkdir(parents=True, exist_ok=True)
    # The file lists as one string each: torch.load reads 50,000 strings in a list ten times
    # slower than the images.
    lists = {key: "\0".join(getattr(data, key)) for key in _FILE_LISTS}  # \0: in no file name
    save_atomic(cache, {**asdict(data), **lists})
    return data


def _read_cache(path: Path) -> FolderData | None:
    import torch

    try:
        payload = torch.load(path, weights_only=True)
        return FolderData(**{**payload, **{k: _split(payload[k]) for k in _FILE_LISTS}})
    except Exception:  # missing, truncated or foreign: decode the folder again
        return None


def _split(joined: str) -> list[str]:
    return joined.split("\0") if joined else []


def _decode_folder(
    layout: FolderLayout,
    size: int,
    split: str,
    test_fraction: float,
    split_seed: int,
    workers: int,
) -> FolderData:
    import torch

    from .split import stratified_split

    entries = list(layout.train + (layout.test or ()))
    images = torch.from_numpy(decode_images([layout.root / p for p, _ in entries], size, workers))
    labels = torch.tensor([label for _, label in entries], dtype=torch.int64)
    paths = [p for p, _ in entries]
    n_train = len(layout.train)
    if layout.test is not None:
        train_idx, test_idx = torch.arange(n_train), torch.arange(n_train, len(entries))
    else:
        train_idx, test_idx = stratified_split(labels, test_fraction, split_seed)
    parts = (images[train_idx], labels[train_idx], images[test_idx], labels[test_idx])
    digest = hashlib.blake2b(digest_size=32)
    digest.update("\0".join(layout.classes).encode())
    for part in parts:
        digest.update(part.numpy().tobytes())
    return FolderData(
        *parts,
        classes=list(layout.classes),
        image_size=size,
        files_fingerprint=layout.files_fingerprint,
        fingerprint=digest.hexdigest(),
        test_split=split,
        train_files=[paths[i] for i in train_idx.tolist()],
        test_files=[paths[i] for i in test_idx.tolist()],
    )


def decode_images(
    paths: list[Path], size: int, workers: int = DECODE_WORKERS, chunk: int = CHUNK
) -> np.ndarray:
    """uint8 (N, 3, size, size), decoded in chunks of `chunk` on `workers` threads."""
    chunks = [paths[i : i + chunk] for i in range(0, len(paths), chunk)]
    if workers <= 1 or len(chunks) <= 1:
        return np.concatenate([decode_chunk(chunk, size) for chunk in chunks])
    pool = ThreadPoolExecutor(workers)
    try:
        return np.concatenate(list(pool.map(decode_chunk, chunks, [size] * len(chunks))))
    finally:
        pool.shutdown(cancel_futures=True)  # a bad image stops the rest at once


def decode_chunk(paths: list[Path], size: int) -> np.ndarray:
    return np.stack([decode_image(path, size) for path in paths]).transpose(0, 3, 1, 2)


def decode_image(path: Path, size: int) -> np.ndarray:
    """uint8 (size, size, 3): any mode made RGB, resized whole (bilinear, antialiased)."""
    try:
        with Image.open(path) as image:
            image.draft("RGB", (size, size))  # JPEG: decode at a reduced scale, far faster
            rgb = _to_rgb(image)
            if rgb.size != (size, size):
                rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(rgb, dtype=np.uint8)
    except UnidentifiedImageError:
        raise DatasetError(f"{path} is not an image Pillow can read") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DatasetError(f"cannot read image {path} (unreadable or truncated): {err}") from None


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in _SIXTEEN_BIT:  # 16-bit grayscale: keep the top 8 bits, not a clip at 255
        eight = np.clip(np.asarray(image, dtype=np.float32) / 257, 0, 255).round()
        image = Image.fromarray(eight.astype(np.uint8), "L")
    return image.convert("RGB")
