"""Which GPUs this process may use, as the scheduler and --gpus name them. Torch-free at
import: torch (which loads CUDA, seconds) is asked only where a GPU can be there."""

from __future__ import annotations

import os
import re
from pathlib import Path


class GpuSpecError(ValueError):
    """A --gpus value that names no usable GPU."""


def visible_gpu_count() -> int:
    """How many CUDA GPUs this process may use: the one place torch is asked."""
    import torch  # counting GPUs loads CUDA; only --gpus asks for it

    return torch.cuda.device_count()


def visible_gpus() -> list[str]:
    """This process's GPUs by the names a child's CUDA_VISIBLE_DEVICES must give them.

    A scheduler (Slurm --gres, the Kubernetes device plugin) or a user narrows a job to some
    GPUs with CUDA_VISIBLE_DEVICES, as indices, GPU UUIDs or MIG UUIDs; a child must name its
    GPU as the parent sees it, not by the index CUDA renumbered it to. CUDA stops reading the
    list at the first entry that names no device, hence the count from torch.
    """
    count = visible_gpu_count()
    given = os.environ.get("CUDA_VISIBLE_DEVICES")
    if given is None:
        return [str(i) for i in range(count)]
    return [name.strip() for name in given.split(",") if name.strip()][:count]


def worker_gpu() -> str:
    """The GPU a worker trains on, as its name and its trials show it: the first it may see
    (the one `cuda` means), by its CUDA_VISIBLE_DEVICES name with characters other than
    letters, digits, '.', '-' and '_' made '_'; "cpu" where none is visible (a value such as
    -1 or Slurm's NoDevFiles, or no driver)."""
    names = visible_gpus()
    return re.sub(r"[^A-Za-z0-9._-]", "_", names[0]) if names else "cpu"


def parse_gpus(spec: str | None) -> list[int] | None:
    """'all' or a comma list of indices into this process's GPUs (0 = the first it may see);
    None leaves the device to each worker."""
    if spec is None:
        return None
    visible = visible_gpu_count()
    if visible == 0:
        raise GpuSpecError(
            f"--gpus {spec}: no CUDA GPU is visible here; leave out --gpus to train on the CPU"
        )
    if spec == "all":
        return list(range(visible))
    gpus = [part.strip() for part in spec.split(",") if part.strip()]
    if not gpus or not all(gpu.isdigit() for gpu in gpus):
        raise GpuSpecError(f"--gpus {spec!r}: expected 'all' or indices like 0,1,2")
    if any(int(gpu) >= visible for gpu in gpus):
        raise GpuSpecError(
            f"--gpus {spec}: this job may use {visible} GPU(s), indices 0-{visible - 1} "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})"
        )
    if len(set(gpus)) != len(gpus):
        raise GpuSpecError(f"--gpus {spec!r}: a GPU is listed twice; use --jobs-per-gpu instead")
    return [int(gpu) for gpu in gpus]


def gpu_names(indices: list[int] | None) -> list[str] | None:
    """The CUDA_VISIBLE_DEVICES entry for a child on each of `indices` (see visible_gpus)."""
    if indices is None:
        return None
    names = visible_gpus()
    return [names[index] for index in indices]


def cuda_is_here() -> bool:
    """Whether a CUDA GPU is visible. The driver and CUDA_VISIBLE_DEVICES are asked first, so
    a machine that cannot have one never imports torch (loading CUDA costs seconds)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES") in ("", "-1"):
        return False
    if not (Path("/proc/driver/nvidia").exists() or Path("/dev/nvidiactl").exists()):
        return False
    import torch

    return torch.cuda.is_available()
