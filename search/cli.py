"""The `hpo` command: parse, call one function, print. Logic lives in the modules below.

Only the control plane is imported here, so help, status, best and every user error answer
without torch; a command that trains imports the training plane inside its function.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, NoReturn

import optuna
import typer
from rich.console import Console

from data.cifar import DatasetMissingError, default_data_dir, download_cifar10
from data.dataset import DATASETS
from data.identity import DatasetError, parse_dataset
from model.config import ModelConfigError
from search.commands.compare import CompareRequest, run_compare
from search.commands.export import (
    best_document,
    config_storage,
    pareto_documents,
    to_yaml,
    to_yaml_documents,
    trial_document,
)
from search.commands.fleet import WorkerOptions
from search.commands.launch import StudyRequest, create_study, join_search, start_search
from search.commands.progress import SearchProgress
from search.commands.status import studies_table, study_status
from search.rules.artifacts import (
    DEFAULT_CHECKPOINT_INTERVAL_S,
    ArtifactDirError,
    check_artifact_dir,
)
from search.rules.artifacts import artifact_dir as resolve_artifact_dir
from search.rules.config import (
    COMPILE_MODES,
    DEFAULT_COMPILE_MODE,
    DEFAULT_EPOCHS,
    FINAL_EPOCHS,
    ConfigError,
    load_config_file,
)
from search.rules.data import DATASET_HELP
from search.rules.faults import (
    EXIT_MACHINE_FAULT,
    FilesNotWritten,
    compile_disk_fault,
    compile_fault_line,
)
from search.rules.pruners import DEFAULT_MIN_EPOCHS, PRUNERS
from search.rules.settings import DEFAULT_SEED, SettingsConflict
from search.rules.space import BUILTIN_SPACES, DEFAULT_SPACE_NAME, IMAGE_SIZE, SpaceError
from search.rules.study import StudyError, join
from search.rules.trackers import MLFLOW_ENV, TrackerError
from search.training.devices import GpuSpecError
from storage import (
    DEFAULT_HEARTBEAT_S,
    DEFAULT_STORAGE_RETRY_S,
    DEFAULT_STORAGE_URL,
    StorageURLError,
    backend_of,
    open_storage,
)

app = typer.Typer(
    help="Hyperparameter search for the Backbone CIFAR-10 CNN, on Optuna.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# One event, one line: a log file or a container's output (not a terminal) is not wrapped.
console = Console(soft_wrap=not sys.stdout.isatty())
# Optuna's INFO lines repeat what the progress lines already say.
optuna.logging.set_verbosity(optuna.logging.WARNING)

# Mistakes a user can make: one line on stderr, exit code 2, nothing stored.
USER_ERRORS = (
    StorageURLError,
    StudyError,
    SettingsConflict,
    SpaceError,
    ConfigError,
    ModelConfigError,
    DatasetMissingError,
    DatasetError,  # a --dataset or its data the study cannot use
    GpuSpecError,
    ArtifactDirError,
    TrackerError,  # a --tensorboard folder or --mlflow URI that cannot work
)


def choices(name: str, values: Iterable[str]) -> type[Enum]:
    """A typer choice type for a list of choices owned by another module."""
    return Enum(name, {value: value for value in values}, type=str)  # type: ignore[return-value]


Compile = choices("Compile", COMPILE_MODES)
Pruner = choices("Pruner", PRUNERS)
DEFAULT_COMPILE = Compile(DEFAULT_COMPILE_MODE)


StorageOption = Annotated[
    str,
    typer.Option(
        "--storage",
        envvar="HPO_STORAGE",
        help="Study storage URL: sqlite:///FILE, "
        "postgresql+psycopg://..., mysql+pymysql://..., journal://FILE or redis://HOST.",
    ),
]
DataDirOption = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        envvar="HPO_DATA_DIR",
        help="Where CIFAR is (or is downloaded to), and where image folders are cached decoded.",
        show_default=str(default_data_dir()),
    ),
]


def fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    raise typer.Exit(2)


@contextmanager
def user_errors(*also: type[Exception]) -> Iterator[None]:
    """USER_ERRORS, and `also`: those of a module only one command imports. Files the disk
    refused once the work was done are the machine's: one line, EXIT_MACHINE_FAULT."""
    try:
        yield
    except (*USER_ERRORS, *also) as err:
        fail(str(err))
    except FilesNotWritten as err:
        print(f"error: {err}", file=sys.stderr)
        raise typer.Exit(EXIT_MACHINE_FAULT) from None
    except Exception as err:  # a compile the disk refused (`hpo train` compiles on CUDA)
        fault = compile_disk_fault(err)
        if fault is None:
            raise
        print(f"error: {compile_fault_line(fault)}", file=sys.stderr)
        raise typer.Exit(EXIT_MACHINE_FAULT) from None


