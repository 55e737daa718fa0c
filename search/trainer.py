"""The training loop: AdamW + cross-entropy, one of five LR schedules, bf16 on CUDA.

The trainer is handed loaders (iterables of device tensors); it never imports `data`.
Losses stay on the device during an epoch and are read once at its end, so a step
never waits for the host.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from search.config import TrainConfig

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]
# Schedules that move every step; the others move once per epoch.
PER_STEP_SCHEDULERS = ("onecycle", "cosine")


class DivergedError(RuntimeError):
    """The training loss became NaN or infinite."""


@dataclass(frozen=True)
class EpochStats:
    epoch: int  # 1-based
    train_loss: float
    val_loss: float | None
    val_acc: float | None
    seconds: float
    images_per_s: float
    lr: float


class Trainer:
    def __init__(
        self, model: nn.Module, cfg: TrainConfig, steps_per_epoch: int, device: torch.device
    ):
        self.cfg = cfg
        self.device = device
        on_cuda = device.type == "cuda"
        memory_format = torch.channels_last if on_cuda else torch.preserve_format
        self.model = model.to(device, memory_format=memory_format)
        self.optimizer = torch.optim.AdamW(
            model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=on_cuda
        )
        self.scheduler = _build_scheduler(self.optimizer, cfg, steps_per_epoch)
        self.autocast_dtype = torch.bfloat16 if on_cuda else None
        self.epoch = 0

    def fit(self, train: Batches, val: Batches | None) -> Iterator[EpochStats]:
        """Train up to cfg.epochs, yielding after each epoch (the caller may stop early)."""
        while self.epoch < self.cfg.epochs:
            start = time.perf_counter()
            train_loss, images = self.train_epoch(train)
            train_seconds = time.perf_counter() - start
            val_loss, val_acc = self.evaluate(val) if val is not None else (None, None)
            self._end_epoch(val_loss if val_loss is not None else train_loss)
            yield EpochStats(
                epoch=self.epoch,
                train_loss=train_loss,
                val_loss=val_loss,
                val_acc=val_acc,
                seconds=time.perf_counter() - start,
                images_per_s=images / train_seconds,
                lr=self.optimizer.param_groups[0]["lr"],
            )

    def train_epoch(self, batches: Batches) -> tuple[float, int]:
        self.model.train()
        loss_sum = torch.zeros((), device=self.device)
        images = 0
        for x, y in batches:
            with self._autocast():
                loss = F.cross_entropy(self.model(x), y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.cfg.grad_clip > 0:
                # Clipped by value, as in the tutorial code the report's grad_clip=0.1 comes from.
                nn.utils.clip_grad_value_(self.model.parameters(), self.cfg.grad_clip)
            self.optimizer.step()
            if self.cfg.scheduler in PER_STEP_SCHEDULERS:
                self.scheduler.step()
            loss_sum += loss.detach().float() * len(y)
            images += len(y)
        mean_loss = loss_sum.item() / max(images, 1)
        if not math.isfinite(mean_loss):
            raise DivergedError(f"training loss is {mean_loss} in epoch {self.epoch + 1}")
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return mean_loss, images

    @torch.no_grad()
    def evaluate(self, batches: Batches) -> tuple[float, float]:
        """Mean cross-entropy and accuracy over all batches."""
        self.model.eval()
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        images = 0
        for x, y in batches:
            with self._autocast():
                logits = self.model(x)
            loss_sum += F.cross_entropy(logits.float(), y, reduction="sum")
            correct += (logits.argmax(dim=1) == y).sum()
            images += len(y)
        return loss_sum.item() / max(images, 1), correct.item() / max(images, 1)

    def _end_epoch(self, monitored_loss: float) -> None:
        self.epoch += 1
        if self.cfg.scheduler == "plateau":
            self.scheduler.step(monitored_loss)
        elif self.cfg.scheduler == "step":
            self.scheduler.step()

    def _autocast(self) -> Any:
        return torch.autocast(
            self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.epoch = state["epoch"]


def _build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int
) -> Any:
    args = cfg.scheduler_args
    total_steps = max(cfg.epochs * steps_per_epoch, 1)
    if cfg.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, factor=args.get("factor", 0.1), patience=int(args.get("patience", 10))
        )
    if cfg.scheduler == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=cfg.lr, total_steps=total_steps, pct_start=args.get("pct_start", 0.25)
        )
    if cfg.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=total_steps, eta_min=cfg.lr * args.get("min_lr_ratio", 0.01)
        )
    if cfg.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(
            optimizer, step_size=int(args.get("step_size", 1)), gamma=args.get("gamma", 0.1)
        )
    return None
