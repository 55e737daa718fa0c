"""How much bookkeeping each Optuna storage adds per trial, early and late in a study.

W worker processes share one study per storage. The study is created as `hpo` creates one
(search.rules.study.create_or_join: a window of WAITING tickets, topped up by claims) and each
worker runs the project's own loop, search.training.worker.run_worker: claim_trial, run_trial
(heartbeat, objective, tell), then one read of the study (stale trials failed once per
heartbeat interval) from which it shows `hpo`'s per-trial progress (budget and best
trial). The objective computes nothing: two suggest_float calls, then E trial.report +
trial.should_prune calls (the pruner is asked but not obeyed, so every trial does the same
work). A trial's time, from the end of the previous one to its own end, is therefore
bookkeeping: the storage's, plus the sampler's and the pruner's.

Run from the repository root:

    .venv/bin/python -m bench.storage --smoke     # seconds: 2 workers, SQLite and journal
    .venv/bin/python -m bench.storage --storages postgresql --trials 2000
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import threading
import time
import traceback
import uuid
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from pathlib import Path

# Run as a file, this folder would come first on sys.path and shadow the `storage` package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import optuna
import redis
from optuna.trial import FrozenTrial, TrialState

import search.training.worker
from search.commands.progress import best_summary
from search.rules.pruners import PRUNERS
from search.rules.settings import StudySettings
from search.rules.study import (
    StudyView,
    create_or_join,
    join,
    join_as_worker,
)
from storage import HeartbeatPolicy, StorageURLError, has_heartbeat, open_storage

STORAGES = ("sqlite", "journal", "postgresql", "mysql", "redis")
DEFAULT_STORAGES = "sqlite,journal,postgresql,mysql"
# --smoke: seconds, on the storages that share no server with other runs (the suite runs it).
SMOKE = ["--workers", "2", "--reports", "5", "--trials", "12", "--storages", "sqlite,journal"]
PHASES = ("claim", "suggest", "report", "prune", "tell", "progress")
# Seconds the parent waits for all workers to finish one storage's run.
RUN_TIMEOUT_S = 3600.0


@dataclass(frozen=True)
class Job:
    """What one worker process needs; pickled into it by `spawn`."""

    url: str
    study_name: str
    settings: StudySettings
    reports: int
    sampler: str
    target: int


@dataclass(frozen=True)
class TrialTiming:
    """One trial as one worker saw it; seconds, on the clock all processes share."""

    number: int
    start: float
    end: float
    claim: float  # claim_trial + heartbeat start
    suggest: float
    report: float
    prune: float
    tell: float  # study.tell + heartbeat stop + the worker's read of the study (stale trials)
    progress: float  # budget + best trial from that read, as `hpo` shows after each trial
    compute: float  # the objective's own arithmetic

    @property
    def overhead(self) -> float:
        return self.end - self.start - self.compute


@dataclass
class Objective:
    """Two suggestions, then E report + should_prune; times each kind of call."""

    reports: int
    began: float = 0.0
    returned: float = 0.0
    suggest: float = 0.0
    report: float = 0.0
    prune: float = 0.0
    compute: float = 0.0

    def __call__(self, trial: optuna.Trial) -> float:
        self.began = time.perf_counter()
        x = trial.suggest_float("x", -10.0, 10.0)
        y = trial.suggest_float("y", 1e-3, 1.0, log=True)
        self.suggest = time.perf_counter() - self.began
        self.report = self.prune = self.compute = 0.0
        value = 0.0
        for step in range(self.reports):
            t0 = time.perf_counter()
            value = (x - 2.0) ** 2 + y + 1.0 / (step + 1)
            t1 = time.perf_counter()
            trial.report(value, step)
            t2 = time.perf_counter()
            trial.should_prune()  # asked, not obeyed: every trial does the same work
            t3 = time.perf_counter()
            self.compute += t1 - t0
            self.report += t2 - t1
            self.prune += t3 - t2
        self.returned = time.perf_counter()
        return value


# --- worker process -------------------------------------------------------------------------


def worker_main(job: Job, index: int, start: Barrier, results: Queue) -> None:
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    try:
        study = open_worker_study(job, index)
        start.wait()
        results.put(("ok", run_until_empty(study, job.reports)))
    except BaseException:  # the parent must hear of it, or it waits for ever
        start.abort()
        results.put(("error", traceback.format_exc()))


def open_worker_study(job: Job, index: int) -> optuna.Study:
    """The study as `hpo` opens it: heartbeats on RDB storages, the study's pruner."""
    heartbeat = HeartbeatPolicy(job.settings.heartbeat_s) if has_heartbeat(job.url) else None
    storage = open_storage(job.url, heartbeat)
    if job.sampler == "tpe":
        return join_as_worker(storage, job.study_name, job.settings, f"bench/slot{index}")
    sampler = optuna.samplers.RandomSampler(seed=index)
    pruner = job.settings.build_pruner()
    return join(storage, job.study_name, sampler=sampler, pruner=pruner)