StudyOption = Annotated[str, typer.Option(help="Study name.")]
SpaceOption = Annotated[
    str | None,
    typer.Option(
        help=f"Search space: {', '.join(BUILTIN_SPACES)}, or a YAML file of overrides.",
        show_default=DEFAULT_SPACE_NAME,
    ),
]


def study_setting(help: str, default: object, least: int = 1) -> Any:
    """An optional int study setting: left out, the study's stored value holds (or, for a
    new study, `default`)."""
    return Annotated[int | None, typer.Option(min=least, help=help, show_default=str(default))]


EpochsOption = study_setting("Epochs per trial.", DEFAULT_EPOCHS)
DatasetOption = Annotated[str | None, typer.Option(help=DATASET_HELP, show_default=DATASETS[0])]
LocalDatasetOption = Annotated[
    str | None,
    typer.Option(
        help="This machine's copy of the study's data, where its path differs here "
        "(folder:PATH); refused unless it holds the same images.",
        show_default="the study's",
    ),
]
PrunerOption = Annotated[
    Pruner | None,
    typer.Option(help="Prune on validation loss.", show_default=next(iter(PRUNERS))),
]
SeedOption = Annotated[int | None, typer.Option(help="Study seed.", show_default=str(DEFAULT_SEED))]
HeartbeatOption = study_setting(
    "Seconds between trial heartbeats; a trial silent for twice that is failed and retried.",
    DEFAULT_HEARTBEAT_S,
)
MinEpochsOption = study_setting(
    "Epochs every trial trains before the pruner may stop it (Hyperband's minimum resource): "
    "a warm-up or a slow start is not judged on epoch 1.",
    DEFAULT_MIN_EPOCHS,
)
CheckpointIntervalOption = study_setting(
    "Seconds of training between a trial's checkpoints (and always after its last epoch and "
    "on a graceful stop): the most a crash can lose; 0 checkpoints every epoch.",
    DEFAULT_CHECKPOINT_INTERVAL_S,
    least=0,
)
ImageSizeOption = Annotated[
    int | None,
    typer.Option(
        min=IMAGE_SIZE,
        max=256,
        help="Side in pixels a folder's images are resized to (CIFAR: 32 only); the space's "
        "poolings, the FLOPs and the cost follow it.",
        show_default=str(IMAGE_SIZE),
    ),
]
StorageRetryOption = Annotated[
    float,
    typer.Option(
        min=0,
        help="Seconds a worker waits out a lost database (retrying with backoff) before it "
        "exits; its trial is then recovered by the heartbeat.",
    ),
]
ArtifactDirOption = Annotated[
    Path | None,
    typer.Option(
        envvar="HPO_ARTIFACT_DIR",
        help="Optuna artifact store for epoch checkpoints and final weights; shared by all "
        "workers of a study.",
        show_default="hpo-artifacts beside a SQLite file, else ./hpo-artifacts",
    ),
]
TimeoutOption = Annotated[
    float | None, typer.Option(min=0, help="Start no new trial after this many seconds.")
]
GpusOption = Annotated[
    str | None,
    typer.Option(help="GPUs to use, one worker process each: 'all' or a list like 0,1,2."),
]
JobsOption = Annotated[
    int, typer.Option(min=1, help="Worker processes per GPU (small models share a GPU well).")
]
TensorBoardOption = Annotated[
    str | None,
    typer.Option(
        "--tensorboard",
        metavar="DIR",
        help="Log every trial to this TensorBoard folder (a run per trial, its curves and "
        "HParams; needs the [tensorboard] extra); stored in the study, for every worker.",
    ),
]
MlflowOption = Annotated[
    str | None,
    typer.Option(
        "--mlflow",
        metavar="URI",
        help=f"Log every trial to this MLflow tracking URI (needs the [mlflow] extra); left "
        f"out, ${MLFLOW_ENV} where set. Stored in the study: every worker logs there.",
    ),
]
CompileOption = Annotated[
    Compile, typer.Option(help="torch.compile the model: auto compiles on CUDA only.")
]


