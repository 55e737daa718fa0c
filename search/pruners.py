"""The pruners a study can use, by name; each prunes on validation loss after every epoch."""

from __future__ import annotations

from collections.abc import Callable

import optuna


def _hyperband(epochs: int) -> optuna.pruners.BasePruner:
    return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=epochs)


def _median(epochs: int) -> optuna.pruners.BasePruner:
    return optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=1)


def _none(epochs: int) -> optuna.pruners.BasePruner:
    return optuna.pruners.NopPruner()


# The first is the default.
PRUNERS: dict[str, Callable[[int], optuna.pruners.BasePruner]] = {
    "hyperband": _hyperband,
    "median": _median,
    "none": _none,
}


def build_pruner(name: str, epochs: int) -> optuna.pruners.BasePruner:
    return PRUNERS[name](epochs)
