"""A fleet on one database (issue 25): W real `hpo worker` processes against bare Optuna's
`study.optimize` in W processes, on the same storage, with the same objective and sampler.

The storage is an own PostgreSQL that admits --max-connections, behind an own PgBouncer in
transaction mode lending it --pool-size server connections (tests/servers.py). The objective
is tests/stand_in.py: per trial two suggestions, then 3 epochs of a sleep (--epoch-s), a
report and a prune check, so what is measured is the study machinery, not training. Every
worker first claims a trial and waits at the stand-in's gate; the clock starts when the gate
opens with the whole fleet running. Both runs kill -9 --kills workers mid-trial and start
new ones of their kind: a heartbeat finds the trial stale, and ours queues its retry as
Optuna's RetryFailedTrialCallback re-queues bare Optuna's. Figures per run:

- trials/s: trials finished over the seconds from the gate to the last trial's end;
- claim p50/p99: per worker, from one trial's objective returning to the next one's start
  (the tell, the stale check, the claim, the sampler's start of the trial);
- study-row and trial-row lock waits: backends waiting on a lock, sampled every 0.25 s from
  pg_stat_activity (mean, max), and waits over 10 ms in the server's log (log_lock_waits);
- the pooler: clients connected and clients queued for a server connection (SHOW POOLS);
- connections: client connections the workers hold, server connections (backends);
- RSS and PSS per worker process mid-run, and whether any loaded torch;
- storage traffic per trial: statements (each a round trip), transactions (a BEGIN and a
  COMMIT more each) and rows read, counted in every worker by SQLAlchemy's engine events
  (tests/stand_in.py) from its first trial's start to its last;
- bookkeeping per trial: the claim p50 plus the objective's own storage calls (its median
  time less its sleeps), and what share that is of a trial of the small config on a GPU.

Run from the repository root (the full run takes ~20 minutes on 2 cores):

    .venv/bin/python bench/fleet.py --sizes 8,32,128 --trials 1000
    .venv/bin/python bench/fleet.py --sizes 8 --trials 100 --kinds ours   # a quick look
    .venv/bin/python bench/fleet.py --smoke    # one worker of each, a few trials
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.study import MaxTrialsCallback
from optuna.trial import TrialState

ROOT = Path(__file__).resolve().parents[1]
# Run as a file, this folder would come first on sys.path and shadow the `storage` package.
sys.path[:1] = [str(ROOT), str(ROOT / "tests")]

KINDS = ("ours", "optuna")
# A pruned trial of the small config on a GPU, what the bookkeeping is a share of: Hyperband's
# first rung (3 epochs) at 2.05 s an epoch (45,000 images at issue 4's 21,900 img/s eager on an
# H100; docs/BENCHMARKS.md, "GPU: not measured here").
GPU_TRIAL_S = 3 * 45_000 / 21_900
# The driver's own imports (fleetrun: the test servers, the `hpo` modules) wait for the
# driver: a bare Optuna worker loads only Optuna and the stand-in.


@dataclass
class Run:
    kind: str
    workers: int
    trials: int
    finished: int
    seconds: float
    startup_s: float
    claim_ms: list[float]
    storage_ms: float  # the objective's median time less its sleeps
    traffic: tuple[float, float, float]  # statements, transactions, rows read per trial
    samples: object
    logged_waits: dict[str, int]
    rss_mib: float
    pss_mib: float
    torch: bool
    load: str

    def row(self) -> str:
        claims = sorted(self.claim_ms)
        p50 = statistics.median(claims)
        p99 = claims[min(len(claims) - 1, int(0.99 * len(claims)))]
        s = self.samples
        logged = self.logged_waits
        rate = self.finished / self.seconds
        statements, transactions, rows = self.traffic
        bookkeeping_s = (p50 + self.storage_ms) / 1000
        share = bookkeeping_s / (bookkeeping_s + GPU_TRIAL_S)
        return (
            f"| {self.workers} | {self.kind} | {self.finished} | {rate:.1f} "
            f"| {p50:.0f} / {p99:.0f} | {statements:.0f} / {transactions:.0f} / {rows:.0f} "
            f"| {bookkeeping_s * 1000:.0f} ms, {share:.1%} "
            f"| {s.summary(s.study_row_waits)}; {logged['study row']} "
            f"| {s.summary(s.trial_row_waits)}; {logged['trial row']} "
            f"| {s.summary(s.heartbeat_row_waits)}; {logged['heartbeat row']} "
            f"| {s.summary(s.pooler_waiting)} | {max(s.pooler_clients)} | {max(s.backends)} "
            f"| {self.rss_mib:.0f} / {self.pss_mib:.0f} | {self.load} |"
        )


HEADER = (
    "| workers | run | trials finished | trials/s | claim p50 / p99 ms "
    "| statements / transactions / rows read per trial "
    "| bookkeeping per trial, share of a GPU trial "
    "| study-row lock waiters (sampled; logged >10 ms) | trial-row lock waiters (same) "
    "| heartbeat-row lock waiters (same) "
    "| clients queued at PgBouncer | client connections | server backends "
    "| RSS / PSS per worker MiB | load at start |\n" + "|---" * 15 + "|"
)


# --smoke: the smallest fleet, one worker of each kind (the suite runs it).
SMOKE = ["--sizes", "1", "--trials", "6", "--kills", "0"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="8,32,128", help="worker counts, comma-separated")
    parser.add_argument("--trials", type=int, default=1000)
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--kills", type=int, default=3, help="kill -9 mid-trial, in each run")
    parser.add_argument("--max-connections", type=int, default=40)
    parser.add_argument("--pool-size", type=int, default=20)
    parser.add_argument("--epoch-s", type=float, default=0.05)
    sub = parser.add_subparsers(dest="command")
    worker = sub.add_parser("optuna-worker", help="one bare Optuna worker (the driver starts it)")
    worker.add_argument("--url")
    worker.add_argument("--study")
    parser.add_argument("--smoke", action="store_true", help=" ".join(SMOKE) + " (seconds)")
    args = parser.parse_args()
    if args.smoke:
        args = parser.parse_args([*SMOKE, *sys.argv[1:]])
    if args.command == "optuna-worker":
        optuna_worker(args.url, args.study, args.trials)
        return
    print(f"# bench/fleet.py on {os.cpu_count()} cores, {args.trials} trials a run, "
          f"max_connections {args.max_connections}, PgBouncer pool {args.pool_size}")  # fmt: skip
    rows = []
    for size in [int(s) for s in args.sizes.split(",")]:
        for kind in args.kinds.split(","):
            run = one_run(kind, size, args)
            rows.append(run.row())
            print(f"{kind} x{size}: {run.finished} trials in {run.seconds:.1f} s after a "
                  f"{run.startup_s:.0f} s start; torch loaded: {run.torch}; {run.row()}",
                  flush=True)  # fmt: skip
    print(HEADER)
    print("\n".join(rows))


def one_run(kind: str, size: int, args: argparse.Namespace) -> Run:
    from fleetrun import (
        Fleet,
        Sampler,
        check_study,
        claim_times,
        create_fleet_study,
        fleet_servers,
        logged_lock_waits,
        memory_mib,
        torch_loaded,
    )

    folder = Path(tempfile.mkdtemp(prefix="hpo-own-server-"))
    load = f"{os.getloadavg()[0]:.1f}"
    name = f"{kind}-{size}-{uuid.uuid4().hex[:6]}"
    fleet = Fleet("", name, folder / "fleet", epoch_s=args.epoch_s, count_reads=True)
    try:
        with fleet_servers(folder, args.max_connections, args.pool_size) as (postgres, bouncer):
            fleet.url = bouncer.url
            started = time.monotonic()
            if kind == "ours":
                study = create_fleet_study(bouncer.url, name, args.trials)
            else:
                study = create_optuna_study(bouncer.url, name)
            spawn_workers(fleet, kind, size, args.trials)
            fleet.wait_until_running(study, size, timeout=1800)
            startup_s = time.monotonic() - started
            log_start = (postgres.folder / "log").stat().st_size
            sampler = Sampler(postgres, bouncer)
            sampler.start()
            fleet.open_gate()
            memory = None
            for i in range(args.kills + 1):
                wait_for_ends(fleet, args.trials * (i + 1) // (args.kills + 2))
                memory = memory or (
                    memory_mib(list(fleet.workers)),
                    fleet_torch(fleet, torch_loaded),
                )
                if i < args.kills:
                    fleet.kill_mid_trial(restart=False)
                    spawn_workers(fleet, kind, 1, args.trials)
            codes = fleet.wait(timeout=1800)
            sampler.done.set()
            sampler.join()
            if kind == "ours":
                assert set(codes.values()) == {0}, (codes, fleet.outputs())
                check_study(study, args.trials, fleet.killed)
            else:  # a bare worker whose trial was failed as stale (starved of CPU) exits 1
                crashed = sum(code != 0 for code in codes.values())
                print(f"optuna x{size}: {crashed} of {len(codes)} workers exited non-zero")
            spans = fleet.spans()
            ends = [end for worker in spans.values() for _, _, end in worker]
            finished = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
            (rss, pss), torch = memory
            run = Run(
                kind, size, args.trials, finished, max(ends) - fleet.gate_opened, startup_s,
                [1000 * gap for gap in claim_times(spans)], storage_ms(spans, args.epoch_s),
                fleet.traffic_per_trial(), sampler.samples,
                logged_lock_waits(postgres, log_start), rss, pss, torch, load,
            )  # fmt: skip
    except BaseException:
        for process in fleet.workers.values():  # those left: the folder is kept, to read
            process.kill()
        raise
    shutil.rmtree(folder, ignore_errors=True)
    return run


def spawn_workers(fleet: object, kind: str, count: int, trials: int) -> None:
    if kind == "ours":
        fleet.spawn_hpo_workers(count)
        return
    for _ in range(count):
        fleet.spawn(sys.executable, __file__, "--trials", str(trials),
                    "optuna-worker", "--url", fleet.url, "--study", fleet.study)  # fmt: skip


def storage_ms(spans: dict, epoch_s: float) -> float:
    """The objective's median time less its sleeps: its suggestions, reports and prune checks."""
    from stand_in import EPOCHS

    times = [end - start for worker in spans.values() for _, start, end in worker]
    return 1000 * (statistics.median(times) - EPOCHS * epoch_s)


