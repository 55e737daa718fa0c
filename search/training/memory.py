"""A finished trial's memory, given back before the next trial starts; what an OOM had.

A trial's model, optimizer and activations are freed only once nothing refers to them: a
traceback still does inside the `except` that caught the trial's error, and reference cycles
(compiled code, autograd graphs) wait for the collector. So the worker releases memory after
`run_trial` has returned, whatever the trial did; freeing inside the handler returns nothing.

torch is imported only where a trial loaded it: the worker loop imports this module, and a
loop whose objective trains nothing (bench/fleet.py's) has no device memory to give back.
"""

from __future__ import annotations

import gc
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

GIB = 2**30


def release_trial_memory() -> None:
    """Give back what the last trial held: compiled graphs and CUDA-graph pools (where it
    compiled), unreachable cycles, and the CUDA allocator's cached blocks, so the next trial,
    and another process sharing the GPU, can have them."""
    if "torch" not in sys.modules:
        return  # no trial of this process trained
    import torch

    from search.training.trainer import forget_compiled

    forget_compiled()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()  # the next trial's peak is its own


def memory_note(device: torch.device) -> str:
    """What the device had when a trial ran out of memory, in one phrase."""
    import torch

    if device.type != "cuda":
        return f"on {device.type}"
    free, total = torch.cuda.mem_get_info(device)
    peak = torch.cuda.max_memory_allocated(device)
    return (
        f"{free / GIB:.1f} of {total / GIB:.1f} GiB free on {torch.cuda.get_device_name(device)}, "
        f"the trial's peak {peak / GIB:.1f} GiB"
    )


def device_out_of_memory() -> type[BaseException]:
    """The error of a trial that ran out of device memory: torch's, where a trial loaded
    torch; else one nothing raises (an objective that trains nothing has no device)."""
    torch = sys.modules.get("torch")
    return torch.OutOfMemoryError if torch is not None else _NoDevice


class _NoDevice(Exception):
    """Never raised: what `device_out_of_memory` names in a process without torch."""
