"""A small CIFAR-shaped set in the real on-disk format, for tests and offline smoke runs
(and a random CIFAR-100-format archive for tests).

Each class is a smooth random colour field with a striped texture. An image is a shifted,
possibly mirrored crop of its class template, blended with another class's template, with
random contrast, brightness and pixel noise: a small CNN learns it in a few epochs, but not
in one step, and the same augmentations as CIFAR-10 make sense on it.
"""

from __future__ import annotations

import gzip
import hashlib
import tarfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .batches import (
    BASE_FOLDER,
    BATCH_FILES,
    CACHE_FILE,
    CIFAR100_FILES,
    CIFAR100_FOLDER,
    META_FILE,
    TEST_FILE,
    TRAIN_FILES,
    write_batch,
)
from .cifar import ArchiveSource

NUM_CLASSES = 10
CLASSES = [f"pattern_{i}" for i in range(NUM_CLASSES)]
SIZE = 32
MARGIN = 4  # templates are this much larger on each side, so shifted crops stay filled


def synthetic_folder(data_dir: Path | str) -> Path:
    return Path(data_dir).expanduser() / "synthetic" / BASE_FOLDER


def write_synthetic(
    data_dir: Path | str, train_per_class: int = 500, test_per_class: int = 100, seed: int = 0
) -> Path:
    """Write the set under `<data_dir>/synthetic/cifar-10-batches-py`; same seed, same bytes."""
    folder = synthetic_folder(data_dir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CACHE_FILE).unlink(missing_ok=True)  # it may hold another seed's images
    rng = np.random.default_rng(seed)
    templates = _templates(rng)
    train_images, train_labels = _sample(rng, templates, train_per_class)
    test_images, test_labels = _sample(rng, templates, test_per_class)
    parts = zip(np.array_split(train_images, 5), np.array_split(train_labels, 5), strict=True)
    for i, (images, labels) in enumerate(parts, start=1):
        _write_batch(folder / TRAIN_FILES[i - 1], images, labels, f"training batch {i} of 5")
    _write_batch(folder / TEST_FILE, test_images, test_labels, "testing batch 1 of 1")
    meta = {"num_cases_per_batch": len(train_labels) // 5, "label_names": CLASSES, "num_vis": 3072}
    write_batch(folder / META_FILE, meta, set(CLASSES))
    return folder


def make_synthetic_archive(
    data_dir: Path | str, train_per_class: int = 50, test_per_class: int = 10, seed: int = 0
) -> tuple[Path, ArchiveSource]:
    """A CIFAR-10-style tar.gz of a small synthetic set, and the ArchiveSource describing it.

    For tests: use a scratch `data_dir`, as this rewrites `<data_dir>/synthetic`. The source's
    url is a file:// URL; point it elsewhere (dataclasses.replace) to serve the archive.
    """
    folder = write_synthetic(data_dir, train_per_class, test_per_class, seed)
    archive = folder.parent / "cifar-10-python.tar.gz"
    return archive, _archive(archive, folder, BATCH_FILES, "CIFAR-10")


def make_cifar100_archive(
    data_dir: Path | str, train_per_class: int = 2, test_per_class: int = 1, seed: int = 0
) -> tuple[Path, ArchiveSource]:
    """A tar.gz in CIFAR-100's published format (`cifar-100-python/` with `train`, `test` and
    `meta` pickles, fine and coarse labels) of random images, and its ArchiveSource (a file://
    URL). Fine class f belongs to coarse class f % 20. For tests: use a scratch `data_dir`."""
    rng = np.random.default_rng(seed)
    folder = Path(data_dir).expanduser() / "synthetic-cifar100" / CIFAR100_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    fine_names = [f"fine_{i:02d}" for i in range(100)]
    coarse_names = [f"coarse_{i:02d}" for i in range(20)]
    for name, per_class in (("train", train_per_class), ("test", test_per_class)):
        fine = rng.permutation(np.repeat(np.arange(100), per_class))
        images = rng.integers(0, 256, (len(fine), 3 * SIZE * SIZE), dtype=np.uint8)
        filenames = [f"image_{i:05d}.png" for i in range(len(fine))]
        fields = {
            "filenames": filenames,
            "batch_label": f"{name}ing batch 1 of 1",
            "fine_labels": fine.tolist(),
            "coarse_labels": (fine % 20).tolist(),
            "data": images,
        }
        write_batch(folder / name, fields, {fields["batch_label"], *filenames})
    meta = {"fine_label_names": fine_names, "coarse_label_names": coarse_names}
    write_batch(folder / "meta", meta, {*fine_names, *coarse_names})
    archive = folder.parent / "cifar-100-python.tar.gz"
    return archive, _archive(archive, folder, CIFAR100_FILES, "CIFAR-100")


def _archive(archive: Path, folder: Path, files: tuple[str, ...], title: str) -> ArchiveSource:
    _write_tar_gz(archive, folder, files)
    return ArchiveSource(
        url=archive.as_uri(),
        filename=archive.name,
        md5=_md5(archive),
        base_folder=folder.name,
        files={name: _md5(folder / name) for name in files},
        title=title,
    )


def _templates(rng: np.random.Generator) -> np.ndarray:
    """(classes, 3, side, side) float32 pixel values around 128."""
    side = SIZE + 2 * MARGIN
    coarse = torch.from_numpy(rng.normal(size=(NUM_CLASSES, 3, 5, 5)).astype(np.float32))
    smooth = F.interpolate(coarse, size=(side, side), mode="bicubic", align_corners=False)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
    angle, freq, phase = (rng.uniform(0, hi, (NUM_CLASSES, 1, 1)) for hi in (np.pi, 0.3, 2 * np.pi))
    stripes = np.sin(2 * np.pi * freq * (xx * np.cos(angle) + yy * np.sin(angle)) + phase)
    colour = rng.normal(size=(NUM_CLASSES, 3, 1, 1))
    return (128 + 40 * smooth.numpy() + 30 * colour * stripes[:, None]).astype(np.float32)


def _sample(
    rng: np.random.Generator, templates: np.ndarray, per_class: int
) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.permutation(np.repeat(np.arange(NUM_CLASSES), per_class))
    n = len(labels)
    distractor = (labels + rng.integers(1, NUM_CLASSES, n)) % NUM_CLASSES  # never the label
    mix = rng.uniform(0.0, 0.5, (n, 1, 1, 1)).astype(np.float32)
    images = (1 - mix) * _crops(rng, templates, labels) + mix * _crops(rng, templates, distractor)
    gain = rng.uniform(0.6, 1.3, (n, 1, 1, 1)).astype(np.float32)
    offset = rng.normal(0, 20, (n, 1, 1, 1)).astype(np.float32)
    noise = rng.normal(0, 45, images.shape).astype(np.float32)
    images = (images - 128) * gain + 128 + offset + noise
    return np.clip(np.rint(images), 0, 255).astype(np.uint8), labels


def _crops(rng: np.random.Generator, templates: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """One SIZE x SIZE window per label at a random offset, mirrored half the time."""
    n = len(labels)
    top, left = rng.integers(0, 2 * MARGIN + 1, (2, n))
    rows = top[:, None] + np.arange(SIZE)
    cols = left[:, None] + np.arange(SIZE)
    cols = np.where(rng.random((n, 1)) < 0.5, cols[:, ::-1], cols)
    channels = np.arange(3)[None, :, None, None]
    return templates[
        labels[:, None, None, None], channels, rows[:, None, :, None], cols[:, None, None, :]
    ]


def _write_batch(path: Path, images: np.ndarray, labels: np.ndarray, batch_label: str) -> None:
    filenames = [f"pattern_{label}_{i:05d}.png" for i, label in enumerate(labels)]
    fields = {
        "batch_label": batch_label,
        "labels": labels.tolist(),
        "data": images.reshape(len(images), -1),
        "filenames": filenames,
    }
    write_batch(path, fields, {batch_label, *filenames})


def _write_tar_gz(archive: Path, folder: Path, files: tuple[str, ...]) -> None:
    # Fixed timestamps and owners make the archive, and so its md5, depend only on the seed.
    def scrub(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
        return info

    with gzip.GzipFile(archive, "wb", mtime=0) as gz, tarfile.open(fileobj=gz, mode="w") as tar:
        tar.add(folder, arcname=folder.name, recursive=False, filter=scrub)
        for name in sorted(files):
            tar.add(folder / name, arcname=f"{folder.name}/{name}", filter=scrub)


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()
