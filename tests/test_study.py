"""The study budget on real storages: tickets, claiming, targets, retries."""

from __future__ import annotations

import multiprocessing
import uuid
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from servers import server_url

from search.commands.launch import StudyRequest
from search.rules.cost import refuse_over_cap
from search.rules.settings import SettingsConflict
from search.rules.space import report_table1_params
from search.rules.study import (
    TICKET_WINDOW,
    StudyError,
    budget,
    claim_trial,
    create_or_join,
    join,
    move_target,
)
from storage import open_storage, queue_retry


def tiny_settings(**changes: object):
    return StudyRequest(study="s", trials=1, storage="", space="tiny", **changes).new_settings()


def test_new_study_holds_target_tickets_and_default_space_starts_from_table1(
    tmp_path: Path,
) -> None:
    storage = open_storage(f"sqlite:///{tmp_path / 'a.db'}")
    default = StudyRequest(study="d", trials=3, storage="").new_settings()
    settings, created = create_or_join(storage, "d", default, 3)
    assert created and settings == default
    waiting = join(storage, "d").get_trials(states=(TrialState.WAITING,))
    assert len(waiting) == 3
    assert waiting[0].system_attrs["fixed_params"] == report_table1_params()
    assert waiting[1].params == {} and waiting[1].system_attrs == {}  # a bare ticket

    again, created = create_or_join(storage, "d", tiny_settings(), 10)
    assert not created and again == default  # the stored settings win
    assert budget(join(storage, "d")).target == 3


def test_target_moves_up_never_down(tmp_path: Path) -> None:
    storage = open_storage(f"sqlite:///{tmp_path / 'a.db'}")
    create_or_join(storage, "s", tiny_settings(), 2)
    study = join(storage, "s")
    assert move_target(study, 5).waiting == 5
    with pytest.raises(StudyError, match="below the study's target 5"):
        move_target(study, 4)
    assert budget(study).target == 5


def test_only_a_window_of_tickets_is_queued_and_claims_top_it_up(tmp_path: Path) -> None:
    storage = open_storage(f"sqlite:///{tmp_path / 'a.db'}")
    create_or_join(storage, "s", tiny_settings(), TICKET_WINDOW + 5)
    study = join(storage, "s")
    assert len(study.trials) == TICKET_WINDOW
    assert budget(study).waiting == TICKET_WINDOW + 5
    for _ in range(TICKET_WINDOW + 5):
        study.tell(claim_trial(study), 1.0)
        assert len(study.get_trials(states=(TrialState.WAITING,))) <= TICKET_WINDOW
    assert claim_trial(study) is None
    assert len(study.trials) == TICKET_WINDOW + 5 and budget(study).done

    move_target(study, TICKET_WINDOW + 7)  # a raised target: claims make the new tickets
    assert len(study.trials) == TICKET_WINDOW + 5
    study.tell(claim_trial(study), 1.0)
    study.tell(claim_trial(study), 1.0)
    assert claim_trial(study) is None and budget(study).finished == TICKET_WINDOW + 7


def test_tickets_past_the_target_are_never_claimed(tmp_path: Path) -> None:
    storage = open_storage(f"sqlite:///{tmp_path / 'a.db'}")
    create_or_join(storage, "s", tiny_settings(), 2)
    study = join(storage, "s")
    study.enqueue_trial({})  # as a top-up racing another would leave
    assert [claim_trial(study).number, claim_trial(study).number] == [0, 1]
    assert claim_trial(study) is None
    assert budget(study).running == 2
    move_target(study, 3)
    assert claim_trial(study).number == 2  # the extra ticket counts once the target grows


def test_conflicting_flag_names_both_values() -> None:
    with pytest.raises(SettingsConflict, match="--epochs 3 .* epochs 20"):
        tiny_settings().check_flags({"epochs": 3, "space": None})
    tiny_settings().check_flags({"epochs": 20, "space": "tiny"})


def test_a_retry_replaces_the_failed_trial_in_the_budget(tmp_path: Path) -> None:
    storage = open_storage(f"sqlite:///{tmp_path / 'a.db'}")
    create_or_join(storage, "s", tiny_settings(), 2)
    study = join(storage, "s")
    trial = claim_trial(study)
    trial.suggest_float("x", 0, 1)
    trial.report(0.5, 1)
    failed = study.tell(trial, state=TrialState.FAIL)
    queue_retry(study, failed)
    state = budget(study)
    assert (state.finished, state.waiting, state.target) == (0, 2, 2)
    retry = claim_trial(study)
    assert retry.params == failed.params
    assert study.get_trials()[retry.number].intermediate_values == {1: 0.5}


def test_an_over_cap_draw_leaves_the_budget_and_a_new_ticket_takes_its_place(
    tmp_path: Path,
) -> None:
    storage = open_storage(f"sqlite:///{tmp_path / 'a.db'}")
    create_or_join(storage, "s", tiny_settings(), 2)
    study = join(storage, "s")
    skipped = claim_trial(study)
    with pytest.raises(optuna.TrialPruned):
        refuse_over_cap(skipped, gflops=2.0, max_gflops=1.0)
    study.tell(skipped, state=TrialState.PRUNED)  # as the worker tells it
    state = budget(study)
    assert (state.finished, state.running, state.waiting) == (0, 0, 2)
    numbers = []
    while (trial := claim_trial(study)) is not None:
        numbers.append(trial.number)
        study.tell(trial, 1.0)
    assert numbers == [1, 2] and budget(study).done  # ticket 2 was made for the skipped one
    assert len(study.trials) == 3


def claim_all(url: str, name: str, claimed: multiprocessing.Queue) -> None:
    study = join(open_storage(url), name)
    numbers = []
    while (trial := claim_trial(study)) is not None:
        numbers.append(trial.number)
        study.tell(trial, 1.0)
    claimed.put(numbers)


def storage_url(backend: str, tmp_path: Path) -> str:
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / 'race.db'}"
    if backend == "journal":
        return f"journal://{tmp_path / 'race.log'}"
    return server_url(backend)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite", "journal", "redis", "postgresql", "mysql"])
def test_concurrent_claims_never_hand_out_a_trial_twice(backend: str, tmp_path: Path) -> None:
    url, name = storage_url(backend, tmp_path), f"race-{uuid.uuid4().hex[:8]}"
    create_or_join(open_storage(url), name, tiny_settings(), 40)
    context = multiprocessing.get_context("spawn")
    claimed = context.Queue()
    workers = [context.Process(target=claim_all, args=(url, name, claimed)) for _ in range(3)]
    for worker in workers:
        worker.start()
    numbers = [n for _ in workers for n in claimed.get(timeout=180)]
    for worker in workers:
        worker.join(timeout=60)
    assert [worker.exitcode for worker in workers] == [0, 0, 0]
    assert sorted(numbers) == list(range(40))
    study = join(open_storage(url), name)
    assert budget(study).finished == 40
    # Racing top-ups may leave a few tickets past the target: queued, never run.
    assert all(t.state == TrialState.WAITING for t in study.trials[40:])