def run_until_empty(study: optuna.Study, reports: int) -> list[TrialTiming]:
    """search.training.worker.run_worker until the queue is empty; one timing per trial."""
    objective = Objective(reports)
    timings: list[TrialTiming] = []
    previous_end = time.perf_counter()

    def on_trial_end(trial: FrozenTrial, view: StudyView) -> None:
        nonlocal previous_end
        told = time.perf_counter()
        # What `hpo` shows after each trial, from the worker's read of the study (in "tell")
        view.budget  # noqa: B018
        best_summary(study, view.trials)
        end = time.perf_counter()
        timings.append(
            TrialTiming(
                number=trial.number,
                start=previous_end,
                end=end,
                claim=objective.began - previous_end,
                suggest=objective.suggest,
                report=objective.report,
                prune=objective.prune,
                tell=told - objective.returned,
                progress=end - told,
                compute=objective.compute,
            )
        )
        previous_end = end

    # run_worker only calls its runner with the trial; this objective stands in for training.
    search.training.worker.run_worker(study, objective, threading.Event(), on_trial_end)  # type: ignore[arg-type]
    return timings


# --- one storage ----------------------------------------------------------------------------


@dataclass(frozen=True)
class RunResult:
    storage: str
    target: int
    setup_s: float
    elapsed_s: float
    extra: int  # tickets made past the target by racing top-ups; never run
    load: str  # load average when the run ended
    timings: list[TrialTiming]

    def by_number(self) -> list[TrialTiming]:
        return sorted(self.timings, key=lambda t: t.number)


def storage_url(kind: str, workdir: Path, args: argparse.Namespace) -> str:
    if kind == "sqlite":
        return f"sqlite:///{workdir / 'bench.db'}"
    if kind == "journal":
        return f"journal://{workdir / 'bench.log'}"
    return {"postgresql": args.postgres_url, "mysql": args.mysql_url, "redis": args.redis_url}[kind]


def bench_settings(args: argparse.Namespace) -> StudySettings:
    """Settings as `hpo` builds them from its defaults; epochs = reports, for the pruner."""
    return StudySettings.for_space(epochs=args.reports, dataset="synthetic", pruner=args.pruner)


def run_storage(kind: str, args: argparse.Namespace, workdir: Path) -> RunResult:
    url = storage_url(kind, workdir, args)
    name = f"bench-{kind}-{uuid.uuid4().hex[:8]}"
    settings = bench_settings(args)
    job = Job(url, name, settings, args.reports, args.sampler, args.trials)
    with cleanup(kind, url, name):
        t0 = time.perf_counter()
        create_or_join(open_storage(url), name, settings, args.trials)
        setup_s = time.perf_counter() - t0
        started, timings = run_workers(job, args.workers)
        elapsed = max(t.end for t in timings) - started
        extra = check_study(open_storage(url), name, args.trials, timings)
    return RunResult(kind, args.trials, setup_s, elapsed, extra, load_average(), timings)


