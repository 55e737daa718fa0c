"""A fleet of real `hpo worker` processes on one study, on an own PostgreSQL behind an own
PgBouncer in transaction mode, running the stand-in objective (tests/stand_in.py).

The driver of tests/test_fleet_scale.py (16 workers) and bench/fleet.py (128, and bare
Optuna's `study.optimize` beside it). Workers start, each claims a trial and waits at the
stand-in's gate; the gate opens once all of them run, so a run's figures are the whole
fleet's. What the driver watches (lock waits, the pooler's queue, memory) it samples from
outside the workers.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import psycopg
from optuna.trial import FrozenTrial, TrialState
from rich.console import Console
from servers import OwnPgBouncer, OwnPostgres

from search.commands.launch import BENCH_OBJECTIVE_ENV, StudyRequest, create_study
from search.commands.progress import SearchProgress
from storage import RetryPolicy, open_storage
from storage.optuna_private import RETRY_HISTORY_KEY, retried_numbers, retry_of

TESTS = Path(__file__).resolve().parent
HPO = str(Path(sys.executable).parent / "hpo")
# Seconds between heartbeats: a killed worker's trial is recovered 2x this after its last.
HEARTBEAT_S = 2
SAMPLE_EVERY_S = 0.25


@contextlib.contextmanager
def fleet_servers(
    folder: Path, max_connections: int, pool_size: int
) -> Iterator[tuple[OwnPostgres, OwnPgBouncer]]:
    """A PostgreSQL that admits `max_connections`, logging every lock wait over 10 ms, and
    PgBouncer in transaction mode lending it `pool_size` server connections."""
    postgres = OwnPostgres(
        folder, max_connections=max_connections, log_lock_waits="on", deadlock_timeout="10ms"
    )
    postgres.start()
    try:
        bouncer = OwnPgBouncer(folder / "bouncer", postgres, default_pool_size=pool_size)
        bouncer.start()
        try:
            yield postgres, bouncer
        finally:
            bouncer.stop()
    finally:
        postgres.stop()


def create_fleet_study(url: str, name: str, trials: int) -> optuna.Study:
    request = StudyRequest(
        study=name, trials=trials, storage=url, space="tiny", epochs=3,
        dataset="synthetic", pruner="none", heartbeat=HEARTBEAT_S,
    )  # fmt: skip
    create_study(request, SearchProgress(Console(quiet=True)))
    return optuna.load_study(study_name=name, storage=watching_storage(url))


def watching_storage(url: str) -> optuna.storages.BaseStorage:
    """The driver's own: it waits, as a worker does, while the pooler queues it behind the
    fleet's transactions."""
    return open_storage(url, retry=RetryPolicy(say=lambda _: None))


