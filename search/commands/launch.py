"""`hpo create`, `hpo start` and `hpo worker`: set up a study, then run workers on it."""

from __future__ import annotations

import functools
import gc
import importlib
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import optuna

from search.commands.fleet import WorkerOptions, plan_slots, run_fleet
from search.commands.progress import SearchProgress, best_summary
from search.rules.artifacts import artifact_dir, check_artifact_dir
from search.rules.cost import GpuProbe, cost_lines
from search.rules.data import (
    check_batches_fit,
    check_data,
    check_image_size,
    local_dataset,
    needs_identity,
    study_identity,
)
from search.rules.faults import EXIT_MACHINE_FAULT, MachineFault, record_machine_fault
from search.rules.settings import StudySettings
from search.rules.study import (
    StudyError,
    StudyView,
    budget,
    check_study_name,
    create_or_join,
    join,
    join_as_worker,
    load_settings,
    move_target,
)
from search.rules.trackers import (
    TrackerError,
    check_mlflow_uri,
    check_tensorboard_dir,
    chosen_mlflow_uri,
)
from search.training.devices import cuda_is_here, gpu_names, parse_gpus, worker_gpu
from storage import (
    HeartbeatPolicy,
    RetryPolicy,
    StorageUnavailable,
    StorageURLError,
    close_storage,
    open_storage,
)

if TYPE_CHECKING:
    from pathlib import Path

    from data.identity import DatasetIdentity
    from search.training.objective import TrialRunner, WorkerInfo
    from search.training.worker import WorkerSummary

# Exit code of a worker that gave up on a lost storage (sysexits EX_TEMPFAIL: try again later).
EXIT_STORAGE_UNAVAILABLE = 75
# Benchmarks and tests of the study machinery (bench/fleet.py) run `hpo worker` with a
# stand-in objective, MODULE:NAME of a callable that takes the trial, instead of training: a
# fleet of hundreds on one machine, each process without torch. Its trials train nothing.
BENCH_OBJECTIVE_ENV = "HPO_BENCH_OBJECTIVE"


@dataclass(frozen=True)
class StudyRequest:
    """What `hpo create`/`hpo start` ask of a study; None where a flag was left out."""

    study: str
    trials: int
    storage: str
    space: str | None = None
    epochs: int | None = None
    dataset: str | None = None
    pruner: str | None = None
    seed: int | None = None
    heartbeat: int | None = None
    min_epochs: int | None = None
    checkpoint_interval: int | None = None
    image_size: int | None = None
    tensorboard: str | None = None  # a log folder, as given
    mlflow: str | None = None  # a tracking URI, as given (MLFLOW_TRACKING_URI: new_settings)

    def flags(self) -> dict[str, object]:
        return {
            "space": self.space,
            "epochs": self.epochs,
            "dataset": self.dataset,
            "pruner": self.pruner,
            "seed": self.seed,
            "heartbeat_s": self.heartbeat,
            "min_epochs": self.min_epochs,
            "checkpoint_interval_s": self.checkpoint_interval,
            "image_size": self.image_size,
            "tensorboard": self.tensorboard,
            "mlflow": self.mlflow,
        }

    def new_settings(self, identity: DatasetIdentity | None = None) -> StudySettings:
        flags = {key: value for key, value in self.flags().items() if key != "space"}
        flags["identity"] = None if identity is None else identity.to_dict()
        flags["mlflow"] = chosen_mlflow_uri(self.mlflow)
        if self.space is None:
            return StudySettings.for_space(**flags)
        return StudySettings.for_space(self.space, **flags)


def check_trackers(request: StudyRequest) -> StudyRequest:
    """The request with its trackers checked before anything is stored (one line, exit 2
    where one cannot work; $MLFLOW_TRACKING_URI too, which a new study would take), the
    TensorBoard folder made absolute, as the study stores it."""
    folder = request.tensorboard and check_tensorboard_dir(request.tensorboard)
    chosen_mlflow_uri(request.mlflow)
    return replace(request, tensorboard=folder)


def start_search(request: StudyRequest, options: WorkerOptions, progress: SearchProgress) -> int:
    """`hpo start`: create or join the study, then run this machine's workers on it."""
    from data.dataset import dataset_folder  # a trial's data: only once a search really starts

    # Every check that can fail comes before anything is stored.
    request = check_trackers(request)
    parse_gpus(options.gpus)
    check_study_name(request.study)
    check_image_size(request.dataset, request.image_size)
    check_artifact_dir(artifact_dir(options.artifact_dir, request.storage))
    retry = startup_retry(options, progress)
    try:
        planned = planned_settings(request, retry)
        dataset_folder(planned.dataset, options.data_dir, image_size=planned.image_size)
        settings = create_study(request, progress, retry, options.data_dir)
    except StorageUnavailable as err:
        return gave_up(err)
    note_outage(request.storage, request.study, retry)
    return run_workers(request.study, request.storage, settings, options, progress)


