"""A stand-in objective for fleets of `hpo worker` (HPO_BENCH_OBJECTIVE=stand_in:objective):
a trial's storage traffic without training, so a process needs no torch. Per epoch: a sleep,
a report, a prune check (asked, not obeyed). It waits at a gate (a file) before its first
trial, until the driver has the whole fleet running, and writes each trial's start and end to
$STAND_IN_LOG_DIR/PID.log, which the driver (tests/fleetrun.py) reads for kills and timings.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import optuna

EPOCHS = int(os.environ.get("STAND_IN_EPOCHS", "3"))
EPOCH_S = float(os.environ.get("STAND_IN_EPOCH_S", "0.05"))
LOG_DIR = Path(os.environ.get("STAND_IN_LOG_DIR", "."))
GATE = LOG_DIR / "gate"


def objective(trial: optuna.Trial) -> float:
    while not GATE.exists():
        time.sleep(0.05)
    log = (LOG_DIR / f"{os.getpid()}.log").open("a")
    with log:
        log.write(f"start {trial.number} {time.time():.6f}\n")
        log.flush()  # a kill -9 from here on leaves "start" as the last line
        trial.set_user_attr("pid", os.getpid())
        x = trial.suggest_float("x", -10.0, 10.0)
        y = trial.suggest_float("y", 1e-3, 1.0, log=True)
        value = 0.0
        for epoch in range(1, EPOCHS + 1):
            time.sleep(EPOCH_S)
            value = (x - 2.0) ** 2 + y + 1.0 / epoch
            trial.report(value, epoch)
            trial.should_prune()
        log.write(f"end {trial.number} {time.time():.6f}\n")
    return value
