"""Training throughput: the PyTorch tutorial's pipeline and this project's, in one process.

    python bench/throughput.py --device cpu      # small config, batch 256: about a minute
    python bench/throughput.py --device cuda     # Table 1, batch 512, 50,000 images
    python bench/throughput.py --device cuda --config small --batch-size 256 --jobs 1,2,4
    python bench/throughput.py --smoke       # small config, 100 images, batch 32: seconds

Both pipelines train the same architecture from the same initial weights on the same
synthetic CIFAR-shaped images (data.write_synthetic: no network needed).

- tutorial: a torchvision-style Dataset making a PIL image per item, RandomCrop(32, 4),
  RandomHorizontalFlip, ToTensor, Normalize in a DataLoader; fp32, eager, separate blocks,
  AdamW, the loss read after every step, as the PyTorch CIFAR-10 tutorial does.
- project: the split resident on the device as uint8, augmented a batch at a time
  (data.DeviceLoader), trained by search.training.trainer.Trainer (bf16 autocast and channels_last
  where native, fused AdamW, fused blocks, --compile).

Rates are whole passes over the training split (a DataLoader pass includes starting its
workers, as in the tutorial), after one warm-up pass each; the rounds alternate between the
pipelines so that load from other processes falls on both, and medians are printed.
--jobs J1,J2,... instead runs J copies of this project's pipeline at once on the device and
prints their aggregate images/s. Figures and how they were obtained: docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing as mp
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from data.augment_config import AugmentConfig
from data.batches import ImageSet
from data.dataset import load_dataset
from data.loader import CIFAR10_MEAN, CIFAR10_STD, search_data
from data.split import stratified_split
from data.synthetic import synthetic_folder, write_synthetic
from model.config import REPORT_TABLE1, ModelConfig
from model.counts import train_step_flops
from model.network import build_model
from search.rules.config import TrainConfig
from search.training.trainer import DeviceRecipe, Trainer

CONFIGS = {
    "table1": REPORT_TABLE1,
    # The "small trial": two backbones of two blocks, widths in multiples of 16.
    "small": ModelConfig(channels=[[3, 32, 64], [64, 128, 256]], blocks=[2, 2], dropout=0.2),
}
# The tutorial's augmentation, on the project's side too.
AUGMENT = AugmentConfig(crop_padding=4, flip=True, rotation_degrees=0.0)
VAL_FRACTION = 0.1
# --smoke: the smallest run (the suite runs it).
SMOKE = ["--device", "cpu", "--images", "100", "--batch-size", "32", "--rounds", "1"]


@dataclass(frozen=True)
class Options:
    device: str
    config: str
    batch_size: int
    images: int
    rounds: int
    workers: tuple[int, ...]
    compile: str
    fused: bool | None
    data_dir: Path | None  # None: a scratch directory for this run

    @property
    def model(self) -> ModelConfig:
        return CONFIGS[self.config]

    def train_config(self, epochs: int) -> TrainConfig:
        return TrainConfig(batch_size=self.batch_size, epochs=epochs, grad_clip=0.1)


# --- the tutorial pipeline ---------------------------------------------------------------------


class TutorialCIFAR(Dataset):
    """What torchvision.datasets.CIFAR10 does per item: HWC uint8 array -> PIL -> transforms."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.data = images.permute(0, 2, 3, 1).numpy()  # (N, H, W, C), as torchvision keeps it
        self.targets = labels.tolist()
        self.transform = transforms.Compose(
            [
                transforms.RandomCrop(32, padding=4),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                transforms.Normalize(CIFAR10_MEAN, CIFAR10_STD),
            ]
        )

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(Image.fromarray(self.data[index])), self.targets[index]


class TutorialPipeline:
    def __init__(self, opts: Options, images: torch.Tensor, labels: torch.Tensor, workers: int):
        self.device = torch.device(opts.device)
        torch.manual_seed(0)
        self.model = build_model(opts.model).to(self.device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-3, weight_decay=1e-4)
        self.loader = DataLoader(
            TutorialCIFAR(images, labels),
            batch_size=opts.batch_size,
            shuffle=True,
            num_workers=workers,
            pin_memory=self.device.type == "cuda",
            drop_last=True,
        )

    def epoch(self) -> tuple[int, float]:
        """One pass over the split: (images, seconds)."""
        with torch_defaults():
            return self._epoch()

    def _epoch(self) -> tuple[int, float]:
        self.model.train()
        start, images, running_loss = time.perf_counter(), 0, 0.0
        for x, y in self.loader:
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            loss = F.cross_entropy(self.model(x), y)
            self.optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_value_(self.model.parameters(), 0.1)
            self.optimizer.step()
            running_loss += loss.item()  # the tutorial's per-step read: a host wait each step
            images += len(y)
        return images, time.perf_counter() - start


@contextmanager
def torch_defaults() -> Iterator[None]:
    """torch's default backend flags, which the tutorial runs with and the Trainer changes."""
    saved = torch.backends.cudnn.benchmark, torch.get_float32_matmul_precision()
    torch.backends.cudnn.benchmark = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = saved[0]
        torch.set_float32_matmul_precision(saved[1])


