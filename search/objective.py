"""One trial: sample a config, build the Backbone, train it, report validation loss, prune."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import optuna
import torch

from data import DeviceLoader, ImageSet, make_loaders
from model import build_model, count_parameters
from search.checkpoints import CheckpointStore
from search.config import TrialConfig
from search.settings import StudySettings
from search.space import sample_config
from search.trainer import EpochStats, Trainer


class TrialInterrupted(Exception):
    """A stop was requested; the trial's last epoch is checkpointed and it should be retried."""


@dataclass(frozen=True)
class WorkerInfo:
    name: str  # unique per worker process, seeds its sampler
    host: str
    gpu: str  # CUDA_VISIBLE_DEVICES of the worker, or "cpu"


@dataclass
class TrialRunner:
    """Callable objective holding what a worker keeps between trials."""

    settings: StudySettings
    images: ImageSet
    device: torch.device
    worker: WorkerInfo
    checkpoints: CheckpointStore | None = None
    on_epoch: Callable[[optuna.Trial, EpochStats], None] | None = None
    stop: threading.Event | None = None
    compile_mode: str = "auto"

    def __call__(self, trial: optuna.Trial) -> float:
        cfg = sample_config(trial, self.settings.search_space(), self.settings.epochs)
        model = build_model(cfg.model)
        self._describe(trial, cfg, count_parameters(model))
        train, val = make_loaders(
            self.images,
            cfg.train.batch_size,
            self.device,
            cfg.augment,
            seed=self.settings.seed + trial.number,
        )
        trainer = Trainer(model, cfg.train, len(train), self.device, self.compile_mode)
        # Batches arrive in the layout the trainer picked for this device.
        train.channels_last = val.channels_last = trainer.memory_format == torch.channels_last
        self._resume(trial, trainer)
        # A resumed trial's next epoch sees the batches it would have seen without the crash.
        train.epoch = trainer.epoch
        try:
            return self._train(trial, trainer, train, val)
        except TrialInterrupted:
            raise  # its retry resumes from the checkpoint
        except Exception:
            # Pruned, or failed for good: a Table 1 checkpoint is ~225 MB nobody will read.
            if self.checkpoints is not None:
                self.checkpoints.discard(trial)
            raise

    def _train(
        self, trial: optuna.Trial, trainer: Trainer, train: DeviceLoader, val: DeviceLoader
    ) -> float:
        best = float("inf")
        for stats in trainer.fit(train, val):
            best = min(best, stats.val_loss)
            self._record_epoch(trial, stats, best)
            if self.checkpoints is not None:
                self.checkpoints.save(trial, trainer.state_dict())
            if self.stop is not None and self.stop.is_set():
                raise TrialInterrupted(f"stopped after epoch {stats.epoch}")
            # After the last epoch there is nothing left to save by pruning.
            if stats.epoch < trainer.cfg.epochs and trial.should_prune():
                raise optuna.TrialPruned(f"pruned after epoch {stats.epoch}")
        return best

    def _describe(self, trial: optuna.Trial, cfg: TrialConfig, params: int) -> None:
        trial.set_user_attr("config", cfg.to_dict())
        trial.set_user_attr("architecture", describe_architecture(cfg))
        trial.set_user_attr("params", params)
        trial.set_user_attr("device", device_name(self.device))
        trial.set_user_attr("host", self.worker.host)
        trial.set_user_attr("gpu", self.worker.gpu)
        trial.set_user_attr("worker", self.worker.name)

    def _resume(self, trial: optuna.Trial, trainer: Trainer) -> None:
        """Continue a retried trial from its checkpoint; epoch 1 when it has none here."""
        state = self.checkpoints.load(trial) if self.checkpoints is not None else None
        if state is not None:
            trainer.load_state_dict(state)
            trial.set_user_attr("resumed_from_epoch", trainer.epoch)
        # Epochs the failed trial ran past its checkpoint are run (and logged) again.
        done = trial.user_attrs.get("epochs", [])
        if len(done) > trainer.epoch:
            trial.set_user_attr("epochs", done[: trainer.epoch])

    def _record_epoch(self, trial: optuna.Trial, stats: EpochStats, best: float) -> None:
        trial.report(stats.val_loss, stats.epoch)
        epochs = trial.user_attrs.get("epochs", [])
        epochs.append(
            {
                "epoch": stats.epoch,
                "train_loss": round(stats.train_loss, 5),
                "val_loss": round(stats.val_loss, 5),
                "val_acc": round(stats.val_acc, 5),
                "seconds": round(stats.seconds, 3),
                "images_per_s": round(stats.images_per_s, 1),
                "compile_seconds": round(stats.compile_seconds, 2),
            }
        )
        trial.set_user_attr("epochs", epochs)
        trial.set_user_attr("best_val_loss", best)
        trial.set_user_attr("val_acc", max(e["val_acc"] for e in epochs))
        trial.set_user_attr("images_per_s", round(stats.images_per_s, 1))
        if self.on_epoch is not None:
            self.on_epoch(trial, stats)


def describe_architecture(cfg: TrialConfig) -> str:
    m = cfg.model
    chains = " | ".join("-".join(map(str, chain)) for chain in m.channels)
    return (
        f"N={m.n_backbones} K={list(m.blocks)} channels {chains} "
        f"kernel {m.kernel_size} dropout {m.dropout:.2f}"
    )


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"
