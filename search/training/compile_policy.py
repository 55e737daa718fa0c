"""`--compile auto` in a search: a trial compiles only once compiling pays for itself.

Compiling is paid once per trial and saves a fraction of every later epoch; under a pruner
most trials run a few epochs, so it pays only for trials that live long. A trial starts eager;
after each epoch, with

    t  the eager epoch just measured (seconds: training + validation),
    e  the epochs the trial will surely still run: up to the pruner's next rung, where it may
       be stopped (search.rules.pruners.next_rung), or to its last epoch,
    s  the speed-up compiling gives (compiled / eager images per second),
    c  the seconds compiling costs,

it switches to compiled when  e * t * (1 - 1/s) > c.  c and s are this worker's own figures
from the last trial it compiled, until then the defaults below. Inductor's on-disk caches make
a later compile of layer shapes seen before cheaper; the measured c follows that.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# Seconds a trial's first compile costs. CUDA: the Table 1 step on an H100 (issue 11);
# CPU: the small config, cold cache, 2-core EPYC (docs/BENCHMARKS.md).
DEFAULT_COMPILE_S = {"cuda": 25.0, "cpu": 45.0}
# Compiled over eager images/s. CUDA: Table 1 on an H100, 40,560 / 27,950 (issue 11). CPU:
# no gain measured (docs/BENCHMARKS.md), so `auto` stays eager on a CPU unless told otherwise.
DEFAULT_SPEEDUP = {"cuda": 1.45, "cpu": 1.0}

# Where every worker of a machine keeps inductor's and Triton's compiled kernels, unless the
# environment says otherwise: outside /tmp, so it outlives reboots (and, mounted, containers).
COMPILE_CACHE_DIR = Path("~/.cache/backbone-hpo/compile")


@dataclass
class CompilePolicy:
    next_rung: Callable[[int], int]  # epoch -> the next epoch at which the pruner may stop it
    compile_s: float
    speedup: float

    @classmethod
    def for_device(cls, device_type: str, next_rung: Callable[[int], int]) -> CompilePolicy:
        kind = "cuda" if device_type == "cuda" else "cpu"
        return cls(next_rung, DEFAULT_COMPILE_S[kind], DEFAULT_SPEEDUP[kind])

    def pays(self, epoch: int, eager_epoch_s: float, epochs: int) -> bool:
        """Whether compiling after `epoch` saves more than it costs before the trial can end."""
        sure_epochs = min(self.next_rung(epoch), epochs) - epoch
        return sure_epochs * eager_epoch_s * (1 - 1 / self.speedup) > self.compile_s

    def learn(self, compile_s: float, speedup: float) -> None:
        """What the last compiled trial of this worker cost and gained."""
        self.compile_s, self.speedup = compile_s, speedup


def share_compile_caches() -> Path:
    """Point inductor's and Triton's caches at one directory per machine where unset, so a
    layer shape any worker compiled before loads instead of compiling again."""
    root = Path(os.environ.get("TORCHINDUCTOR_CACHE_DIR") or COMPILE_CACHE_DIR.expanduser())
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(root))
    os.environ.setdefault("TRITON_CACHE_DIR", str(root / "triton"))
    return root
