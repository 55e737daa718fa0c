"""The pruners a study can use, by name; each prunes on validation loss after every epoch."""

from __future__ import annotations

from collections.abc import Callable

import optuna

# Epochs every trial trains before a pruner may stop it (Hyperband's minimum resource).
DEFAULT_MIN_EPOCHS = 3


def _hyperband(epochs: int, min_epochs: int) -> optuna.pruners.BasePruner:
    return optuna.pruners.HyperbandPruner(min_resource=min_epochs, max_resource=epochs)


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