def run_workers(job: Job, workers: int) -> tuple[float, list[TrialTiming]]:
    """Start the workers, release them together, and gather every trial's timing."""
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(workers + 1)
    results = ctx.Queue()
    processes = [
        ctx.Process(target=worker_main, args=(job, i, barrier, results)) for i in range(workers)
    ]
    for process in processes:
        process.start()
    # A worker that fails before the start breaks the barrier; its error is in the queue.
    with suppress(threading.BrokenBarrierError):
        barrier.wait()
    started = time.perf_counter()
    timings: list[TrialTiming] = []
    errors: list[str] = []
    for _ in processes:
        status, payload = results.get(timeout=RUN_TIMEOUT_S)
        if status == "ok":
            timings.extend(payload)
        else:
            errors.append(payload)
    for process in processes:
        process.join()
    if errors:  # the cause, not the broken barrier it left the others
        raise RuntimeError(min(errors, key=lambda error: "BrokenBarrierError" in error))
    return started, timings


def check_study(
    storage: optuna.storages.BaseStorage, name: str, target: int, timings: list[TrialTiming]
) -> int:
    """Each of the first `target` tickets ran once and completed; returns the tickets made
    past the target by racing top-ups (left waiting, never run)."""
    numbers = sorted(t.number for t in timings)
    if numbers != list(range(target)):
        raise RuntimeError(f"{name}: ran trials {numbers[:5]}..., not each of 0-{target - 1} once")
    trials = optuna.load_study(study_name=name, storage=storage).trials
    states = {t.state for t in trials[:target]}
    if states != {TrialState.COMPLETE}:
        reasons = {t.user_attrs.get("fail_reason") for t in trials if t.state == TrialState.FAIL}
        raise RuntimeError(f"{name}: trials ended in states {states}; failures: {reasons}")
    return len(trials) - target


@contextmanager
def cleanup(kind: str, url: str, name: str) -> Iterator[None]:
    """Delete the study afterwards; for Redis, the whole journal the run wrote."""
    client = redis.Redis.from_url(url) if kind == "redis" else None
    if client is not None and client.dbsize():
        # A journal is append-only: deleting the study would leave its entries, and every
        # later open of that journal (the tests' too) would replay them.
        raise RuntimeError(f"Redis database {url} is not empty; pass an empty one (--redis-url)")
    try:
        yield
    finally:
        with suppress(KeyError):  # KeyError: the run failed before the study was created
            optuna.delete_study(study_name=name, storage=open_storage(url))
        if client is not None:
            for batch in batched(client.scan_iter(count=10_000), 10_000):
                client.delete(*batch)


def batched(items: Iterable[bytes], size: int) -> Iterator[list[bytes]]:
    batch: list[bytes] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


# --- report ---------------------------------------------------------------------------------


