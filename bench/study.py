"""A whole study, measured: where each worker's time goes, from process start to exit.

    python bench/study.py --device cpu             # tiny space, small synthetic set: ~3 min
    python bench/study.py --device cuda --trials 24   # default space, 50,000 synthetic images

The study is created as `hpo create` creates it (search.commands.launch.create_study) in a
SQLite file, and each worker is a process that runs what `hpo worker` runs
(search.commands.launch.join_search):
its own start-up, data on the device once, then claim, objective, tell, progress, until the
study's target is met. Each worker process wraps the project's functions with timers (main
thread only) and writes what it measured to a JSON file; the parent adds the trials' own
`seconds` attribute (the phases the objective records) and prints the breakdown:

    start-up  process (interpreter, imports), data (read + split + device copy), other
    claim     the read of the study between trials (read_at_boundary: stale trials, the
              view) + claim_trial                      tell      study.tell
    progress  budget + best trial after each trial     idle      waiting with nothing to claim
    in the objective: sample, build, compile, train, eval, checkpoint, report, prune
    other     what no timer covers (heartbeat thread, progress lines, exit)

Epoch share = (train + eval) / worker time. Code without the `seconds` attribute (before it
existed) is measured by the same timers around Trainer.evaluate, CheckpointStore.save,
trial.report/should_prune/set_user_attr, sample_config and start_run, with train = the
epochs' seconds less eval and compile; run this file from that tree to measure it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Run as a file, this folder would come first on sys.path and shadow the `storage` package;
# the tree this file is in is the one measured.
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import optuna  # noqa: E402
from rich.console import Console  # noqa: E402

import data.dataset  # noqa: E402
import data.loader  # noqa: E402
import search.commands.launch  # noqa: E402
import search.training.checkpoints  # noqa: E402
import search.training.objective  # noqa: E402
import search.training.trainer  # noqa: E402
import search.training.worker  # noqa: E402
from data.dataset import load_dataset  # noqa: E402
from data.synthetic import synthetic_folder, write_synthetic  # noqa: E402
from search.commands.fleet import WorkerOptions  # noqa: E402
from search.commands.progress import SearchProgress  # noqa: E402

OBJECTIVE_PHASES = ("sample", "build", "compile", "train", "eval", "checkpoint", "report", "prune")
WORKER_PHASES = ("claim", "tell", "progress", "idle")
STARTUP_PHASES = ("process", "data", "other")
# After --timeout, the seconds running trials get to finish before the workers are stopped.
STOP_GRACE_S = 60.0
MODES = {
    # device: space, trials, epochs, synthetic training images (10% of them held out)
    "cpu": ("tiny", 12, 9, 2_500),
    "cuda": ("default", 24, 20, 50_000),
}
# --smoke: the smallest study that still runs every phase, on the CPU (the suite runs it).
SMOKE = ["--device", "cpu", "--trials", "1", "--epochs", "1", "--images", "200"]


# --- worker process -----------------------------------------------------------------------------


class Timers:
    """Seconds per phase, on the main thread only (checkpoint writers run beside it)."""

    def __init__(self) -> None:
        self.worker: defaultdict[str, float] = defaultdict(float)
        self.trials: dict[int, defaultdict[str, float]] = {}
        self.objective_s: dict[int, float] = {}
        self.current: int | None = None  # the trial whose objective runs now
        self.first_claim: float | None = None
        self.idle_since: float | None = None
        self.inside = False  # in a timed call

    def wrap(self, owner: Any, name: str, phase: str, after: Callable | None = None) -> None:
        original = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            # The outermost timed call counts (a checkpoint's set_user_attr is checkpoint).
            if self.inside or threading.current_thread() is not threading.main_thread():
                return original(*args, **kwargs)
            start = time.perf_counter()
            self.inside = True
            try:
                result = original(*args, **kwargs)
            finally:
                self.inside = False
                self.add(phase, time.perf_counter() - start)
            if after is not None:
                after(result)
            return result

        setattr(owner, name, timed)

    def add(self, phase: str, seconds: float) -> None:
        if self.current is not None and phase in OBJECTIVE_PHASES:
            self.trials[self.current][phase] += seconds
        elif self.first_claim is not None or phase == "data":
            self.worker[phase] += seconds

    def install(self) -> None:
        look = search.training.worker.read_at_boundary

        def look_for_work(study: optuna.Study, *args: Any) -> Any:  # before each claim
            now = time.time()
            self.first_claim = self.first_claim or now
            if self.idle_since is not None:
                self.worker["idle"] += now - self.idle_since
                self.idle_since = None
            return look(study, *args)

        search.training.worker.read_at_boundary = look_for_work
        self.wrap(search.training.worker, "read_at_boundary", "claim")
        self.wrap(search.training.worker, "claim_trial", "claim", after=self._claimed)
        # The worker imports these where trials run (the control plane stays torch-free).
        self.wrap(data.dataset, "load_dataset", "data")
        self.wrap(data.loader, "search_data", "data")
        self.wrap(search.commands.launch, "budget", "progress")
        self.wrap(search.commands.launch, "best_summary", "progress")
        self.wrap(optuna.study.Study, "tell", "tell")
        # Inside the objective; used only where a trial has no `seconds` attribute.
        self.wrap(search.training.objective, "sample_config", "sample")
        self.wrap(search.training.objective, "start_run", "build")
        self.wrap(search.training.trainer.Trainer, "evaluate", "eval")
        self.wrap(search.training.checkpoints.CheckpointStore, "save", "checkpoint")
        for name, phase in (("report", "report"), ("set_user_attr", "report")):
            self.wrap(optuna.trial.Trial, name, phase)
        self.wrap(optuna.trial.Trial, "should_prune", "prune")
        call = search.training.objective.TrialRunner.__call__

        def objective(runner: Any, trial: optuna.Trial) -> float:
            self.current = trial.number
            self.trials[trial.number] = defaultdict(float)
            start = time.perf_counter()
            try:
                return call(runner, trial)
            finally:
                self.objective_s[trial.number] = time.perf_counter() - start
                self.current = None

        search.training.objective.TrialRunner.__call__ = objective

    def _claimed(self, trial: optuna.Trial | None) -> None:
        if trial is None:
            self.idle_since = time.time()


def run_worker(spec: dict[str, Any]) -> None:
    """One `hpo worker`, timed; writes its figures to spec['out']."""
    imported = time.time()
    timers = Timers()
    timers.install()
    options = WorkerOptions(
        data_dir=Path(spec["data_dir"]),
        artifact_dir=Path(spec["artifact_dir"]),
        compile=spec["compile"],
        timeout_s=spec["timeout"],
    )
    with open(spec["log"], "a") as log:
        search.commands.launch.join_search(
            spec["study"], spec["storage"], options, SearchProgress(Console(file=log))
        )
    record = {
        "spawned": spec["spawned"],
        "imported": imported,
        "first_claim": timers.first_claim,
        "ended": time.time(),
        "worker": timers.worker,
        "trials": timers.trials,
        "objective_s": timers.objective_s,
    }
    Path(spec["out"]).write_text(json.dumps(record))


# --- the study ----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.worker_spec:
        run_worker(json.loads(args.worker_spec))
        return
    space, trials, epochs, n_images = MODES[args.device]
    space, trials, epochs = args.space or space, args.trials or trials, args.epochs or epochs
    work = Path(tempfile.mkdtemp(prefix="bench-study-"))
    data_dir = args.data_dir or work / "data"
    images = synthetic_set(data_dir, args.images or n_images)
    storage = f"sqlite:///{work / 'hpo.db'}"
    print_header(args, space, trials, epochs, len(images.train_labels))

    start = time.time()
    request = search.commands.launch.StudyRequest(
        study="bench", trials=trials, storage=storage, space=space, epochs=epochs,
        dataset="synthetic", pruner=args.pruner, checkpoint_interval=args.checkpoint_interval,
    )  # fmt: skip
    quiet = SearchProgress(Console(file=open(os.devnull, "w")))  # noqa: SIM115
    search.commands.launch.create_study(request, quiet)
    created = time.time()
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, os.cpu_count() // args.workers))
    env = {**os.environ, "OMP_NUM_THREADS": threads, "HPO_STORAGE": storage}
    workers = []
    for index in range(args.workers):
        spec = {
            "study": "bench", "storage": storage, "data_dir": str(data_dir),
            "artifact_dir": str(work / "artifacts"), "compile": args.compile,
            "timeout": args.timeout,
            "out": str(work / f"worker-{index}.json"), "log": str(work / f"worker-{index}.log"),
            "spawned": time.time(),
        }  # fmt: skip
        command = [sys.executable, __file__, "--worker-spec", json.dumps(spec)]
        workers.append((subprocess.Popen(command, env=env), spec))
    codes = wait_or_stop([process for process, _ in workers], args.timeout)
    ended = time.time()
    if any(codes):
        sys.exit(f"a worker failed ({codes}); logs in {work}")
    records = [json.loads(Path(spec["out"]).read_text()) for _, spec in workers]
    study = optuna.load_study(study_name="bench", storage=storage)
    report(study, records, wall_s=ended - start, create_s=created - start)
    print(f"threads per worker: {threads}; logs and database: {work}")


def wait_or_stop(processes: list[subprocess.Popen], timeout: float | None) -> list[int]:
    """Their exit codes. With a timeout the workers start no new trial after it; a minute
    later they are stopped as Ctrl-C stops them (finish the epoch, re-queue the trial)."""
    deadline = None if timeout is None else time.monotonic() + timeout + STOP_GRACE_S
    for process in processes:
        left = None if deadline is None else max(deadline - time.monotonic(), 0.1)
        try:
            process.wait(left)
        except subprocess.TimeoutExpired:
            for other in processes:  # once: a second stop would make them exit at once
                if other.poll() is None:
                    other.send_signal(signal.SIGTERM)
            break
    return [process.wait() for process in processes]


def synthetic_set(data_dir: Path, n_images: int) -> Any:
    """The synthetic set with `n_images` training images, written if not there yet (the same
    files bench/throughput.py writes, so a --data-dir serves both)."""
    if synthetic_folder(data_dir).exists():
        images = load_dataset("synthetic", data_dir)
        if len(images.train_labels) == n_images:
            return images
    write_synthetic(data_dir, train_per_class=n_images // 10, test_per_class=10)
    return load_dataset("synthetic", data_dir)


def trial_phases(trial: optuna.trial.FrozenTrial, timed: dict[str, float]) -> dict[str, float]:
    """The trial's own `seconds` attribute, or the timers' figures where it has none."""
    if trial.user_attrs.get("seconds"):
        return dict(trial.user_attrs["seconds"])
    phases = {phase: timed.get(phase, 0.0) for phase in OBJECTIVE_PHASES}
    epochs = trial.user_attrs.get("epochs") or []
    phases["compile"] = sum(e.get("compile_seconds", 0.0) for e in epochs)
    epoch_s = sum(e["seconds"] for e in epochs)
    phases["train"] = epoch_s - phases["eval"] - phases["compile"]
    return phases


def report(
    study: optuna.Study, records: list[dict[str, Any]], wall_s: float, create_s: float
) -> None:
    trials = {t.number: t for t in study.get_trials()}
    totals: defaultdict[str, float] = defaultdict(float)
    worker_s, objective_s = 0.0, 0.0
    startups = []
    for record in records:
        worker_s += record["ended"] - record["spawned"]
        first = record["first_claim"] or record["ended"]
        data = record["worker"].get("data", 0.0)
        startup = {
            "process": record["imported"] - record["spawned"],
            "data": data,
            "other": first - record["imported"] - data,
        }
        startups.append(startup)
        for phase, seconds in startup.items():
            totals[f"start-up: {phase}"] += seconds
        for phase in WORKER_PHASES:
            totals[phase] += record["worker"].get(phase, 0.0)
        for number, timed in record["trials"].items():
            for phase, seconds in trial_phases(trials[int(number)], timed).items():
                totals[phase] += seconds
        objective_s += sum(record["objective_s"].values())
    inside = sum(totals[phase] for phase in OBJECTIVE_PHASES)
    totals["other"] = worker_s - sum(totals.values())
    ran = [t for t in trials.values() if t.state.is_finished() and t.user_attrs.get("epochs")]
    finished = [t for t in ran if t.state.name in ("COMPLETE", "PRUNED")]
    epochs = sum(t.last_step or 0 for t in finished)
    n = max(len(finished), 1)
    states = ", ".join(
        f"{s.lower()} {sum(t.state.name == s for t in ran)}" for s in ("COMPLETE", "PRUNED", "FAIL")
    )
    print(
        f"\n{len(finished)} trials finished ({states}), {epochs} epochs ({epochs / n:.1f} per "
        f"trial), wall {wall_s:.1f} s ({create_s:.1f} s creating the study), "
        f"{len(finished) / wall_s * 3600:.0f} trials/hour, {len(records)} worker(s)"
    )
    print(f"\nworker time, summed over workers: {worker_s:.1f} s")
    print(f"  {'phase':<20} {'seconds':>9} {'share':>7} {'per trial':>10}")
    order = [f"start-up: {p}" for p in STARTUP_PHASES] + ["claim", *OBJECTIVE_PHASES]
    for phase in [*order, "tell", "progress", "idle", "other"]:
        seconds = totals[phase]
        print(f"  {phase:<20} {seconds:9.2f} {seconds / worker_s:7.1%} {seconds / n:10.3f}")
    epoch_s = totals["train"] + totals["eval"]
    print(f"\nepoch share (train + eval) / worker time: {epoch_s / worker_s:.1%}")
    print(
        f"epoch share of trial time (objective calls, {objective_s:.1f} s): "
        f"{epoch_s / objective_s:.1%}; overhead per trial "
        f"{(objective_s - epoch_s) / n:.3f} s (objective phases timed: {inside:.1f} s)"
    )
    print(
        f"checkpoint / training: {totals['checkpoint'] / max(totals['train'], 1e-9):.2%}; "
        f"compile / worker time: {totals['compile'] / worker_s:.1%}"
    )
    for index, startup in enumerate(startups):
        parts = ", ".join(f"{phase} {seconds:.2f}" for phase, seconds in startup.items())
        print(f"start-up before the first trial, worker {index}: {sum(startup.values()):.2f} s "
              f"({parts})")  # fmt: skip
    per_hour = len(finished) / worker_s * len(records) * 3600
    print(f"extrapolated: 200 trials like these take {200 / per_hour:.2f} h on these workers")


def print_header(args: argparse.Namespace, space: str, trials: int, epochs: int, n: int) -> None:
    import torch

    device = args.device
    name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu"
    print(f"machine: {name}, {os.cpu_count()} cores; torch {torch.__version__}, "
          f"python {platform.python_version()}, optuna {optuna.__version__}")  # fmt: skip
    if hasattr(os, "getloadavg"):
        print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"study: space {space}, {trials} trials, {epochs} epochs, pruner {args.pruner}, "
          f"{n} synthetic training images, {args.workers} worker(s), --compile {args.compile}, "
          f"checkpoint interval {args.checkpoint_interval or 'default'}; tree {ROOT}")  # fmt: skip


def parse(argv: list[str] | None) -> argparse.Namespace:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=sorted(MODES), default="cuda")
    parser.add_argument("--space", help="default: tiny on cpu, default on cuda")
    parser.add_argument("--trials", type=int, help="default: 12 on cpu, 24 on cuda")
    parser.add_argument("--epochs", type=int, help="default: 9 on cpu, 20 on cuda")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--pruner", default="hyperband")
    parser.add_argument("--compile", default="auto")
    parser.add_argument("--checkpoint-interval", type=int, help="default: the study's")
    parser.add_argument("--images", type=int, help="default: 2,500 on cpu, 50,000 on cuda")
    parser.add_argument(
        "--timeout",
        type=float,
        help="seconds after which workers start no new trial; a minute later they are stopped",
    )
    parser.add_argument("--data-dir", type=Path, help="keeps the synthetic set between runs")
    parser.add_argument("--worker-spec", help=argparse.SUPPRESS)
    parser.add_argument("--smoke", action="store_true", help=" ".join(SMOKE) + " (seconds)")
    args = parser.parse_args(argv)
    return parser.parse_args([*SMOKE, *argv]) if args.smoke else args


if __name__ == "__main__":
    main()
