"""What a search space costs: train FLOPs per image of draws from Optuna's RandomSampler.

    python bench/space.py default              # or tiny, or a space YAML file
    python bench/space.py default --draws 300 --seed 0
    python bench/space.py --smoke              # the default space, 10 draws: seconds

RandomSampler draws from the prior, which is what TPE draws before it has learned anything,
through the project's real `sample_config`; each draw is priced by `model.train_step_flops`
(forward + backward on the meta device: no arithmetic). Prints p10, median, mean, p90 and
max in GFLOP per image and as multiples of the report's Table 1 network, for every draw and
for the draws under the space's `max_gflops` (those that train), and the share over the cap.
Works on checkouts from before the cap existed (no `max_gflops`: nothing is over).
Figures and how they were obtained: docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
from functools import cache
from pathlib import Path

import numpy as np
import optuna
import torch

from model.config import REPORT_TABLE1, ModelConfig
from model.counts import train_step_flops
from model.network import build_model
from search.rules.space import load_space, sample_config

# --smoke: the smallest run (the suite runs it).
SMOKE = ["--draws", "10"]
# Batch 2: BatchNorm refuses one image on a 1x1 map; FLOPs are linear in the batch.
COUNT_BATCH = 2


@cache
def gflops_per_image(model: ModelConfig) -> float:
    with torch.device("meta"):
        network = build_model(model)
    return train_step_flops(network, COUNT_BATCH) / COUNT_BATCH / 1e9


def draw_costs(space_name: str, draws: int, seed: int) -> np.ndarray:
    space = load_space(space_name)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    costs = []
    for _ in range(draws):
        trial = study.ask()
        costs.append(gflops_per_image(sample_config(trial, space, epochs=20).model))
        study.tell(trial, 1.0)
    return np.array(costs)


def summary_row(label: str, costs: np.ndarray, table1: float) -> str:
    figures = [np.percentile(costs, 10), np.median(costs), costs.mean()]
    figures += [np.percentile(costs, 90), costs.max()]
    cells = "  ".join(f"{g:7.2f} ({g / table1:5.2f}x)" for g in figures)
    return f"{label:<16} {len(costs):>5}  {cells}"


def machine() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return f"{names[0] if names else platform.machine()}, {os.cpu_count()} cores"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "space", nargs="?", default="default", help="default (the default), tiny or a YAML file"
    )
    parser.add_argument("--draws", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help=" ".join(SMOKE) + " (seconds)")
    args = parser.parse_args()
    if args.smoke:
        args = parser.parse_args([*SMOKE, *sys.argv[1:]])
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    costs = draw_costs(args.space, args.draws, args.seed)
    cap = getattr(load_space(args.space), "max_gflops", float("inf"))
    table1 = gflops_per_image(REPORT_TABLE1)
    trains = costs[costs <= cap]
    print(f"{machine()}; ", end="")
    print(f"torch {torch.__version__}, optuna {optuna.__version__}; {datetime.date.today()}")
    print(f"command: {' '.join([os.path.basename(sys.executable), *sys.argv])}")
    print(f"space {args.space}: max_gflops {cap}, Table 1 {table1:.3f} GFLOP per image")
    print(f"{'GFLOP per image':<16} {'draws':>5}  " + "  ".join(
        f"{name:>16}" for name in ("p10", "median", "mean", "p90", "max")
    ))  # fmt: skip
    print(summary_row("all draws", costs, table1))
    print(summary_row("under the cap", trains, table1))
    over = len(costs) - len(trains)
    flop_share = costs[costs > cap].sum() / costs.sum()
    print(
        f"over the cap: {over} of {len(costs)} draws ({over / len(costs):.1%}), "
        f"{flop_share:.1%} of the draws' FLOPs"
    )


if __name__ == "__main__":
    main()
