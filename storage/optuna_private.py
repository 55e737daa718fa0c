"""Every use of a private Optuna name, in this one module.

Each stands in for a public API Optuna lacks; its comment names the gap. It sits in storage/
so that both storage/ (heartbeats, retries) and search/ (claims, stale trials, artifacts) can
use it; tests/test_optuna_private.py imports and exercises every name, so an Optuna upgrade
that moves one fails there first, by name.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Container, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, suppress
from pathlib import Path
from types import SimpleNamespace

import optuna
import sqlalchemy
from optuna.artifacts import FileSystemArtifactStore
from optuna.artifacts._upload import ARTIFACTS_ATTR_PREFIX
from optuna.distributions import distribution_to_json
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import _CachedStorage
from optuna.storages._heartbeat import BaseHeartbeat, get_heartbeat_thread, is_heartbeat_enabled
from optuna.trial import FrozenTrial, TrialState

# System attributes RetryHeartbeatStaleTrialCallback writes on a retry. Its public readers
# (retried_trial_number, retry_history) are experimental and warn on every call, and every
# claim reads them for every trial of the study.
RETRY_OF_KEY = "failed_trial"
RETRY_HISTORY_KEY = "retry_history"
# This project's own system attribute, copied to a retry with the two above: the numbers of
# the chain's trials that ended by a stop (SIGTERM, Ctrl-C), which do not use up max_retry.
STOPS_KEY = "hpo:stopped"
# A user attribute naming a ticket of which the study holds one only (the report's Table 1
# ticket): an insert of it repeated after a lost answer makes no second copy.
TICKET_KEY = "hpo:ticket"


def claim_waiting_trial(
    study: optuna.Study, waiting: FrozenTrial, trials: list[FrozenTrial] | None = None
) -> optuna.Trial | None:
    """Move this WAITING trial to RUNNING if no one else did first; the Trial, or None.
    `trials`: the study's trials as the caller has just read them, which the sampler then
    starts the trial from instead of reading them again.

    Missing API: `study.ask()` pops whichever WAITING trial the storage likes; there is no
    public way to claim a chosen one (a retry before fresh tickets, only tickets in budget).
    """
    try:
        # A read first, without a lock: in a fleet most tickets a worker tries were just taken,
        # and a claim (a heartbeat, then the trial's row lock) on each queued every worker
        # behind the same rows (docs/BENCHMARKS.md, "A fleet on one database").
        if trial_state(study._storage, waiting._trial_id) != TrialState.WAITING:
            return None
        # The storage compares and sets: False when another worker claimed it first.
        if study._storage.set_trial_state_values(waiting._trial_id, TrialState.RUNNING):
            if trials is not None:
                sample_from(study, trials)
            return optuna.Trial(study, waiting._trial_id)
    except UpdateFinishedTrialError:
        pass
    return None


# The one-column read of a trial's state, which the RDB storages of storage/_open.py have
# (StateQuery); a storage without it reads the whole trial.
STATE_QUERY = "get_trial_state"


def trial_state(storage: optuna.storages.BaseStorage, trial_id: int) -> TrialState:
    """The trial's state as stored now.

    Missing API: Optuna's cache in front of an RDBStorage (_CachedStorage) is private, and
    its get_trial reads an unfinished trial whole: params, values, attributes and reports.
    """
    read_state = getattr(_uncached(storage), STATE_QUERY, None)
    return storage.get_trial(trial_id).state if read_state is None else read_state(trial_id)


def _uncached(storage: optuna.storages.BaseStorage) -> optuna.storages.BaseStorage:
    """The storage behind Optuna's cache, which every RDBStorage is given (_CachedStorage).

    Missing API: the cache and its backend are private.
    """
    return storage._backend if isinstance(storage, _CachedStorage) else storage


class StateQuery:
    """An RDBStorage's read of one trial's state: one column of one row, in one statement
    (get_trial takes six). Mixed into the RDBStorage classes of storage/_open.py.

    Missing API: no storage reads a trial's state alone, and the session is private.
    """

    def get_trial_state(self, trial_id: int) -> TrialState:
        from optuna.storages._rdb import models
        from optuna.storages._rdb.storage import _create_scoped_session

        with _create_scoped_session(self.scoped_session) as session:
            query = session.query(models.TrialModel.state)
            state = query.filter(models.TrialModel.trial_id == trial_id).scalar()
        if state is None:
            raise KeyError(f"no trial with id {trial_id}")
        return state


class RetryInsert:
    """An RDBStorage that inserts a retry in one statement per table. Optuna writes each of a
    template's params and attributes through its update path (a read of the trial, a look for
    an existing row, a check of the param's distribution against the study's, an insert): a
    retry of a trained trial took 56 statements, each a chance for a flaky link to lose the
    whole transaction, and it ran under the study row's lock (docs/BENCHMARKS.md). A retry's
    params are its failed trial's, checked when that trial set them. Mixed into the RDBStorage
    classes of storage/_open.py; any other template takes Optuna's path.

    Missing API: a trial's insert (`_get_prepared_new_trial`), its session and the table
    models are private.
    """

    def _get_prepared_new_trial(
        self, study_id: int, template: FrozenTrial | None, session: object
    ) -> object:
        if template is None or RETRY_OF_KEY not in template.system_attrs:
            return super()._get_prepared_new_trial(study_id, template, session)
        from optuna.storages._rdb import models

        trial = models.TrialModel(
            study_id=study_id,
            number=None,
            state=template.state,
            datetime_start=template.datetime_start,
            datetime_complete=template.datetime_complete,
        )
        session.add(trial)
        session.flush()  # the trial's id, which its rows name
        for model, rows in _template_rows(models, trial.trial_id, template).items():
            if rows:  # one statement a table (executemany)
                session.execute(sqlalchemy.insert(model), rows)
        trial.number = trial.count_past_trials(session)
        return trial


# A trial's params held while it samples and written at once (ParamsWrite).
PARAMS_WRITE = "set_trial_params"


class ParamsWrite:
    """An RDBStorage that writes a trial's params in one transaction. Optuna writes each
    suggested param in a transaction of its own: a trial of the tiny space with every recipe
    lever suggests 23, and each commit cost more than the sampling it stored
    (docs/BENCHMARKS.md). Mixed into the RDBStorage classes of storage/_open.py.

    Missing API: a param's write inside a caller's transaction, and the session, are private.
    """

    def set_trial_params(self, trial_id: int, params: list[tuple]) -> None:
        """`params`: (name, internal value, distribution, the study's known distribution of
        that name or None); each is checked as Optuna's own write checks it."""
        from optuna.storages._rdb.storage import _create_scoped_session

        # A repeat (its answer lost) breaks the params' unique key and is rolled back whole,
        # as Optuna's own param write is: the first one stands.
        with _create_scoped_session(self.scoped_session, ignore_integrity_error=True) as session:
            for name, value, distribution, known in params:
                self._set_trial_param_without_commit(
                    session, trial_id, name, value, distribution, known
                )