def command(function: Callable[..., None]) -> Callable[..., None]:
    """A command whose help is its docstring with each paragraph on one line: typer shows a
    paragraph's own line breaks, which break sentences mid-line; the terminal wraps instead."""
    paragraphs = inspect.cleandoc(function.__doc__ or "").split("\n\n")
    return app.command(help="\n\n".join(" ".join(p.split()) for p in paragraphs))(function)


def study_request(study: str, trials: int, storage: str, **flags: object) -> StudyRequest:
    values = {k: v.value if isinstance(v, Enum) else v for k, v in flags.items()}
    if values.get("dataset") is not None:
        with user_errors():  # stored as its canonical name: a folder's absolute path
            values["dataset"] = parse_dataset(values["dataset"]).name
    return StudyRequest(study=study, trials=trials, storage=storage, **values)


@command
def create(
    study: StudyOption,
    trials: Annotated[int, typer.Option(min=1, help="Finished trials the study should hold.")],
    storage: StorageOption = DEFAULT_STORAGE_URL,
    space: SpaceOption = None,
    epochs: EpochsOption = None,
    dataset: DatasetOption = None,
    data_dir: DataDirOption = None,
    pruner: PrunerOption = None,
    seed: SeedOption = None,
    heartbeat: HeartbeatOption = None,
    min_epochs: MinEpochsOption = None,
    checkpoint_interval: CheckpointIntervalOption = None,
    image_size: ImageSizeOption = None,
    tensorboard: TensorBoardOption = None,
    mlflow: MlflowOption = None,
) -> None:
    """Create a study with its settings and target, and run nothing (for init jobs).

    A dataset other than CIFAR-10 and the synthetic set is loaded (a folder decoded) first,
    and its identity stored with the study: bad data are refused before anything is stored.
    """
    request = study_request(
        study, trials, storage, space=space, epochs=epochs, dataset=dataset, pruner=pruner,
        seed=seed, heartbeat=heartbeat, min_epochs=min_epochs,
        checkpoint_interval=checkpoint_interval, image_size=image_size,
        tensorboard=tensorboard, mlflow=mlflow,
    )  # fmt: skip
    with user_errors():
        create_study(request, SearchProgress(console), data_dir=data_dir)


