"""A write that committed and whose answer was lost is repeated safely: no second trial, no
second retry, no lost retry, no trial RUNNING forever, no false message (storage/_retry.py).

The storage is a real SQLite file whose chosen writes lose their answer once (tests/lossy.py).
"""

from __future__ import annotations

import dataclasses
import io
import pickle
import sqlite3
import threading
from pathlib import Path

import optuna
import pytest
import sqlalchemy.event
from lossy import OUTSIDE_THE_LOOP, age_heartbeats, forget_losses, lossy_storage, lost_answer
from optuna.trial import TrialState
from rich.console import Console
from servers import SERVERS, server_url

import search.commands.launch
import search.rules.study
from search.commands.fleet import WorkerOptions
from search.commands.launch import StudyRequest, create_study, startup_retry
from search.commands.progress import SearchProgress
from search.commands.status import study_table
from search.rules import attrs
from search.rules.settings import SettingsConflict
from search.rules.space import load_space, report_table1_params, sample_config
from search.rules.study import (
    FIRST_TICKET,
    budget,
    claim_trial,
    create_or_join,
    fail_stale_trials,
    join,
    load_settings,
    move_target,
)
from search.training.stops import TrialInterrupted
from search.training.worker import run_trial
from storage import HeartbeatPolicy, RetryPolicy, StorageUnavailable, open_storage, optuna_private
from storage._open import _begin_immediate
from storage.optuna_private import TICKET_KEY

pytestmark = pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used")


def lossy_study(path: Path, target: int, max_retry: int = 3) -> optuna.Study:
    settings = StudyRequest(study="s", trials=target, storage="", space="tiny").new_settings()
    storage = lossy_storage(path, max_retry)
    create_or_join(storage, "s", settings, target)
    return join(storage, "s")


def lossy(study: optuna.Study):
    return study._storage._backend  # the RDB storage behind Optuna's cache


def crash(study: optuna.Study, trial: optuna.Trial, path: Path) -> None:
    """The trial's worker sent a heartbeat and died: a day later, its trial is stale."""
    with optuna_private.heartbeat(study, trial):
        pass
    age_heartbeats(path)
    forget_losses(lossy(study))


def retries_of(study: optuna.Study, number: int) -> list[optuna.trial.FrozenTrial]:
    return [t for t in study.get_trials() if optuna_private.replaced_number(t) == number]


def run_to_the_end(study: optuna.Study) -> None:
    while (trial := claim_trial(study)) is not None:
        study.tell(trial, 1.0)


# Inside Optuna's insert loop (what a server's lost commit is), and after it (all tries lost).
@pytest.mark.parametrize("where", ["_create_new_trial", OUTSIDE_THE_LOOP])
def test_a_retry_insert_whose_answer_is_lost_makes_one_retry(where: str, tmp_path: Path) -> None:
    study = lossy_study(tmp_path / "l.db", target=2)
    crash(study, claim_trial(study), tmp_path / "l.db")
    lossy(study).lose(where)
    fail_stale_trials(study)
    assert lossy(study).lost == [(where, None)]
    assert len(retries_of(study, 0)) == 1
    run_to_the_end(study)
    assert budget(study).finished == 2
    assert sum(t.state == TrialState.COMPLETE for t in study.get_trials()) == 2


def test_a_study_creation_whose_answer_is_lost_is_this_creation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: the repeat found the study, took it for another's, waited for its settings
    and failed; so did every later start."""
    monkeypatch.setattr(search.rules.study, "SETTINGS_WAIT_S", 1.0)  # fail fast, not in 60 s
    storage = lossy_storage(tmp_path / "l.db")
    storage.lose("create_new_study")
    settings = StudyRequest(study="s", trials=3, storage="", space="tiny").new_settings()
    assert create_or_join(storage, "s", settings, 3) == (settings, True)
    assert storage.lost == [("create_new_study", None)]
    assert load_settings(storage, "s") == settings  # what a later start reads
    study = join(storage, "s")
    assert budget(study).target == 3 and len(study.get_trials()) == 3
    run_to_the_end(study)
    assert budget(study).done


def test_a_creation_lost_while_another_process_creates_the_study_joins_it(
    tmp_path: Path,
) -> None:
    """This creation's request was lost (nothing written), and another `hpo start` created
    the study before the repeat: that study is taken for this one's, and completing it keeps
    the other's target and settings."""
    path, made = tmp_path / "l.db", []
    theirs = StudyRequest(study="s", trials=5, storage="", space="tiny", epochs=3)

    def meanwhile(_: str) -> None:  # said while this creation waits out its lost connection
        if not made:
            made.append(create_or_join(lossy_storage(path), "s", theirs.new_settings(), 5))

    storage = lossy_storage(path, say=meanwhile)
    storage.lose("create_new_study", before=True)
    ours = StudyRequest(study="s", trials=2, storage="", space="tiny", epochs=1).new_settings()
    assert create_or_join(storage, "s", ours, 2) == (theirs.new_settings(), False)
    assert made[0][1]  # the other one created it
    study = join(storage, "s")
    assert budget(study).target == 5
    assert load_settings(storage, "s") == theirs.new_settings()


