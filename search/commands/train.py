"""`hpo train`: a config file trained per seed and tested, its weights and metrics written and
attached to the study it came from."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data.dataset import DATASETS, load_with_identity
from data.identity import DatasetIdentity
from search.commands.export import config_storage, is_redacted
from search.commands.figures import TRAINING_FIGURES, write_training_figures
from search.commands.progress import SearchProgress, format_mean_std
from search.rules import attrs
from search.rules.artifacts import artifact_dir
from search.rules.config import FINAL_EPOCHS, ConfigError, load_config_file
from search.rules.data import check_classes, check_data
from search.rules.faults import FilesNotWritten
from search.rules.settings import StudySettings
from search.training.final import (
    METRICS_FILE,
    attach_final,
    make_output_dir,
    metrics_files,
    open_for_writing,
    seed_devices,
    train_seeds,
    unwritten_files,
)
from storage import backend_of


@dataclass(frozen=True)
class FinalRequest:
    """What `hpo train` was asked: a config file, and where to train and write it."""

    config: Path
    dataset: str | None  # None: the data the config's study trained on (its `source.data`)
    output_dir: Path
    storage: str | None  # None: the storage the config's study is in (export.config_storage)
    epochs: int | None = None  # FINAL_EPOCHS if None; the config's recipe is kept either way
    data_dir: Path | None = None
    artifact_dir: Path | None = None
    seeds: int = 1  # seeds 0 .. seeds-1
    gpus: str | None = None  # 'all' or '0,1': seeds side by side, one process per GPU


def run_final(request: FinalRequest, progress: SearchProgress) -> dict[str, Any]:
    """`hpo train`: train the config per seed, test it, write and attach weights, metrics and
    the per-epoch figures. A file the disk refused raises FilesNotWritten once all is said."""
    cfg, document = load_config_file(request.config)
    cfg = cfg.with_epochs(request.epochs or FINAL_EPOCHS)
    backend_of(config_storage(request.storage, document))  # malformed: refused before training
    make_output_dir(request.output_dir)
    devices = seed_devices(request.gpus, progress.say)
    if cfg.train.scheduler == "plateau" and not cfg.train.lr_by_epoch:
        progress.say("plateau schedule without lr_by_epoch: it watches the training loss")
    dataset, size = train_dataset(request.dataset, document), cfg.model.image_size
    images, found = load_with_identity(dataset, request.data_dir, image_size=size)
    check_data(exported_identity(document), found)
    check_classes(cfg, found)
    output = request.output_dir
    seeds = range(request.seeds)
    stats = (found.mean, found.std)
    metrics = train_seeds(cfg, images, seeds, output, devices, progress.say, stats)
    for run in metrics["seeds"]:
        progress.say(
            f"seed {run['seed']}: test accuracy {run['test_acc']:.2%} "
            f"(test loss {run['test_loss']:.4f})"
        )
    progress.say(
        f"test accuracy {format_mean_std(metrics['test_acc'], percent=True)} over "
        f"{len(metrics['seeds'])} seed(s) (test loss {format_mean_std(metrics['test_loss'])})"
    )
    metrics["figures"] = write_training_figures(metrics, output, progress.say)
    progress.say(f"wrote {', '.join(metrics_files(metrics, output)) or 'nothing'} in {output}")
    progress.say(_attach(request, document, metrics))
    _log_to_trackers(request, document, metrics, progress)
    figures = [name for name in TRAINING_FIGURES if name not in metrics["figures"]]
    unwritten = [*unwritten_files(metrics), *figures]
    if unwritten:
        raise FilesNotWritten(
            f"{', '.join(unwritten)} not written in {output} (the disk refused them, as said "
            "above; the test accuracy above stands)"
        )
    return metrics


def train_dataset(given: str | None, document: dict[str, Any]) -> str:
    """--dataset where given, else the data the config's study trained on, else CIFAR-10
    (a config exported before `hpo best` wrote its data)."""
    exported = exported_data(document)
    return given or exported.get("name") or DATASETS[0]


def exported_identity(document: dict[str, Any]) -> DatasetIdentity | None:
    """The identity of the data the config's study trained on, where `hpo best` wrote one."""
    exported = exported_data(document)
    if "fingerprint" not in exported:  # CIFAR-10, synthetic, or an older export
        return None
    try:
        return DatasetIdentity.from_dict(exported)
    except TypeError as err:
        raise ConfigError(f"config: source.data is not a dataset identity ({err})") from err


def exported_data(document: dict[str, Any]) -> dict[str, Any]:
    data = (document.get("source") or {}).get("data") or {}
    if not isinstance(data, dict):
        raise ConfigError("config: source.data must be a mapping")
    return data


def _attach(request: FinalRequest, document: dict[str, Any], metrics: dict[str, Any]) -> str:
    """Attach to the study the config came from, in --storage or else in its source's storage;
    one line saying where, or why not."""
    source = document.get("source") or {}
    storage = config_storage(request.storage, document)
    if is_redacted(storage):
        return (
            f"not attached to study {source.get('study')!r}: the config's storage {storage} "
            "has its password redacted; give --storage (or HPO_STORAGE) to attach"
        )
    artifacts = artifact_dir(request.artifact_dir, storage)
    return attach_final(storage, artifacts, source, request.output_dir, metrics)


def _log_to_trackers(
    request: FinalRequest,
    document: dict[str, Any],
    metrics: dict[str, Any],
    progress: SearchProgress,
) -> None:
    """The run beside the study's trials in TensorBoard and MLflow, where the study the config
    came from logs them: its seeds, its test accuracy, the config and figures."""
    source = document.get("source") or {}
    storage = config_storage(request.storage, document)
    try:
        study = open_for_writing(storage, source["study"])
    except Exception:  # no study to follow: _attach said why
        return
    settings = StudySettings.from_dict(study.user_attrs[attrs.SETTINGS])
    if not (settings.tensorboard or settings.mlflow):
        return
    from search.training.final_trackers import log_final

    output = request.output_dir
    files = [request.config, *(output / name for name in (METRICS_FILE, *metrics["figures"]))]
    label = f"train-trial-{source.get('trial')}"
    log_final(study, settings, label, metrics, [f for f in files if f.is_file()], progress.say)
