"""A finished trial's memory, given back before the next trial starts; what an OOM had.

A trial's model, optimizer and activations are freed only once nothing refers to them: a
traceback still does inside the `except` that caught the trial's error, and reference cycles
(compiled code, autograd graphs) wait for the collector. So the worker releases memory after
`run_trial` has returned, whatever the trial did; freeing inside the handler returns nothing.
"""

from __future__ import annotations

import gc

import torch

from search.training.trainer import forget_compiled

GIB = 2**30


def release_trial_memory() -> None:
    """Give back what the last trial held: compiled graphs and CUDA-graph pools (where it
    compiled), unreachable cycles, and the CUDA allocator's cached blocks, so the next trial,
    and another process sharing the GPU, can have them."""
    forget_compiled()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()  # the next trial's peak is its own


def memory_note(device: torch.device) -> str:
    """What the device had when a trial ran out of memory, in one phrase."""
    if device.type != "cuda":
        return f"on {device.type}"
    free, total = torch.cuda.mem_get_info(device)
    peak = torch.cuda.max_memory_allocated(device)
    return (
        f"{free / GIB:.1f} of {total / GIB:.1f} GiB free on {torch.cuda.get_device_name(device)}, "
        f"the trial's peak {peak / GIB:.1f} GiB"
    )