# --- this project's pipeline -------------------------------------------------------------------


class ProjectPipeline:
    def __init__(self, opts: Options, imageset: ImageSet, epochs: int):
        recipe = DeviceRecipe.for_device(opts.device)
        # Batches arrive in the layout the trainer computes in, so it never converts them.
        self.train, self.val = search_data(imageset, recipe.device, VAL_FRACTION).loaders(
            opts.batch_size, AUGMENT, channels_last=recipe.channels_last
        )
        torch.manual_seed(0)
        model = build_model(opts.model)
        self.trainer = Trainer(
            model,
            opts.train_config(epochs),
            len(self.train),
            recipe,
            compile_mode=opts.compile,
            fused_blocks=opts.fused,
        )
        self.epochs = self.trainer.fit(self.train, self.val)

    def epoch(self) -> tuple[float, float]:
        """One epoch (training split, then validation): (training images/s, epoch seconds)."""
        stats = next(self.epochs)
        return stats.images_per_s, stats.seconds


# --- runs --------------------------------------------------------------------------------------


def compare(opts: Options) -> None:
    imageset = load_images(opts)
    train_images, train_labels = split_for_tutorial(imageset)
    flops_per_image = train_step_flops(build_model(opts.model), 1)
    print_header(opts, flops_per_image, len(train_labels))

    project = ProjectPipeline(opts, imageset, epochs=opts.rounds + 1)
    tutorials = {w: TutorialPipeline(opts, train_images, train_labels, w) for w in opts.workers}
    project.epoch()  # warm-up: compiling, cudnn's algorithm search, allocator
    for tutorial in tutorials.values():
        tutorial.epoch()
    project_rates, epoch_seconds = [], []
    tutorial_rates: dict[int, list[float]] = {w: [] for w in opts.workers}
    for _ in range(opts.rounds):
        for workers, tutorial in tutorials.items():
            images, seconds = tutorial.epoch()
            tutorial_rates[workers].append(images / seconds)
        rate, seconds = project.epoch()
        project_rates.append(rate)
        epoch_seconds.append(seconds)

    print("| pipeline | images/s (median) | TFLOP/s | rounds (images/s) |")
    print("|---|---:|---:|---|")
    for workers, rates in tutorial_rates.items():
        print_rate(f"tutorial, fp32, {workers} DataLoader workers", rates, flops_per_image)
    print_rate(f"project{describe(project.trainer)}", project_rates, flops_per_image)
    best_tutorial = max(statistics.median(r) for r in tutorial_rates.values())
    print()
    print(f"ratio project / tutorial: {statistics.median(project_rates) / best_tutorial:.2f}x")
    print(
        f"epoch (train {len(project.train) * opts.batch_size:,} + val {project.val.num_samples:,}"
        f" images): {statistics.median(epoch_seconds):.2f} s median"
        f" ({', '.join(f'{s:.2f}' for s in epoch_seconds)})"
    )
    print(f"compile: {project.trainer.compile_seconds:.1f} s (first call of each step function)")
    print_load("after")


