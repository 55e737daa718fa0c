"""The `hpo` command: parse, call one function, print. Logic lives in the modules below."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated, NoReturn

import optuna
import typer
from rich.console import Console

from data import DatasetMissingError, default_data_dir, download_cifar10, load_dataset
from model import ModelConfigError
from search.checkpoints import artifact_dir as resolve_artifact_dir
from search.config import ConfigError, load_config_file
from search.dashboard import DashboardError, exposure_warning, open_dashboard
from search.export import best_document, to_yaml
from search.final import attach_to_study, train_final
from search.fleet import GpuSpecError, parse_gpus, plan_slots, run_fleet
from search.launch import (
    StudyRequest,
    WorkerOptions,
    create_study,
    pick_device,
    run_local_worker,
    stored_settings,
)
from search.progress import SearchProgress, format_epoch
from search.report import ReportError, write_report
from search.settings import SettingsConflict
from search.space import SpaceError
from search.status import studies_table, study_status
from search.study import StudyError, join
from storage import DEFAULT_STORAGE_URL, StorageURLError, backend_of, open_storage

app = typer.Typer(
    help="Hyperparameter search for the Backbone CIFAR-10 CNN, on Optuna.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
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
    GpuSpecError,
    DashboardError,
    ReportError,
)


class Dataset(str, Enum):
    cifar10 = "cifar10"
    synthetic = "synthetic"


class Compile(str, Enum):
    auto = "auto"
    on = "on"
    off = "off"


class Pruner(str, Enum):
    hyperband = "hyperband"
    median = "median"
    none = "none"


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
        help="Where CIFAR-10 is (or is downloaded to). [default: ~/.cache/backbone-hpo/data]",
    ),
]


def fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    raise typer.Exit(2)


@contextmanager
def user_errors() -> Iterator[None]:
    try:
        yield
    except USER_ERRORS as err:
        fail(str(err))


StudyOption = Annotated[str, typer.Option(help="Study name.")]
SpaceOption = Annotated[
    str | None, typer.Option(help="Search space: default, tiny, or a YAML file of overrides.")
]
EpochsOption = Annotated[int | None, typer.Option(min=1, help="Epochs per trial. [default: 20]")]
DatasetOption = Annotated[Dataset | None, typer.Option(help="[default: cifar10]")]
PrunerOption = Annotated[
    Pruner | None, typer.Option(help="Prune on validation loss. [default: hyperband]")
]
SeedOption = Annotated[int | None, typer.Option(help="Study seed. [default: 0]")]
HeartbeatOption = Annotated[
    int | None,
    typer.Option(
        min=1,
        help="Seconds between trial heartbeats; a trial silent for twice that is failed and "
        "retried. [default: 60]",
    ),
]
ArtifactDirOption = Annotated[
    Path | None,
    typer.Option(
        envvar="HPO_ARTIFACT_DIR",
        help="Optuna artifact store for epoch checkpoints and final weights; shared by all "
        "workers of a study. "
        "[default: hpo-artifacts beside a SQLite file, else ./hpo-artifacts]",
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
CompileOption = Annotated[
    Compile, typer.Option(help="torch.compile the model: auto compiles on CUDA only.")
]


def study_request(study: str, trials: int, storage: str, **flags: object) -> StudyRequest:
    values = {k: v.value if isinstance(v, Enum) else v for k, v in flags.items()}
    return StudyRequest(study=study, trials=trials, storage=storage, **values)


@app.command()
def create(
    study: StudyOption,
    trials: Annotated[int, typer.Option(min=1, help="Finished trials the study should hold.")],
    storage: StorageOption = DEFAULT_STORAGE_URL,
    space: SpaceOption = None,
    epochs: EpochsOption = None,
    dataset: DatasetOption = None,
    pruner: PrunerOption = None,
    seed: SeedOption = None,
    heartbeat: HeartbeatOption = None,
) -> None:
    """Create a study with its settings and target, and run nothing (for init jobs)."""
    request = study_request(
        study, trials, storage, space=space, epochs=epochs, dataset=dataset, pruner=pruner,
        seed=seed, heartbeat=heartbeat,
    )  # fmt: skip
    with user_errors():
        create_study(request, SearchProgress(console))


@app.command()
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
    artifact_dir: ArtifactDirOption = None,
    timeout: TimeoutOption = None,
    gpus: GpusOption = None,
    jobs_per_gpu: JobsOption = 1,
    compile: CompileOption = Compile.auto,
) -> None:
    """Search: create the study (or join it) and run trials until it holds --trials.

    Study settings (space, epochs, dataset, pruner, seed, heartbeat) are stored when the
    study is created; later starts and workers reuse them. A larger --trials extends a
    finished study.
    """
    request = study_request(
        study, trials, storage, space=space, epochs=epochs, dataset=dataset, pruner=pruner,
        seed=seed, heartbeat=heartbeat,
    )  # fmt: skip
    options = WorkerOptions(data_dir, artifact_dir, timeout, compile.value)
    progress = SearchProgress(console)
    with user_errors():
        slots = plan_slots(parse_gpus(gpus), jobs_per_gpu)
        settings = create_study(request, progress)
        if len(slots) == 1 and gpus is None:
            run_local_worker(study, storage, settings, options, progress)
            return
    raise typer.Exit(run_fleet(study, storage, slots, options, progress))


@app.command()
def worker(
    study: Annotated[str, typer.Option(help="An existing study to work on.")],
    storage: StorageOption = DEFAULT_STORAGE_URL,
    data_dir: DataDirOption = None,
    artifact_dir: ArtifactDirOption = None,
    timeout: TimeoutOption = None,
    gpus: GpusOption = None,
    jobs_per_gpu: JobsOption = 1,
    compile: CompileOption = Compile.auto,
    slot: Annotated[int | None, typer.Option(hidden=True)] = None,
) -> None:
    """Join an existing study from any machine and run trials toward its stored target.

    Everything but the per-machine options comes from the study's stored settings.
    """
    options = WorkerOptions(data_dir, artifact_dir, timeout, compile.value, slot)
    progress = SearchProgress(console)
    with user_errors():
        settings = stored_settings(study, storage)
        slots = plan_slots(parse_gpus(gpus), jobs_per_gpu)
        if len(slots) == 1 and gpus is None:
            run_local_worker(study, storage, settings, options, progress)
            return
    raise typer.Exit(run_fleet(study, storage, slots, options, progress))


@app.command()
def download(data_dir: DataDirOption = None) -> None:
    """Download and verify CIFAR-10 into the data directory (done on first use otherwise)."""
    with user_errors():
        folder = download_cifar10(data_dir or default_data_dir())
    console.print(f"CIFAR-10 verified in {folder}")


@app.command()
def status(
    study: Annotated[
        str | None, typer.Option(help="Study to show; all studies if left out.")
    ] = None,
    storage: StorageOption = DEFAULT_STORAGE_URL,
) -> None:
    """Trials by state, the best trial, and the trials running now."""
    with user_errors():
        console.print(
            study_status(storage, study)
            if study
            else studies_table(open_storage(storage, reader=True))
        )


@app.command()
def best(
    study: Annotated[str, typer.Option(help="Study to export from.")],
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="YAML file to write; stdout if left out.")
    ] = None,
    storage: StorageOption = DEFAULT_STORAGE_URL,
) -> None:
    """Export the best trial's config (with its metrics) as YAML for `hpo train`."""
    with user_errors():
        document = to_yaml(best_document(join(open_storage(storage, reader=True), study), storage))
    if output is None:
        sys.stdout.write(document)
        return
    output.write_text(document)
    console.print(f"wrote {output}")


