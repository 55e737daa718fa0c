"""One training run, set up the same way for a search trial and for the final training."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from data.augment import evaluation_views
from data.loader import DeviceLoader, RunData
from model.network import build_model
from search.rules.config import DEFAULT_COMPILE_MODE, TrialConfig
from search.training.compile_policy import CompilePolicy
from search.training.trainer import DeviceRecipe, Trainer


@dataclass
class Run:
    trainer: Trainer
    train: DeviceLoader
    held_out: DeviceLoader  # validation in a trial, test in the final run


def start_run(
    cfg: TrialConfig,
    data: RunData,
    recipe: DeviceRecipe,
    seed: int,
    compile_mode: str = DEFAULT_COMPILE_MODE,
    state: dict[str, Any] | None = None,
    compile_policy: CompilePolicy | None = None,
    calibrated_score: bool = False,
) -> Run:
    """Model, loaders and Trainer for `cfg`; resumed from `state` (a checkpoint) if given.

    The loaders follow the recipe's memory format and start at the checkpoint's epoch, so a
    resumed run sees the batches the uninterrupted one would have.
    """
    torch.manual_seed(seed)
    model = build_model(cfg.model)
    epoch = state["epoch"] if state is not None else 0
    train, held_out = data.loaders(
        cfg.train.batch_size,
        cfg.augment,
        seed=seed,
        epoch=epoch,
        channels_last=recipe.channels_last,
        num_classes=cfg.model.num_classes,
    )
    views = None
    if cfg.augment.tta != "none":
        views = partial(evaluation_views, mode=cfg.augment.tta, black=held_out.black)
    trainer = Trainer(
        model,
        cfg.train,
        len(train),
        recipe,
        compile_mode,
        compile_policy=compile_policy,
        eval_views=views,
        calibrated_score=calibrated_score,
    )
    if state is not None:
        trainer.load_state_dict(state)
    return Run(trainer=trainer, train=train, held_out=held_out)


def pick_device(say: Callable[[str], None]) -> torch.device:
    """CUDA where there is one (CUDA_VISIBLE_DEVICES picks which), else the CPU, said once."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    say("CUDA is not available: training on the CPU (slow)")
    return torch.device("cpu")
