"""`hpo start`: create or join a study, then run this process's worker on it."""

from __future__ import annotations

import os
import signal
import socket
import threading
from dataclasses import dataclass
from pathlib import Path

import optuna
import torch
from sqlalchemy.engine import make_url

from data import load_dataset
from search.checkpoints import CheckpointStore
from search.objective import TrialRunner, WorkerInfo
from search.progress import SearchProgress, best_summary
from search.settings import StudySettings
from search.space import load_space
from search.study import budget, create_or_join, join_as_worker, move_target
from search.worker import WorkerSummary, run_worker
from storage import HeartbeatPolicy, backend_of, open_storage

DEFAULTS = {
    "space": "default",
    "epochs": 20,
    "dataset": "cifar10",
    "pruner": "hyperband",
    "seed": 0,
}
DEFAULT_HEARTBEAT_S = 60


@dataclass(frozen=True)
class StartRequest:
    study: str
    trials: int
    storage: str
    space: str | None = None
    epochs: int | None = None
    dataset: str | None = None
    pruner: str | None = None
    seed: int | None = None
    heartbeat: int | None = None
    data_dir: Path | None = None
    artifact_dir: Path | None = None
    timeout_s: float | None = None

    def flags(self) -> dict[str, object]:
        """The study settings the user typed (None where left out)."""
        return {
            "space": self.space,
            "epochs": self.epochs,
            "dataset": self.dataset,
            "pruner": self.pruner,
            "seed": self.seed,
            "heartbeat_s": self.heartbeat,
        }

    def new_settings(self) -> StudySettings:
        space_name = self.space or DEFAULTS["space"]
        return StudySettings(
            space_name=space_name,
            space=load_space(space_name).to_dict(),
            epochs=self.epochs or DEFAULTS["epochs"],
            dataset=self.dataset or DEFAULTS["dataset"],
            pruner=self.pruner or DEFAULTS["pruner"],
            seed=DEFAULTS["seed"] if self.seed is None else self.seed,
            heartbeat_s=self.heartbeat or DEFAULT_HEARTBEAT_S,
        )


def start_search(request: StartRequest, progress: SearchProgress) -> WorkerSummary | None:
    """Create or join the study, move its target, and run trials until it is met."""
    storage = open_storage(request.storage)
    settings, created = create_or_join(
        storage, request.study, request.new_settings(), request.trials
    )
    if not created:
        settings.check_flags(request.flags())
        move_target(optuna.load_study(study_name=request.study, storage=storage), request.trials)
    verb = "created" if created else "joined"
    progress.say(
        f"{verb} study {request.study!r}: space {settings.space_name}, {settings.epochs} epochs, "
        f"{settings.dataset}, pruner {settings.pruner}"
    )
    return run_local_worker(request.study, request.storage, settings, request, progress)


def run_local_worker(
    study_name: str,
    storage_url: str,
    settings: StudySettings,
    request: StartRequest,
    progress: SearchProgress,
) -> WorkerSummary | None:
    worker = this_worker()
    study = join_as_worker(
        _worker_storage(storage_url, settings), study_name, settings, worker.name
    )
    state = budget(study)
    if state.done and state.running == 0:
        progress.say(
            f"study {study_name!r} already has {state.finished}/{state.target} finished trials; "
            "nothing to run (pass a larger --trials to extend it)"
        )
        return None
    device = pick_device(progress)
    stop = install_stop_handlers(progress)
    runner = TrialRunner(
        settings=settings,
        images=load_dataset(settings.dataset, request.data_dir),
        device=device,
        worker=worker,
        checkpoints=CheckpointStore(artifact_dir(request.artifact_dir, storage_url)),
        on_epoch=lambda trial, stats: progress.epoch(trial, stats, settings.epochs),
        stop=stop,
    )

    def on_trial_end(trial: optuna.trial.FrozenTrial) -> None:
        state, best = budget(study), best_summary(study)
        progress.trial_end(trial, state, best)
        progress.show_budget(study_name, state, best)

    with progress:
        progress.show_budget(study_name, budget(study), best_summary(study))
        summary = run_worker(study, runner, stop, on_trial_end, request.timeout_s)
    final = budget(study)
    progress.say(f"{final.finished}/{final.target} trials finished; best {best_summary(study)}")
    return summary


def _worker_storage(url: str, settings: StudySettings) -> optuna.storages.BaseStorage:
    """RDB storages get heartbeats, so a dead worker's trial is failed and retried."""
    if backend_of(url) in ("sqlite", "postgresql", "mysql"):
        return open_storage(url, HeartbeatPolicy(interval_s=settings.heartbeat_s))
    return open_storage(url)


def artifact_dir(given: Path | None, storage_url: str) -> Path:
    """Checkpoints live beside a SQLite file by default, else in ./hpo-artifacts."""
    if given is not None:
        return given
    if backend_of(storage_url) == "sqlite":
        return Path(make_url(storage_url).database or ".").parent / "hpo-artifacts"
    return Path("hpo-artifacts")


def this_worker(slot: int | None = None) -> WorkerInfo:
    host = socket.gethostname()
    gpu = os.environ.get("CUDA_VISIBLE_DEVICES", "0" if torch.cuda.is_available() else "cpu")
    name = f"{host}/gpu{gpu}/{'pid' + str(os.getpid()) if slot is None else 'slot' + str(slot)}"
    return WorkerInfo(name=name, host=host, gpu=gpu)


def pick_device(progress: SearchProgress) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    progress.say("CUDA is not available: training on the CPU (slow)")
    return torch.device("cpu")


def install_stop_handlers(progress: SearchProgress) -> threading.Event:
    """First SIGINT/SIGTERM: finish the epoch, checkpoint, re-queue the trial. Second: exit now."""
    stop = threading.Event()

    def handle(signum: int, _frame: object) -> None:
        if stop.is_set():
            os._exit(128 + signum)
        stop.set()
        progress.say(
            f"{signal.Signals(signum).name}: stopping after this epoch (again to exit now)"
        )

    signal.signal(signal.SIGINT, handle)
    signal.signal(signal.SIGTERM, handle)
    return stop
