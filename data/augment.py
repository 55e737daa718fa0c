"""Whole-batch augmentation on (B, C, H, W) tensors: a few tensor ops, no per-image Python.

Everything runs on the images' device. Random draws come from a torch.Generator (on its own
device), so a seed replays the same flips, shifts, angles and cutouts; mixing draws its one
weight per batch from a seeded NumPy generator on the host (torch has no Beta draw that takes
a generator), so it never waits for the device either.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .augment_config import AugmentConfig


def flip_batch(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mirror left-right the images where `mask` (B,) is true."""
    return torch.where(mask.view(-1, 1, 1, 1), x.flip(-1), x)


def translate_batch(
    x: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor, fill: torch.Tensor | float = 0.0
) -> torch.Tensor:
    """Move image b's content dx[b] pixels right and dy[b] down, filling the gap with `fill`
    (a number, or one per channel shaped (1, C, 1, 1)).

    The same as a crop from the padded image; done as two gathers, one per axis.
    """
    b, c, h, w = x.shape
    rows = torch.arange(h, device=x.device) - dy.view(-1, 1)  # source row for each output row
    cols = torch.arange(w, device=x.device) - dx.view(-1, 1)
    out = x.gather(2, rows.clamp(0, h - 1).view(b, 1, h, 1).expand(b, c, h, w))
    out = out.gather(3, cols.clamp(0, w - 1).view(b, 1, 1, w).expand(b, c, h, w))
    inside = ((rows >= 0) & (rows < h)).view(b, 1, h, 1) & ((cols >= 0) & (cols < w)).view(
        b, 1, 1, w
    )
    return torch.where(inside, out, torch.as_tensor(fill, dtype=x.dtype, device=x.device))


def rotate_batch(x: torch.Tensor, degrees: torch.Tensor | float) -> torch.Tensor:
    """Rotate float images counterclockwise about their centre (bilinear, corners filled with 0).

    Square images only are rotated rigidly: the sampling grid uses normalised coordinates.
    """
    angle = torch.as_tensor(degrees, dtype=x.dtype, device=x.device).expand(x.shape[0])
    radians = angle * (math.pi / 180)
    cos, sin, zero = radians.cos(), radians.sin(), torch.zeros_like(radians)
    # The grid maps output to input coordinates (x right, y down), hence the inverse rotation.
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def cutout_batch(
    x: torch.Tensor, size: int, prob: float, generator: torch.Generator
) -> torch.Tensor:
    """Black out a size x size square at a random centre (it may reach past the border) in a
    `prob` share of the images (DeVries & Taylor 2017): one mask for the whole batch."""
    n, _, h, w = x.shape
    centre = torch.rand(2, n, generator=generator, device=generator.device).to(x.device)
    top = (centre[0] * h).long() - size // 2
    left = (centre[1] * w).long() - size // 2
    rows = torch.arange(h, device=x.device) - top.view(-1, 1)  # row offset inside the square
    cols = torch.arange(w, device=x.device) - left.view(-1, 1)
    cut = (_uniform(n, generator, x.device) < prob).view(n, 1, 1, 1)
    inside = ((rows >= 0) & (rows < size)).view(n, 1, h, 1) & ((cols >= 0) & (cols < size)).view(
        n, 1, 1, w
    )
    return x.masked_fill(inside & cut, 0.0)


def mix_batch(
    x: torch.Tensor,
    labels: torch.Tensor,
    cfg: AugmentConfig,
    num_classes: int,
    generator: torch.Generator,
    weights: np.random.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup (a blend) or cutmix (a pasted box) of each image with another of the batch, in a
    `mix_prob` share of the batches; the targets are the label probabilities mixed the same way.

    One weight per batch, from Beta(alpha, alpha) (Zhang et al. 2018; Yun et al. 2019); an
    unmixed batch gets its one-hot labels, so every batch has the same target type.
    """
    targets = F.one_hot(labels, num_classes).float()
    if weights.random() >= cfg.mix_prob:
        return x, targets
    lam = float(weights.beta(cfg.mix_alpha, cfg.mix_alpha))
    partner = torch.randperm(len(x), generator=generator, device=generator.device).to(x.device)
    if cfg.mix == "mixup":
        x = x.lerp(x[partner], 1 - lam)
    else:
        x, lam = _paste_box(x, x[partner], lam, weights)
    return x, targets.lerp(targets[partner], 1 - lam)


def _paste_box(
    x: torch.Tensor, other: torch.Tensor, lam: float, weights: np.random.Generator
) -> tuple[torch.Tensor, float]:
    """Paste a box of `1 - lam` of the area from `other` (clipped at the border); returns the
    share of `x` left, which weighs the labels."""
    h, w = x.shape[-2:]
    side = math.sqrt(1 - lam)
    cy, cx = int(weights.integers(h)), int(weights.integers(w))
    top, bottom = max(cy - int(h * side / 2), 0), min(cy + int(h * side / 2), h)
    left, right = max(cx - int(w * side / 2), 0), min(cx + int(w * side / 2), w)
    x = x.clone()
    x[..., top:bottom, left:right] = other[..., top:bottom, left:right]
    return x, 1 - (bottom - top) * (right - left) / (h * w)


def evaluation_views(x: torch.Tensor, mode: str, black: torch.Tensor) -> list[torch.Tensor]:
    """The views whose logits are averaged at evaluation (augment_config.TTA_MODES) of a
    normalised batch. `black` is a black pixel normalised (DeviceLoader.black): a shifted view's
    border is black, as a training shift's is (training shifts before normalising)."""
    views = [x] if mode == "none" else [x, x.flip(-1)]
    if mode == "flip_shift":
        n = x.shape[0]
        for dx in (-1, 1):
            shift = torch.full((n,), dx, device=x.device)
            views += [translate_batch(view, shift, shift, black) for view in views[:2]]
    return views


def augment_batch(x: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Per image: maybe mirror, shift by up to crop_padding pixels, rotate by a random angle,
    cut out a square."""
    n = x.shape[0]
    if cfg.flip:
        x = flip_batch(x, _uniform(n, generator, x.device) < 0.5)
    if cfg.crop_padding:
        shift = _shifts(n, cfg.crop_padding, generator, x.device)
        x = translate_batch(x, shift[0], shift[1])
    if cfg.rotation_degrees:
        angle = (2 * _uniform(n, generator, x.device) - 1) * cfg.rotation_degrees
        x = rotate_batch(x, angle.to(x.dtype))
    if cfg.cuts:
        x = cutout_batch(x, cfg.cutout_size, cfg.cutout_prob, generator)
    return x


def _uniform(n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.rand(n, generator=generator, device=generator.device).to(device)


def _shifts(n: int, padding: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """(2, n) integer shifts in [-padding, padding]: a crop offset from the padded image."""
    drawn = torch.randint(0, 2 * padding + 1, (2, n), generator=generator, device=generator.device)
    return (drawn - padding).to(device)
