"""`hpo train`: train one config from scratch on train+validation and test it once."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from optuna.artifacts import FileSystemArtifactStore, upload_artifact

from data import ImageSet, final_data, load_dataset
from model import count_parameters
from search import attrs
from search.checkpoints import artifact_dir
from search.config import TrialConfig, load_config_file
from search.progress import SearchProgress, format_epoch
from search.run import pick_device, start_run
from search.study import StudyError, join
from search.trainer import DeviceRecipe, EpochStats, Trainer
from storage import StorageURLError, backend_of, open_storage

FINAL_FILES = ("model.pt", "metrics.json")


@dataclass(frozen=True)
class FinalRequest:
    """What `hpo train` was asked: a config file, and where to train and write it."""

    config: Path
    dataset: str
    output_dir: Path
    storage: str
    epochs: int | None = None  # the config's own if None
    data_dir: Path | None = None
    artifact_dir: Path | None = None


def run_final(request: FinalRequest, progress: SearchProgress) -> dict[str, Any]:
    """`hpo train`: train the config, test it, write and attach the weights and metrics."""
    cfg, document = load_config_file(request.config)
    if request.epochs is not None:
        cfg = cfg.with_epochs(request.epochs)
    backend_of(request.storage)  # a malformed URL fails now, not after the training
    if cfg.train.scheduler == "plateau" and not cfg.train.lr_by_epoch:
        progress.say("plateau schedule without lr_by_epoch: it watches the training loss")
    images = load_dataset(request.dataset, request.data_dir)
    recipe = DeviceRecipe.for_device(pick_device(progress.say))
    epochs = cfg.train.epochs
    metrics = train_final(
        cfg,
        images,
        recipe,
        request.output_dir,
        on_epoch=lambda stats: progress.say(format_epoch("final", stats, epochs)),
    )
    progress.say(f"test accuracy {metrics['test_acc']:.2%} (test loss {metrics['test_loss']:.4f})")
    progress.say(
        f"wrote {request.output_dir / 'model.pt'} and {request.output_dir / 'metrics.json'}"
    )
    artifacts = artifact_dir(request.artifact_dir, request.storage)
    source = document.get("source") or {}
    progress.say(attach_to_study(request.storage, artifacts, source, request.output_dir, metrics))
    return metrics


def train_final(
    cfg: TrialConfig,
    images: ImageSet,
    recipe: DeviceRecipe,
    output_dir: Path,
    on_epoch: Callable[[EpochStats], None] | None = None,
) -> dict[str, Any]:
    """Train, evaluate on the test set, save weights and metrics; returns the metrics."""
    run = start_run(cfg, final_data(images, recipe.device), recipe, seed=0)
    history = []
    for stats in run.trainer.fit(run.train, None):
        history.append(stats)
        if on_epoch is not None:
            on_epoch(stats)
    test_loss, test_acc = run.trainer.evaluate(run.held_out)
    metrics = {
        "test_acc": test_acc,
        "test_loss": test_loss,
        "epochs": cfg.train.epochs,
        "train_images": run.train.num_samples,
        "params": count_parameters(run.trainer.model),
        "train_loss": [round(s.train_loss, 5) for s in history],
        "images_per_s": round(sum(s.images_per_s for s in history) / len(history), 1),
    }
    _save(output_dir, cfg, run.trainer, metrics)
    return metrics


def _save(output_dir: Path, cfg: TrialConfig, trainer: Trainer, metrics: dict[str, Any]) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    torch.save(
        {"config": cfg.to_dict(), "state_dict": trainer.model.state_dict()}, output_dir / "model.pt"
    )
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")


def attach_to_study(
    storage_url: str,
    artifacts: Path,
    source: dict[str, Any],
    output_dir: Path,
    metrics: dict[str, Any],
) -> str:
    """Keep the final weights and metrics as artifacts of the study the config came from,
    where the dashboard lists them. Returns one line saying where, or why not."""
    name = source.get("study")
    if not name:
        return "not attached to a study: the config names none"
    try:
        # The reader open refuses a missing SQLite file instead of creating an empty one.
        join(open_storage(storage_url, reader=True), name)
        study = join(open_storage(storage_url), name)
    except (StorageURLError, StudyError) as err:
        return f"not attached to study {name!r}: {err}"
    artifacts.mkdir(parents=True, exist_ok=True)
    store = FileSystemArtifactStore(str(artifacts))
    ids = {
        file: upload_artifact(
            artifact_store=store, file_path=str(output_dir / file), study_or_trial=study
        )
        for file in FINAL_FILES
    }
    study.set_user_attr(
        attrs.FINAL,
        {
            "trial": source.get("trial"),
            "test_acc": metrics["test_acc"],
            "epochs": metrics["epochs"],
            "artifacts": ids,
        },
    )
    return f"attached {' and '.join(FINAL_FILES)} to study {name!r} (artifacts in {artifacts})"
