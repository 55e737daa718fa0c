"""A stand-in objective for fleets of `hpo worker` (HPO_BENCH_OBJECTIVE=stand_in:objective):
a trial's storage traffic without training, so a process needs no torch. Per epoch: a sleep,
a report, a prune check (asked, not obeyed). It waits at a gate (a file) before its first
trial, until the driver has the whole fleet running, and writes each trial's start and end to
$STAND_IN_LOG_DIR/PID.log, which the driver (tests/fleetrun.py) reads for kills and timings.
With STAND_IN_COUNT_READS set it also counts the process's storage traffic (count_traffic) and
writes the running totals at each trial's start to PID.reads (bench/fleet.py's reads per trial).
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
COUNT_READS = bool(os.environ.get("STAND_IN_COUNT_READS"))


class Traffic:
    """This process's storage traffic so far: statements sent, transactions (each a BEGIN and a
    COMMIT or ROLLBACK on the wire), rows read (what the statements returned)."""

    statements = 0
    transactions = 0
    rows = 0


def count_traffic() -> None:
    """Count every engine's statements and rows (SQLAlchemy's events, on all engines)."""
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    def statement(conn, cursor, statement, parameters, context, executemany) -> None:  # noqa: ANN001
        Traffic.statements += 1
        if cursor.description is not None:  # a statement that returns rows: rowcount is theirs
            Traffic.rows += max(cursor.rowcount, 0)

    def ended(conn) -> None:  # noqa: ANN001
        Traffic.transactions += 1

    event.listen(Engine, "after_cursor_execute", statement)
    event.listen(Engine, "commit", ended)
    event.listen(Engine, "rollback", ended)


if COUNT_READS:
    count_traffic()


def objective(trial: optuna.Trial) -> float:
    while not GATE.exists():
        time.sleep(0.05)
    log = (LOG_DIR / f"{os.getpid()}.log").open("a")
    with log:
        log.write(f"start {trial.number} {time.time():.6f}\n")
        log.flush()  # a kill -9 from here on leaves "start" as the last line
        if COUNT_READS:
            with (LOG_DIR / f"{os.getpid()}.reads").open("a") as reads:
                reads.write(f"{Traffic.statements} {Traffic.transactions} {Traffic.rows}\n")
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