def test_a_creator_refused_after_a_lost_creation_leaves_the_target_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`hpo start --trials 50 --epochs 1` whose creation was lost while another start made the
    study with --epochs 3 --trials 10 is refused, and the target stays 10; one whose flags
    agree raises it as a joiner does. Before: refused, with the target raised to 50."""
    path, made = tmp_path / "l.db", []
    theirs = StudyRequest(study="s", trials=10, storage="", space="tiny", epochs=3)

    def meanwhile(_: str) -> None:  # said while this creation waits out its lost connection
        if not made:
            made.append(create_or_join(lossy_storage(path), "s", theirs.new_settings(), 10))

    storage = lossy_storage(path, say=meanwhile)
    monkeypatch.setattr(search.commands.launch, "open_storage", lambda *_, **__: storage)
    progress = SearchProgress(Console(file=io.StringIO()))
    storage.lose("create_new_study", before=True)
    refused = StudyRequest(study="s", trials=50, storage="", space="tiny", epochs=1)
    with pytest.raises(SettingsConflict, match="epochs"):
        create_study(refused, progress)
    assert storage.lost == [("create_new_study", None)] and made[0][1]  # theirs created it
    assert budget(join(storage, "s")).target == 10
    storage.lose("create_new_study", before=True)
    create_study(dataclasses.replace(refused, epochs=None), progress)
    assert budget(join(storage, "s")).target == 50


@pytest.mark.parametrize(("first_trials", "second_trials"), [(5, 2), (2, 5)])
def test_two_creators_interleaved_store_one_settings_and_the_winner_s_target(
    first_trials: int, second_trials: int, tmp_path: Path
) -> None:
    """This creation's request was lost; another `hpo start` creates the study and is held
    just before it writes the settings; this one's repeat takes the study for its own and
    completes it. Before: both stored their settings and both were told they created the
    study (their workers would train different epochs in it). The one told it joined raises
    the target only once its flags pass (the test above)."""
    path, made = tmp_path / "l.db", []
    theirs = StudyRequest(study="s", trials=first_trials, storage="", space="tiny", epochs=3)
    held, go_on = threading.Event(), threading.Event()
    other = lossy_storage(path)
    write = other.set_study_user_attr

    def held_before_the_settings(study_id: int, key: str, value: object) -> None:
        if key == attrs.SETTINGS and not held.is_set():
            held.set()
            go_on.wait(timeout=60)
        write(study_id, key, value)

    other.set_study_user_attr = held_before_the_settings
    creator = threading.Thread(
        target=lambda: made.append(create_or_join(other, "s", theirs.new_settings(), first_trials))
    )

    def meanwhile(_: str) -> None:  # said while this creation waits out its lost connection
        if not creator.is_alive() and not held.is_set():
            creator.start()
            assert held.wait(timeout=60)

    storage = lossy_storage(path, say=meanwhile)
    storage.lose("create_new_study", before=True)
    ours = StudyRequest(study="s", trials=second_trials, storage="", space="tiny", epochs=1)
    mine = create_or_join(storage, "s", ours.new_settings(), second_trials)
    go_on.set()
    creator.join(timeout=60)
    stored = load_settings(storage, "s")
    assert [mine[1], made[0][1]].count(True) == 1, (mine, made)  # exactly one creator
    assert mine[0] == made[0][0] == stored  # the workers of both train one recipe
    assert budget(join(storage, "s")).target == first_trials  # the creator's (theirs)


def report_configs(trials: list[optuna.trial.FrozenTrial]) -> list[int]:
    table1 = report_table1_params()
    return [t.number for t in trials if t.params == table1]


@pytest.mark.parametrize("where", ["_create_new_trial", OUTSIDE_THE_LOOP])
def test_a_lost_insert_of_the_report_ticket_makes_one(where: str, tmp_path: Path) -> None:
    """The study's first ticket is the report's Table 1 run: repeated after a lost answer,
    it is still one ticket. Before: `counted` held trials 0 and 1, both the report's."""
    storage = lossy_storage(tmp_path / "l.db")
    storage.lose(where)  # the first insert of the creation: the report's ticket
    settings = StudyRequest(study="s", trials=3, storage="").new_settings()  # default space
    create_or_join(storage, "s", settings, 3)
    assert storage.lost == [(where, None)]
    study = join(storage, "s")
    space = load_space(settings.space_name)
    while (trial := claim_trial(study)) is not None:  # each samples, as the objective does
        sample_config(trial, space, settings.epochs)
        study.tell(trial, 1.0)
    finished = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(finished) == 3 and report_configs(finished) == [0]
    # One row, not a copy the budget then ignores: the keyed insert made none.
    assert first_tickets(study) == [0]