def wait_for_ends(fleet: object, count: int) -> None:
    while sum(len(s) for s in fleet.spans().values()) < count:
        time.sleep(0.2)


def fleet_torch(fleet: object, torch_loaded: object) -> bool:
    return any(torch_loaded(pid) for pid in fleet.workers)


# --- bare Optuna ----------------------------------------------------------------------------

# As the fleet's (tests/fleetrun.py), which a bare worker does not import.
HEARTBEAT_S = 2


def optuna_storage(url: str) -> optuna.storages.RDBStorage:
    """RDBStorage as an Optuna user writes it for PgBouncer: prepared statements off (a
    connect argument; the URL's "none" would reach psycopg as a string), heartbeats as ours."""
    with _quiet():
        return optuna.storages.RDBStorage(
            url.split("?")[0],
            engine_kwargs={"connect_args": {"prepare_threshold": None}},
            heartbeat_interval=HEARTBEAT_S,
            grace_period=2 * HEARTBEAT_S,
            failed_trial_callback=optuna.storages.RetryFailedTrialCallback(),
        )


def create_optuna_study(url: str, name: str) -> optuna.Study:
    from fleetrun import watching_storage

    optuna.create_study(study_name=name, storage=optuna_storage(url))
    return optuna.load_study(study_name=name, storage=watching_storage(url))


def optuna_worker(url: str, name: str, trials: int) -> None:
    """`study.optimize` until the study holds `trials` complete: TPE as ours, no pruner."""
    from stand_in import objective

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with _quiet():
        sampler = optuna.samplers.TPESampler(
            seed=os.getpid(), multivariate=True, group=True, constant_liar=True
        )
    study = optuna.load_study(
        study_name=name, storage=optuna_storage(url), sampler=sampler,
        pruner=optuna.pruners.NopPruner(),
    )  # fmt: skip
    study.optimize(objective, callbacks=[MaxTrialsCallback(trials, states=(TrialState.COMPLETE,))])


def _quiet() -> warnings.catch_warnings:
    context = warnings.catch_warnings()
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
    warnings.simplefilter("ignore", FutureWarning)
    return context


if __name__ == "__main__":
    main()
