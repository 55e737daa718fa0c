"""Ablation analysis: which change bought the points on the way from the report's config to
the best trial. The predicted path (Biedenkapp et al., AAAI 2017): a surrogate of the study's
score fitted to its complete trials; from the report's config, each step flips the one group
of differences whose change to the best's values lowers the predicted score most. Torch-free:
`hpo report` and `hpo ablate` draw it without the training plane.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.trial import FrozenTrial, TrialState

# Below this many complete trials a forest of the space's ~30 parameters fits noise: its
# path would rank groups by chance. 20 is about two trials per group of a default study.
MIN_TRIALS = 20
# A conditional parameter the config does not have (SGD's LR under AdamW): no value of its
# own range, so the trees can split "absent" from every present value.
ABSENT = -1.0e6
TREES = 200

# The groups a person reasons in, by parameter name (search/rules/space.py names them); each
# conditional parameter sits in its switch's group, so it moves with it.
GROUPS: dict[str, re.Pattern[str]] = {
    name: re.compile(pattern)
    for name, pattern in {
        "architecture": r"backbones|blocks_\d+|layers_\d+|width_\d+_\d+|kernel_size",
        "dropout": r"dropout",
        "optimizer": r"optimizer|lr|sgd_lr|momentum",
        "weight decay": r"weight_decay",
        "gradient clipping": r"grad_clip",
        "schedule": r"scheduler|plateau_\w+|onecycle_\w+|cosine_\w+|step_\w+",
        "batch size": r"batch_size",
        "label smoothing": r"label_smoothing",
        "weight averaging": r"weight_averaging|ema_decay",
        "cutout": r"cutout|cutout_size|cutout_prob",
        "mixing": r"mix|mix_alpha|mix_prob",
        "test-time views": r"tta",
    }.items()
}


class AblationError(ValueError):
    """The path cannot be drawn for this study; the message is one printable line."""


def group_of(param: str) -> str:
    """The group a parameter moves with; a parameter no group claims is an error, so a new
    parameter of the space cannot drop out of the path unseen."""
    for group, pattern in GROUPS.items():
        if pattern.fullmatch(param):
            return group
    raise AblationError(f"parameter {param!r} belongs to no ablation group")


@dataclass(frozen=True)
class Step:
    group: str | None  # None: the start (the report's config)
    changes: dict[str, tuple[Any, Any]]  # param -> (before, after); None where absent
    params: dict[str, Any]  # the whole config after this step
    mean: float  # the forest's predicted score
    sd: float  # its spread across the trees

    @property
    def label(self) -> str:
        return "report's config" if self.group is None else f"+ {self.group}"


@dataclass(frozen=True)
class PredictedPath:
    steps: list[Step]
    trials: int  # the complete trials the surrogate was fitted on
    start_trial: int | None  # the report's trial, where the study holds it
    target_trial: int


class Surrogate:
    """A random forest of the score over the encoded parameters. A forest because it takes the
    conditional, mixed categorical and numeric space as it is (absent parameters a value of
    their own, categories an index a tree may split anywhere), its trees disagree where the
    trials are few (the spread drawn as error bars), and it is the model Biedenkapp et al.'s
    surrogate ablation and fANOVA (Hutter et al., 2014) are built on."""

    def __init__(self, trials: list[FrozenTrial], seed: int = 0) -> None:
        from sklearn.ensemble import RandomForestRegressor  # only where a path is drawn

        self.distributions: dict[str, BaseDistribution] = {}
        for trial in trials:
            for name, distribution in trial.distributions.items():
                self.distributions.setdefault(name, distribution)
        self.columns = sorted(self.distributions)
        self.forest = RandomForestRegressor(n_estimators=TREES, random_state=seed, n_jobs=1)
        self.forest.fit([self.encode(t.params) for t in trials], [t.value for t in trials])

    def encode(self, params: dict[str, Any]) -> list[float]:
        """One row: a category by its index, a log-scale number by its log, an absent parameter
        ABSENT. A parameter no trial sampled has no column: the forest never saw it vary."""
        return [self._number(name, params.get(name)) for name in self.columns]

    def _number(self, name: str, value: Any) -> float:
        if value is None:
            return ABSENT
        distribution = self.distributions[name]
        if isinstance(distribution, CategoricalDistribution):
            if value not in distribution.choices:
                raise AblationError(
                    f"{name} = {value!r} is none of the study's choices "
                    f"{list(distribution.choices)}"
                )
            return float(distribution.choices.index(value))
        if isinstance(distribution, (FloatDistribution, IntDistribution)) and distribution.log:
            return math.log(value)
        return float(value)

    def predict(self, configs: list[dict[str, Any]]) -> list[tuple[float, float]]:
        """Per config, the mean and standard deviation of the trees' predictions."""
        import numpy as np

        rows = np.array([self.encode(params) for params in configs], dtype=np.float64)
        per_tree = np.stack([tree.predict(rows) for tree in self.forest.estimators_])
        return list(zip(per_tree.mean(axis=0).tolist(), per_tree.std(axis=0).tolist(), strict=True))


