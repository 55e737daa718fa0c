"""The pruners a study can use, by name; each prunes on validation loss after every epoch."""

from __future__ import annotations

from collections.abc import Callable

import optuna

# Epochs every trial trains before a pruner may stop it (Hyperband's minimum resource).
DEFAULT_MIN_EPOCHS = 3
# Hyperband's rungs grow by this factor (Optuna's default, stated so next_rung can use it).
HYPERBAND_REDUCTION_FACTOR = 3


def _hyperband(epochs: int, min_epochs: int) -> optuna.pruners.BasePruner:
    return optuna.pruners.HyperbandPruner(
        min_resource=min_epochs, max_resource=epochs, reduction_factor=HYPERBAND_REDUCTION_FACTOR
    )


def _median(epochs: int, min_epochs: int) -> optuna.pruners.BasePruner:
    # Steps are 1-based epochs: a warm-up of n steps first compares epoch n + 1.
    return optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=min_epochs - 1)


def _none(epochs: int, min_epochs: int) -> optuna.pruners.BasePruner:
    return optuna.pruners.NopPruner()


# The first is the default.
PRUNERS: dict[str, Callable[[int, int], optuna.pruners.BasePruner]] = {
    "hyperband": _hyperband,
    "median": _median,
    "none": _none,
}


def build_pruner(
    name: str, epochs: int, min_epochs: int = DEFAULT_MIN_EPOCHS
) -> optuna.pruners.BasePruner:
    return PRUNERS[name](epochs, min(min_epochs, epochs))


def next_rung(name: str, epoch: int, epochs: int, min_epochs: int = DEFAULT_MIN_EPOCHS) -> int:
    """The first epoch after `epoch` at which the named pruner may stop a trial; `epochs` if
    none. Every Hyperband bracket judges only at min_epochs * 3**k; the median pruner judges
    every epoch after its warm-up."""
    min_epochs = min(min_epochs, epochs)
    if name == "hyperband":
        rung = min_epochs
        while rung <= epoch:
            rung *= HYPERBAND_REDUCTION_FACTOR
    elif name == "median":
        rung = max(min_epochs, epoch + 1)
    else:
        rung = epochs
    return min(rung, epochs)