def join_search(
    study_name: str, storage_url: str, options: WorkerOptions, progress: SearchProgress
) -> int:
    """`hpo worker`: run this machine's workers on an existing study."""
    check_artifact_dir(artifact_dir(options.artifact_dir, storage_url))
    retry = startup_retry(options, progress)
    try:
        settings = stored_settings(study_name, storage_url, retry)
    except StorageUnavailable as err:
        return gave_up(err)
    settings = local_trackers(settings, options.tensorboard, options.mlflow)
    note_outage(storage_url, study_name, retry)
    return run_workers(study_name, storage_url, settings, options, progress)


def local_trackers(
    settings: StudySettings, tensorboard: str | None, mlflow: str | None
) -> StudySettings:
    """The study's settings with this machine's mount of its TensorBoard folder and address
    of its MLflow server, where `hpo worker` gives them: each moves a tracker the study has,
    and adds none."""
    for flag, metavar, what, given, stored in (
        ("--tensorboard", "DIR", "TensorBoard folder", tensorboard, settings.tensorboard),
        ("--mlflow", "URI", "MLflow server", mlflow, settings.mlflow),
    ):
        if given is not None and stored is None:
            raise TrackerError(
                f"{flag} {given}: the study logs to no {what} (set at creation: hpo "
                f"create/start {flag} {metavar}); a worker's only moves it"
            )
    if tensorboard is not None:
        settings = replace(settings, tensorboard=check_tensorboard_dir(tensorboard))
    if mlflow is not None:
        settings = replace(settings, mlflow=check_mlflow_uri(mlflow))
    return settings


def startup_retry(options: WorkerOptions, progress: SearchProgress) -> RetryPolicy:
    """A worker that starts before its database is up (compose, Kubernetes) waits for it,
    as long as it would wait out an outage."""
    return RetryPolicy(limit_s=options.storage_retry_s, say=progress.say)


def note_outage(storage_url: str, study_name: str, retry: RetryPolicy) -> None:
    """A storage outage waited out at start-up (a full pooler, a database not up yet), kept
    where `hpo status` shows the study's last machine fault."""
    if retry.last_outage:
        storage = open_storage(storage_url, retry=retry)
        try:
            record_machine_fault(join(storage, study_name), socket.gethostname(), retry.last_outage)
        finally:
            close_storage(storage)


def gave_up(err: StorageUnavailable) -> int:
    print(f"error: {err}", file=sys.stderr)
    return EXIT_STORAGE_UNAVAILABLE


def run_workers(
    study_name: str,
    storage_url: str,
    settings: StudySettings,
    options: WorkerOptions,
    progress: SearchProgress,
) -> int:
    """Run trials in this process, or one worker process per GPU slot with --gpus."""
    slots = plan_slots(gpu_names(parse_gpus(options.gpus)), options.jobs_per_gpu)
    if len(slots) > 1 or options.gpus is not None:
        return run_fleet(study_name, storage_url, slots, options, progress)
    try:
        run_local_worker(study_name, storage_url, settings, options, progress)
    except StorageUnavailable as err:
        # Its running trial stays RUNNING: once the storage is back, its heartbeat is seen to
        # have stopped and another worker retries it from its checkpoint.
        return gave_up(err)
    except MachineFault as err:  # its trial handed back (search/training/worker.py)
        print(f"error: {err}", file=sys.stderr)
        return EXIT_MACHINE_FAULT
    return 0


