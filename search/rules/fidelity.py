"""How far a study's short runs can be trusted: at each rung its pruner judges, the rank
correlation (Spearman) between the trials' validation loss there and at the last epoch.

Short runs are known to rank long ones weakly on CIFAR (Zela et al., 2018); a study holds the
data to say how much that holds for it. Torch-free: `hpo status` and `hpo report` show it.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import optuna
from optuna.trial import FrozenTrial

from search.rules import attrs
from search.rules.pruners import next_rung
from storage.optuna_private import one_per_chain

# Fewer trials than this rank too few pairs to say anything: "too few trials", no number.
MIN_TRIALS = 5


@dataclass(frozen=True)
class RungFidelity:
    rung: int  # an epoch at which the pruner judges trials
    trials: int  # chains that reached both the rung and the last epoch, with finite losses
    spearman: float | None  # None: fewer than MIN_TRIALS trials, or no spread to rank


def study_fidelity(study: optuna.Study) -> tuple[int, list[RungFidelity]] | None:
    """(last epoch, one result per rung of the study's pruner); None for a study hpo did not
    make (no stored settings)."""
    settings = study.user_attrs.get(attrs.SETTINGS)
    if settings is None:
        return None
    epochs = settings["epochs"]
    trials = study.get_trials(deepcopy=False)
    rungs = pruner_rungs(settings["pruner"], epochs, settings["min_epochs"])
    return epochs, [rung_fidelity(trials, rung, epochs) for rung in rungs]


def pruner_rungs(pruner: str, epochs: int, min_epochs: int) -> list[int]:
    """The epochs before the last at which the pruner may stop a trial."""
    rungs, epoch = [], 0
    while (epoch := next_rung(pruner, epoch, epochs, min_epochs)) < epochs:
        rungs.append(epoch)
    return rungs


def rung_fidelity(trials: Sequence[FrozenTrial], rung: int, last: int) -> RungFidelity:
    """Each chain once (a retry inherits its original's reports); a loss that is not finite
    (a diverged run's NaN) has no rank, so its trial is left out."""
    pairs = [
        (t.intermediate_values[rung], t.intermediate_values[last])
        for t in one_per_chain(trials)
        if rung in t.intermediate_values and last in t.intermediate_values
    ]
    pairs = [pair for pair in pairs if all(map(math.isfinite, pair))]
    if len(pairs) < MIN_TRIALS:
        return RungFidelity(rung, len(pairs), None)
    at_rung, at_last = zip(*pairs, strict=True)
    return RungFidelity(rung, len(pairs), spearman(at_rung, at_last))


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Spearman's rank correlation: Pearson's on the ranks, tied values sharing their mean
    rank. None where either side has no spread (every value tied)."""
    try:
        return statistics.correlation(ranks(xs), ranks(ys))
    except statistics.StatisticsError:
        return None


def ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks; a run of equal values each gets the mean of the ranks it spans."""
    order = sorted(range(len(values)), key=values.__getitem__)
    result = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for position in range(start, end + 1):
            result[order[position]] = (start + end) / 2 + 1
        start = end + 1
    return result


def fidelity_line(study: optuna.Study) -> str:
    """One line for status and report: each rung's correlation with the last epoch."""
    found = study_fidelity(study)
    if found is None:
        return "-"
    last, results = found
    if not results:
        return "no rung: this pruner judges no epoch before the last"
    return f"Spearman with epoch {last}, " + "; ".join(_describe(r, last) for r in results)


def _describe(result: RungFidelity, last: int) -> str:
    if result.trials < MIN_TRIALS:
        return (
            f"epoch {result.rung}: too few trials ({result.trials} reached it and epoch "
            f"{last}; {MIN_TRIALS} needed)"
        )
    if result.spearman is None:
        return f"epoch {result.rung}: no spread to rank (n {result.trials})"
    return f"epoch {result.rung}: {result.spearman:+.2f} (n {result.trials})"