@command
def start(
    study: Annotated[str, typer.Option(help="Study name; created if new, joined if it exists.")],
    trials: Annotated[
        int, typer.Option(min=1, help="Finished trials the whole study should hold (all workers).")
    ],
    storage: StorageOption = DEFAULT_STORAGE_URL,
    space: SpaceOption = None,
    epochs: EpochsOption = None,
    dataset: DatasetOption = None,
    data_dir: DataDirOption = None,
    pruner: PrunerOption = None,
    seed: SeedOption = None,
    heartbeat: HeartbeatOption = None,
    min_epochs: MinEpochsOption = None,
    checkpoint_interval: CheckpointIntervalOption = None,
    image_size: ImageSizeOption = None,
    tensorboard: TensorBoardOption = None,
    mlflow: MlflowOption = None,
    artifact_dir: ArtifactDirOption = None,
    timeout: TimeoutOption = None,
    gpus: GpusOption = None,
    jobs_per_gpu: JobsOption = 1,
    compile: CompileOption = DEFAULT_COMPILE,
    storage_retry_s: StorageRetryOption = DEFAULT_STORAGE_RETRY_S,
) -> None:
    """Search: create the study (or join it) and run trials until it holds --trials.

    Study settings (space, epochs, dataset, pruner, seed, heartbeat) are stored when the
    study is created; later starts and workers reuse them. A larger --trials extends a
    finished study.
    """
    request = study_request(
        study, trials, storage, space=space, epochs=epochs, dataset=dataset, pruner=pruner,
        seed=seed, heartbeat=heartbeat, min_epochs=min_epochs,
        checkpoint_interval=checkpoint_interval, image_size=image_size,
        tensorboard=tensorboard, mlflow=mlflow,
    )  # fmt: skip
    options = WorkerOptions(
        data_dir, artifact_dir, timeout, compile.value, gpus, jobs_per_gpu, storage_retry_s
    )
    with user_errors():
        code = start_search(request, options, SearchProgress(console))
    raise typer.Exit(code)


# The per-machine options repeat start's: typer reads a command's options from its signature,
# and `start` is `create` plus `worker`.
@command
def worker(
    study: Annotated[str, typer.Option(help="An existing study to work on.")],
    storage: StorageOption = DEFAULT_STORAGE_URL,
    dataset: LocalDatasetOption = None,
    data_dir: DataDirOption = None,
    artifact_dir: ArtifactDirOption = None,
    timeout: TimeoutOption = None,
    gpus: GpusOption = None,
    jobs_per_gpu: JobsOption = 1,
    compile: CompileOption = DEFAULT_COMPILE,
    storage_retry_s: StorageRetryOption = DEFAULT_STORAGE_RETRY_S,
    tensorboard: Annotated[
        str | None,
        typer.Option(
            "--tensorboard",
            metavar="DIR",
            help="This machine's mount of the study's TensorBoard folder, where it differs.",
            show_default="the study's",
        ),
    ] = None,
    mlflow: Annotated[
        str | None,
        typer.Option(
            "--mlflow",
            metavar="URI",
            help="This machine's address of the study's MLflow tracking server, where it "
            "differs (a container's service name, a tunnel).",
            show_default="the study's",
        ),
    ] = None,
    slot: Annotated[int | None, typer.Option(hidden=True)] = None,
) -> None:
    """Join an existing study from any machine and run trials toward its stored target.

    Everything but the per-machine options comes from the study's stored settings.
    """
    options = WorkerOptions(
        data_dir, artifact_dir, timeout, compile.value, gpus, jobs_per_gpu, storage_retry_s, slot,
        dataset, tensorboard, mlflow,
    )  # fmt: skip
    with user_errors():
        code = join_search(study, storage, options, SearchProgress(console))
    raise typer.Exit(code)


@command
def download(data_dir: DataDirOption = None) -> None:
    """Download and verify CIFAR-10 into the data directory (done on first use otherwise)."""
    with user_errors():
        folder = download_cifar10(data_dir or default_data_dir())
    console.print(f"CIFAR-10 verified in {folder}")


@command
def status(
    study: Annotated[
        str | None, typer.Option(help="Study to show; all studies if left out.")
    ] = None,
    storage: StorageOption = DEFAULT_STORAGE_URL,
    artifact_dir: ArtifactDirOption = None,
) -> None:
    """Trials by state, the best trial, the trials running now, the checkpoints' size."""
    with user_errors():
        console.print(
            study_status(storage, study, artifact_dir)
            if study is not None
            else studies_table(open_storage(storage, reader=True))
        )