@contextmanager
def params_written_once(trial: optuna.Trial) -> Iterator[None]:
    """Hold the params the block suggests and write them in one transaction as it ends (on an
    error too, as Optuna would have written them); a storage without ParamsWrite writes each
    as Optuna does. The other workers' samplers see them a sampling's time later.

    Missing API: a trial writes through its `storage` attribute and Optuna's cache
    (_CachedStorage) keeps each param name's distribution in private fields.
    """
    cached = trial.storage
    backend = getattr(cached, "_backend", None)
    if not isinstance(cached, _CachedStorage) or not hasattr(backend, PARAMS_WRITE):
        yield
        return
    held: list[tuple] = []
    trial.storage = _HoldingParams(cached, held)
    try:
        yield
    except BaseException:
        trial.storage = cached
        with suppress(Exception):  # never hides why the sampling failed
            _write_held(cached, trial._trial_id, held)
        raise
    trial.storage = cached
    _write_held(cached, trial._trial_id, held)


class _HoldingParams:
    """A trial's storage that holds its param writes; everything else is the storage's."""

    def __init__(self, storage: _CachedStorage, held: list[tuple]) -> None:
        self._storage, self._held = storage, held

    def set_trial_param(self, trial_id: int, name: str, value: float, distribution: object) -> None:
        self._held.append((name, value, distribution))

    def __getattr__(self, name: str) -> object:
        return getattr(self._storage, name)