@app.command()
def train(
    config: Annotated[Path, typer.Option(help="YAML config written by `hpo best`.")],
    epochs: Annotated[
        int | None, typer.Option(min=1, help="Epochs; the config's own if left out.")
    ] = None,
    dataset: Annotated[Dataset, typer.Option()] = Dataset.cifar10,
    data_dir: DataDirOption = None,
    output_dir: Annotated[
        Path, typer.Option(help="Where model.pt and metrics.json are written.")
    ] = Path("runs/final"),
    storage: StorageOption = DEFAULT_STORAGE_URL,
    artifact_dir: ArtifactDirOption = None,
) -> None:
    """Train a config from scratch on train+validation, then report test accuracy.

    The weights and metrics are also attached to the study the config came from, when that
    study is in --storage, so the dashboard lists them beside the search.
    """
    with user_errors():
        cfg, document = load_config_file(config)
        backend_of(storage)  # a malformed URL fails now, not after the training
        images = load_dataset(dataset.value, data_dir)
    progress = SearchProgress(console)
    total = epochs or cfg.train.epochs
    metrics = train_final(
        cfg,
        images,
        pick_device(progress),
        output_dir,
        epochs=epochs,
        on_epoch=lambda stats: console.print(format_epoch("final", stats, total), highlight=False),
    )
    console.print(f"test accuracy {metrics['test_acc']:.2%} (test loss {metrics['test_loss']:.4f})")
    console.print(f"wrote {output_dir / 'model.pt'} and {output_dir / 'metrics.json'}")
    artifacts = resolve_artifact_dir(artifact_dir, storage)
    source = document.get("source") or {}
    console.print(attach_to_study(storage, artifacts, source, output_dir, metrics), highlight=False)


@app.command()
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
    with user_errors():
        artifacts = resolve_artifact_dir(artifact_dir, storage)
        server = open_dashboard(storage, host, port, artifacts)
    warning = exposure_warning(host)
    if warning:
        print(warning, file=sys.stderr)
    console.print(server.banner(), highlight=False, soft_wrap=True)
    server.serve()


@app.command()
def report(
    study: Annotated[str, typer.Option(help="Study to report on.")],
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Folder for report.html and the PNGs.")
    ],
    storage: StorageOption = DEFAULT_STORAGE_URL,
    top: Annotated[int, typer.Option(min=1, help="Rows in the table of best trials.")] = 10,
) -> None:
    """Write an offline HTML page (and PNGs) of a study's plots and its best trials."""
    with user_errors():
        written = write_report(join(open_storage(storage, reader=True), study), output, top)
    for line in written.skipped:
        console.print(line, highlight=False)
    console.print(f"wrote {written.page} and {len(written.images)} PNGs", highlight=False)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