def first_tickets(study: optuna.Study) -> list[int]:
    return [t.number for t in study.get_trials() if t.user_attrs.get(TICKET_KEY) == FIRST_TICKET]


def test_a_copy_of_the_report_ticket_a_storage_made_anyway_is_no_ticket(tmp_path: Path) -> None:
    """On a journal storage a repeated insert (redis-py repeats a command itself) can leave a
    copy of the report's ticket; ranked inside the target, it must not run the report's
    config twice: the next ticket takes its place."""
    storage = open_storage(f"journal://{tmp_path / 'j.log'}")
    settings = StudyRequest(study="s", trials=3, storage="").new_settings()  # default space
    create_or_join(storage, "s", settings, 3)
    study = join(storage, "s")
    copy = {TICKET_KEY: FIRST_TICKET}
    study.enqueue_trial(report_table1_params(), user_attrs=copy, skip_if_exists=False)
    move_target(study, 4)  # the copy (trial 3) ranks fourth: inside the target
    space = load_space(settings.space_name)
    while (trial := claim_trial(study)) is not None:
        sample_config(trial, space, settings.epochs)
        study.tell(trial, 1.0)
    finished = study.get_trials(states=(TrialState.COMPLETE,))
    assert first_tickets(study) == [0, 3]
    assert len(finished) == 4 and report_configs(finished) == [0]


def test_a_stale_fail_whose_answer_is_lost_still_queues_the_retry(tmp_path: Path) -> None:
    study = lossy_study(tmp_path / "l.db", target=2)
    crash(study, claim_trial(study), tmp_path / "l.db")
    lossy(study).lose("set_trial_state_values", TrialState.FAIL)
    fail_stale_trials(study)
    assert lossy(study).lost == [("set_trial_state_values", TrialState.FAIL)]
    assert len(retries_of(study, 0)) == 1
    run_to_the_end(study)
    state = budget(study)
    assert (state.finished, state.running, state.given_up) == (2, 0, 0)


def test_a_claim_whose_answer_and_heartbeat_are_lost_goes_stale(tmp_path: Path) -> None:
    study = lossy_study(tmp_path / "l.db", target=3)
    lossy(study).lose("set_trial_state_values", TrialState.RUNNING)
    lossy(study).lose("record_heartbeat", before=True)  # the connection stays down a while
    # Ticket 0 was claimed, its answer lost: this is another ticket (after a lost ticket a
    # worker tries the rest in random order, search/study.claim_trial).
    claimed = claim_trial(study)
    assert claimed.number != 0 and len(lossy(study).lost) == 2
    assert study.get_trials()[0].state == TrialState.RUNNING  # no worker runs it
    study.tell(claimed, 1.0)
    age_heartbeats(tmp_path / "l.db")  # the heartbeat marking the lost claim landed
    forget_losses(lossy(study))
    fail_stale_trials(study)
    assert study.get_trials()[0].state == TrialState.FAIL and len(retries_of(study, 0)) == 1
    run_to_the_end(study)
    assert budget(study).finished == 3
    assert not study.get_trials(states=(TrialState.RUNNING,))


def test_a_complete_whose_answer_is_lost_is_complete_without_a_false_message(
    tmp_path: Path,
) -> None:
    study = lossy_study(tmp_path / "l.db", target=1)
    lossy(study).lose("set_trial_state_values", TrialState.COMPLETE)
    said: list[str] = []
    finished = run_trial(study, claim_trial(study), lambda trial: 0.25, said.append)
    assert lossy(study).lost and said == []
    assert finished.state == TrialState.COMPLETE and finished.value == 0.25
    assert budget(study).done


def interrupted(trial: optuna.Trial) -> float:
    raise TrialInterrupted("stopped after epoch 1")


def test_a_stop_whose_fail_answer_is_lost_is_still_requeued(tmp_path: Path) -> None:
    study = lossy_study(tmp_path / "l.db", target=1)
    lossy(study).lose("set_trial_state_values", TrialState.FAIL)
    said: list[str] = []
    stopped = run_trial(study, claim_trial(study), interrupted, said.append)
    assert lossy(study).lost and said == []
    assert stopped.user_attrs[attrs.FAIL_REASON].startswith(attrs.STOPPED_PREFIX)
    assert [t.state for t in retries_of(study, 0)] == [TrialState.WAITING]