def jobs(opts: Options, counts: list[int], seconds: float) -> None:
    """J copies of the project's pipeline on one device at once: aggregate images/s."""
    load_images(opts)  # written once, here, not by J processes at the same time
    print_header(opts, train_step_flops(build_model(opts.model), 1), None)
    context = mp.get_context("spawn")  # CUDA cannot be used in a forked child
    print("| jobs | images/s per job | aggregate images/s | vs 1 job |")
    print("|---:|---|---:|---:|")
    single = None
    for count in counts:
        barrier, results = context.Barrier(count), context.Queue()
        threads = max(1, (os.cpu_count() or 1) // count) if opts.device == "cpu" else 0
        procs = [
            context.Process(target=job, args=(opts, barrier, results, seconds, threads))
            for _ in range(count)
        ]
        for proc in procs:
            proc.start()
        # A job that dies never reports: wait for its warm-up and window, not forever.
        rates = sorted(results.get(timeout=seconds + 900) for _ in procs)
        for proc in procs:
            proc.join()
        total = sum(rates)
        single = single or total / count  # the first J's rate per job: one job's, for J=1
        per_job = ", ".join(f"{r:,.0f}" for r in rates)
        print(f"| {count} | {per_job} | {total:,.0f} | {total / single:.2f}x |", flush=True)
    print_load("after")


def job(opts: Options, barrier: object, results: object, seconds: float, threads: int) -> None:
    if threads:
        torch.set_num_threads(threads)  # J processes share the cores, not J times over
    project = ProjectPipeline(opts, load_images(opts), epochs=1)
    trainer, train = project.trainer, project.train
    batches = endless(train)
    chunk = 5 if opts.device == "cpu" else 50  # steps between host waits
    trainer.train_epoch(itertools.islice(batches, 3))  # warm-up, compiling
    barrier.wait()
    start, images = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        images += trainer.train_epoch(itertools.islice(batches, chunk)).images
    results.put(images / (time.perf_counter() - start))


def endless(loader: object) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    while True:
        yield from loader


# --- data and printing -------------------------------------------------------------------------


def load_images(opts: Options) -> ImageSet:
    """The synthetic set with opts.images training images, written if not there yet."""
    per_class = opts.images // 10
    folder = synthetic_folder(opts.data_dir)
    imageset = load_dataset("synthetic", opts.data_dir) if folder.exists() else None
    if imageset is None or len(imageset.train_labels) != 10 * per_class:
        write_synthetic(opts.data_dir, train_per_class=per_class, test_per_class=10)
        imageset = load_dataset("synthetic", opts.data_dir)
    return imageset


def split_for_tutorial(imageset: ImageSet) -> tuple[torch.Tensor, torch.Tensor]:
    """The training part of the same split the project's loaders use."""
    train_idx, _ = stratified_split(imageset.train_labels, VAL_FRACTION, 0)
    return imageset.train_images[train_idx], imageset.train_labels[train_idx]


def describe(trainer: Trainer) -> str:
    parts = [
        "bf16" if trainer.autocast_dtype is not None else "fp32",
        "channels_last" if trainer.memory_format == torch.channels_last else "NCHW",
        "fused blocks" if getattr(trainer.model, "fused", False) else "separate blocks",
        "compiled" if trainer.compiled else "eager",
    ]
    return ", " + ", ".join(parts)


def print_header(opts: Options, flops_per_image: int, train_images: int | None) -> None:
    print(f"machine: {machine(opts.device)}")
    print(f"torch {torch.__version__}, python {platform.python_version()}")
    print(f"date: {time.strftime('%Y-%m-%d %H:%M %Z')}")
    print(f"command: python {' '.join(sys.argv)}")
    m = opts.model
    print(
        f"config: {opts.config} (channels {[list(c) for c in m.channels]}, K {list(m.blocks)}),"
        f" batch {opts.batch_size}, {flops_per_image / 1e9:.3f} GFLOP per image forward+backward"
    )
    if train_images is not None:
        print(f"data: synthetic, {train_images:,} training images, {opts.rounds} rounds")
    print_load("before")
    print()


def print_rate(name: str, rates: list[float], flops_per_image: int) -> None:
    median = statistics.median(rates)
    each = ", ".join(f"{r:,.0f}" for r in rates)
    print(f"| {name} | {median:,.0f} | {median * flops_per_image / 1e12:.2f} | {each} |")


def print_load(when: str) -> None:
    if hasattr(os, "getloadavg"):
        print(f"load average {when}: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


def machine(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.get_device_name()}, {os.cpu_count()} CPU cores"
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return f"{names[0] if names else platform.machine()}, {os.cpu_count()} cores"


def parse(argv: list[str] | None) -> tuple[Options, list[int] | None, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cuda = torch.cuda.is_available()
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if cuda else "cpu")
    parser.add_argument("--config", choices=sorted(CONFIGS), help="table1 on cuda, small on cpu")
    parser.add_argument("--batch-size", type=int, help="512 for table1, 256 for small")
    parser.add_argument(
        "--images",
        type=int,
        help="synthetic training set, 10%% held out: 50,000 on cuda, 2,000 on cpu",
    )
    parser.add_argument("--rounds", type=int, default=3, help="measured passes per pipeline")
    parser.add_argument("--workers", help="tutorial DataLoader workers, e.g. 4,8,16 (cpu: 2)")
    parser.add_argument("--compile", choices=["auto", "on", "off"], default="auto")
    parser.add_argument("--fused", choices=["auto", "on", "off"], default="auto")
    parser.add_argument("--data-dir", type=Path, help="keep the synthetic set here for reuse")
    parser.add_argument("--jobs", help="e.g. 1,2,4: J concurrent trainings on the one device")
    parser.add_argument("--seconds", type=float, default=20.0, help="per --jobs measurement")
    parser.add_argument("--smoke", action="store_true", help=" ".join(SMOKE) + " (seconds)")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if args.smoke:
        args = parser.parse_args([*SMOKE, *argv])
    on_cuda = args.device == "cuda"
    config = args.config or ("table1" if on_cuda else "small")
    opts = Options(
        device=args.device,
        config=config,
        batch_size=args.batch_size or (512 if config == "table1" else 256),
        images=args.images or (50_000 if on_cuda else 2_000),
        rounds=args.rounds,
        workers=tuple(int(w) for w in (args.workers or ("8" if on_cuda else "2")).split(",")),
        compile=args.compile,
        fused={"auto": None, "on": True, "off": False}[args.fused],
        data_dir=args.data_dir,
    )
    counts = [int(j) for j in args.jobs.split(",")] if args.jobs else None
    return opts, counts, args.seconds


def main(argv: list[str] | None = None) -> None:
    opts, counts, seconds = parse(argv)
    if opts.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device here")
    with tempfile.TemporaryDirectory(prefix="hpo-bench-") as scratch:
        if opts.data_dir is None:
            opts = replace(opts, data_dir=Path(scratch))
        if counts:
            jobs(opts, counts, seconds)
        else:
            compare(opts)


if __name__ == "__main__":
    main()