def _write_held(cached: _CachedStorage, trial_id: int, held: list[tuple]) -> None:
    if not held:
        return
    with cached._lock:  # as _CachedStorage.set_trial_param
        study_id, _ = cached._trial_id_to_study_id_and_number[trial_id]
        known = cached._studies[study_id].param_distribution
        params = [(name, value, dist, known.get(name)) for name, value, dist in held]
        getattr(cached._backend, PARAMS_WRITE)(trial_id, params)
        for name, _, distribution in held:
            known.setdefault(name, distribution)


def _template_rows(models: object, trial_id: int, template: FrozenTrial) -> dict[type, list]:
    """The rows Optuna's insert of `template` writes other than the trial's own, by table."""
    values = [models.TrialValueModel.value_to_stored_repr(v) for v in template.values or []]
    to_stored = models.TrialIntermediateValueModel.intermediate_value_to_stored_repr
    steps = [(step, *to_stored(value)) for step, value in template.intermediate_values.items()]
    return {
        models.TrialValueModel: [
            {"trial_id": trial_id, "objective": i, "value": stored, "value_type": kind}
            for i, (stored, kind) in enumerate(values)
        ],
        models.TrialParamModel: [
            {
                "trial_id": trial_id,
                "param_name": name,
                "param_value": template.distributions[name].to_internal_repr(value),
                "distribution_json": distribution_to_json(template.distributions[name]),
            }
            for name, value in template.params.items()
        ],
        models.TrialUserAttributeModel: _attribute_rows(trial_id, template.user_attrs),
        models.TrialSystemAttributeModel: _attribute_rows(trial_id, template.system_attrs),
        models.TrialIntermediateValueModel: [
            {
                "trial_id": trial_id,
                "step": step,
                "intermediate_value": stored,
                "intermediate_value_type": kind,
            }
            for step, stored, kind in steps
        ],
    }


def _attribute_rows(trial_id: int, attributes: dict) -> list[dict]:
    return [
        {"trial_id": trial_id, "key": k, "value_json": json.dumps(v)} for k, v in attributes.items()
    ]


def sample_from(study: optuna.Study, trials: list[FrozenTrial]) -> None:
    """Have the sampler read these trials, until the next tell, where it reads the study's
    trials through its cache; sample_relative_params has it read them where it would not.

    Missing API: a sampler reads the trials through Study._get_trials's cache, per thread,
    which `ask` empties and `tell` drops; nothing public hands it trials read just before.
    """
    study._thread_local.cached_all_trials = trials


def sample_relative_params(study: optuna.Study, trial: optuna.Trial) -> None:
    """Sample the trial's relative params now, from the trials handed over by sample_from.
    Optuna samples them at the first suggestion, and with a constant liar TPE then reads every
    unfinished trial again, past the cache (7 statements and the running trials' rows;
    docs/BENCHMARKS.md, "Exactly N at bare Optuna's speed"). Call it under the trial's
    heartbeat: the sampler writes the params it drew, for the other workers' liars.
    Where the sampler fails, the first suggestion samples again and the trial fails of it.

    Missing API: TPE reads the running trials with use_cache=False, and the relative params
    are sampled only by the property that the first suggestion reads.
    """
    if study._thread_local.cached_all_trials is None:  # nothing handed over
        return
    study._get_trials = functools.partial(_cached_read, study._get_trials)
    try:
        with suppress(Exception):
            trial.relative_params  # noqa: B018
    finally:
        del study._get_trials  # the class's method again


def _cached_read(
    read: Callable[..., list[FrozenTrial]],
    deepcopy: bool = True,
    states: Container[TrialState] | None = None,
    use_cache: bool = False,
) -> list[FrozenTrial]:
    return read(deepcopy, states, use_cache=True)


