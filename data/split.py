"""A deterministic, stratified train/validation split."""

from __future__ import annotations

import torch


def stratified_split(
    labels: torch.Tensor, val_fraction: float = 0.1, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted (train_idx, val_idx); class c gives round(n_c * val_fraction) images to val.

    CIFAR-10's 50,000 training images give 45,000 / 5,000, with 500 of each class in val.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    labels = torch.as_tensor(labels, dtype=torch.int64).cpu()
    generator = torch.Generator().manual_seed(seed)
    # A random order, then grouped by class (stable sort keeps the random order inside a class):
    # the first round(n_c * val_fraction) of each class go to validation.
    order = torch.randperm(len(labels), generator=generator)
    order = order[torch.sort(labels[order], stable=True).indices]
    counts = torch.bincount(labels)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(len(labels)) - starts.repeat_interleave(counts)
    n_val = torch.round(counts * val_fraction).long().repeat_interleave(counts)
    is_val = rank < n_val
    return order[~is_val].sort().values, order[is_val].sort().values
