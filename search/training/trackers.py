"""Trials where ML engineers already look: the one interface the objective calls (a chain
started or resumed, an epoch, an end with its state), fanned out to TensorBoard and MLflow.

A tracker is never the trial's problem (ARCHITECTURE, "Whose fault is it"): every write goes
through a queue to a thread of its own per tracker, so training never waits on a slow or
down one and nothing it raises reaches the trial. A write that fails stays at the head of its
queue and is tried again, with backoff, until the tracker takes it (the run catches up); the
worker says once that the tracker is down, and records it where `hpo status` shows the last
machine fault. At a trial's end it waits a bounded time for the writes to go out; at exit it
says what it dropped.

The sinks (tensorboard_sink.py, mlflow_sink.py) keep one run per retry chain, named by the
chain's first trial, and write no step twice across a resume.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable

import optuna
from optuna.trial import FrozenTrial

from search.rules import attrs
from search.training.tracker_chain import Chain, Sink, describe_error
from storage.optuna_private import original_number

# How long a trial's end waits for a healthy tracker's writes to go out, and a worker's exit
# for a down one's before it drops them.
FLUSH_S = 5.0
CLOSE_S = 10.0
# Between two tries of a failed write: doubling from the first to the last.
RETRY_S = (0.5, 30.0)
# Writes a down tracker keeps (about 8 per epoch): past that the oldest are dropped, counted.
MAX_PENDING = 20_000
# How a trial ended, as the trackers record it. "interrupted": its chain goes on (a stop, a
# storage outage, out of memory once, taken over): the run stays open for the retry.
STATES = ("complete", "pruned", "failed", "interrupted")

Say = Callable[[str], None]


class SinkQueue:
    """A sink's writes in order on a thread of its own; failed writes retried until taken."""

    def __init__(self, sink: Sink, say: Say, on_down: Say) -> None:
        self.sink, self.say, self.on_down = sink, say, on_down
        self.pending: deque[tuple[str, Callable[[], None]]] = deque()
        self.ready = threading.Condition()
        self.closing = False
        self.down_since: float | None = None
        self.dropped: list[str] = []
        self.busy = False
        self.hurry = False  # closing: a down tracker is tried every RETRY_S[0]
        self.thread = threading.Thread(target=self._run, name=f"tracker-{sink.name}", daemon=True)
        self.thread.start()

    def put(self, what: str, write: Callable[[], None]) -> None:
        with self.ready:
            if len(self.pending) >= MAX_PENDING:
                self.dropped.append(self.pending.popleft()[0])
            self.pending.append((what, write))
            self.ready.notify()

    def behind(self) -> int:
        with self.ready:
            return len(self.pending) + self.busy

    def drain(self, timeout_s: float, while_down: bool = False) -> int:
        """Wait up to `timeout_s` for every write queued to go out, no longer than the tracker
        answers unless `while_down`; the writes still queued."""
        deadline = time.monotonic() + timeout_s
        with self.ready:
            while (
                (self.pending or self.busy)
                and time.monotonic() < deadline
                and (while_down or self.down_since is None)
            ):
                self.ready.wait(max(0.0, min(0.05, deadline - time.monotonic())))
            return len(self.pending) + self.busy

    def close(self, timeout_s: float) -> list[str]:
        """Drain for up to `timeout_s` (a down tracker tried again at once, then every
        RETRY_S[0]), stop the thread; what was not written."""
        with self.ready:
            self.hurry = True
            self.ready.notify_all()
        self.drain(timeout_s, while_down=True)
        with self.ready:
            self.closing = True
            left = [what for what, _ in self.pending]
            self.pending.clear()
            self.ready.notify_all()
        self.thread.join(timeout=timeout_s)
        try:
            self.sink.close()
        except Exception as err:  # its last flush: said with the rest
            left.append(f"close ({type(err).__name__})")
        return self.dropped + left

    def _run(self) -> None:
        wait_s = RETRY_S[0]
        while True:
            with self.ready:
                while not self.pending and not self.closing:
                    self.ready.wait()
                if self.closing:
                    return
                item = self.pending[0]
                self.busy = True
            what, write = item
            try:
                write()
            except Exception as err:  # any: a tracker is never the trial's problem
                if self.sink.permanent(err):
                    self._done(item)
                    self.dropped.append(what)
                    self.say(f"{self.sink.name} refused {what}: {describe_error(err)}")
                    continue
                self._failed(err)
                with self.ready:
                    self.busy = False
                    self.ready.notify_all()
                    self.ready.wait(wait_s)  # a put or a close cuts the wait short
                wait_s = RETRY_S[0] if self.hurry else min(wait_s * 2, RETRY_S[1])
                continue
            self._done(item)
            wait_s = RETRY_S[0]
            if self.down_since is not None:
                self.down_since = None
                self.say(f"{self.sink.name} is back: its runs catch up ({self.behind()} queued)")

    def _done(self, item: tuple[str, Callable[[], None]]) -> None:
        with self.ready:
            if self.pending and self.pending[0] is item:  # not dropped meanwhile (MAX_PENDING)
                self.pending.popleft()
            self.busy = False
            self.ready.notify_all()

    def _failed(self, err: Exception) -> None:
        if self.down_since is None:
            self.down_since = time.monotonic()
            line = (
                f"{self.sink.name} not written: {describe_error(err)}; trials go on, their records "
                "are kept and sent once it answers"
            )
            self.say(line)
            self.on_down(line)


