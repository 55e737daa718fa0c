"""The study's budget rule (search/rules/study.py's docstring) under random sequences of worker
events, on a real SQLite file: claims, crashes, stale trials, retries, over-cap draws, prunes,
completions, errors, stops, target raises and lost answers, in any order.

After every step: never more than N counted, no chain with two live members, no chain run to
an end twice. At the end, the real worker loop drains the study: exactly N counted finished,
none RUNNING, and the loop's exit condition true. Runs the study's own functions, not copies.
"""

from __future__ import annotations

import gc
import os
import shutil
import tempfile
import threading
from collections import Counter
from pathlib import Path

import optuna
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from lossy import OUTSIDE_THE_LOOP, age_heartbeats, forget_losses, lossy_storage
from optuna.trial import FrozenTrial, TrialState

from search.commands.launch import StudyRequest
from search.rules.cost import is_over_cap, refuse_over_cap
from search.rules.study import (
    budget,
    claim_trial,
    create_or_join,
    fail_stale_trials,
    join,
    move_target,
)
from search.training.stops import TrialInterrupted
from search.training.worker import run_trial, run_worker
from storage import optuna_private

pytestmark = pytest.mark.filterwarnings("ignore::Warning")

# 100 sequences in CI (Hypothesis's default; about 45 CPU s); HPO_BUDGET_SEQUENCES=500 for a
# deeper look, 30 for a quick one.
settings.register_profile(
    "budget",
    max_examples=int(os.environ.get("HPO_BUDGET_SEQUENCES", "100")),
    stateful_step_count=12,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
MAX_RETRY = 2
# Memory-backed where there is one: a sequence is some hundred SQLite commits.
SCRATCH = "/dev/shm" if Path("/dev/shm").is_dir() else None
# Answers a worker may lose: (write, state) as tests/lossy.py names them.
LOSSES = [
    ("set_trial_state_values", TrialState.RUNNING),
    ("set_trial_state_values", TrialState.COMPLETE),
    ("set_trial_state_values", TrialState.PRUNED),
    ("set_trial_state_values", TrialState.FAIL),
    # After Optuna's insert loop: inside it, each loss costs the loop's random sleep (up to
    # 2 s); tests/test_lost_answers.py loses a commit inside it.
    (OUTSIDE_THE_LOOP, None),
    ("set_study_user_attr", None),
    ("set_trial_system_attr", None),
]


def template_database() -> Path:
    """A new study of target 1 on a fresh SQLite file, made once: each sequence copies it."""
    global TEMPLATE
    if TEMPLATE is None:
        # The worker loop collects garbage after every trial (search/training/memory.py); a
        # full pass over this process's objects (pytest, Hypothesis, torch) costs ~0.2 s.
        # Frozen, they are skipped, as `hpo worker` skips its own start-up's (gc.freeze).
        gc.freeze()
        TEMPLATE = Path(tempfile.mkdtemp(prefix="budget-", dir=SCRATCH)) / "template.db"
        settings_ = StudyRequest(study="s", trials=1, storage="", space="tiny").new_settings()
        create_or_join(lossy_storage(TEMPLATE, MAX_RETRY), "s", settings_, 1)
    return TEMPLATE


TEMPLATE: Path | None = None


def is_retry(trial: FrozenTrial) -> bool:
    return optuna_private.retry_of(trial) is not None


def most_per_chain(trials: list[FrozenTrial]) -> int:
    return max(Counter(map(chain_of, trials)).values(), default=0)


def chain_of(trial: FrozenTrial) -> int:
    return (
        optuna_private.retry_of(trial)
        if optuna_private.retry_of(trial) is not None
        else trial.number
    )


def twins(trials: list[FrozenTrial]) -> set[int]:
    """Retries of a trial that already has an earlier retry (queued twice at once)."""
    seen, found = set(), set()
    for trial in sorted(trials, key=lambda t: t.number):
        replaced = optuna_private.replaced_number(trial)
        if replaced is not None:
            (found if replaced in seen else seen).add(
                trial.number if replaced in seen else replaced
            )
    return found


def finished_chains(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """The latest member of each chain, where it has ended and is no over-cap draw: the
    study's finished trials, counted without search/rules/study.py."""
    ignored = twins(trials)
    latest = {
        chain_of(t): t for t in sorted(trials, key=lambda t: t.number) if t.number not in ignored
    }
    return [t for t in latest.values() if t.state.is_finished() and not is_over_cap(t)]


class BudgetMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        # What the earlier sequences left (Hypothesis' records) joins the frozen objects, so
        # the collection after each of this sequence's trials scans this sequence's alone.
        gc.collect()
        gc.freeze()
        self.directory = Path(tempfile.mkdtemp(prefix="budget-", dir=SCRATCH))
        self.path = self.directory / "b.db"
        shutil.copy(template_database(), self.path)
        self.study = join(lossy_storage(self.path, MAX_RETRY), "s")
        self.held: dict[int, optuna.Trial] = {}  # claimed by a live (simulated) worker
        self.said: list[str] = []

    @property
    def storage(self):
        return self.study._storage._backend  # the lossy storage behind Optuna's cache

    @initialize(n=st.integers(1, 4))
    def set_target(self, n: int) -> None:
        move_target(self.study, n)

    # Workers' events.

    @rule(over_cap=st.booleans())
    def claim(self, over_cap: bool) -> None:
        """Claim a ticket and draw its network: over the cap or not. The draw is kept before
        the cap check, as the objective's sampling does; a retry inherits it."""
        trial = claim_trial(self.study)
        if trial is not None:
            self.beat(trial)
            if DRAW not in trial.user_attrs:
                trial.set_user_attr(DRAW, 2.0 if over_cap else 0.5)
            self.held[trial.number] = trial

    def beat(self, trial: optuna.Trial) -> None:
        with optuna_private.heartbeat(self.study, trial):  # one beat, as the worker's thread
            pass

    def end(self, number: int, runner) -> None:
        trial = self.held.pop(number)
        run_trial(self.study, trial, runner, self.said.append)

    @precondition(lambda self: self.held)
    @rule(data=st.data(), how=st.sampled_from(["complete", "prune", "stop", "error"]))
    def finish(self, data: st.DataObject, how: str) -> None:
        number = data.draw(st.sampled_from(sorted(self.held)))
        self.end(number, RUNNERS[how])

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def crash(self, data: st.DataObject) -> None:
        """The worker dies (kill -9): its trial stays RUNNING, its heartbeat stops."""
        self.held.pop(data.draw(st.sampled_from(sorted(self.held))))

    @rule(outage=st.booleans())
    def time_passes(self, outage: bool) -> None:
        """A grace period passes: dead workers' heartbeats age; live ones beat again, unless
        an outage stopped theirs too (then their trials are failed under them)."""
        age_heartbeats(self.path)
        forget_losses(self.storage)
        if not outage:
            for trial in self.held.values():
                self.beat(trial)

    @rule()
    def stale_fail(self) -> None:
        fail_stale_trials(self.study)

    @rule(more=st.integers(0, 2))
    def raise_target(self, more: int) -> None:
        move_target(self.study, budget(self.study).target + more)

    @rule(loss=st.sampled_from(LOSSES))
    def lose_an_answer(self, loss: tuple) -> None:
        self.storage.lose(*loss)

    # What must hold.

    @invariant()
    def never_more_than_n_and_one_live_member_per_chain(self) -> None:
        trials = self.study.get_trials(deepcopy=False)
        state = budget(self.study)
        # Counted from the storage here, not by budget(): each chain's latest finished
        # member, and every running trial (a worker never runs a trial outside the budget).
        assert state.finished == len(finished_chains(trials))
        assert state.running == sum(t.state == TrialState.RUNNING for t in trials)
        assert 0 <= state.finished <= state.target and state.waiting >= 0
        ended = [
            t
            for t in trials
            if t.state in (TrialState.COMPLETE, TrialState.PRUNED) and not is_over_cap(t)
        ]
        assert len(ended) <= state.target
        assert len(finished_chains(trials)) <= state.target
        assert most_per_chain(ended) <= 1  # no chain run to an end twice
        ignored = twins(trials)
        live = [
            t
            for t in trials
            if t.state == TrialState.RUNNING
            or (t.state == TrialState.WAITING and is_retry(t) and t.number not in ignored)
        ]
        assert most_per_chain(live) <= 1

    def teardown(self) -> None:
        try:
            self.drain()
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)

    def drain(self) -> None:
        """The live workers finish; then, once the dead ones' trials look stale, one worker
        runs the study's real loop until it exits by itself."""
        for number in sorted(self.held):
            self.end(number, RUNNERS["complete"])
        self.storage.to_lose.clear()
        age_heartbeats(self.path)
        forget_losses(self.storage)
        run_worker(
            self.study, RUNNERS["complete"], threading.Event(), timeout_s=30, say=self.said.append
        )
        state = budget(self.study)
        assert (state.finished, state.running, state.waiting) == (state.target, 0, 0), state
        trials = self.study.get_trials(deepcopy=False)
        assert not [t for t in trials if t.state == TrialState.RUNNING]
        assert len(finished_chains(trials)) == state.target


# The trial's drawn GFLOP per image (tests only); the space's cap is 1.
DRAW = "test:gflops"


def check_cap(trial: optuna.Trial) -> None:
    """The objective's first step: an over-cap draw ends PRUNED, untrained."""
    refuse_over_cap(trial, gflops=trial.user_attrs.get(DRAW, 0.5), max_gflops=1.0)


def complete(trial: optuna.Trial) -> float:
    check_cap(trial)
    return 0.5


def prune(trial: optuna.Trial) -> float:
    check_cap(trial)
    raise optuna.TrialPruned("pruned after epoch 1")


def stop(trial: optuna.Trial) -> float:
    check_cap(trial)
    raise TrialInterrupted("stopped after epoch 1")


def error(trial: optuna.Trial) -> float:
    check_cap(trial)
    raise RuntimeError("NaN loss")


RUNNERS = {"complete": complete, "prune": prune, "stop": stop, "error": error}

TestBudgetMachine = pytest.mark.slow(pytest.mark.timeout(900)(BudgetMachine.TestCase))
TestBudgetMachine.settings = settings.get_profile("budget")


def test_a_retry_over_the_cap_is_replaced(tmp_path: Path) -> None:
    """A worker died after its claim, before its cap check; the retry copies the draw, which
    is over the cap: the chain gives up its place, and a new ticket takes it."""
    machine = BudgetMachine()
    try:
        machine.set_target(2)
        machine.claim(over_cap=True)  # trial 0: its worker dies before the cap check
        machine.claim(over_cap=False)  # trial 1
        machine.crash(st_fixed(0))
        machine.finish(st_fixed(1), "complete")
        machine.time_passes(outage=False)
        machine.stale_fail()  # trial 0 failed, its retry (2) queued
        machine.claim(over_cap=False)  # the retry: its draw is trial 0's
        machine.finish(st_fixed(2), "complete")  # over the cap: PRUNED untrained
        assert is_over_cap(machine.study.trials[2])
        assert claim_trial(machine.study) is not None  # before the fix: Budget(2, 1, 0, 1)
    finally:
        machine.teardown()


class st_fixed:
    """A stand-in for st.data() whose draw is fixed (an explicit example of the machine)."""

    def __init__(self, value: object) -> None:
        self.value = value

    def draw(self, _strategy: object) -> object:
        return self.value