@command
def best(
    study: Annotated[str, typer.Option(help="Study to export from.")],
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="YAML file to write; stdout if left out.")
    ] = None,
    storage: StorageOption = DEFAULT_STORAGE_URL,
    pareto: Annotated[
        bool,
        typer.Option(
            "--pareto",
            help="Export every config on the accuracy-versus-cost front (validation accuracy "
            "against train GFLOP per image), cheapest first, one YAML document each.",
        ),
    ] = False,
    trial: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="Export this complete trial instead of the best (e.g. one of the front).",
        ),
    ] = None,
) -> None:
    """Export the best trial's config (with its metrics) as YAML for `hpo train`."""
    if pareto and trial is not None:
        fail("--pareto exports the whole front and --trial one trial: give one of them")
    with user_errors():
        found = join(open_storage(storage, reader=True), study)
        if pareto:
            document = to_yaml_documents(pareto_documents(found, storage))
        elif trial is not None:
            document = to_yaml(trial_document(found, storage, trial))
        else:
            document = to_yaml(best_document(found, storage))
    if output is None:
        sys.stdout.write(document)
        return
    output.write_text(document)
    console.print(f"wrote {output}")


FinalEpochsOption = Annotated[
    int | None,
    typer.Option(
        min=1,
        help="Epochs of every seed, on all training images (the report's); the config's "
        "recipe is kept.",
        show_default=str(FINAL_EPOCHS),
    ),
]
SeedsOption = Annotated[int, typer.Option(min=1, help="Seeds to train, 0 .. N-1.")]
SeedGpusOption = Annotated[
    str | None,
    typer.Option(
        help="Train seeds side by side, one process per GPU: 'all' or a list like 0,1. "
        "Left out, seeds run one after another on this process's device."
    ),
]


@command
def train(
    config: Annotated[Path, typer.Option(help="YAML config written by `hpo best`.")],
    epochs: FinalEpochsOption = None,
    seeds: SeedsOption = 1,
    gpus: SeedGpusOption = None,
    dataset: Annotated[
        str | None,
        typer.Option(help=DATASET_HELP, show_default="the data of the config's study"),
    ] = None,
    data_dir: DataDirOption = None,
    output_dir: Annotated[
        Path,
        typer.Option(help="Where model-seedN.pt (one per seed) and metrics.json are written."),
    ] = Path("runs/final"),
    storage: Annotated[
        str | None,
        typer.Option(
            "--storage",
            envvar="HPO_STORAGE",
            help="Storage of the study to attach the results to.",
            show_default=f"the config's source storage, else {DEFAULT_STORAGE_URL}",
        ),
    ] = None,
    artifact_dir: ArtifactDirOption = None,
) -> None:
    """Train a config from scratch on all training images per seed, then test each seed.

    Prints every seed's test accuracy and the mean ± standard deviation. The weights and
    metrics are also attached to the study the config came from, in --storage or else in the
    storage `hpo best` wrote in the config, so the dashboard lists them beside the search.
    """
    with user_errors():
        # A bad file or URL is refused before the training plane (torch) loads.
        storage = config_storage(storage, load_config_file(config)[1])
        backend_of(storage)
        check_artifact_dir(resolve_artifact_dir(artifact_dir, storage))
        from search.commands.train import FinalRequest, run_final

        request = FinalRequest(
            config, dataset, output_dir, storage, epochs, data_dir, artifact_dir, seeds, gpus
        )
        run_final(request, SearchProgress(console))


@command
def compare(
    study: Annotated[str, typer.Option(help="Study whose best configs face the report's.")],
    seeds: SeedsOption = 3,
    epochs: FinalEpochsOption = None,
    top: Annotated[
        int, typer.Option(min=1, help="The study's best trials to train (by validation loss).")
    ] = 1,
    gpus: SeedGpusOption = None,
    dataset: LocalDatasetOption = None,
    data_dir: DataDirOption = None,
    output_dir: Annotated[
        Path, typer.Option(help="Where compare.md, compare.json and every seed's weights go.")
    ] = Path("runs/compare"),
    storage: StorageOption = DEFAULT_STORAGE_URL,
    artifact_dir: ArtifactDirOption = None,
) -> None:
    """Did the search beat the report? Train the best configs and the report's Table 1/2
    config alike, on the study's dataset with the same seeds, and test each.

    Prints one table (test accuracy per config, the paired difference to the report with a
    95% interval, parameters, GFLOP, time), writes it as Markdown and JSON and attaches both
    to the study, where `hpo status`, `hpo report` and the dashboard show it.
    """
    request = CompareRequest(
        study, storage, output_dir, seeds, epochs, top, data_dir, artifact_dir, gpus, dataset
    )
    with user_errors():
        check_artifact_dir(resolve_artifact_dir(artifact_dir, storage))  # before it trains
        run_compare(request, SearchProgress(console))


