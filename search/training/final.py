"""Final training: one config from scratch on all training images, once per seed, each
seed tested once (`hpo train` and `hpo compare` run it)."""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.artifacts import FileSystemArtifactStore, upload_artifact

from data.batches import ImageSet
from data.loader import CIFAR10_MEAN, CIFAR10_STD, final_data
from search.rules import attrs
from search.rules.config import ConfigError, TrialConfig
from search.rules.cost import gflops_per_image, parameter_count
from search.rules.faults import machine_fault_line, write_or_say
from search.rules.study import StudyError, join
from search.training.devices import parse_gpus
from search.training.run import pick_device, start_run
from search.training.trainer import DeviceRecipe
from storage import StorageURLError, open_storage

METRICS_FILE = "metrics.json"

Say = Callable[[str], None]
Stats = tuple[tuple[float, ...], tuple[float, ...]]  # per-channel mean, std


def make_output_dir(folder: Path) -> None:
    """Make the folder results go to, before any training: a bad one is refused at once."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"--output-dir {folder}: {err.strerror or err}") from err
    if not os.access(folder, os.W_OK):
        raise ConfigError(f"--output-dir {folder}: not writable")


def seed_devices(gpus: str | None, say: Say) -> list[torch.device]:
    """The devices seeds train on: the listed GPUs, else this process's device."""
    indices = parse_gpus(gpus)  # refuses --gpus where no CUDA GPU is visible
    if indices is None:
        return [pick_device(say)]
    return [torch.device(f"cuda:{index}") for index in indices]


def train_seeds(
    cfg: TrialConfig,
    images: ImageSet,
    seeds: Iterable[int],
    output_dir: Path,
    devices: list[torch.device],
    say: Say = print,
    stats: Stats = (CIFAR10_MEAN, CIFAR10_STD),
) -> dict[str, Any]:
    """Train and test `cfg` once per seed; write one weights file per seed and metrics.json
    with every seed. One device: seeds one after another in this process; several: side by
    side, one process per device. `stats`: the data's per-channel mean and std."""
    output_dir.mkdir(parents=True, exist_ok=True)
    seeds = list(seeds)
    if len(devices) == 1:
        recipe = DeviceRecipe.for_device(devices[0])
        runs = [train_seed(cfg, images, recipe, seed, output_dir, say, stats) for seed in seeds]
    else:
        runs = _side_by_side(cfg, images, seeds, output_dir, devices, stats)
    metrics = {
        "epochs": cfg.train.epochs,
        "train_images": len(images.train_labels),
        "test_images": len(images.test_labels),
        "params": parameter_count(cfg.model),
        "train_gflop_per_image": gflops_per_image(cfg.model),
        "test_acc": mean_std([run["test_acc"] for run in runs]),
        "test_loss": mean_std([run["test_loss"] for run in runs]),
        "seeds": runs,
        "config": cfg.to_dict(),
    }
    text = json.dumps(metrics, indent=2) + "\n"
    if not write_or_say(output_dir / METRICS_FILE, lambda file: file.write(text.encode()), say):
        metrics["unwritten"] = [METRICS_FILE]
    return metrics


def train_seed(
    cfg: TrialConfig,
    images: ImageSet,
    recipe: DeviceRecipe,
    seed: int,
    output_dir: Path,
    say: Say,
    stats: Stats = (CIFAR10_MEAN, CIFAR10_STD),
) -> dict[str, Any]:
    """One seed: train on all training images, test in full precision, save the weights."""
    run = start_run(cfg, final_data(images, recipe.device, stats), recipe, seed=seed)
    history = []
    for stats in run.trainer.fit(run.train, None):
        history.append(stats)
        say(stats.line(f"seed {seed}", cfg.train.epochs))
    # fp32, no autocast: the number that is reported is not rounded to bf16 on the way.
    test_loss, test_acc = run.trainer.evaluate(run.held_out, full_precision=True)
    weights = weights_file(seed)
    weights_of = run.trainer.evaluated_model  # the average of the weights, where kept
    state = {"config": cfg.to_dict(), "seed": seed, "state_dict": weights_of.state_dict()}
    # A disk that refuses the weights is said; the seed's test figures still count.
    written = write_or_say(output_dir / weights, lambda file: torch.save(state, file), say)
    return {
        "seed": seed,
        "test_acc": test_acc,
        "test_loss": test_loss,
        "train_seconds": round(sum(s.seconds for s in history), 3),
        "images_per_s": round(statistics.fmean(s.images_per_s for s in history), 1),
        # Per epoch, for the report's Figures 2-4 (hpo train draws them).
        "lr": [s.start_lr for s in history],
        "train_loss": [round(s.train_loss, 5) for s in history],
        "train_acc": [round(s.train_acc, 5) for s in history],
        "device": str(recipe.device),
        "weights": weights if written else None,
    }