def heartbeat(study: optuna.Study, trial: optuna.Trial) -> AbstractContextManager:
    """Send the trial's heartbeats while the block runs (a no-op without heartbeats).

    Missing API: Optuna starts this thread only inside `study.optimize`.
    """
    return get_heartbeat_thread(trial._trial_id, study._storage)


def has_heartbeat(study: optuna.Study) -> bool:
    """Whether the study's storage was opened with heartbeats.

    Missing API: a study's storage is not public, nor is this check.
    """
    return is_heartbeat_enabled(study._storage)


def heartbeat_interval_s(study: optuna.Study) -> int | None:
    """Seconds between the heartbeats of the study's storage; None without heartbeats.

    Missing API: a study's storage is not public.
    """
    return study._storage.get_heartbeat_interval() if has_heartbeat(study) else None


def stale_trial_callback(study: optuna.Study) -> Callable[[optuna.Study, FrozenTrial], None] | None:
    """What the study's storage does with a stale trial it failed (None without heartbeats).

    Missing API: a study's storage is not public.
    """
    if not is_heartbeat_enabled(study._storage):
        return None
    return study._storage.get_heartbeat_stale_trial_callback()


def stale_trial_numbers(study: optuna.Study, interval_s: int, grace_s: int) -> set[int]:
    """RUNNING trials silent for more than `grace_s`, without failing them (`hpo status`
    only looks). The study's storage may have opened without heartbeats: a reader learns
    the study's heartbeat setting from the study, after the one open it needs.

    Missing API: `optuna.storages.fail_stale_trials` fails them and nothing public lists
    them; a storage's heartbeat settings are fixed at open, so they are set here.
    """
    storage = _uncached(study._storage)
    storage.heartbeat_interval, storage.grace_period = interval_s, grace_s
    stale_ids = set(storage._get_stale_trial_ids(study._study_id))
    return {t.number for t in study.get_trials(deepcopy=False) if t._trial_id in stale_ids}


def retry_of(trial: FrozenTrial) -> int | None:
    """The number of the original trial this one retries; None for a fresh trial."""
    return trial.system_attrs.get(RETRY_OF_KEY)


def original_number(trial: optuna.Trial) -> int:
    """The number of the first trial of a retry chain; the trial's own for a fresh one.

    Missing API: a running Trial has no public system_attrs (FrozenTrial's are public).
    """
    system_attrs = trial.storage.get_trial_system_attrs(trial._trial_id)
    return system_attrs.get(RETRY_OF_KEY, trial.number)


class OriginalTrialHyperband(optuna.pruners.HyperbandPruner):
    """Hyperband that judges a retry in the bracket of the trial it continues, against one
    member of every other chain, as the uninterrupted trial would have been judged.

    Missing API: the bracket is a hash of the trial's number (`_get_bracket_id`, also used to
    filter each bracket's trials), and a retry has a number of its own.
    """

    def _get_bracket_id(self, study: optuna.Study, trial: FrozenTrial) -> int:
        original = trial.system_attrs.get(RETRY_OF_KEY, trial.number)
        return super()._get_bracket_id(study, SimpleNamespace(number=original))

    def _create_bracket_study(self, study: optuna.Study, bracket_id: int) -> optuna.Study:
        # Missing API: a rung's competitors are every trial of the bracket with the rung's
        # record (`completed_rung_K`), whatever its state; a retry copies its original's
        # records, so each chain must compete once (one_per_chain), as one uninterrupted trial.
        return _OneMemberPerChain(super()._create_bracket_study(study, bracket_id))


def replaced_number(trial: FrozenTrial) -> int | None:
    """The number of the trial this retry replaces (the chain's latest before it)."""
    history = trial.system_attrs.get(RETRY_HISTORY_KEY)
    return history[-1] if history else None


def stopped_numbers(trial: FrozenTrial) -> list[int]:
    """Numbers of the trials of this trial's chain, itself included, that ended by a stop."""
    return list(trial.system_attrs.get(STOPS_KEY, []))


