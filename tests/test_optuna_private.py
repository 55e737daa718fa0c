"""Every private Optuna name this project uses, imported and exercised here, so an Optuna
upgrade that moves one fails this file first, by name (storage/optuna_private.py uses them)."""

from __future__ import annotations

import copy
import inspect
import re
import threading
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import optuna
import pytest
import sqlalchemy
from optuna.artifacts import FileSystemArtifactStore, upload_artifact
from optuna.artifacts._upload import ARTIFACTS_ATTR_PREFIX  # noqa: F401  (the import is the test)
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback, _CachedStorage
from optuna.storages._heartbeat import BaseHeartbeat as OptunaBaseHeartbeat
from optuna.storages._heartbeat import get_heartbeat_thread, is_heartbeat_enabled  # noqa: F401
from optuna.trial import TrialState
from servers import server_url

from search.rules.space import TINY_SPACE, sample_config
from search.rules.study import fail_stale_trials
from search.training.worker import run_trial
from storage import HeartbeatPolicy, RetryPolicy, open_storage, optuna_private
from storage import has_heartbeat as has_heartbeat_url
from storage.optuna_private import RDB_CACHE_CALLS, STALE_TRIAL_IDS, Heartbeat

HEARTBEAT_OUTSIDE_OPTIMIZE = "ignore:Heartbeat of storage is supposed to be used"


@pytest.mark.filterwarnings(HEARTBEAT_OUTSIDE_OPTIMIZE)
def test_the_private_attributes_exist(tmp_path: Path) -> None:
    storage = open_storage(f"sqlite:///{tmp_path / 'o.db'}", HeartbeatPolicy(1))
    study = optuna.create_study(storage=storage)
    trial = study.ask()
    assert isinstance(study._study_id, int) and isinstance(trial._trial_id, int)
    assert trial.storage is study._storage
    assert study._storage._backend is storage  # Optuna caches an RDBStorage in _CachedStorage
    assert callable(RDBStorage._get_stale_trial_ids)
    assert FileSystemArtifactStore(tmp_path)._base_path == tmp_path


def test_claiming_a_chosen_waiting_trial_happens_once(tmp_path: Path) -> None:
    study = optuna.create_study(storage=open_storage(f"sqlite:///{tmp_path / 'o.db'}"))
    study.enqueue_trial({})
    waiting = study.get_trials(states=(TrialState.WAITING,))[0]
    claimed = optuna_private.claim_waiting_trial(study, waiting)
    assert claimed is not None and claimed.number == waiting.number
    assert optuna_private.claim_waiting_trial(study, waiting) is None


def test_the_sampler_starts_a_claimed_trial_from_the_trials_handed_to_it(tmp_path: Path) -> None:
    study = optuna.create_study(storage=open_storage(f"sqlite:///{tmp_path / 'o.db'}"))
    study.enqueue_trial({})
    seen = study.get_trials(deepcopy=False)
    claimed = optuna_private.claim_waiting_trial(study, seen[0], seen)
    assert claimed is not None and study._thread_local.cached_all_trials is seen
    assert study._get_trials(deepcopy=False, use_cache=True) is seen  # what samplers read
    study.tell(claimed, 1.0)
    assert study._thread_local.cached_all_trials is None  # the next trial reads afresh


class ReadingSampler(optuna.samplers.RandomSampler):
    """Reads the study's running trials as TPE with a constant liar does (use_cache=False),
    keeps what it got, and waits, up to 10 s, for `beat` where one is given."""

    def __init__(self, beat: threading.Event | None = None, fail: bool = False) -> None:
        super().__init__(seed=0)
        self.beat, self.fail, self.read, self.beaten = beat, fail, [], []

    def infer_relative_search_space(self, study: object, trial: object) -> dict:
        return {}

    def sample_relative(self, study: optuna.Study, trial: object, space: object) -> dict:
        if self.fail:
            raise RuntimeError("sampler broke")
        self.read.append(study._get_trials(deepcopy=False, use_cache=False))
        if self.beat is not None:
            self.beaten.append(self.beat.wait(timeout=10))
        return {}