def weights_file(seed: int) -> str:
    return f"model-seed{seed}.pt"


def metrics_files(metrics: dict[str, Any], output_dir: Path) -> list[str]:
    """The files a run wrote: its weights, one per seed, metrics.json, then its figures (those
    its disk took: write_or_say removed any it refused)."""
    weights = [run["weights"] for run in metrics["seeds"] if run["weights"]]
    files = [*weights, METRICS_FILE, *metrics.get("figures", [])]
    return [file for file in files if (output_dir / file).is_file()]


def unwritten_files(metrics: dict[str, Any]) -> list[str]:
    """The weights and metrics a run was to write and its disk refused (each said as it
    happened)."""
    weights = [weights_file(run["seed"]) for run in metrics["seeds"] if not run["weights"]]
    return [*weights, *metrics.get("unwritten", [])]


def mean_std(values: list[float]) -> dict[str, float | None]:
    """Mean and sample standard deviation (n - 1); no standard deviation from one value."""
    std = statistics.stdev(values) if len(values) > 1 else None
    return {"mean": statistics.fmean(values), "std": std}


def _side_by_side(
    cfg: TrialConfig,
    images: ImageSet,
    seeds: list[int],
    output_dir: Path,
    devices: list[torch.device],
    stats: Stats,
) -> list[dict[str, Any]]:
    """One process per device, each training its share of the seeds one after another."""
    # Spawned, not forked: CUDA cannot run in a forked child. torch's multiprocessing
    # hands the images over in shared memory instead of copying them through a pipe.
    context = torch.multiprocessing.get_context("spawn")
    with ExitStack() as stack:
        pools = [stack.enter_context(ProcessPoolExecutor(1, mp_context=context)) for _ in devices]
        futures = [
            pools[i % len(pools)].submit(
                _train_seed_in_child, cfg, images, devices[i % len(pools)], seed, output_dir, stats
            )
            for i, seed in enumerate(seeds)
        ]
        return [future.result() for future in futures]


def _train_seed_in_child(
    cfg: TrialConfig,
    images: ImageSet,
    device: torch.device,
    seed: int,
    output_dir: Path,
    stats: Stats,
) -> dict[str, Any]:
    def say(line: str) -> None:
        print(f"{device}| {line}", flush=True)

    recipe = DeviceRecipe.for_device(device)
    return train_seed(cfg, images, recipe, seed, output_dir, say, stats)


def attach_final(
    storage_url: str,
    artifacts: Path,
    source: dict[str, Any],
    output_dir: Path,
    metrics: dict[str, Any],
) -> str:
    """Keep every seed's weights and the metrics as artifacts of the study the config came
    from, where the dashboard lists them. Returns one line saying where, or why not."""
    name = source.get("study")
    if not name:
        return "not attached to a study: the config names none"
    try:
        study = open_for_writing(storage_url, name)
    except (StorageURLError, StudyError) as err:
        return f"not attached to study {name!r}: {err}"
    files = metrics_files(metrics, output_dir)
    try:
        ids = attach_to_study(study, artifacts, [output_dir / file for file in files])
    except OSError as err:  # the machine's fault: the files stay in output_dir
        return f"not attached to study {name!r}: {machine_fault_line(err, 'artifacts', artifacts)}"
    study.set_user_attr(
        attrs.FINAL,
        {
            "trial": source.get("trial"),
            "test_acc": metrics["test_acc"]["mean"],
            "test_acc_std": metrics["test_acc"]["std"],
            "seeds": len(metrics["seeds"]),
            "epochs": metrics["epochs"],
            "artifacts": ids,
        },
    )
    return f"attached {', '.join(files)} to study {name!r} (artifacts in {artifacts})"


def open_for_writing(storage_url: str, name: str) -> optuna.Study:
    # The reader open refuses a missing SQLite file instead of creating an empty one.
    join(open_storage(storage_url, reader=True), name)
    return join(open_storage(storage_url), name)


def attach_to_study(study: optuna.Study, artifacts: Path, files: list[Path]) -> dict[str, str]:
    """Upload `files` as artifacts of `study`; returns file name -> artifact id."""
    artifacts.mkdir(parents=True, exist_ok=True)
    store = FileSystemArtifactStore(str(artifacts))
    return {
        file.name: upload_artifact(artifact_store=store, file_path=str(file), study_or_trial=study)
        for file in files
    }