def mark_stopped(trial: optuna.Trial) -> None:
    """Record that this running trial ends by a stop; its retry inherits the record.

    Missing API: a running Trial has no public system_attrs.
    """
    stopped = trial.storage.get_trial_system_attrs(trial._trial_id).get(STOPS_KEY, [])
    if trial.number not in stopped:  # repeated after a lost answer: once
        stopped = [*stopped, trial.number]
    trial.storage.set_trial_system_attr(trial._trial_id, STOPS_KEY, stopped)


def retried_numbers(trials: list[FrozenTrial]) -> set[int]:
    """Numbers of trials that a later trial retries."""
    retried: set[int] = set()
    for trial in trials:
        retried.update(trial.system_attrs.get(RETRY_HISTORY_KEY, []))
    return retried


def forget_artifact(trial: optuna.Trial, artifact_id: str) -> None:
    """Drop a removed artifact from the trial's artifact listing, as the dashboard does.

    Missing API: Optuna can upload an artifact to a trial but not unlist one.
    """
    listing = ARTIFACTS_ATTR_PREFIX + artifact_id
    trial.storage.set_trial_system_attr(trial._trial_id, listing, json.dumps(None))


def listed_artifacts(trial: FrozenTrial) -> list[str]:
    """The ids of the artifacts the trial lists and has not unlisted (forget_artifact); a
    retry lists its original's too (Optuna copies a failed trial's system attributes).

    Missing API: Optuna lists a trial's artifacts only in its system attributes, under a
    private prefix (the dashboard reads them so).
    """
    return [
        key.removeprefix(ARTIFACTS_ATTR_PREFIX)
        for key, listing in trial.system_attrs.items()
        if key.startswith(ARTIFACTS_ATTR_PREFIX) and json.loads(listing) is not None
    ]


def replace_artifact(store: FileSystemArtifactStore, artifact_id: str, path: Path) -> None:
    """Replace the artifact's content with the file at `path`, atomically.

    Missing API: `ArtifactStore.write` truncates and then copies, so a crash mid-write
    leaves half a file. FileSystemArtifactStore keeps an artifact at <base_path>/<id>.
    """
    os.replace(path, Path(store._base_path) / artifact_id)


# Missing API: the cache Optuna puts in front of every RDBStorage (_CachedStorage) reads and
# writes through these private RDBStorage methods, so waiting out an outage must cover them.
RDB_CACHE_CALLS = ("_create_new_trial", "_set_trial_param", "_get_trials", "_get_best_trial_id")
# The cache inserts a trial through this one (it returns a FrozenTrial, not an id).
RDB_CREATE_TRIAL = RDB_CACHE_CALLS[0]
# Missing API: RDBStorage._create_new_trial repeats its insert itself (five tries on any
# StorageInternalError, a commit whose answer was lost included), so a wrapper around it never
# hears of the loss. The row is prepared here, inside that loop's transaction.
RDB_PREPARE_TRIAL = "_get_prepared_new_trial"
# Missing API: the stale-trial query of Optuna's heartbeat interface has only this private name.
STALE_TRIAL_IDS = "_get_stale_trial_ids"


def insert_key(template: FrozenTrial | None) -> tuple[str, object] | None:
    """What makes a trial insert one of a kind, as (attribute, value): a retry's chain
    history (a system attribute; each retry carries the chain so far, so no two retries share
    one), or a one-off ticket's TICKET_KEY (a user attribute, search/rules/study.py). None: a
    plain ticket or trial, of which a second copy is harmless."""
    if template is None:
        return None
    history = template.system_attrs.get(RETRY_HISTORY_KEY)
    if history:
        return RETRY_HISTORY_KEY, history
    ticket = template.user_attrs.get(TICKET_KEY)
    return (TICKET_KEY, ticket) if ticket is not None else None


def same_insert(trials: list[FrozenTrial], key: tuple[str, object]) -> FrozenTrial | None:
    """The first of these trials that an insert with this `insert_key` made."""
    attribute, value = key
    for trial in sorted(trials, key=lambda t: t.number):
        attributes = trial.system_attrs if attribute == RETRY_HISTORY_KEY else trial.user_attrs
        if attributes.get(attribute) == value:
            return trial
    return None