@dataclass
class Fleet:
    """Worker processes of one study; their output and the stand-in's logs in `folder`."""

    url: str
    study: str
    folder: Path
    epoch_s: float = 0.05
    count_reads: bool = False  # the stand-in counts each worker's storage traffic
    workers: dict[int, subprocess.Popen] = field(default_factory=dict)
    killed: dict[int, int] = field(default_factory=dict)  # pid -> trial it was running
    output: dict[int, Path] = field(default_factory=dict)  # pid -> its stdout and stderr
    gate_opened: float = 0.0

    def __post_init__(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HPO_", "STAND_IN_"))}
        paths = [str(TESTS), str(TESTS.parent), env.get("PYTHONPATH", "")]
        env.update(
            PYTHONPATH=os.pathsep.join(p for p in paths if p),
            STAND_IN_LOG_DIR=str(self.folder),
            STAND_IN_EPOCH_S=str(self.epoch_s),
            HPO_STORAGE=self.url,
            COLUMNS="200",
            OMP_NUM_THREADS="1",
        )
        env[BENCH_OBJECTIVE_ENV] = "stand_in:objective"
        if self.count_reads:
            env["STAND_IN_COUNT_READS"] = "1"
        return env

    def spawn(self, *command: str) -> subprocess.Popen:
        path = self.folder / f"out-{len(self.output)}.txt"
        with path.open("w") as log:
            process = subprocess.Popen(
                command, env=self.env(), cwd=self.folder, stdout=log, stderr=subprocess.STDOUT
            )
        self.workers[process.pid] = process
        self.output[process.pid] = path
        return process

    def spawn_hpo_workers(self, count: int) -> None:
        for _ in range(count):
            self.spawn(HPO, "worker", "--study", self.study, "--storage-retry-s", "120")

    def wait_until_running(self, study: optuna.Study, count: int, timeout: float) -> None:
        """Until `count` trials run: every worker holds one, waiting at the gate."""
        deadline = time.monotonic() + timeout
        while len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))) < count:
            exited = [pid for pid, p in self.workers.items() if p.poll() is not None]
            if exited or time.monotonic() > deadline:
                raise AssertionError(f"not all running; exited:\n{self.outputs(exited)}")
            time.sleep(0.2)

    def open_gate(self) -> None:
        self.gate_opened = time.time()
        (self.folder / "gate").touch()

    def kill_mid_trial(self, restart: bool = True) -> int:
        """kill -9 a worker that is inside its objective (and start another in its place);
        the trial it was running, which its heartbeat must now recover."""
        while True:
            pids = list(self.workers)
            random.shuffle(pids)
            for pid in pids:
                if not self._in_objective(pid):
                    continue
                os.kill(pid, signal.SIGKILL)
                self.workers.pop(pid).wait()
                number = self._in_objective(pid)  # its last line now cannot change
                if number is not None:
                    self.killed[pid] = number
                    if restart:
                        self.spawn_hpo_workers(1)
                    return number
            time.sleep(0.05)

    def _in_objective(self, pid: int) -> int | None:
        path = self.folder / f"{pid}.log"
        lines = path.read_text().splitlines() if path.exists() else []
        last = lines[-1].split() if lines else []
        return int(last[1]) if len(last) == 3 and last[0] == "start" else None

    def wait(self, timeout: float) -> dict[int, int | None]:
        """Every worker's exit code (None: still running at the timeout, then killed)."""
        deadline = time.monotonic() + timeout
        codes: dict[int, int | None] = {}
        for pid, process in self.workers.items():
            try:
                codes[pid] = process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                codes[pid] = None
        return codes

    def outputs(self, pids: list[int] | None = None) -> str:
        """What these workers (by default those that failed) printed, the end of it."""
        if pids is None:
            pids = [pid for pid, p in self.workers.items() if p.returncode not in (0, None)]
        texts = [f"--- {pid}: {self.output[pid].read_text()[-3000:]}" for pid in pids[:3]]
        return "\n".join(texts)

    def spans(self) -> dict[int, list[tuple[int, float, float]]]:
        """Per worker process: (trial number, objective start, objective end), in order."""
        found: dict[int, list[tuple[int, float, float]]] = {}
        for path in self.folder.glob("*.log"):
            started: dict[int, float] = {}
            spans = found.setdefault(int(path.stem), [])
            for kind, number, stamp in (line.split() for line in path.read_text().splitlines()):
                if kind == "start":
                    started[int(number)] = float(stamp)
                else:
                    spans.append((int(number), started.pop(int(number)), float(stamp)))
        return found

    def traffic_per_trial(self) -> tuple[float, float, float]:
        """Statements, transactions and rows read per trial (count_reads), over the workers:
        from each one's first trial start to its last, so a cycle holds everything a worker
        does for a trial (the tell, the stale check, the claim, the sampler, the reports)."""
        totals, cycles = [0, 0, 0], 0
        for path in self.folder.glob("*.reads"):
            lines = [[int(n) for n in line.split()] for line in path.read_text().splitlines()]
            if len(lines) > 1:
                totals = [
                    t + last - first
                    for t, first, last in zip(totals, lines[0], lines[-1], strict=True)
                ]
                cycles += len(lines) - 1
        return tuple(t / max(cycles, 1) for t in totals)


# --- what the study must hold at the end ----------------------------------------------------


def chain_of(trial: FrozenTrial) -> int:
    original = retry_of(trial)
    return trial.number if original is None else original


def live_members_that_ran(trials: list[FrozenTrial]) -> dict[int, list[int]]:
    """Per chain, its members that ran and that no later trial retries: one at most."""
    retried = retried_numbers(trials)
    chains: dict[int, list[int]] = {}
    for trial in trials:
        if trial.state != TrialState.WAITING and trial.number not in retried:
            chains.setdefault(chain_of(trial), []).append(trial.number)
    return chains


def check_study(study: optuna.Study, n: int, killed: dict[int, int]) -> None:
    """Exactly `n` finished, none running, no chain with two live members, and each trial a
    kill interrupted failed and retried; counted from the trials, not by budget()."""
    trials = study.get_trials(deepcopy=False)
    by_state = {state: [t for t in trials if t.state == state] for state in TrialState}
    assert len(by_state[TrialState.COMPLETE]) == n, {s.name: len(v) for s, v in by_state.items()}
    assert not by_state[TrialState.RUNNING], [t.number for t in by_state[TrialState.RUNNING]]
    twice = {c: m for c, m in live_members_that_ran(trials).items() if len(m) > 1}
    assert not twice, twice
    retried = retried_numbers(trials)
    assert all(t.number in retried for t in by_state[TrialState.FAIL]), "a crash not retried"
    for number in killed.values():
        assert trials[number].state == TrialState.FAIL, (number, trials[number].state)
        retries = [t for t in trials if number in t.system_attrs.get(RETRY_HISTORY_KEY, [])]
        assert any(t.state == TrialState.COMPLETE for t in retries), number


# --- what the driver samples while the fleet runs -------------------------------------------


