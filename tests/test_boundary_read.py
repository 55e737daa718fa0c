"""A worker reads the study once between two trials (search.rules.study.read_at_boundary):
what it shows and claims from that read is what a read of its own would give."""

from __future__ import annotations

import threading
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from search.commands.launch import StudyRequest
from search.commands.progress import best_summary
from search.rules.study import (
    TICKET_WINDOW,
    budget,
    claim_trial,
    create_or_join,
    join,
    move_target,
    read_at_boundary,
    read_study,
)
from search.training.worker import run_worker
from storage import HeartbeatPolicy, open_storage
from storage.optuna_private import mark_stopped


@pytest.mark.parametrize("direction", ["minimize", "maximize"])
def test_the_best_line_from_a_read_is_the_studys_best(tmp_path: Path, direction: str) -> None:
    study = optuna.create_study(
        storage=open_storage(f"sqlite:///{tmp_path / 'b.db'}"), direction=direction
    )
    assert best_summary(study, study.get_trials(deepcopy=False)) == "-"
    for value in (0.5, 0.25, 0.75):
        study.tell(study.ask(), value)
    study.tell(study.ask(), state=TrialState.PRUNED)
    study.ask()  # running
    best = study.best_trial
    expected = f"{best.value:.4f} (trial {best.number})"
    assert best_summary(study, study.get_trials(deepcopy=False)) == expected
    assert best_summary(study) == expected


def test_a_retry_owed_at_the_boundary_is_run_before_the_worker_exits(tmp_path: Path) -> None:
    """The read after queuing an owed retry holds the retry: a worker whose view still showed
    the target met would exit with the retry queued and never run (a study short of N)."""
    url = f"sqlite:///{tmp_path / 'r.db'}"
    settings = StudyRequest(study="r", trials=1, storage="", space="tiny").new_settings()
    create_or_join(open_storage(url), "r", settings, 1)
    study = join(open_storage(url, HeartbeatPolicy(1)), "r")
    crashed = claim_trial(study)
    # Its worker died after the FAIL and before queuing the retry it was owed (a stop).
    mark_stopped(crashed)
    study.tell(crashed, state=TrialState.FAIL)
    view, given_up = read_at_boundary(study, fail_stale=False)
    assert given_up == [] and view.budget.waiting == 1  # the retry, in the view
    ran = []
    run_worker(study, lambda trial: ran.append(trial.number) or 1.0, threading.Event())
    assert len(ran) == 1 and budget(study).done


def test_a_claim_from_a_stale_read_takes_the_ticket_its_top_up_made(tmp_path: Path) -> None:
    """Where the others took every ticket the worker's read showed, it claims the one its own
    top-up just made (read again), rather than idling with a ticket queued."""
    url = f"sqlite:///{tmp_path / 's.db'}"
    settings = StudyRequest(study="s", trials=1, storage="", space="tiny").new_settings()
    create_or_join(open_storage(url), "s", settings, TICKET_WINDOW + 1)
    mine, others = join(open_storage(url), "s"), join(open_storage(url), "s")
    assert claim_trial(others) is not None
    view = read_study(mine)  # TICKET_WINDOW - 1 queued: a claim from it tops up one more
    while claim_trial(others, read_study(others)) is not None:
        if len(others.get_trials(states=(TrialState.RUNNING,))) == TICKET_WINDOW:
            break
    claimed = claim_trial(mine, view)
    assert claimed is not None and claimed.number == TICKET_WINDOW


def test_a_raise_read_late_still_runs_before_the_worker_exits(tmp_path: Path) -> None:
    """A busy worker takes the target it read before (read_at_boundary's `target`); where
    that older target shows nothing left to claim, it reads the target again rather than exit
    with the raised trials unrun."""
    url = f"sqlite:///{tmp_path / 't.db'}"
    settings = StudyRequest(study="t", trials=1, storage="", space="tiny").new_settings()
    create_or_join(open_storage(url), "t", settings, 2)
    study = join(open_storage(url, HeartbeatPolicy(1)), "t")
    ran = []

    def objective(trial: optuna.Trial) -> float:
        ran.append(trial.number)
        if len(ran) == 2:  # the first boundary read the target; the next takes it as read
            move_target(study, 4)
        return 1.0

    run_worker(study, objective, threading.Event())
    assert len(ran) == 4 and budget(study).done
