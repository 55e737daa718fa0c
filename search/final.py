"""`hpo train`: train one config from scratch on train+validation and test it once."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from optuna.artifacts import FileSystemArtifactStore, upload_artifact

from data import ImageSet, full_train_loader, test_loader
from model import build_model, count_parameters
from search.config import TrialConfig
from search.study import StudyError, join
from search.trainer import EpochStats, Trainer
from storage import StorageURLError, open_storage

# Study user attribute: the latest `hpo train` of a config exported from this study.
FINAL_ATTR = "hpo:final"
FINAL_FILES = ("model.pt", "metrics.json")


def train_final(
    cfg: TrialConfig,
    images: ImageSet,
    device: torch.device,
    output_dir: Path,
    epochs: int | None = None,
    on_epoch: Callable[[EpochStats], None] | None = None,
) -> dict[str, Any]:
    """Train, evaluate on the test set, save weights and metrics; returns the metrics."""
    if epochs is not None:
        cfg = replace(cfg, train=replace(cfg.train, epochs=epochs))
    torch.manual_seed(0)
    model = build_model(cfg.model)
    train = full_train_loader(images, cfg.train.batch_size, device, cfg.augment)
    trainer = Trainer(model, cfg.train, len(train), device)
    # Batches arrive in the layout the trainer picked for this device.
    channels_last = trainer.memory_format == torch.channels_last
    train.channels_last = channels_last
    history = []
    for stats in trainer.fit(train, None):
        history.append(stats)
        if on_epoch is not None:
            on_epoch(stats)
    test_loss, test_acc = trainer.evaluate(test_loader(images, device, channels_last=channels_last))
    metrics = {
        "test_acc": test_acc,
        "test_loss": test_loss,
        "epochs": cfg.train.epochs,
        "train_images": train.num_samples,
        "params": count_parameters(model),
        "train_loss": [round(s.train_loss, 5) for s in history],
        "images_per_s": round(sum(s.images_per_s for s in history) / len(history), 1),
    }
    _save(output_dir, cfg, trainer, metrics)
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
        FINAL_ATTR,
        {
            "trial": source.get("trial"),
            "test_acc": metrics["test_acc"],
            "epochs": metrics["epochs"],
            "artifacts": ids,
        },
    )
    return f"attached {' and '.join(FINAL_FILES)} to study {name!r} (artifacts in {artifacts})"
