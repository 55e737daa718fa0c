"""`hpo start --gpus`: one worker process per (GPU, slot), all on the same study."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from search.commands.progress import SearchProgress
from search.rules.config import DEFAULT_COMPILE_MODE
from storage import DEFAULT_STORAGE_RETRY_S


@dataclass(frozen=True)
class WorkerOptions:
    """Per-machine options: where data and checkpoints are, and how to use the hardware."""

    data_dir: Path | None = None
    artifact_dir: Path | None = None
    timeout_s: float | None = None
    compile: str = DEFAULT_COMPILE_MODE
    gpus: str | None = None  # 'all' or '0,1' (of the job's GPUs): a worker per GPU (and job)
    jobs_per_gpu: int = 1
    storage_retry_s: float = DEFAULT_STORAGE_RETRY_S  # waiting out a database outage
    slot: int | None = None  # set by `hpo start --gpus` for the processes it spawns
    dataset: str | None = None  # this machine's copy of the study's data (`hpo worker`)
    tensorboard: str | None = None  # this machine's mount of the study's TensorBoard folder
    mlflow: str | None = None  # this machine's address of the study's MLflow tracking server


@dataclass(frozen=True)
class Slot:
    index: int
    gpu: str | None  # CUDA_VISIBLE_DEVICES for the process (a name from visible_gpus); None
    # keeps the parent's

    @property
    def label(self) -> str:
        return f"gpu{self.gpu}/{self.index}" if self.gpu is not None else f"worker{self.index}"


def plan_slots(gpus: list[str] | None, jobs_per_gpu: int) -> list[Slot]:
    devices = gpus if gpus is not None else [None]
    return [
        Slot(index=i, gpu=gpu)
        for i, (gpu, _) in enumerate((gpu, job) for gpu in devices for job in range(jobs_per_gpu))
    ]


def run_fleet(
    study: str,
    storage_url: str,
    slots: list[Slot],
    options: WorkerOptions,
    progress: SearchProgress,
) -> int:
    """Run one `hpo worker` per slot, relay their lines, and pass stops on to them."""
    workers = [_spawn(study, storage_url, slot, options) for slot in slots]
    relays = [
        threading.Thread(target=_relay, args=(worker, slot, progress), daemon=True)
        for worker, slot in zip(workers, slots, strict=True)
    ]
    for relay in relays:
        relay.start()
    _forward_stops(workers, progress)
    codes = [worker.wait() for worker in workers]
    for relay in relays:
        relay.join()
    ended = zip(slots, codes, strict=True)
    failed = [f"{slot.label} exited {code}" for slot, code in ended if code]
    progress.say("all workers done" if not failed else "; ".join(failed))
    return max(codes, default=0)


def _spawn(study: str, storage_url: str, slot: Slot, options: WorkerOptions) -> subprocess.Popen:
    command = [*_hpo_command(), "worker", "--study", study]
    command += ["--slot", str(slot.index), "--compile", options.compile]
    command += ["--storage-retry-s", str(options.storage_retry_s)]
    if options.data_dir is not None:
        command += ["--data-dir", str(options.data_dir)]
    if options.dataset is not None:
        command += ["--dataset", options.dataset]
    if options.artifact_dir is not None:
        command += ["--artifact-dir", str(options.artifact_dir)]
    if options.tensorboard is not None:
        command += ["--tensorboard", options.tensorboard]
    if options.mlflow is not None:
        command += ["--mlflow", options.mlflow]
    if options.timeout_s is not None:
        command += ["--timeout", str(options.timeout_s)]
    # The URL travels in the environment: a password on a command line shows up in `ps`.
    env = {**os.environ, "HPO_STORAGE": storage_url}
    if slot.gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = slot.gpu
    return subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # Own process group: a terminal's Ctrl-C reaches only us, and we forward one stop.
        start_new_session=True,
    )


def _hpo_command() -> list[str]:
    """The installed `hpo` script; `python -m` would put the working directory on sys.path,
    where a user's own `data/` folder would shadow this project's `data` package."""
    script = Path(sys.executable).with_name("hpo")
    return [str(script)] if script.exists() else [sys.executable, "-m", "search.cli"]


def _relay(worker: subprocess.Popen, slot: Slot, progress: SearchProgress) -> None:
    assert worker.stdout is not None
    for line in worker.stdout:
        progress.say(f"{slot.label}| {line.rstrip()}")


def _forward_stops(workers: list[subprocess.Popen], progress: SearchProgress) -> None:
    def forward(signum: int, _frame: object) -> None:
        progress.say(f"{signal.Signals(signum).name}: passing it on to {len(workers)} workers")
        for worker in workers:
            if worker.poll() is None:
                worker.send_signal(signum)  # a second Ctrl-C still means "exit now"

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