def complete_trials(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    return [
        t
        for t in trials
        if t.state == TrialState.COMPLETE and t.value is not None and math.isfinite(t.value)
    ]


def differences(start: dict[str, Any], target: dict[str, Any]) -> dict[str, list[str]]:
    """The parameters that differ between two configs, by group, in GROUPS' order."""
    differ = sorted(n for n in {*start, *target} if start.get(n) != target.get(n))
    groups: dict[str, list[str]] = {}
    for name in differ:
        groups.setdefault(group_of(name), []).append(name)
    return {group: groups[group] for group in GROUPS if group in groups}


def with_group(params: dict[str, Any], target: dict[str, Any], group: str) -> dict[str, Any]:
    """`params` with every parameter of `group` as `target` has it: the switch and all its
    conditional parameters together, absent ones dropped."""
    moved = {name: value for name, value in params.items() if group_of(name) != group}
    moved.update({name: value for name, value in target.items() if group_of(name) == group})
    return moved


def predicted_path(
    trials: list[FrozenTrial],
    start: dict[str, Any],
    target: dict[str, Any],
    start_trial: int | None,
    target_trial: int,
    minimize: bool = True,
) -> PredictedPath:
    """The greedy path from `start` to `target`: at each step the remaining group whose change
    predicts the best score (lowest where the study minimises)."""
    fitted = complete_trials(trials)
    if len(fitted) < MIN_TRIALS:
        raise AblationError(
            f"too few trials: {len(fitted)} complete, the predicted path needs at least "
            f"{MIN_TRIALS}"
        )
    surrogate = Surrogate(fitted)
    sign = 1.0 if minimize else -1.0
    current = dict(start)
    steps = [Step(None, {}, current, *surrogate.predict([current])[0])]
    remaining = list(differences(start, target))
    while remaining:
        candidates = {g: with_group(current, target, g) for g in remaining}
        predictions = dict(
            zip(remaining, surrogate.predict(list(candidates.values())), strict=True)
        )
        group = min(remaining, key=lambda g: sign * predictions[g][0])
        changes = {
            name: (current.get(name), candidates[group].get(name))
            for name in differences(current, candidates[group])[group]
        }
        current = candidates[group]
        steps.append(Step(group, changes, current, *predictions[group]))
        remaining.remove(group)
    return PredictedPath(steps, len(fitted), start_trial, target_trial)


def largest_steps(path: PredictedPath, keep: int, minimize: bool = True) -> list[list[str]]:
    """The path's groups as measured steps: the `keep` steps of the largest predicted gain, each
    on its own in the path's order, and every other group merged into one last step."""
    sign = 1.0 if minimize else -1.0
    steps = path.steps[1:]
    gains = {
        step.group: sign * (before.mean - step.mean)
        for before, step in zip(path.steps, steps, strict=False)
    }
    kept = set(sorted(gains, key=lambda g: -gains[g])[:keep])
    measured = [[step.group] for step in steps if step.group in kept]
    rest = [step.group for step in steps if step.group not in kept]
    return measured + ([rest] if rest else [])


def describe_changes(changes: dict[str, tuple[Any, Any]]) -> str:
    """`name old -> new` per parameter; `-` where the config has no such parameter."""
    return ", ".join(f"{n} {_short(a)} -> {_short(b)}" for n, (a, b) in changes.items())


def _short(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)
