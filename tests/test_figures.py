"""`hpo train`'s per-epoch figures (the report's Figures 2-4) and the training accuracy they
draw, which the trainer counts on the batches it steps on."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from search.commands.figures import TRAINING_FIGURES, training_figure, write_training_figures
from search.rules.config import TrainConfig
from search.training.trainer import DeviceRecipe, Trainer

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def always_class_zero() -> nn.Module:
    """A classifier that answers 0 for every image, whatever a tiny step does to it."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].bias.copy_(torch.tensor([10.0] + [0.0] * 9))
    return model


def test_training_accuracy_is_the_share_the_model_got_right() -> None:
    labels = torch.tensor([0, 0, 0, 1, 2, 3, 0, 5])  # 4 of 8 are class 0
    batches = [(torch.rand(4, 3, 32, 32), labels[:4]), (torch.rand(4, 3, 32, 32), labels[4:])]
    cfg = TrainConfig(lr=1e-6, weight_decay=0.0, grad_clip=0.0, batch_size=4, epochs=1)
    trainer = Trainer(always_class_zero(), cfg, 2, DeviceRecipe.for_device(torch.device("cpu")))
    trained = trainer.train_epoch(batches)
    assert (trained.accuracy, trained.images) == (0.5, 8)


def test_each_figure_draws_every_seeds_series(tmp_path: Path) -> None:
    seeds = [
        {"seed": seed, "lr": [1e-3, 5e-4, 1e-4], "train_loss": [2.0 - seed, 1.5, 1.0],
         "train_acc": [0.2, 0.4 + seed / 10, 0.6]}
        for seed in (0, 1)
    ]  # fmt: skip
    for series, label, log in TRAINING_FIGURES.values():
        ax = training_figure(seeds, series, label, log).axes[0]
        assert [list(line.get_ydata()) for line in ax.lines] == [run[series] for run in seeds]
        assert [line.get_label() for line in ax.lines] == ["seed 0", "seed 1"]
        assert ax.get_yscale() == ("log" if log else "linear")
    written = write_training_figures({"seeds": seeds}, tmp_path, print)
    assert written == list(TRAINING_FIGURES)
    for name in written:
        assert (tmp_path / name).read_bytes().startswith(PNG_MAGIC)