def test_relative_params_are_sampled_from_the_handed_trials(tmp_path: Path) -> None:
    """Even TPE's uncached read of the running trials takes the trials the claim handed."""
    sampler = ReadingSampler()
    study = optuna.create_study(
        storage=open_storage(f"sqlite:///{tmp_path / 'o.db'}"), sampler=sampler
    )
    study.enqueue_trial({})
    seen = study.get_trials(deepcopy=False)
    claimed = optuna_private.claim_waiting_trial(study, seen[0], seen)
    optuna_private.sample_relative_params(study, claimed)
    assert sampler.read == [seen] and sampler.read[0] is seen
    assert claimed.relative_params == {} and len(sampler.read) == 1  # sampled once, not again
    assert "_get_trials" not in vars(study)  # the class's method again
    assert len(study._get_trials(deepcopy=False, use_cache=False)) == 1  # the study's own read


def test_a_sampler_failing_at_the_start_fails_the_trial_at_its_first_suggestion(
    tmp_path: Path,
) -> None:
    storage = open_storage(f"sqlite:///{tmp_path / 'o.db'}")
    study = optuna.create_study(storage=storage, sampler=ReadingSampler(fail=True))
    study.enqueue_trial({})
    seen = study.get_trials(deepcopy=False)
    claimed = optuna_private.claim_waiting_trial(study, seen[0], seen)
    optuna_private.sample_relative_params(study, claimed)  # not here: the objective's error
    assert "_get_trials" not in vars(study)
    with pytest.raises(RuntimeError, match="sampler broke"):
        claimed.suggest_float("x", 0.0, 1.0)


@pytest.mark.filterwarnings(HEARTBEAT_OUTSIDE_OPTIMIZE)
def test_a_claimed_trial_is_sampled_under_its_heartbeat(tmp_path: Path) -> None:
    """The sampler writes the params it drew: under random resets those writes' retries can
    outlast the grace, so they run with the trial's heartbeat thread already beating (sampled
    at the claim, before it, they ran with none: reverted at stop 34)."""
    beat = threading.Event()
    sampler = ReadingSampler(beat)
    storage = open_storage(f"sqlite:///{tmp_path / 'o.db'}", HeartbeatPolicy(60))
    study = optuna.create_study(storage=storage, sampler=sampler)
    study._storage.record_heartbeat = lambda trial_id: beat.set()  # the thread's, not the claim's
    study.enqueue_trial({})
    seen = study.get_trials(deepcopy=False)
    claimed = optuna_private.claim_waiting_trial(study, seen[0], seen)
    finished = run_trial(study, claimed, lambda trial: 0.5)
    assert finished.state == TrialState.COMPLETE and sampler.beaten == [True]


def a_trained_failed_trial(study: optuna.Study) -> optuna.trial.FrozenTrial:
    trial = study.ask()
    for i in range(8):
        trial.suggest_float(f"p{i}", 1e-4, 1.0, log=i % 2 == 0)
    trial.suggest_categorical("c", ["a", "b"])
    for key in ("architecture", "config", "epochs", "checkpoint", "device", "host", "worker"):
        trial.set_user_attr(key, {"epochs": [1, 2, 3]} if key == "epochs" else key)
    trial.report(2.3, 1)
    trial.report(float("inf"), 2)
    return study.tell(trial, state=TrialState.FAIL)


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
@pytest.mark.parametrize("server", ["sqlite", "postgresql", "mysql"])
def test_a_retry_is_inserted_in_a_few_statements_as_optuna_would(
    tmp_path: Path, server: str
) -> None:
    """Optuna's insert writes each param and attribute in three or four statements (56 here),
    each a chance for a flaky link to lose the whole transaction (test_faults_study's random
    resets took minutes to queue one retry). The rows are those Optuna's insert writes."""
    url = f"sqlite:///{tmp_path / 'o.db'}" if server == "sqlite" else server_url(server)
    study = optuna.create_study(storage=open_storage(url))
    failed = a_trained_failed_trial(study)
    plain = optuna.create_study(
        storage=optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'p.db'}")
    )
    statements = []
    sqlalchemy.event.listen(
        study._storage._backend.engine, "before_cursor_execute",
        lambda *args: statements.append(args[2]),
    )  # fmt: skip
    for into in (study, plain):
        RetryHeartbeatStaleTrialCallback(inherit_intermediate_values=True)(
            into, copy.deepcopy(failed)
        )
    assert len(statements) <= 12, statements
    ours, optunas = study.get_trials()[-1], plain.get_trials()[-1]
    for field in ("state", "params", "distributions", "user_attrs", "system_attrs", "values"):
        assert getattr(ours, field) == getattr(optunas, field), field
    assert ours.intermediate_values == optunas.intermediate_values == {1: 2.3, 2: float("inf")}
    assert ours.number == 1 and optuna_private.retry_of(ours) == failed.number


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_a_tickets_state_is_read_in_one_statement(tmp_path: Path, kind: str) -> None:
    url = f"sqlite:///{tmp_path / 'o.db'}" if kind == "sqlite" else f"journal://{tmp_path / 'j'}"
    storage = open_storage(url)
    study = optuna.create_study(storage=storage)
    study.enqueue_trial({})
    waiting = study.get_trials(deepcopy=False)[0]
    selects = []
    if kind == "sqlite":
        sqlalchemy.event.listen(
            storage.engine, "before_cursor_execute",
            lambda *args: selects.append(args[2]) if args[2].startswith("SELECT") else None,
        )  # fmt: skip
    assert optuna_private.trial_state(study._storage, waiting._trial_id) == TrialState.WAITING
    assert len(selects) == (1 if kind == "sqlite" else 0)  # a journal is read in memory
    study.ask()
    assert optuna_private.trial_state(study._storage, waiting._trial_id) == TrialState.RUNNING