def create_study(
    request: StudyRequest,
    progress: SearchProgress,
    retry: RetryPolicy | None = None,
    data_dir: Path | None = None,
) -> StudySettings:
    """Create the study with the request's settings and target, or check and extend it.

    A dataset the study must know (data/identity.py) is loaded and its identity computed
    first: bad data are refused before anything is stored, and a joined study's data must
    be the same. With `retry`, an unreachable storage is waited for (StorageUnavailable past
    its limit)."""
    request = check_trackers(request)
    check_study_name(request.study)
    check_image_size(request.dataset, request.image_size)
    identity = None
    if request.dataset is not None and needs_identity(request.dataset):
        from data.dataset import dataset_identity  # decodes a folder: torch, only here

        planned = planned_settings(request, retry)  # a joined study's own
        identity = dataset_identity(request.dataset, data_dir, image_size=planned.image_size)
        check_batches_fit(replace(planned, identity=identity.to_dict()))
    storage = open_storage(request.storage, retry=retry)
    try:
        settings, created = create_or_join(
            storage, request.study, request.new_settings(identity), request.trials
        )
        if identity is not None:
            check_data(study_identity(settings), identity)
        if created:
            from search.commands.dashboard import (
                write_study_note,  # optuna-dashboard: a new study only
            )

            write_study_note(join(storage, request.study), settings, request.trials)
        else:
            settings.check_flags(request.flags())
            move_target(join(storage, request.study), request.trials)
    finally:
        close_storage(storage)  # a worker of this process opens its own
    verb = "created" if created else "joined"
    progress.say(
        f"{verb} study {request.study!r}: space {settings.space_name}, {settings.epochs} epochs, "
        f"{settings.dataset}, pruner {settings.pruner}, target {request.trials} trials"
    )
    if created:  # priced once, for whoever creates the study (no GPU probe on a join)
        for line in cost_lines(settings, request.trials, gpu_probe()):
            progress.say(line)
    return settings


def gpu_probe() -> GpuProbe | None:
    """The probe that prices the study in GPU-hours, where a GPU is here to be probed."""
    if not cuda_is_here():
        return None
    from search.training.probe import gpu_rate  # the probe trains: it needs torch

    return gpu_rate


def planned_settings(request: StudyRequest, retry: RetryPolicy | None = None) -> StudySettings:
    """The settings the study will run with: its stored ones, which the flags must agree
    with, where it exists; else the request's (checked as they are made)."""
    try:
        stored = stored_settings(request.study, request.storage, retry)
    except (StudyError, StorageURLError):  # no such study (or no database file) yet
        return request.new_settings()
    stored.check_flags(request.flags())
    return stored


def stored_settings(
    study_name: str, storage_url: str, retry: RetryPolicy | None = None
) -> StudySettings:
    """The settings of an existing study; StudyError if there is none."""
    storage = open_storage(storage_url, reader=True, retry=retry)
    try:
        return load_settings(storage, study_name)
    finally:
        close_storage(storage)  # a worker of this process opens its own


def run_local_worker(
    study_name: str,
    storage_url: str,
    settings: StudySettings,
    options: WorkerOptions,
    progress: SearchProgress,
) -> WorkerSummary | None:
    """Run trials in this process until the study's target is met (or a stop/timeout)."""
    from search.training.worker import run_worker  # the loop itself needs no torch

    stand_in = bench_objective()  # None but in bench/fleet.py's fleets: the objective trains
    worker = this_worker(options.slot) if stand_in is None else None
    name = worker.name if worker else f"{socket.gethostname()}/bench/pid{os.getpid()}"
    heartbeat = HeartbeatPolicy(interval_s=settings.heartbeat_s)
    retry = RetryPolicy(limit_s=options.storage_retry_s, say=progress.say)
    # Heartbeats on every storage, so a dead worker's trial is failed and retried.
    storage = open_storage(storage_url, heartbeat, retry=retry)
    study = join_as_worker(storage, study_name, settings, name)
    retry.on_back = functools.partial(record_machine_fault, study, name)  # for `hpo status`
    note = unseen_gpus_note(worker) if worker else ""
    progress.say(f"worker {name} joined study {study_name!r}{note}")
    state = budget(study)
    if state.done and state.running == 0:
        progress.say(
            f"study {study_name!r} already has {state.finished}/{state.target} finished trials; "
            "nothing to run (pass a larger --trials to extend it)"
        )
        return None
    stop = install_stop_handlers(progress)
    on_down = functools.partial(record_machine_fault, study, name)  # a tracker that is down
    runner = stand_in or training_runner(
        study_name, settings, storage_url, options, worker, stop, progress, on_down
    )
    trackers = getattr(runner, "trackers", None)

    def on_trial_end(trial: optuna.trial.FrozenTrial, view: StudyView) -> None:
        state, best = view.budget, best_summary(study, view.trials)
        progress.trial_end(trial, state, best)
        progress.show_budget(study_name, state, best)

    # What start-up made (torch, the data, Optuna) lives as long as the process: frozen, the
    # collection after every trial (search/training/memory.py) skips it, ms instead of ~0.3 s.
    gc.freeze()
    with progress:
        progress.show_budget(study_name, budget(study), best_summary(study))
        try:
            summary = run_worker(study, runner, stop, on_trial_end, options.timeout_s, progress.say)
            final = budget(study)
            if trackers and final.done and final.running == 0:  # the last worker out
                trackers.study_done(study)
        finally:
            if trackers:
                trackers.close()  # what a down tracker still holds is said, then dropped
    verb = "stopped" if summary.interrupted else "done"
    best = best_summary(study)
    given_up = f" ({final.given_up} failed for good)" if final.given_up else ""
    done = f"{final.finished}/{final.target} trials finished{given_up}"
    progress.say(f"{verb}: {done}; best score {best}")
    return summary


