"""What the worker's collection after every trial costs, before and after `gc.freeze()`.

search/training/memory.py runs a full `gc.collect()` after each trial so that a trial's model
in a reference cycle is freed before the next one claims the GPU's memory. A full pass visits
every object the process holds, most of them made at start-up (torch, torchvision, Optuna)
and alive until exit; search/commands/launch.py freezes those once, before the first trial.

    python bench/gc_freeze.py
    python bench/gc_freeze.py --rounds 3    # or --smoke: the same, 3 rounds
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

# Run as a file, this folder would come first on sys.path and shadow the `storage` package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import optuna  # noqa: E402, F401  (what a worker has loaded by its first trial)
import torch  # noqa: E402, F401
import torchvision  # noqa: E402, F401

from search.training import objective, worker  # noqa: E402, F401

# --smoke: the smallest run (the suite runs it).
SMOKE = ["--rounds", "3"]


def median_pass_ms(rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        gc.collect()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9, help="collections timed, each way")
    parser.add_argument("--smoke", action="store_true", help=" ".join(SMOKE) + " (seconds)")
    args = parser.parse_args()
    if args.smoke:
        args = parser.parse_args([*SMOKE, *sys.argv[1:]])
    before = median_pass_ms(args.rounds)
    gc.freeze()
    after = median_pass_ms(args.rounds)
    print(f"gc.collect after a trial: {before:.0f} ms; with start-up frozen: {after:.2f} ms")


if __name__ == "__main__":
    main()