class Trackers:
    """What the objective and the worker loop call; nothing here raises or waits long."""

    def __init__(self, sinks: Iterable[Sink] = (), say: Say = print, on_down: Say = print):
        self.say = say
        self.queues = [SinkQueue(sink, say, lambda line: on_down(line)) for sink in sinks]
        self.given_up_seen: set[int] = set()

    def __bool__(self) -> bool:
        return bool(self.queues)

    def started(
        self,
        trial: optuna.Trial,
        tags: dict[str, str],
        resumed: list[dict] | None,
    ) -> Chain | None:
        """A chain's run opened (a first run) or continued (a retry, with the epochs up to
        its checkpoint, which the run is made to hold exactly once)."""
        if not self.queues:
            return None
        tags = {"hpo.study": trial.study.study_name, **tags}
        # Copies: the objective goes on appending to its history while the writes wait.
        resumed = None if resumed is None else list(resumed)
        chain = Chain(trial, original_number(trial), dict(trial.params), tags, resumed)
        chain.history = list(resumed or [])
        self._each(f"trial {trial.number}'s start", lambda sink: lambda: sink.started(chain))
        return chain

    def epoch(self, chain: Chain | None, record: dict) -> None:
        if chain is None:
            return
        chain.history.append(record)
        at_ms = int(time.time() * 1000)  # fixed now: a write tried again is the same point
        what = f"trial {chain.trial.number}'s epoch {record['epoch']}"
        self._each(what, lambda sink: lambda: sink.epoch(chain, record, at_ms))

    def ended(self, chain: Chain | None, state: str) -> None:
        """The trial's end; waits up to FLUSH_S for the healthy trackers' writes, and says
        how far a down one is behind."""
        if chain is None:
            return
        what = f"trial {chain.trial.number}'s end"
        self._each(what, lambda sink: lambda: sink.ended(chain, state))
        for queue in self.queues:
            if queue.drain(FLUSH_S) and queue.down_since is not None:
                behind = queue.behind()
                self.say(f"trial {chain.trial.number}: {queue.sink.name} {behind} write(s) behind")
            elif queue.behind():
                self.say(
                    f"trial {chain.trial.number}: {queue.sink.name} still writing after "
                    f"{FLUSH_S:.0f} s; its {queue.behind()} write(s) go on in the background"
                )

    def given_up(self, study: optuna.Study, trials: Iterable[FrozenTrial]) -> None:
        """Close the runs of chains that failed for good while their worker could not (it
        died, or ran out of memory twice), so that none stays running forever."""
        for trial in trials:
            if trial.number in self.given_up_seen or not closed_by_nobody(trial):
                continue
            self.given_up_seen.add(trial.number)
            what = f"trial {trial.number}'s chain failed for good"
            self._each(what, lambda sink, trial=trial: lambda: sink.given_up(study, trial))

    def study_done(self, study: optuna.Study) -> None:
        """The study met its target with no trial running: its own run ends (MLflow's)."""
        self._each("the study's end", lambda sink: lambda: sink.study_done(study))

    def close(self, timeout_s: float = CLOSE_S) -> None:
        for queue in self.queues:
            dropped = queue.close(timeout_s)
            if dropped:
                shown = ", ".join(dropped[:3]) + (", ..." if len(dropped) > 3 else "")
                self.say(f"{queue.sink.name}: dropped {len(dropped)} write(s): {shown}")
        self.queues = []

    def _each(self, what: str, write_of: Callable[[Sink], Callable[[], None]]) -> None:
        for queue in self.queues:
            queue.put(what, write_of(queue.sink))


def closed_by_nobody(trial: FrozenTrial) -> bool:
    """A chain that failed for good with no objective to end its run: a crash (no reason),
    or a stop or out-of-memory reason (the run was left open for the retry that never came).
    A failure of its own config was ended "failed" by the objective."""
    reason = trial.user_attrs.get(attrs.FAIL_REASON)
    return reason is None or reason.startswith((attrs.STOPPED_PREFIX, attrs.OUT_OF_MEMORY_PREFIX))


def open_trackers(
    study_name: str,
    tensorboard: str | None,
    mlflow: str | None,
    say: Say = print,
    on_down: Say = print,
) -> Trackers:
    """The study's trackers; the tracker libraries load here, only where one is asked."""
    sinks: list[Sink] = []
    if tensorboard:
        from search.training.tensorboard_sink import TensorBoardSink

        sinks.append(TensorBoardSink(tensorboard, study_name))
    if mlflow:
        from search.training.mlflow_sink import MlflowSink

        sinks.append(MlflowSink(mlflow, study_name))
    return Trackers(sinks, say, on_down)