def window(trials: int) -> int:
    """Trials averaged at the start and at the end: 100, or a fifth of a small study."""
    return max(1, min(100, trials // 5))


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def mean_overhead(timings: list[TrialTiming]) -> float:
    return statistics.fmean(t.overhead for t in timings)


def markdown_row(cells: list[object]) -> str:
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def summary_row(result: RunResult) -> str:
    trials = result.by_number()
    size = window(result.target)
    early, late = mean_overhead(trials[:size]), mean_overhead(trials[-size:])
    return markdown_row(
        [
            result.storage,
            result.target,
            result.extra,
            f"{result.setup_s:.1f}",
            f"{result.elapsed_s:.1f}",
            f"{len(trials) / result.elapsed_s:.1f}",
            ms(mean_overhead(trials)),
            ms(early),
            ms(late),
            f"{late / early:.2f}",
            result.load,
        ]
    )


def phase_row(result: RunResult, part: str, timings: list[TrialTiming]) -> str:
    cells = [ms(statistics.fmean(getattr(t, phase) for t in timings)) for phase in PHASES]
    return markdown_row([result.storage, part, *cells, ms(mean_overhead(timings))])


def print_tables(results: list[RunResult], args: argparse.Namespace) -> None:
    size = window(args.trials)
    print(
        f"\n{args.workers} workers, {args.reports} reports/trial, sampler {args.sampler}, "
        f"pruner {args.pruner}\n"
    )
    header = ["storage", "trials", "extra", "setup s", "run s", "trials/s", "ms/trial"]
    header += [f"first {size}", f"last {size}", "growth", "load avg at end"]
    print(markdown_row(header))
    print(markdown_row(["---"] * len(header)))
    for result in results:
        print(summary_row(result))
    print(f"\nms per trial by phase (report, prune: all {args.reports} calls together)\n")
    header = ["storage", "trials", *PHASES, "total"]
    print(markdown_row(header))
    print(markdown_row(["---"] * len(header)))
    for result in results:
        trials = result.by_number()
        print(phase_row(result, "all", trials))
        print(phase_row(result, f"first {size}", trials[:size]))
        print(phase_row(result, f"last {size}", trials[-size:]))


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# --- command line ---------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Per-trial bookkeeping of each storage, through the project's worker loop.",
        epilog="ms/trial: one trial's time in one worker, from the end of its previous trial "
        "to the end of its own, less the objective's compute; first/last: that mean over the "
        "lowest/highest trial numbers; growth = last / first; extra: tickets made past the "
        "target by racing top-ups (queued, never run).",
    )
    parser.add_argument("--workers", type=int, default=8, help="worker processes (default 8)")
    parser.add_argument("--reports", type=int, default=30, help="reports per trial (default 30)")
    parser.add_argument("--trials", type=int, default=2000, help="tickets per study (default 2000)")
    parser.add_argument(
        "--storages",
        default=DEFAULT_STORAGES,
        help=f"comma list of {', '.join(STORAGES)} (default {DEFAULT_STORAGES})",
    )
    parser.add_argument(
        "--sampler",
        choices=("random", "tpe"),
        default="random",
        help="random isolates the storage; tpe is the workers' own sampler (default random)",
    )
    parser.add_argument(
        "--pruner",
        choices=tuple(PRUNERS),
        default=next(iter(PRUNERS)),
        help="the study's pruner, as `hpo --pruner` (default: hpo's)",
    )
    parser.add_argument("--smoke", action="store_true", help=" ".join(SMOKE) + " (seconds)")
    parser.add_argument(
        "--postgres-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/hpo_bench"
    )
    parser.add_argument("--mysql-url", default="mysql+pymysql://root@127.0.0.1:3306/hpo_bench")
    parser.add_argument(
        "--redis-url",
        default="redis://127.0.0.1:6379/14",
        help="an empty Redis database (not the tests' /15): the run's journal is removed "
        "afterwards",
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args = parser.parse_args([*SMOKE, *(sys.argv[1:] if argv is None else argv)])
    args.storages = [s.strip() for s in args.storages.split(",") if s.strip()]
    unknown = set(args.storages) - set(STORAGES)
    if unknown:
        parser.error(f"unknown storages {sorted(unknown)}; choose from {', '.join(STORAGES)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    results = []
    with tempfile.TemporaryDirectory(prefix="hpo-bench-") as workdir:
        for kind in args.storages:
            print(f"{kind}: {args.trials} trials, {args.workers} workers ...", flush=True)
            try:
                result = run_storage(kind, args, Path(workdir))
            except (RuntimeError, StorageURLError) as err:
                print(f"{kind}: failed: {err}", flush=True)
                continue
            print(f"{kind}: done\n{summary_row(result)}", flush=True)
            results.append(result)
    print_tables(results, args)


if __name__ == "__main__":
    main()