def go_stale(study: optuna.Study) -> optuna.Trial:
    """A trial that sends one heartbeat and falls silent: stale once its 2 s grace is past
    (polled for, not slept through)."""
    trial = study.ask()
    with optuna_private.heartbeat(study, trial):
        pass
    assert optuna_private.stale_trial_numbers(study, 1, 2) == set()  # within its grace
    deadline = time.monotonic() + 30
    while not optuna_private.stale_trial_numbers(study, 1, 2) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert optuna_private.stale_trial_numbers(study, 1, 2) == {trial.number}
    return trial


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_the_heartbeat_interval_is_the_storages(tmp_path: Path, kind: str) -> None:
    url = f"sqlite:///{tmp_path / 'o.db'}" if kind == "sqlite" else f"journal://{tmp_path / 'j'}"
    study = optuna.create_study(storage=open_storage(url, HeartbeatPolicy(3)))
    assert optuna_private.heartbeat_interval_s(study) == 3
    without = optuna.load_study(study_name=study.study_name, storage=open_storage(url))
    assert optuna_private.heartbeat_interval_s(without) is None


@pytest.mark.filterwarnings(HEARTBEAT_OUTSIDE_OPTIMIZE)
def test_heartbeats_and_stale_trials_are_seen(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'o.db'}"
    study = optuna.create_study(storage=open_storage(url, HeartbeatPolicy(1)))
    assert optuna_private.has_heartbeat(study)
    assert not optuna_private.has_heartbeat(optuna.create_study(storage=open_storage(url)))
    trial = go_stale(study)
    # A reader opened without heartbeats (hpo status) sees it under the study's grace only.
    looking = optuna.load_study(study_name=study.study_name, storage=open_storage(url, reader=True))
    assert optuna_private.stale_trial_numbers(looking, 1, 2) == {trial.number}
    assert optuna_private.stale_trial_numbers(looking, 1800, 3600) == set()