def test_stops_do_not_use_up_max_retry_and_crashes_do(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    study = lossy_study(path, target=1, max_retry=2)
    for _ in range(3):  # three SIGTERMs of the same trial: it is resumed each time
        trial = claim_trial(study)
        assert run_trial(study, trial, interrupted, print).state == TrialState.FAIL
    for _ in range(3):  # then it crashes three times: max_retry 2, so it fails for good
        trial = claim_trial(study)
        assert trial is not None and optuna_private.retry_of(study.trials[trial.number]) == 0
        crash(study, trial, path)
        fail_stale_trials(study)
    assert claim_trial(study) is None
    state = budget(study)
    assert (state.finished, state.given_up, state.running, state.done) == (1, 1, 0, True)
    assert len(study.trials) == 6  # the ticket and five retries: three stops, two crashes
    console = Console(width=200, record=True)
    console.print(study_table(study, artifact_dir=tmp_path))
    shown = console.export_text()
    assert "1 / 1" in shown and "MB in" in shown
    assert "failed for good" in shown and "1 (counted as finished" in shown


def test_target_raises_never_lower_it_and_a_lost_raise_lands_once(tmp_path: Path) -> None:
    study = lossy_study(tmp_path / "l.db", target=2)
    lossy(study).lose("set_study_user_attr")
    assert move_target(study, 7).target == 7 and lossy(study).lost
    # A second `hpo start --trials 5` that read the target 2 before the raise to 7 writes:
    study.set_user_attr(f"{attrs.TARGET_RAISED}5", 5)
    assert budget(study).target == 7


def test_past_the_limit_the_policy_gives_up_once_not_per_call() -> None:
    attempts = []

    def lost() -> None:
        attempts.append(1)
        raise lost_answer()

    policy = RetryPolicy(limit_s=0.2, first_delay_s=0.05, say=lambda _: None)
    with pytest.raises(StorageUnavailable) as first:
        policy.call("tell", lost, lambda: None)
    assert len(attempts) > 1
    attempts.clear()
    # The trial's summary on the way out, or another thread: the same line, whichever is shown.
    with pytest.raises(StorageUnavailable) as again:
        policy.call("set_trial_user_attr", lost, lambda: None)
    assert len(attempts) == 1  # no second window
    assert str(again.value) == str(first.value) and "giving up" in str(first.value)
    assert policy.call("get_trial", lambda: 3, lambda: None) == 3 and not policy.gave_up


@pytest.mark.parametrize("url", ["sqlite:///{}/p.db", "journal://{}/p.log", "postgresql", "redis"])
def test_the_storages_hpo_opens_pickle(url: str, tmp_path: Path) -> None:
    """Opened as a worker opens them: heartbeats, and the retry policy that says its lines
    on the search's progress console (before: its lock did not pickle)."""
    url = server_url(url) if url in SERVERS else url.format(tmp_path)
    progress = SearchProgress(Console(file=io.StringIO()))
    retry = startup_retry(WorkerOptions(storage_retry_s=5), progress)
    storage = open_storage(url, HeartbeatPolicy(interval_s=1), retry=retry)
    copy = pickle.loads(pickle.dumps(storage))
    assert copy._retry == dataclasses.replace(retry, say=print)  # the copy prints its lines
    study = optuna.create_study(storage=copy)
    study.tell(study.ask(), 1.0)
    assert optuna.load_study(study_name=study.study_name, storage=storage).best_value == 1.0


def test_an_unpickled_sqlite_storage_takes_the_write_lock_at_begin(tmp_path: Path) -> None:
    database = tmp_path / "p.db"
    storage = open_storage(f"sqlite:///{database}", retry=RetryPolicy())
    copy = pickle.loads(pickle.dumps(storage))
    assert sqlalchemy.event.contains(copy.engine, "begin", _begin_immediate)
    with copy.engine.connect() as connection, connection.begin():
        # A transaction of the copy holds the write lock from its start, so another copy
        # cannot read a WAITING trial and claim it meanwhile: its BEGIN IMMEDIATE waits.
        other = sqlite3.connect(database, timeout=0, isolation_level=None)
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            other.execute("BEGIN IMMEDIATE")
        other.close()


def test_a_trials_params_whose_answer_was_lost_are_written_once(tmp_path: Path) -> None:
    """Repeated, the one transaction of a trial's params breaks their unique key and is rolled
    back whole: the first write stands, and the sampled config is the trial's."""
    study = lossy_study(tmp_path / "s.db", target=2)
    trial = study.ask()
    lossy(study).lose("set_trial_params")
    with optuna_private.params_written_once(trial):
        cfg = sample_config(trial, load_space("tiny"), 2)
    assert lossy(study).lost == [("set_trial_params", None)]
    stored = study._storage.get_trial(trial._trial_id)
    assert stored.params == trial.params and len(stored.params) >= 15
    assert cfg == search.rules.space.config_from_params(stored.params, load_space("tiny"), 2)
