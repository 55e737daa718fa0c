"""One trial: sample a config, build the Backbone, train it, report validation loss, prune."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import optuna
import torch
from optuna.exceptions import UpdateFinishedTrialError

from data import RunData
from model import count_parameters
from search import attrs
from search.checkpoints import CheckpointStore
from search.config import TrialConfig
from search.run import Run, start_run
from search.settings import StudySettings
from search.space import sample_config
from search.trainer import DEFAULT_COMPILE_MODE, DeviceRecipe, EpochStats
from storage import StorageUnavailable


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
    data: RunData  # the train/validation split on the device, made once per worker
    recipe: DeviceRecipe
    worker: WorkerInfo
    checkpoints: CheckpointStore | None = None
    on_epoch: Callable[[optuna.Trial, EpochStats], None] | None = None
    stop: threading.Event | None = None
    compile_mode: str = DEFAULT_COMPILE_MODE
    say: Callable[[str], None] = print  # warnings for the worker's log

    def __call__(self, trial: optuna.Trial) -> float:
        cfg = sample_config(trial, self.settings.search_space(), self.settings.epochs)
        run = start_run(
            cfg,
            self.data,
            self.recipe,
            seed=self.settings.seed + trial.number,
            compile_mode=self.compile_mode,
            state=self._checkpoint(trial),
        )
        self._describe(trial, cfg, count_parameters(run.trainer.model))
        self._forget_epochs_past(trial, run.trainer.epoch)
        try:
            return self._train(trial, run)
        except (TrialInterrupted, StorageUnavailable, UpdateFinishedTrialError):
            raise  # stopped, storage gone, or taken over: its retry resumes from the checkpoint
        except Exception:
            # Pruned, or failed for good: a Table 1 checkpoint is ~225 MB nobody will read.
            self._discard_checkpoint(trial)
            raise

    def _discard_checkpoint(self, trial: optuna.Trial) -> None:
        """Best effort: a failure here (an outage) must not hide why the trial ended."""
        if self.checkpoints is None:
            return
        try:
            self.checkpoints.discard(trial)
        except Exception as err:
            self.say(f"trial {trial.number}: checkpoint not discarded ({type(err).__name__})")

    def _train(self, trial: optuna.Trial, run: Run) -> float:
        best = float("inf")
        for stats in run.trainer.fit(run.train, run.held_out):
            best = min(best, stats.val_loss)
            self._record_epoch(trial, stats, best)
            if self.checkpoints is not None:
                self.checkpoints.save(trial, run.trainer.state_dict())
            if self.stop is not None and self.stop.is_set():
                raise TrialInterrupted(f"stopped after epoch {stats.epoch}")
            # After the last epoch there is nothing left to save by pruning.
            if stats.epoch < run.trainer.cfg.epochs and trial.should_prune():
                raise optuna.TrialPruned(f"pruned after epoch {stats.epoch}")
        return best

    def _describe(self, trial: optuna.Trial, cfg: TrialConfig, params: int) -> None:
        trial.set_user_attr(attrs.CONFIG, cfg.to_dict())
        trial.set_user_attr(attrs.ARCHITECTURE, describe_architecture(cfg))
        trial.set_user_attr(attrs.PARAMS, params)
        trial.set_user_attr(attrs.DEVICE, device_name(self.recipe.device))
        trial.set_user_attr(attrs.HOST, self.worker.host)
        trial.set_user_attr(attrs.GPU, self.worker.gpu)
        trial.set_user_attr(attrs.WORKER, self.worker.name)

    def _checkpoint(self, trial: optuna.Trial) -> dict | None:
        """A retried trial's checkpoint; None (start at epoch 1) when it has none here."""
        state = self.checkpoints.load(trial) if self.checkpoints is not None else None
        if state is not None:
            trial.set_user_attr(attrs.RESUMED_FROM_EPOCH, state["epoch"])
        return state

    def _forget_epochs_past(self, trial: optuna.Trial, epoch: int) -> None:
        """Epochs the failed trial ran past its checkpoint are run (and logged) again."""
        done = trial.user_attrs.get(attrs.EPOCHS, [])
        if len(done) > epoch:
            trial.set_user_attr(attrs.EPOCHS, done[:epoch])

    def _record_epoch(self, trial: optuna.Trial, stats: EpochStats, best: float) -> None:
        trial.report(stats.val_loss, stats.epoch)
        epochs = trial.user_attrs.get(attrs.EPOCHS, [])
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
        trial.set_user_attr(attrs.EPOCHS, epochs)
        trial.set_user_attr(attrs.BEST_VAL_LOSS, best)
        trial.set_user_attr(attrs.VAL_ACC, max(e["val_acc"] for e in epochs))
        trial.set_user_attr(attrs.IMAGES_PER_S, round(stats.images_per_s, 1))
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
