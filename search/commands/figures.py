"""`hpo train`'s figures, as the report drew its Figures 2-4: the learning rate, the training
loss and the training accuracy per epoch, one line per seed. The final run has no validation
split and reads the test set once, so there is no held-out curve to draw."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from search.rules.faults import write_or_say

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# File -> (the per-epoch series in a seed's metrics, the axis label, log scale).
TRAINING_FIGURES = {
    "learning-rate.png": ("lr", "learning rate (at the epoch's start)", True),
    "training-loss.png": ("train_loss", "training loss", False),
    "training-accuracy.png": ("train_acc", "training accuracy", False),
}


def write_training_figures(
    metrics: dict[str, Any], output: Path, say: Callable[[str], None]
) -> list[str]:
    """Draw each figure over every seed's epochs into `output`; the files written (a disk that
    refuses one is said, as for the weights: the machine's fault, not the run's)."""
    import matplotlib.pyplot as plt

    written = []
    for name, (series, label, log) in TRAINING_FIGURES.items():
        figure = training_figure(metrics["seeds"], series, label, log)
        if write_or_say(output / name, partial(figure.savefig, format="png"), say):
            written.append(name)
        plt.close(figure)
    return written


def training_figure(seeds: list[dict[str, Any]], series: str, label: str, log: bool) -> Figure:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, no GUI toolkit
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    figure, ax = plt.subplots(figsize=(6, 4))
    for run in seeds:
        values = run[series]
        ax.plot(range(1, len(values) + 1), values, label=f"seed {run['seed']}")
    ax.set(xlabel="epoch", ylabel=label, yscale="log" if log else "linear")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # no epoch 1.5
    ax.legend()
    figure.tight_layout()
    return figure