def training_runner(
    study_name: str,
    settings: StudySettings,
    storage_url: str,
    options: WorkerOptions,
    worker: WorkerInfo,
    stop: threading.Event,
    progress: SearchProgress,
    on_tracker_down: Callable[[str], None] = print,
) -> TrialRunner:
    """The objective that trains: the data on the device, checkpoints, compile caches, and
    the study's trackers (their libraries load only where the study asks for one)."""
    # The training plane (torch) loads here, where trials run: `hpo create` never pays it.
    from data.dataset import load_with_identity
    from data.loader import search_data
    from search.training.checkpoints import CheckpointStore
    from search.training.compile_policy import share_compile_caches
    from search.training.objective import TrialRunner
    from search.training.run import pick_device
    from search.training.trackers import open_trackers
    from search.training.trainer import DeviceRecipe

    # This machine's data, refused before anything trains where they are not the study's.
    dataset = local_dataset(settings, options.dataset)
    images, found = load_with_identity(dataset, options.data_dir, image_size=settings.image_size)
    check_data(study_identity(settings), found)
    share_compile_caches()  # before anything compiles: every worker here reuses the kernels
    recipe = DeviceRecipe.for_device(pick_device(progress.say))
    return TrialRunner(
        settings=settings,
        data=search_data(images, recipe.device, stats=(found.mean, found.std)),
        recipe=recipe,
        worker=worker,
        checkpoints=CheckpointStore(
            artifact_dir(options.artifact_dir, storage_url), say=progress.say
        ),
        on_epoch=lambda trial, stats: progress.epoch(trial, stats, settings.epochs),
        stop=stop,
        compile_mode=options.compile,
        say=progress.say,
        trackers=open_trackers(
            study_name, settings.tensorboard, settings.mlflow, progress.say, on_tracker_down
        ),
    )


def bench_objective() -> Callable[[optuna.Trial], float] | None:
    """The stand-in objective $HPO_BENCH_OBJECTIVE names; None (train) where it is unset."""
    spec = os.environ.get(BENCH_OBJECTIVE_ENV)
    if not spec:
        return None
    module, _, name = spec.partition(":")
    try:
        objective = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise StudyError(f"{BENCH_OBJECTIVE_ENV}={spec}: not a MODULE:NAME ({err})") from None
    return objective


def this_worker(slot: int | None = None) -> WorkerInfo:
    from search.training.objective import WorkerInfo

    host = socket.gethostname()
    gpu = worker_gpu()
    suffix = f"pid{os.getpid()}" if slot is None else f"slot{slot}"
    device = "cpu" if gpu == "cpu" else f"gpu{gpu}"
    return WorkerInfo(name=f"{host}/{device}/{suffix}", host=host, gpu=gpu)


def unseen_gpus_note(worker: WorkerInfo) -> str:
    """Where CUDA_VISIBLE_DEVICES names GPUs that CUDA cannot see, say so beside the name."""
    given = os.environ.get("CUDA_VISIBLE_DEVICES")
    return (
        f" (CUDA_VISIBLE_DEVICES={given}: no GPU visible)" if given and worker.gpu == "cpu" else ""
    )


def install_stop_handlers(progress: SearchProgress) -> threading.Event:
    """SIGINT/SIGTERM: finish the epoch, checkpoint, re-queue the trial. A second SIGINT (Ctrl-C
    twice) exits now; a second SIGTERM is the same request again: Slurm signals every process
    of a step, so a fleet's child gets the scheduler's SIGTERM and its parent's."""
    stop = threading.Event()

    def handle(signum: int, _frame: object) -> None:
        if stop.is_set():
            if signum == signal.SIGINT:
                os._exit(128 + signum)
            return
        stop.set()
        name = signal.Signals(signum).name
        progress.say(f"{name}: stopping after this epoch (Ctrl-C again to exit now)")

    signal.signal(signal.SIGINT, handle)
    signal.signal(signal.SIGTERM, handle)
    return stop
