"""`hpo start --gpus`: one worker process per (GPU, slot), all on the same study."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from search.config import DEFAULT_COMPILE_MODE
from search.progress import SearchProgress
from storage import DEFAULT_STORAGE_RETRY_S


class GpuSpecError(ValueError):
    """A --gpus value that names no usable GPU."""


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


@dataclass(frozen=True)
class Slot:
    index: int
    gpu: str | None  # CUDA_VISIBLE_DEVICES for the process (a name from visible_gpus); None
    # keeps the parent's

    @property
    def label(self) -> str:
        return f"gpu{self.gpu}/{self.index}" if self.gpu is not None else f"worker{self.index}"


def visible_gpu_count() -> int:
    """How many CUDA GPUs this process may use: the one place torch is asked."""
    import torch  # counting GPUs loads CUDA; only --gpus asks for it

    return torch.cuda.device_count()


def visible_gpus() -> list[str]:
    """This process's GPUs by the names a child's CUDA_VISIBLE_DEVICES must give them.

    A scheduler (Slurm --gres, the Kubernetes device plugin) or a user narrows a job to some
    GPUs with CUDA_VISIBLE_DEVICES, as indices, GPU UUIDs or MIG UUIDs; a child must name its
    GPU as the parent sees it, not by the index CUDA renumbered it to. CUDA stops reading the
    list at the first entry that names no device, hence the count from torch.
    """
    count = visible_gpu_count()
    given = os.environ.get("CUDA_VISIBLE_DEVICES")
    if given is None:
        return [str(i) for i in range(count)]
    return [name.strip() for name in given.split(",") if name.strip()][:count]


def worker_gpu() -> str:
    """The GPU a worker trains on, as its name and its trials show it: the first it may see
    (the one `cuda` means), by its CUDA_VISIBLE_DEVICES name with characters other than
    letters, digits, '.', '-' and '_' made '_'; "cpu" where none is visible (a value such as
    -1 or Slurm's NoDevFiles, or no driver)."""
    names = visible_gpus()
    return re.sub(r"[^A-Za-z0-9._-]", "_", names[0]) if names else "cpu"


def parse_gpus(spec: str | None) -> list[int] | None:
    """'all' or a comma list of indices into this process's GPUs (0 = the first it may see);
    None leaves the device to each worker."""
    if spec is None:
        return None
    visible = visible_gpu_count()
    if visible == 0:
        raise GpuSpecError(
            f"--gpus {spec}: no CUDA GPU is visible here; leave out --gpus to train on the CPU"
        )
    if spec == "all":
        return list(range(visible))
    gpus = [part.strip() for part in spec.split(",") if part.strip()]
    if not gpus or not all(gpu.isdigit() for gpu in gpus):
        raise GpuSpecError(f"--gpus {spec!r}: expected 'all' or indices like 0,1,2")
    if any(int(gpu) >= visible for gpu in gpus):
        raise GpuSpecError(
            f"--gpus {spec}: this job may use {visible} GPU(s), indices 0-{visible - 1} "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})"
        )
    if len(set(gpus)) != len(gpus):
        raise GpuSpecError(f"--gpus {spec!r}: a GPU is listed twice; use --jobs-per-gpu instead")
    return [int(gpu) for gpu in gpus]


def gpu_names(indices: list[int] | None) -> list[str] | None:
    """The CUDA_VISIBLE_DEVICES entry for a child on each of `indices` (see visible_gpus)."""
    if indices is None:
        return None
    names = visible_gpus()
    return [names[index] for index in indices]


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
    if options.artifact_dir is not None:
        command += ["--artifact-dir", str(options.artifact_dir)]
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
