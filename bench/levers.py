"""What the recipe levers cost per epoch: every lever off (the report's recipe) against every
lever on, for Table 1 and the small config; and what test-time views cost an evaluation.

    python bench/levers.py --device cpu              # both configs at CPU sizes: minutes
    python bench/levers.py --device cuda             # 45,000 training images, 5,000 validation
    python bench/levers.py --smoke                   # small config, a few batches: seconds

"on" is SGD with Nesterov momentum, label smoothing 0.1, an average of the weights (decay
0.999, updated every step), cutout (16 px, p 0.5) and cutmix (alpha 1, p 0.5), on top of the
report's crop and mirror. An epoch is one pass of training over the training images, batches
made and augmented on the device as in a trial; off and on alternate round by round so that
load from other processes falls on both, and medians are printed. Evaluation is timed apart,
per test-time mode, on the validation images (a tenth of the training images).

On the CPU the time is this process's CPU time (user + system, all threads), which other
processes' load stretches far less than the wall clock; on CUDA it is the wall clock.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

# Run as a file, this folder would come first on sys.path; the project's root is wanted.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.throughput import CONFIGS, machine  # noqa: E402
from data.augment import augment_batch, mix_batch  # noqa: E402
from data.augment_config import TTA_MODES, AugmentConfig  # noqa: E402
from data.loader import Labelled, RunData  # noqa: E402
from search.rules.config import TrainConfig, TrialConfig  # noqa: E402
from search.training.run import start_run  # noqa: E402
from search.training.trainer import DeviceRecipe  # noqa: E402

OFF_TRAIN = TrainConfig(scheduler="constant")
OFF_AUGMENT = AugmentConfig(crop_padding=4, flip=True)
ON_TRAIN = replace(
    OFF_TRAIN, optimizer="sgd", lr=0.05, momentum=0.9, label_smoothing=0.1, ema_decay=0.999
)
ON_AUGMENT = replace(
    OFF_AUGMENT, cutout_size=16, cutout_prob=0.5, mix="cutmix", mix_alpha=1.0, mix_prob=0.5
)


def random_data(images: int, device: torch.device) -> RunData:
    """CIFAR-shaped uint8 images and labels on the device: the cost does not read them."""
    generator = torch.Generator().manual_seed(0)

    def part(n: int) -> Labelled:
        pixels = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=generator)
        return Labelled(
            pixels.to(device), torch.randint(0, 10, (n,), generator=generator).to(device)
        )

    return RunData(train=part(images), held_out=part(max(images // 10, 1)))


def clock(device: torch.device) -> Callable[[], float]:
    return time.process_time if device.type == "cpu" else time.perf_counter


def epoch_seconds(
    cfg: TrialConfig, data: RunData, recipe: DeviceRecipe, rounds: int
) -> list[float]:
    """Seconds of each training pass after a warm-up pass, one run of `cfg`."""
    run = start_run(cfg, data, recipe, seed=0, compile_mode="off")
    now, times = clock(recipe.device), []
    for _ in range(rounds + 1):
        start = now()
        run.trainer.train_epoch(run.train)  # reads the loss once: waits for the device
        times.append(now() - start)
    return times[1:]


def eval_seconds(cfg: TrialConfig, data: RunData, recipe: DeviceRecipe, rounds: int) -> float:
    run = start_run(cfg, data, recipe, seed=0, compile_mode="off")
    run.trainer.evaluation(run.held_out)  # warm-up
    now, times = clock(recipe.device), []
    for _ in range(rounds):
        start = now()
        run.trainer.evaluation(run.held_out)  # reads its results: waits for the device
        times.append(now() - start)
    return statistics.median(times)


def median_seconds(work: Callable[[], object], now: Callable[[], float], repeats: int) -> float:
    work()  # warm-up
    times = []
    for _ in range(repeats):
        start = now()
        work()
        times.append(now() - start)
    return statistics.median(times)


def per_step_costs(on: TrialConfig, data: RunData, recipe: DeviceRecipe, repeats: int) -> None:
    """Each lever's own work per training step, against the step itself: steadier than whole
    epochs on a loaded machine, where the epochs' noise is larger than the levers' cost."""
    run = start_run(on, data, recipe, seed=0, compile_mode="off")
    trainer, now = run.trainer, clock(recipe.device)
    x, y = next(iter(run.train))
    images = data.train.images[: len(y)].float().div(255)
    labels = data.train.labels[: len(y)]
    generator = torch.Generator(recipe.device).manual_seed(0)
    weights = np.random.default_rng(0)
    step = median_seconds(lambda: trainer._train_step(x, y), now, repeats)
    costs = {
        "the whole step (SGD)": step,
        "average of the weights": median_seconds(trainer.average.update, now, repeats),
        "crop + mirror (off)": median_seconds(
            lambda: augment_batch(images, OFF_AUGMENT, generator), now, repeats
        ),
        "crop + mirror + cutout": median_seconds(
            lambda: augment_batch(images, on.augment, generator), now, repeats
        ),
        "cutmix": median_seconds(
            lambda: mix_batch(
                images, labels, replace(on.augment, mix_prob=1.0), 10, generator, weights
            ),
            now,
            repeats,
        ),
    }
    for label, seconds in costs.items():
        print(f"  per step: {label:<24} {seconds * 1e3:9.2f} ms  {seconds / step:6.1%} of a step")


def bench_config(name: str, args: argparse.Namespace, recipe: DeviceRecipe) -> None:
    model = CONFIGS[name]
    data = random_data(args.images, recipe.device)
    off = TrialConfig(model, replace(OFF_TRAIN, batch_size=args.batch_size), OFF_AUGMENT)
    on = TrialConfig(model, replace(ON_TRAIN, batch_size=args.batch_size), ON_AUGMENT)
    settings = {
        "every lever off": off,
        "every lever on": on,
        # The levers less the optimizer swap: what averaging, smoothing and the batch work add.
        "on but AdamW": replace(on, train=replace(on.train, optimizer="adamw", lr=OFF_TRAIN.lr)),
    }
    times: dict[str, list[float]] = {key: [] for key in settings}
    for round_ in range(args.rounds):  # alternating, so that other load falls on all
        # The order turns each round: whichever ran first was slower in every run here.
        order = list(settings.items())[round_ % len(settings) :] + list(settings.items())
        for key, cfg in order[: len(settings)]:
            times[key] += epoch_seconds(cfg, data, recipe, 1)
    median = {key: statistics.median(value) for key, value in times.items()}
    images = args.images // args.batch_size * args.batch_size
    print(f"{name}: epoch of {images:,} images, batch {args.batch_size}:")
    for key, seconds in median.items():
        extra = seconds / median["every lever off"] - 1
        print(f"  {key:<16} {seconds:7.2f} s  {images / seconds:9,.0f} img/s  {extra:+.1%}")
    per_step_costs(on, data, recipe, args.repeats)
    base = None
    for mode in TTA_MODES:
        cfg = replace(off, augment=replace(OFF_AUGMENT, tta=mode))
        seconds = eval_seconds(cfg, data, recipe, args.rounds)
        base = base or seconds
        share = seconds / median["every lever off"]
        print(
            f"{name}: evaluation of {len(data.held_out.labels):,} images, tta {mode}: "
            f"{seconds:.2f} s ({seconds / base:.1f}x none; {share:.1%} of an epoch off)"
        )


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cuda = torch.cuda.is_available()
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if cuda else "cpu")
    parser.add_argument("--config", choices=[*sorted(CONFIGS), "both"], default="both")
    parser.add_argument("--images", type=int, help="training images: 45,000 on cuda, 256 on cpu")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3, help="timed epochs per setting")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per step part")
    parser.add_argument("--smoke", action="store_true", help="small config, CPU, a few seconds")
    args = parser.parse_args(argv)
    if args.smoke:
        args.device, args.config, args.images, args.batch_size, args.rounds, args.repeats = (
            "cpu", "small", 64, 32, 1, 2,
        )  # fmt: skip
    if args.images is None:
        args.images = 45_000 if args.device == "cuda" else 256
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device here")
    recipe = DeviceRecipe.for_device(args.device)
    precision = "bf16 autocast" if recipe.autocast_dtype is not None else "fp32"
    print(f"machine: {machine(args.device)}; {precision} (bf16 where the hardware computes it)")
    timed = "process CPU time" if args.device == "cpu" else "wall clock"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, eager; {timed}")
    for name in sorted(CONFIGS) if args.config == "both" else [args.config]:
        bench_config(name, args, recipe)


if __name__ == "__main__":
    main()
