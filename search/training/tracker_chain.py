"""What the trackers are told of a retry chain, and what each tracker (a sink) does with it:
the one interface search/training/trackers.py fans out to TensorBoard and MLflow."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import optuna
from optuna.trial import FrozenTrial

from search.rules import attrs


@dataclass
class Chain:
    """One retry chain as the trackers see it: its run is named by the first trial."""

    trial: optuna.Trial  # the trial running the chain now
    first: int  # the chain's first trial number (storage.optuna_private.original_number)
    params: dict[str, Any]
    tags: dict[str, str]  # host, gpu, space, study
    resumed: list[dict] | None  # a retry's epochs up to its checkpoint; None: a first run
    # Every record sent, this run's (the scalars ended() summarises).
    history: list[dict] = field(default_factory=list)
    # When it started: the time of the resumed epochs' points, fixed for a repeated write.
    started_ms: int = field(default_factory=lambda: int(time.time() * 1000))

    @property
    def inherited_run(self) -> str | None:
        """The MLflow run id the chain's earlier trials stored (a retry inherits it)."""
        return self.trial.user_attrs.get(attrs.MLFLOW_RUN)


class Sink(Protocol):
    """One tracker. Its methods run on the tracker's own thread, one at a time; each may
    raise (the queue retries it) and must be safe to run again after a failure."""

    name: str

    def started(self, chain: Chain) -> None: ...

    def epoch(self, chain: Chain, record: dict, at_ms: int) -> None: ...

    def ended(self, chain: Chain, state: str) -> None: ...

    def given_up(self, study: optuna.Study, trial: FrozenTrial) -> None: ...

    def study_done(self, study: optuna.Study) -> None: ...

    def permanent(self, err: Exception) -> bool:
        """Whether trying `err`'s write again cannot help (a refusal, not an outage)."""
        ...

    def close(self) -> None: ...


def final_metrics(history: list[dict]) -> dict[str, float]:
    """What a chain's run ends with: its score (the last epoch's), its best, its accuracy."""
    if not history:
        return {}
    return {
        "final_score": history[-1]["val_loss"],
        "best_score": min(record["val_loss"] for record in history),
        "final_val_acc": history[-1]["val_acc"],
    }


# A record's name in the trial's attrs -> the scalar the trackers show (commands/progress.py
# calls val_loss `score` and val_cross_entropy `val_ce`).
SCALARS = {
    "val_loss": "score",
    "val_cross_entropy": "val_ce",
    "val_acc": "val_acc",
    "train_loss": "train_loss",
    "train_acc": "train_acc",
    "lr": "lr",
    "images_per_s": "images_per_s",
}


def scalars(record: dict) -> dict[str, float]:
    """The record's figures under the trackers' names, those it has."""
    present = {name: value for name, value in record.items() if value is not None}
    return {shown: float(present[name]) for name, shown in SCALARS.items() if name in present}


def describe_error(err: BaseException) -> str:
    """An error in one line: its type and its message's first line."""
    first = (str(err).strip().splitlines() or [""])[0]
    return f"{type(err).__name__}: {first}"[:240]