def test_retry_bookkeeping_keys(tmp_path: Path) -> None:
    study = optuna.create_study(storage=open_storage(f"sqlite:///{tmp_path / 'o.db'}"))
    failed = study.tell(study.ask(), state=TrialState.FAIL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        RetryHeartbeatStaleTrialCallback()(study, failed)
    retry = study.get_trials()[-1]
    assert optuna_private.retry_of(retry) == failed.number
    assert optuna_private.retried_numbers(study.get_trials()) == {failed.number}
    assert optuna_private.retry_of(failed) is None


def test_forgetting_and_replacing_an_artifact(tmp_path: Path) -> None:
    study = optuna.create_study(storage=open_storage(f"sqlite:///{tmp_path / 'o.db'}"))
    trial = study.ask()
    store = FileSystemArtifactStore(tmp_path)
    source = tmp_path / "a.bin"
    source.write_bytes(b"one")
    artifact_id = upload_artifact(artifact_store=store, file_path=str(source), study_or_trial=trial)
    source.write_bytes(b"two")
    optuna_private.replace_artifact(store, artifact_id, source)
    assert store.open_reader(artifact_id).read() == b"two" and not source.exists()
    assert optuna_private.listed_artifacts(study.get_trials()[0]) == [artifact_id]
    optuna_private.forget_artifact(trial, artifact_id)
    listing = study.get_trials()[0].system_attrs[ARTIFACTS_ATTR_PREFIX + artifact_id]
    assert listing == "null" and optuna_private.listed_artifacts(study.get_trials()[0]) == []


def test_the_private_names_storage_uses(tmp_path: Path) -> None:
    """The heartbeat base class, its stale-trial query, and the RDBStorage methods Optuna's
    cache calls (a retry that missed one would not cover it)."""
    assert issubclass(Heartbeat, OptunaBaseHeartbeat)
    assert STALE_TRIAL_IDS in OptunaBaseHeartbeat.__abstractmethods__
    assert STALE_TRIAL_IDS in vars(Heartbeat)  # answered through stale_trial_ids
    cache_calls = set(re.findall(r"self\._backend\.(_\w+)\(", inspect.getsource(_CachedStorage)))
    assert cache_calls == {*RDB_CACHE_CALLS, STALE_TRIAL_IDS}
    assert all(callable(getattr(RDBStorage, name)) for name in RDB_CACHE_CALLS)


@pytest.mark.filterwarnings(HEARTBEAT_OUTSIDE_OPTIMIZE)
def test_journal_trials_send_heartbeats_and_go_stale(tmp_path: Path) -> None:
    url = f"journal://{tmp_path / 'j.log'}"
    assert has_heartbeat_url(url)
    study = optuna.create_study(storage=open_storage(url, HeartbeatPolicy(1)))
    assert optuna_private.has_heartbeat(study)
    trial = go_stale(study)
    looking = optuna.load_study(study_name=study.study_name, storage=open_storage(url, reader=True))
    assert optuna_private.stale_trial_numbers(looking, 1, 2) == {trial.number}
    # Failed and re-queued by the next stale check, as on the RDB storage.
    fail_stale_trials(study)
    retry = study.get_trials()[-1]
    assert study.get_trials()[0].state == TrialState.FAIL
    assert retry.state == TrialState.WAITING and optuna_private.retry_of(retry) == trial.number


def test_a_retry_is_judged_in_the_bracket_of_the_trial_it_continues() -> None:
    sizes = {"min_resource": 1, "max_resource": 27, "reduction_factor": 3}  # four brackets
    ours = optuna_private.OriginalTrialHyperband(**sizes)
    plain = optuna.pruners.HyperbandPruner(**sizes)
    study = optuna.create_study(pruner=ours)
    for pruner in (ours, plain):
        pruner._try_initialization(study)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = RetryHeartbeatStaleTrialCallback()
    pairs = []
    for _ in range(8):
        failed = study.tell(study.ask(), state=TrialState.FAIL)
        retry(study, failed)
        pairs.append((failed, study.tell(study.ask(), state=TrialState.FAIL)))
    assert all(optuna_private.retry_of(again) == failed.number for failed, again in pairs)
    assert all(ours._get_bracket_id(study, a) == ours._get_bracket_id(study, b) for a, b in pairs)
    # Where the bracket came from the trial's own number, some retries moved.
    assert any(plain._get_bracket_id(study, a) != plain._get_bracket_id(study, b) for a, b in pairs)


@pytest.mark.filterwarnings(HEARTBEAT_OUTSIDE_OPTIMIZE)
def test_stops_and_replaced_trials_are_recorded(tmp_path: Path) -> None:
    study = optuna.create_study(
        storage=open_storage(f"sqlite:///{tmp_path / 'o.db'}", HeartbeatPolicy(1))
    )
    trial = study.ask()
    optuna_private.mark_stopped(trial)
    optuna_private.mark_stopped(trial)  # repeated after a lost answer: recorded once
    failed = study.tell(trial, state=TrialState.FAIL)
    assert optuna_private.stopped_numbers(failed) == [failed.number]
    optuna_private.stale_trial_callback(study)(study, failed)  # a stop uses up no retry
    retry = study.get_trials()[-1]
    assert optuna_private.replaced_number(retry) == failed.number
    assert optuna_private.stopped_numbers(retry) == [failed.number]
    assert optuna_private.replaced_number(failed) is None
    assert optuna_private.stale_trial_callback(optuna.create_study()) is None


def test_a_retry_inserted_twice_is_one_trial(tmp_path: Path) -> None:
    """RDBStorage repeats a trial insert inside _create_new_trial; the prepared row is where
    a second copy of one retry is refused (optuna_private.retry_insert_once)."""
    assert callable(getattr(RDBStorage, optuna_private.RDB_PREPARE_TRIAL))
    storage = open_storage(f"sqlite:///{tmp_path / 'o.db'}", retry=RetryPolicy(limit_s=1))
    study = optuna.create_study(storage=storage)
    failed = study.tell(study.ask(), state=TrialState.FAIL)
    template = optuna.trial.create_trial(
        state=TrialState.WAITING,
        system_attrs={optuna_private.RETRY_OF_KEY: 0, optuna_private.RETRY_HISTORY_KEY: [0]},
    )
    study_id = study._study_id
    first = storage.create_new_trial(study_id, template_trial=template)
    again = storage.create_new_trial(study_id, template_trial=template)  # a repeat after a loss
    assert again == first
    assert [t.number for t in study.get_trials()] == [failed.number, 1]
    # A fresh trial (no history) is never taken for another.
    assert storage.create_new_trial(study_id) != first


def test_a_one_off_ticket_inserted_twice_is_one_trial(tmp_path: Path) -> None:
    """A ticket with TICKET_KEY (the report's Table 1 run) is keyed like a retry."""
    storage = open_storage(f"sqlite:///{tmp_path / 'o.db'}", retry=RetryPolicy(limit_s=1))
    study = optuna.create_study(storage=storage)
    ticket = optuna.trial.create_trial(
        state=TrialState.WAITING, user_attrs={optuna_private.TICKET_KEY: "first-0"}
    )
    first = storage.create_new_trial(study._study_id, template_trial=ticket)
    assert storage.create_new_trial(study._study_id, template_trial=ticket) == first
    key = (optuna_private.TICKET_KEY, "first-0")
    assert optuna_private.same_insert(study.get_trials(), key).number == 0
    plain = optuna.trial.create_trial(state=TrialState.WAITING)
    assert storage.create_new_trial(study._study_id, template_trial=plain) != first


def test_hyperband_builds_each_brackets_study_by_one_method() -> None:
    # OriginalTrialHyperband narrows each bracket's trials to one member per chain there.
    pruner = optuna_private.OriginalTrialHyperband(min_resource=1, max_resource=9)
    study = optuna.create_study(pruner=pruner)
    pruner._try_initialization(study)
    failed = study.tell(study.ask(), state=TrialState.FAIL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        RetryHeartbeatStaleTrialCallback(inherit_intermediate_values=True)(study, failed)
    bracket = pruner._create_bracket_study(study, pruner._get_bracket_id(study, failed))
    assert [t.number for t in bracket.get_trials(deepcopy=False)] == [1]  # the retry
    assert bracket.direction == study.direction and bracket._storage is study._storage


def test_under_hyperband_the_sampler_reads_the_handed_trials(tmp_path: Path) -> None:
    """The default pruner's bracket study reads through the study: the claim's view and the
    study's cache reach the sampler, as without a pruner (BENCHMARKS' saving holds there)."""
    sampler = ReadingSampler()
    pruner = optuna_private.OriginalTrialHyperband(min_resource=1, max_resource=9)
    study = optuna.create_study(
        storage=open_storage(f"sqlite:///{tmp_path / 'o.db'}"), sampler=sampler, pruner=pruner
    )
    study.enqueue_trial({})
    seen = study.get_trials(deepcopy=False)
    claimed = optuna_private.claim_waiting_trial(study, seen[0], seen)
    optuna_private.sample_relative_params(study, claimed)
    assert sampler.read == [seen] and sampler.read[0] is seen


class CountingReads:
    """Counts the storage's whole-study reads (get_all_trials)."""

    def __init__(self, study: optuna.Study) -> None:
        self.count, read = 0, study._storage.get_all_trials

        def counted(*args: object, **kwargs: object) -> list:
            self.count += 1
            return read(*args, **kwargs)

        study._storage.get_all_trials = counted


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_under_hyperband_a_trials_suggestions_read_the_study_as_often_as_without(
    tmp_path: Path,
) -> None:
    """TPE's independent suggestions read through the study's per-thread cache: under
    Hyperband each one read the whole study again (a fresh bracket study, an empty cache)."""
    reads = {}
    for name, pruner in (
        ("none", optuna.pruners.NopPruner()),
        ("hyperband", optuna_private.OriginalTrialHyperband(min_resource=1, max_resource=9)),
    ):
        sampler = optuna.samplers.TPESampler(
            seed=0, multivariate=True, group=True, constant_liar=True, n_startup_trials=2
        )
        storage = open_storage(f"sqlite:///{tmp_path / name}.db")
        study = optuna.create_study(storage=storage, sampler=sampler, pruner=pruner)
        for _ in range(4):
            trial = study.ask()
            branch = trial.suggest_categorical("branch", ["a", "b"])
            for i in range(6):  # conditional: sampled independently on a branch's first draws
                trial.suggest_float(f"{branch}{i}", 0.0, 1.0)
            study.tell(trial, trial.number % 3)
        counting = CountingReads(study)
        trial = study.ask()
        for i in range(6):
            trial.suggest_float(f"new{i}", 0.0, 1.0)  # in no group yet: independent
        reads[name] = counting.count
    assert reads["hyperband"] == reads["none"], reads


@pytest.mark.parametrize("server", ["sqlite", "postgresql", "mysql"])
def test_a_trials_params_are_written_in_one_transaction_as_optuna_would(
    tmp_path: Path, server: str
) -> None:
    """A trial of the tiny space with every lever (23 params) commits them once; the rows are
    the ones Optuna writes param by param."""
    url = f"sqlite:///{tmp_path / 'o.db'}" if server == "sqlite" else server_url(server)
    storage = open_storage(url)
    sampled = {}
    for how in ("one", "optuna"):
        name = f"params-{how}-{time.time_ns()}"
        study = optuna.create_study(
            study_name=name, storage=storage, sampler=optuna.samplers.RandomSampler(seed=3)
        )
        trial = study.ask()
        commits: list = []
        count = commits.append  # one listener object, to remove it by
        sqlalchemy.event.listen(storage.engine, "commit", count)
        with optuna_private.params_written_once(trial) if how == "one" else nullcontext():
            sample_config(trial, TINY_SPACE, 2)
        sqlalchemy.event.remove(storage.engine, "commit", count)
        stored = optuna.load_study(study_name=name, storage=url).trials[0]
        sampled[how] = (stored.params, stored.distributions, len(commits))
    (params, distributions, commits), (optunas, its_distributions, its_commits) = (
        sampled["one"],
        sampled["optuna"],
    )
    assert params == optunas and distributions == its_distributions and len(params) >= 15
    assert commits == 1 and its_commits == len(params), (commits, its_commits)


def test_a_trials_params_are_written_on_a_failed_sampling_and_checked(tmp_path: Path) -> None:
    study = optuna.create_study(storage=open_storage(f"sqlite:///{tmp_path / 'o.db'}"))
    study.enqueue_trial({"x": 0.5})
    trial = study.ask()
    with pytest.raises(ZeroDivisionError), optuna_private.params_written_once(trial):
        trial.suggest_float("x", 0.0, 1.0)
        raise ZeroDivisionError  # a sampling that failed after one suggestion
    assert study.trials[0].params == {"x": 0.5}  # written as Optuna would have
    second = study.ask()
    with (
        pytest.raises(ValueError, match="distribution"),
        optuna_private.params_written_once(second),
    ):
        second.suggest_int("x", 0, 3)  # another kind of distribution for the study's "x"
    assert study._storage.get_trial(second._trial_id).params == {}
