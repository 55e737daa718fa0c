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

from data import DatasetMissingError, load_dataset
from model import ModelConfigError
from search.config import ConfigError, load_config_file
from search.export import best_document, to_yaml
from search.final import train_final
from search.launch import StartRequest, pick_device, start_search
from search.progress import SearchProgress, format_epoch
from search.settings import SettingsConflict
from search.space import SpaceError
from search.status import studies_table, study_table
from search.study import StudyError, join
from storage import DEFAULT_STORAGE_URL, StorageURLError, open_storage

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
)


class Dataset(str, Enum):
    cifar10 = "cifar10"
    synthetic = "synthetic"


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


@app.command()
def start(
    study: Annotated[str, typer.Option(help="Study name; created if new, joined if it exists.")],
    trials: Annotated[
        int, typer.Option(min=1, help="Finished trials the whole study should hold (all workers).")
    ],
    storage: StorageOption = DEFAULT_STORAGE_URL,
    space: Annotated[
        str | None, typer.Option(help="Search space: default, tiny, or a YAML file of overrides.")
    ] = None,
    epochs: Annotated[
        int | None, typer.Option(min=1, help="Epochs per trial. [default: 20]")
    ] = None,
    dataset: Annotated[Dataset | None, typer.Option(help="[default: cifar10]")] = None,
    data_dir: DataDirOption = None,
    pruner: Annotated[
        Pruner | None, typer.Option(help="Prune on validation loss. [default: hyperband]")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Study seed. [default: 0]")] = None,
    heartbeat: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Seconds between trial heartbeats; a trial silent for twice "
            "that is failed and retried. [default: 60]",
        ),
    ] = None,
    artifact_dir: Annotated[
        Path | None,
        typer.Option(
            envvar="HPO_ARTIFACT_DIR",
            help="Where epoch checkpoints are stored. "
            "[default: hpo-artifacts beside a SQLite file, else ./hpo-artifacts]",
        ),
    ] = None,
    timeout: Annotated[
        float | None, typer.Option(min=0, help="Start no new trial after this many seconds.")
    ] = None,
) -> None:
    """Search: create the study (or join it) and run trials until it holds --trials.

    Study settings (space, epochs, dataset, pruner, seed, heartbeat) are stored when the
    study is created; later starts reuse them. A larger --trials extends a finished study.
    """
    request = StartRequest(
        study=study,
        trials=trials,
        storage=storage,
        space=space,
        epochs=epochs,
        dataset=dataset.value if dataset else None,
        pruner=pruner.value if pruner else None,
        seed=seed,
        heartbeat=heartbeat,
        data_dir=data_dir,
        artifact_dir=artifact_dir,
        timeout_s=timeout,
    )
    with user_errors():
        start_search(request, SearchProgress(console))


@app.command()
def status(
    study: Annotated[
        str | None, typer.Option(help="Study to show; all studies if left out.")
    ] = None,
    storage: StorageOption = DEFAULT_STORAGE_URL,
) -> None:
    """Trials by state, the best trial, and the trials running now."""
    with user_errors():
        opened = open_storage(storage)
        console.print(study_table(join(opened, study)) if study else studies_table(opened))


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
        document = to_yaml(best_document(join(open_storage(storage), study), storage))
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
) -> None:
    """Train a config from scratch on train+validation, then report test accuracy."""
    with user_errors():
        cfg, _ = load_config_file(config)
        images = load_dataset(dataset.value, data_dir)
    progress = SearchProgress(console)
    total = epochs or cfg.train.epochs
    metrics = train_final(
        cfg,
        images,
        pick_device(progress),
        output_dir,
        epochs=epochs,
        on_epoch=lambda stats: console.print(format_epoch(0, stats, total), highlight=False),
    )
    console.print(f"test accuracy {metrics['test_acc']:.2%} (test loss {metrics['test_loss']:.4f})")
    console.print(f"wrote {output_dir / 'model.pt'} and {output_dir / 'metrics.json'}")


def main() -> None:
    app()
