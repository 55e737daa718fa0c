"""An image folder: decode speed (one thread, a thread pool, a process pool) and cache loads.

    python bench/folder.py                  # 50,000 PNGs of 32x32, as CIFAR-10's size
    python bench/folder.py --images 5000
    python bench/folder.py --images 2000 --source-size 256 --format jpg   # photos, shrunk
    python bench/folder.py --smoke          # 200 images: seconds

Writes --images random images (10 classes) into a scratch folder, decodes them with
data/folder.py's decoder on 1 worker, on a thread pool and on a process pool of --workers
(chunks of data/folder.py's CHUNK; the pool's start-up timed apart), then times a load of
the folder from its uint8 cache (scan + fingerprint of every file + torch.load) against a
cache load of the synthetic CIFAR-10-format set of the same number of images.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image

from data.batches import load_folder
from data.folder import CHUNK, DECODE_WORKERS, decode_chunk, decode_images, load_image_folder
from data.synthetic import write_synthetic

CLASSES = 10


def write_images(root: Path, count: int, size: int, suffix: str) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        path = root / "train" / f"class_{i % CLASSES}" / f"{i:06d}.{suffix}"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def decode_in_processes(pool: ProcessPoolExecutor, paths: list[Path], size: int) -> np.ndarray:
    chunks = [paths[i : i + CHUNK] for i in range(0, len(paths), CHUNK)]
    return np.concatenate(list(pool.map(decode_chunk, chunks, [size] * len(chunks))))


def start_pool(workers: int) -> ProcessPoolExecutor:
    """Started and warm: forkserver, since torch's threads make a plain fork unsafe."""
    pool = ProcessPoolExecutor(workers, mp_context=get_context("forkserver"))
    list(pool.map(abs, range(workers)))
    return pool


def timed(label: str, count: int, run) -> object:
    start = time.perf_counter()
    result = run()
    seconds = time.perf_counter() - start
    rate = f"{count / seconds:10,.0f} images/s" if count else ""
    print(f"{label:<44} {seconds:8.3f} s  {rate}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=50_000)
    parser.add_argument("--size", type=int, default=32, help="the size decoded to")
    parser.add_argument("--source-size", type=int, help="the size written (default --size)")
    parser.add_argument("--format", default="png", choices=["png", "jpg"])
    parser.add_argument("--workers", type=int, default=DECODE_WORKERS)
    parser.add_argument("--smoke", action="store_true", help="200 images")
    args = parser.parse_args()
    count = 200 if args.smoke else args.images
    source = args.source_size or args.size
    print(f"{count:,} {args.format} images of {source}x{source} to {args.size}x{args.size}, "
          f"{os.cpu_count()} CPUs, {args.workers} workers, chunks of {CHUNK}")  # fmt: skip
    with tempfile.TemporaryDirectory() as scratch:
        root, data_dir = Path(scratch, "images"), Path(scratch, "data")
        paths = timed("write", count, lambda: write_images(root, count, source, args.format))
        one = timed("decode, 1 worker", count, lambda: decode_images(paths, args.size, 1))
        threads = timed(
            f"decode, {args.workers} threads",
            count,
            lambda: decode_images(paths, args.size, args.workers),
        )
        pool = timed(
            f"start {args.workers} processes (forkserver)", count, partial(start_pool, args.workers)
        )
        with pool:
            processes = timed(
                f"decode, {args.workers} processes (started)",
                count,
                lambda: decode_in_processes(pool, paths, args.size),
            )
        assert np.array_equal(one, threads) and np.array_equal(one, processes)
        timed("first load: scan, decode, cache", count, lambda: load_image_folder(root, data_dir))
        timed("folder: load from cache", count, lambda: load_image_folder(root, data_dir))
        per_class = max(1, count // CLASSES)
        folder = write_synthetic(data_dir, per_class - per_class // 6, per_class // 6)
        load_folder(folder)  # writes its cache
        timed("synthetic CIFAR-10: load from cache", count, lambda: load_folder(folder))


if __name__ == "__main__":
    main()
