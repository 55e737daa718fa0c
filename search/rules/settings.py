"""Study settings: chosen once when a study is created, stored in it, used by every worker.

Each default is written once, here or in the room that owns it (epochs: search/rules/config.py,
datasets: data/, heartbeat: storage/, pruners: search/rules/pruners.py); the CLI derives its
help and choices from these.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import optuna

from data.dataset import DATASETS
from search.rules.artifacts import DEFAULT_CHECKPOINT_INTERVAL_S
from search.rules.config import DEFAULT_EPOCHS, from_mapping
from search.rules.pruners import DEFAULT_MIN_EPOCHS, PRUNERS, build_pruner
from search.rules.space import DEFAULT_SPACE_NAME, IMAGE_SIZE, SearchSpace, load_space
from storage import DEFAULT_HEARTBEAT_S

DEFAULT_SEED = 0
# The study's one objective, by name: what the dashboard and the report call it.
METRIC_NAME = "validation loss"
# How the final epoch's validation loss is scored (and what the pruner reads): plain
# cross-entropy on the true labels, or the same at the one temperature fitted on the
# validation predictions (search/training/recipe.py), so a config is not ranked down for the
# confidence scale label smoothing or mixup gives its outputs. The first is what studies
# created before the choice existed scored (the stored default); new studies take the last.
VAL_SCORES = ("cross_entropy", "calibrated_cross_entropy")
NEW_STUDY_VAL_SCORE = VAL_SCORES[-1]


class SettingsConflict(ValueError):
    """A command-line flag contradicts what the study stored at creation."""


@dataclass(frozen=True)
class StudySettings:
    space: dict[str, Any]  # the whole space, so a worker elsewhere needs no file
    space_name: str = DEFAULT_SPACE_NAME
    epochs: int = DEFAULT_EPOCHS
    dataset: str = DATASETS[0]
    pruner: str = next(iter(PRUNERS))
    seed: int = DEFAULT_SEED
    heartbeat_s: int = DEFAULT_HEARTBEAT_S
    min_epochs: int = DEFAULT_MIN_EPOCHS  # before the pruner may stop a trial
    checkpoint_interval_s: int = DEFAULT_CHECKPOINT_INTERVAL_S
    direction: str = "minimize"  # validation loss
    val_score: str = VAL_SCORES[0]  # a study stored without it scored so
    # The data's DatasetIdentity (data/identity.py) as a dict, computed when the study was
    # created: every worker and final run compares its own data with it. None for CIFAR-10
    # and the synthetic set (a checksum or the generator fixes them: 10 classes, CIFAR-10's
    # constants), as every study stored before identities existed.
    identity: dict[str, Any] | None = None
    # The side images are resized to (a folder only; CIFAR is 32): the space's poolings, the
    # network's FLOPs and the study's cost follow it.
    image_size: int = IMAGE_SIZE
    # Where every trial is also logged (search/rules/trackers.py): a TensorBoard log folder
    # (absolute) and an MLflow tracking URI; None, as every study stored before them: neither.
    tensorboard: str | None = None
    mlflow: str | None = None

    @classmethod
    def for_space(cls, space_name: str = DEFAULT_SPACE_NAME, **chosen: Any) -> StudySettings:
        """Settings of a new study: the named space, defaults for everything not chosen."""
        given = {key: value for key, value in chosen.items() if value is not None}
        given.setdefault("val_score", NEW_STUDY_VAL_SCORE)
        return cls(space=load_space(space_name).to_dict(), space_name=space_name, **given)

    def __post_init__(self) -> None:
        if self.val_score not in VAL_SCORES:
            raise ValueError(
                f"val_score: must be one of {', '.join(VAL_SCORES)}, got {self.val_score!r}"
            )

    @property
    def calibrated(self) -> bool:
        """Whether trials score their validation loss at a fitted temperature."""
        return self.val_score == "calibrated_cross_entropy"

    def build_pruner(self) -> optuna.pruners.BasePruner:
        return build_pruner(self.pruner, self.epochs, self.min_epochs)

    def search_space(self) -> SearchSpace:
        return SearchSpace.from_dict(self.space)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> StudySettings:
        return from_mapping(cls, raw, "study settings")

    def check_flags(self, flags: dict[str, Any]) -> None:
        """Refuse any flag the user gave that differs from the stored value."""
        for name, given in flags.items():
            if given is None:
                continue
            stored = self.space_name if name == "space" else getattr(self, name)
            if given != stored:
                raise SettingsConflict(
                    f"--{name.replace('_', '-')} {given} contradicts the study's stored "
                    f"{name} {stored}; leave it out to use the study's settings"
                )