@command
def ablate(
    study: Annotated[str, typer.Option(help="Study whose path from the report's config to draw.")],
    trial: Annotated[
        int | None,
        typer.Option(min=0, help="The path's end: this complete trial.", show_default="the best"),
    ] = None,
    measure: Annotated[
        bool,
        typer.Option("--measure", help="Train the path's configs as `hpo compare` trains its own."),
    ] = False,
    steps: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="With --measure: the K largest predicted steps, the rest merged into the last.",
            show_default="every step",
        ),
    ] = None,
    seeds: SeedsOption = 3,
    epochs: FinalEpochsOption = None,
    gpus: SeedGpusOption = None,
    data_dir: DataDirOption = None,
    output_dir: Annotated[
        Path,
        typer.Option(
            "--output-dir", "-o", help="Where the figure, the tables and the trainings go."
        ),
    ] = Path("runs/ablate"),
    storage: StorageOption = DEFAULT_STORAGE_URL,
    artifact_dir: ArtifactDirOption = None,
) -> None:
    """Which change bought the points? The path from the report's config to the best trial,
    one group of changes at a time (architecture, optimizer, schedule, each recipe lever...).

    Prints the path a random forest fitted to the study's trials predicts (free) and draws
    it; --measure trains each step by `hpo compare`'s rule and attaches the table to the study
    (a stopped run resumes where it was, from the output folder).
    """
    from search.commands.ablation import AblateRequest, run_ablate
    from search.rules.ablation import AblationError

    request = AblateRequest(
        study, storage, output_dir, trial, measure, seeds, epochs, steps, data_dir,
        artifact_dir, gpus,
    )  # fmt: skip
    with user_errors(AblationError):
        if measure:
            check_artifact_dir(resolve_artifact_dir(artifact_dir, storage))  # before it trains
        run_ablate(request, SearchProgress(console))


@command
def dashboard(
    storage: StorageOption = DEFAULT_STORAGE_URL,
    host: Annotated[
        str,
        typer.Option(help="Address to listen on; any but loopback exposes it unauthenticated."),
    ] = "127.0.0.1",
    port: Annotated[
        int, typer.Option(min=0, max=65535, help="Port to listen on; 0 picks a free one.")
    ] = 8080,
    artifact_dir: ArtifactDirOption = None,
) -> None:
    """Serve optuna-dashboard on the studies: live plots, trials, notes and checkpoints."""
    from search.commands.dashboard import (  # its server
        DashboardError,
        exposure_warning,
        open_dashboard,
    )

    with user_errors(DashboardError):
        artifacts = resolve_artifact_dir(artifact_dir, storage)
        server = open_dashboard(storage, host, port, artifacts)
    warning = exposure_warning(host)
    if warning:
        print(warning, file=sys.stderr)
    server.serve(on_ready=lambda: console.print(server.banner(), highlight=False, soft_wrap=True))


@command
def report(
    study: Annotated[str, typer.Option(help="Study to report on.")],
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Folder for report.html and the PNGs.")
    ],
    storage: StorageOption = DEFAULT_STORAGE_URL,
    top: Annotated[int, typer.Option(min=1, help="Rows in the table of best trials.")] = 10,
) -> None:
    """Write an offline HTML page (and PNGs) of a study's plots and its best trials."""
    from search.commands.report import (  # plotting loads for this command only
        ReportError,
        write_report,
    )

    with user_errors(ReportError):
        written = write_report(join(open_storage(storage, reader=True), study), output, top)
    for line in written.skipped:
        console.print(line, highlight=False)
    console.print(f"wrote {written.page} and {len(written.images)} PNGs", highlight=False)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
