"""Whole-batch augmentation on (B, C, H, W) tensors: a few tensor ops, no per-image Python.

Everything runs on the images' device. Random draws come from a torch.Generator (on its own
device), so a seed replays the same flips, shifts and angles.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .augment_config import AugmentConfig


def flip_batch(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mirror left-right the images where `mask` (B,) is true."""
    return torch.where(mask.view(-1, 1, 1, 1), x.flip(-1), x)


def translate_batch(x: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """Move image b's content dx[b] pixels right and dy[b] down, filling the gap with 0.

    The same as a crop from the zero-padded image; done as two gathers, one per axis.
    """
    b, c, h, w = x.shape
    rows = torch.arange(h, device=x.device) - dy.view(-1, 1)  # source row for each output row
    cols = torch.arange(w, device=x.device) - dx.view(-1, 1)
    out = x.gather(2, rows.clamp(0, h - 1).view(b, 1, h, 1).expand(b, c, h, w))
    out = out.gather(3, cols.clamp(0, w - 1).view(b, 1, 1, w).expand(b, c, h, w))
    inside = ((rows >= 0) & (rows < h)).view(b, 1, h, 1) & ((cols >= 0) & (cols < w)).view(
        b, 1, 1, w
    )
    return torch.where(inside, out, torch.zeros((), dtype=x.dtype, device=x.device))


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


def augment_batch(x: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Per image: maybe mirror, shift by up to crop_padding pixels, rotate by a random angle."""
    n = x.shape[0]
    if cfg.flip:
        x = flip_batch(x, _uniform(n, generator, x.device) < 0.5)
    if cfg.crop_padding:
        shift = _shifts(n, cfg.crop_padding, generator, x.device)
        x = translate_batch(x, shift[0], shift[1])
    if cfg.rotation_degrees:
        angle = (2 * _uniform(n, generator, x.device) - 1) * cfg.rotation_degrees
        x = rotate_batch(x, angle.to(x.dtype))
    return x


def _uniform(n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.rand(n, generator=generator, device=generator.device).to(device)


def _shifts(n: int, padding: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """(2, n) integer shifts in [-padding, padding]: a crop offset from the padded image."""
    drawn = torch.randint(0, 2 * padding + 1, (2, n), generator=generator, device=generator.device)
    return (drawn - padding).to(device)