@dataclass
class Samples:
    """Lock waits on the server and the pooler's queue, sampled every SAMPLE_EVERY_S."""

    backends: list[int] = field(default_factory=list)  # client backends on the server
    study_row_waits: list[int] = field(default_factory=list)  # waiting on the study row
    trial_row_waits: list[int] = field(default_factory=list)  # waiting on a trial row
    heartbeat_row_waits: list[int] = field(default_factory=list)  # on a trial's heartbeat
    pooler_waiting: list[int] = field(default_factory=list)  # clients queued for a server
    pooler_clients: list[int] = field(default_factory=list)
    pooler_max_wait_s: float = 0.0

    @staticmethod
    def summary(values: list[int]) -> str:
        return f"{statistics.mean(values):.1f} mean, {max(values)} max" if values else "-"


class Sampler(threading.Thread):
    def __init__(self, postgres: OwnPostgres, bouncer: OwnPgBouncer):
        super().__init__(daemon=True)
        self.postgres, self.bouncer = postgres, bouncer
        self.samples = Samples()
        self.done = threading.Event()

    def run(self) -> None:
        dsn = f"host=127.0.0.1 port={self.postgres.port} user=postgres dbname=postgres"
        with psycopg.connect(dsn, autocommit=True) as connection:
            while not self.done.wait(SAMPLE_EVERY_S):
                self.sample(connection)

    def sample(self, connection: psycopg.Connection) -> None:
        rows = connection.execute(
            "SELECT wait_event_type, query FROM pg_stat_activity "
            "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
        ).fetchall()
        waiting = [query for kind, query in rows if kind == "Lock"]
        s = self.samples
        s.backends.append(len(rows))
        s.study_row_waits.append(sum("FROM studies" in q for q in waiting))
        s.trial_row_waits.append(sum("FROM trials" in q for q in waiting))
        s.heartbeat_row_waits.append(sum("FROM trial_heartbeats" in q for q in waiting))
        pool = next(p for p in self.bouncer.show("POOLS") if p["database"] == "postgres")
        s.pooler_waiting.append(int(pool["cl_waiting"]))
        s.pooler_clients.append(int(pool["cl_active"]) + int(pool["cl_waiting"]))
        wait_s = int(pool["maxwait"]) + int(pool["maxwait_us"]) / 1e6
        s.pooler_max_wait_s = max(s.pooler_max_wait_s, wait_s)


def logged_lock_waits(postgres: OwnPostgres, since: int) -> dict[str, int]:
    """Lock waits over deadlock_timeout (10 ms) in the server's log after byte `since`, by
    the row they waited for: the study row (trial inserts), a trial row (claims, tells) or
    a trial's heartbeat row (the heartbeat written before each claim, and the beats)."""
    text = (postgres.folder / "log").read_bytes()[since:].decode(errors="replace")
    counts = {"study row": 0, "trial row": 0, "heartbeat row": 0, "other": 0}
    for match in re.finditer(r"still waiting for .*?\n(?:.*\n)*?.*STATEMENT:\s+(.*)", text):
        counts[_locked_row(match.group(1))] += 1
    return counts


def _locked_row(statement: str) -> str:
    """The log holds a statement's first line only: SQLAlchemy names the table in front of
    every column there (SELECT studies.study_id ...), or after INSERT INTO / UPDATE."""
    found = re.search(r"\b(studies|trial_heartbeats|trials)\b", statement)
    rows = {"studies": "study row", "trial_heartbeats": "heartbeat row", "trials": "trial row"}
    return rows[found.group(1)] if found else "other"


def memory_mib(pids: list[int]) -> tuple[float, float]:
    """Mean RSS and mean PSS (shared pages split among their users) of processes, MiB."""
    rss, pss = [], []
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = dict(
                line.split(":", 1)
                for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]
            )
            rss.append(int(fields["Rss"].split()[0]) / 1024)
            pss.append(int(fields["Pss"].split()[0]) / 1024)
    return (statistics.mean(rss), statistics.mean(pss)) if rss else (0.0, 0.0)


def torch_loaded(pid: int) -> bool:
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text()


def claim_times(spans: dict[int, list[tuple[int, float, float]]]) -> list[float]:
    """Per worker, from one trial's objective returning to the next one's starting: the tell,
    the stale check, the claim and the sampler, as the worker waited for them."""
    gaps = []
    for worker in spans.values():
        ordered = sorted(worker, key=lambda span: span[1])
        gaps += [b[1] - a[2] for a, b in itertools.pairwise(ordered)]
    return gaps


def connections_of(pid: int, port: int) -> int:
    """TCP connections process `pid` holds open to `port` on 127.0.0.1 (from /proc)."""
    sockets = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                sockets.add(target[8:-1])
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        remote, state, inode = fields[2], fields[3], fields[9]
        count += state == "01" and int(remote.split(":")[1], 16) == port and inode in sockets
    return count
