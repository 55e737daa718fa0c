"""What a search prints: one line per epoch and per trial, and a live bar over the study."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import FrozenTrial, TrialState
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from search.rules import attrs
from search.rules.cost import is_over_cap
from search.rules.settings import VAL_SCORES, StudySettings
from search.rules.study import Budget

# The figures of a validation, as every epoch line names them (EpochStats.line), by the
# val_score that makes one of them a study's score.
SCORE_FIGURES = dict(zip(VAL_SCORES, ("val_ce", "calibrated_ce"), strict=True))
SCORE_WORDS = {
    "val_ce": "validation cross-entropy",
    "calibrated_ce": "validation cross-entropy at the temperature fitted to its predictions",
}

if TYPE_CHECKING:
    from search.training.trainer import EpochStats


class SearchProgress:
    """A bar over the study's finished/target trials above the per-epoch lines.

    On a terminal the bar is live; in a log file or CI the same lines appear without it.
    """

    def __init__(self, console: Console | None = None):
        self.console = console or Console()
        self.bar = Progress(
            TextColumn("[bold]{task.fields[study]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("trials  best score {task.fields[best]}"),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
            # Trials take minutes; rich's default 30 s window would never show an ETA.
            speed_estimate_period=24 * 3600,
            disable=not self.console.is_terminal,
        )
        self.task = self.bar.add_task("trials", total=1, study="", best="-")

    def __enter__(self) -> SearchProgress:
        self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.stop()

    def show_budget(self, study_name: str, state: Budget, best: str = "-") -> None:
        self.bar.update(
            self.task,
            total=max(state.target, 1),
            completed=state.finished,
            study=study_name,
            best=best,
        )

    def epoch(self, trial: optuna.Trial, stats: EpochStats, epochs: int) -> None:
        self.console.print(stats.line(f"trial {trial.number:>4}", epochs), highlight=False)

    def trial_end(self, trial: FrozenTrial, state: Budget, best: str) -> None:
        self.console.print(
            f"[{state.finished}/{state.target}] trial {trial.number} {_ending(trial)}  "
            f"best score {best}",
            highlight=False,
        )

    def say(self, message: str) -> None:
        self.console.print(message, highlight=False)


def format_mean_std(stat: dict[str, float | None], percent: bool = False) -> str:
    def show(value: float) -> str:
        return f"{value:.2%}" if percent else f"{value:.4f}"

    std = stat["std"]
    return show(stat["mean"]) + (f" ± {show(std)}" if std is not None else "")


def score_figure(study_attrs: dict[str, Any]) -> str | None:
    """Which figure of a trial's last epoch its score (the trial's value) is, by the name the
    epoch lines give it: the study's val_score. None for a study hpo did not create."""
    if attrs.SETTINGS not in study_attrs:
        return None
    return SCORE_FIGURES[StudySettings.from_dict(study_attrs[attrs.SETTINGS]).val_score]


def score_meaning(study_attrs: dict[str, Any]) -> str:
    """What a trial's score is, in words, for `hpo status`."""
    if attrs.SETTINGS not in study_attrs:
        return "the trial's value"
    return describe_score(StudySettings.from_dict(study_attrs[attrs.SETTINGS]))


def describe_score(settings: StudySettings) -> str:
    figure = SCORE_FIGURES[settings.val_score]
    return f"{figure} of a trial's last epoch ({SCORE_WORDS[figure]}); the pruner reads it"


def best_summary(study: optuna.Study, trials: list[FrozenTrial] | None = None) -> str:
    """The best complete trial's value and number: of `trials` where given (a worker's read
    of the study, search.rules.study.StudyView: no read of its own), else of the study's."""
    if trials is None:
        trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if not complete:
        return "-"
    pick = min if study.direction == optuna.study.StudyDirection.MINIMIZE else max
    best = pick(complete, key=lambda trial: trial.value)
    acc = best.user_attrs.get(attrs.VAL_ACC)
    return f"{best.value:.4f} (trial {best.number})" + (
        f", val acc {acc:.2%}" if acc is not None else ""
    )


def _ending(trial: FrozenTrial) -> str:
    if is_over_cap(trial):
        gflops = trial.user_attrs.get(attrs.GFLOPS, 0)
        return f"skipped untrained: {gflops:.3g} GFLOP per image is over the space's max_gflops"
    if trial.state == TrialState.COMPLETE:
        acc = trial.user_attrs.get(attrs.VAL_ACC, 0)
        return f"complete  score {trial.value:.4f}  acc {acc:.2%}"
    if trial.state == TrialState.PRUNED:
        return f"pruned after epoch {trial.last_step}"
    return f"failed: {trial.user_attrs.get(attrs.FAIL_REASON) or 'unknown'}"
