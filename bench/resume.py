"""Resumed against uninterrupted: how far a trial resumed from its checkpoint drifts.

    python bench/resume.py --device cpu     # small config, 2,000 images, 4 epochs: minutes
    python bench/resume.py --device cuda    # Table 1, 10,000 images, 6 epochs
    python bench/resume.py --smoke          # small config, 300 images, 2 epochs: seconds

One config, one seed, four runs: uninterrupted twice (the device's own run-to-run spread:
on CUDA, cuDNN's benchmark picks and atomic reductions), resumed from a checkpoint written
after epoch --resume-after in the same memory layout (through bytes into a fresh model and
optimizer, as a retry on another worker does), and resumed under the other layout
(contiguous <-> channels_last, as a fleet of mixed GPU generations, or a CPU retry of a GPU
trial). Prints each run's validation losses and its largest difference to the first run.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
from pathlib import Path

import torch

from data.augment_config import AugmentConfig
from data.dataset import load_dataset
from data.loader import search_data
from data.synthetic import write_synthetic
from model.config import REPORT_TABLE1, ModelConfig
from search.rules.config import TrainConfig, TrialConfig
from search.training.run import start_run
from search.training.trainer import DeviceRecipe

# --smoke: the smallest run (the suite runs it).
SMOKE = ["--device", "cpu", "--images", "300", "--epochs", "2", "--resume-after", "1"]
SMALL = ModelConfig(channels=[[3, 32, 64], [64, 128, 256]], blocks=[2, 2], dropout=0.2)


def train(cfg: TrialConfig, data, recipe: DeviceRecipe, compile_mode: str, state=None, until=0):
    """Validation losses from the state's epoch on; and the checkpoint after `until`."""
    run = start_run(cfg, data, recipe, seed=0, compile_mode=compile_mode, state=state)
    losses = []
    for stats in run.trainer.fit(run.train, run.held_out):
        losses.append(stats.val_loss)
        if stats.epoch == until:
            saved = io.BytesIO()
            torch.save(run.trainer.state_dict(), saved)
            saved.seek(0)
            return losses, torch.load(saved, map_location="cpu", weights_only=True)
    return losses, None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    parser.add_argument("--images", type=int, help="default: 2,000 on cpu, 10,000 on cuda")
    parser.add_argument("--epochs", type=int, help="default: 4 on cpu, 6 on cuda")
    parser.add_argument("--resume-after", type=int, default=2)
    parser.add_argument("--compile", default="off", choices=("auto", "on", "off"))
    parser.add_argument("--data-dir", type=Path)
    parser.add_argument("--smoke", action="store_true", help=" ".join(SMOKE) + " (seconds)")
    args = parser.parse_args()
    if args.smoke:
        args = parser.parse_args([*SMOKE, *sys.argv[1:]])
    on_cuda = args.device == "cuda"
    images = args.images or (10_000 if on_cuda else 2_000)
    epochs = args.epochs or (6 if on_cuda else 4)
    cfg = TrialConfig(
        model=REPORT_TABLE1 if on_cuda else SMALL,
        train=TrainConfig(lr=2e-3, epochs=epochs, batch_size=256, scheduler="onecycle"),
        augment=AugmentConfig(),
    )
    root = args.data_dir or Path(tempfile.mkdtemp(prefix="hpo-resume-"))
    write_synthetic(root, train_per_class=images // 10, test_per_class=10)
    recipe = DeviceRecipe.for_device(args.device)
    data = search_data(load_dataset("synthetic", root), recipe.device)
    other_layout = torch.contiguous_format if recipe.channels_last else torch.channels_last
    other = DeviceRecipe(recipe.device, recipe.autocast_dtype, other_layout)
    print(
        f"bench/resume.py --device {args.device}: {images} images, {epochs} epochs, resumed "
        f"after epoch {args.resume_after}, compile {args.compile}, layout "
        f"{'channels_last' if recipe.channels_last else 'contiguous'}, autocast "
        f"{recipe.autocast_dtype}"
    )
    straight, _ = train(cfg, data, recipe, args.compile)
    again, _ = train(cfg, data, recipe, args.compile)
    head, state = train(cfg, data, recipe, args.compile, until=args.resume_after)
    same, _ = train(cfg, data, recipe, args.compile, state=state)
    moved, _ = train(cfg, data, other, args.compile, state=state)
    runs = {
        "uninterrupted": straight,
        "uninterrupted again": again,
        "resumed": head + same,
        "resumed, other layout": head + moved,
    }
    for name, losses in runs.items():
        drift = max(abs(a - b) for a, b in zip(losses, straight, strict=True))
        shown = " ".join(f"{loss:.5f}" for loss in losses)
        print(f"{name:>22}: val loss {shown}  max |diff| {drift:.2e}")


if __name__ == "__main__":
    main()
