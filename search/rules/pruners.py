"""The pruners a study can use, by name; each prunes on validation loss after every epoch."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import optuna

from storage.optuna_private import OriginalTrialHyperband

# Epochs every trial trains before a pruner may stop it (Hyperband's minimum resource).
DEFAULT_MIN_EPOCHS = 3
# Hyperband's rungs grow by this factor (Optuna's default, stated so next_rung can use it).
HYPERBAND_REDUCTION_FACTOR = 3


def _hyperband(epochs: int, min_epochs: int) -> optuna.pruners.BasePruner:
    # A retry stays in its original trial's bracket.
    return OriginalTrialHyperband(
        min_resource=min_epochs, max_resource=epochs, reduction_factor=HYPERBAND_REDUCTION_FACTOR
    )


def _median(epochs: int, min_epochs: int) -> optuna.pruners.BasePruner:
    # Steps are 1-based epochs; Optuna first prunes at step == n_warmup_steps.
    return optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=min_epochs)


def _none(epochs: int, min_epochs: int) -> optuna.pruners.BasePruner:
    return optuna.pruners.NopPruner()


def _hyperband_rung(epoch: int, min_epochs: int) -> int:
    # Every Hyperband bracket judges only at min_epochs * reduction_factor**k.
    rung = min_epochs
    while rung <= epoch:
        rung *= HYPERBAND_REDUCTION_FACTOR
    return rung


def _median_rung(epoch: int, min_epochs: int) -> int:
    return max(min_epochs, epoch + 1)  # every epoch after its warm-up


def _never(epoch: int, min_epochs: int) -> int:
    return sys.maxsize


@dataclass(frozen=True)
class PrunerKind:
    build: Callable[[int, int], optuna.pruners.BasePruner]  # (epochs, min_epochs)
    next_rung: Callable[[int, int], int]  # (epoch, min_epochs) -> next epoch it may prune


# The first is the default.
PRUNERS: dict[str, PrunerKind] = {
    "hyperband": PrunerKind(_hyperband, _hyperband_rung),
    "median": PrunerKind(_median, _median_rung),
    "none": PrunerKind(_none, _never),
}


def build_pruner(
    name: str, epochs: int, min_epochs: int = DEFAULT_MIN_EPOCHS
) -> optuna.pruners.BasePruner:
    return PRUNERS[name].build(epochs, min(min_epochs, epochs))


def next_rung(name: str, epoch: int, epochs: int, min_epochs: int = DEFAULT_MIN_EPOCHS) -> int:
    """The first epoch after `epoch` at which the named pruner may stop a trial; `epochs` if
    none comes before the trial's end."""
    return min(PRUNERS[name].next_rung(epoch, min(min_epochs, epochs)), epochs)
