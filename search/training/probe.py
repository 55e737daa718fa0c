"""The GPU probe that prices a study in hours: the real Trainer on Table 1, measured. The
command that prints the cost hands it to the rules (search/rules/cost.py), which need no torch."""

from __future__ import annotations

import time

import torch

from model.config import REPORT_TABLE1, ModelConfig
from model.flops import train_flops_per_image
from model.network import build_model
from search.rules.config import TrainConfig
from search.training.trainer import DeviceRecipe, Trainer


def gpu_rate() -> tuple[str, float]:
    """This machine's first CUDA GPU by name, and its train FLOP/s on Table 1."""
    device = torch.device("cuda")
    return torch.cuda.get_device_name(device), probe_flops_per_s(device)


def probe_flops_per_s(
    device: torch.device, model: ModelConfig = REPORT_TABLE1, batch_size: int = 256, steps: int = 8
) -> float:
    """Train FLOP/s of `device` on `model` with the real Trainer, eager, after a warm-up that
    pays cuDNN's kernel choice. Small networks reach less of the device: a lower bound."""
    torch.manual_seed(0)
    train = TrainConfig(batch_size=batch_size, epochs=1, scheduler="constant")
    recipe = DeviceRecipe.for_device(device)
    trainer = Trainer(build_model(model), train, steps, recipe, compile_mode="off")
    batch = (
        torch.rand(batch_size, 3, 32, 32, device=device),
        torch.randint(0, 10, (batch_size,), device=device),
    )
    trainer.train_epoch([batch] * 2)
    start = time.perf_counter()
    images = trainer.train_epoch([batch] * steps).images  # ends reading the loss: synchronised
    seconds = time.perf_counter() - start
    del trainer
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the workers that follow need the memory
    return train_flops_per_image(model) * images / seconds