def retry_insert_once(prepare: Callable) -> Callable:
    """RDBStorage's trial preparation, made idempotent for keyed inserts (`insert_key`: a
    retry, a one-off ticket): where a trial with the template's key exists already (an
    earlier try's commit whose answer was lost, or another worker's queuing of the same
    retry) that row is returned instead of a second one. It runs under Optuna's lock on the
    study row, so two inserts with one key cannot both pass the check."""
    from optuna.storages._rdb import models

    def prepare_once(
        self: object, study_id: int, template: FrozenTrial | None, session: object
    ) -> object:
        key = insert_key(template)
        if key is not None:
            attribute, value = key
            table = (
                models.TrialSystemAttributeModel
                if attribute == RETRY_HISTORY_KEY
                else models.TrialUserAttributeModel
            )
            made = (
                session.query(models.TrialModel)
                .join(table)
                .filter(models.TrialModel.study_id == study_id)
                .filter(table.key == attribute)
                .filter(table.value_json == json.dumps(value))
                .order_by(models.TrialModel.number)
                .first()
            )
            if made is not None:
                return made
        return prepare(self, study_id, template, session)

    return prepare_once


class Heartbeat(BaseHeartbeat):
    """Optuna's heartbeat interface, with its stale-trial query under a public name.

    Missing API: `fail_stale_trials` and the heartbeat thread work with any storage that
    inherits BaseHeartbeat, but only RDBStorage does, and the class is private.
    """

    def stale_trial_ids(self, study_id: int) -> list[int]:
        raise NotImplementedError

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        return self.stale_trial_ids(study_id)


def one_per_chain(trials: Iterable[FrozenTrial]) -> list[FrozenTrial]:
    """Of each retry chain, the member that got furthest (most reported epochs; the later on
    a tie), by number. A retry, and a lost answer's twin of one, inherits its original's
    reports and Hyperband rung records: a reader of every member counts a chain once per
    member."""
    furthest: dict[int, FrozenTrial] = {}
    for trial in trials:
        chain = trial.system_attrs.get(RETRY_OF_KEY, trial.number)
        held = furthest.get(chain)
        if held is None or _progress(trial) > _progress(held):
            furthest[chain] = trial
    return sorted(furthest.values(), key=lambda trial: trial.number)


def _progress(trial: FrozenTrial) -> tuple[int, int]:
    return len(trial.intermediate_values), trial.number


class _OneMemberPerChain:
    """A Hyperband bracket's study whose trials are one member of each chain; all else is the
    bracket's (SuccessiveHalvingPruner also reads `direction` and writes through `_storage`)."""

    def __init__(self, bracket: optuna.Study) -> None:
        self._bracket = bracket

    def get_trials(self, deepcopy: bool = True, states: Container | None = None) -> list:
        return one_per_chain(self._bracket.get_trials(deepcopy=deepcopy, states=states))

    def _get_trials(
        self, deepcopy: bool = True, states: Container | None = None, use_cache: bool = False
    ) -> list:
        """The samplers' read, through the study's own: its per-thread cache, and the trials a
        claim handed over (sample_from). Optuna builds a bracket study at every suggestion, each
        with an empty cache, and its `_get_trials` is the whole study's, unfiltered, anyway.

        Missing API: samplers read `_get_trials` of the study the pruner's filter hands them.
        """
        return self._bracket._study._get_trials(deepcopy, states, use_cache=use_cache)

    def __getattr__(self, name: str) -> object:
        return getattr(self._bracket, name)


def is_running(trial: optuna.Trial) -> bool:
    """Whether the trial is still RUNNING in the storage, read now: another worker may have
    failed it as stale (and queued its retry) since this worker claimed it.

    Missing API: a Trial's state is not public, and its frozen copy is cached.
    """
    return trial.storage.get_trial(trial._trial_id).state == TrialState.RUNNING
