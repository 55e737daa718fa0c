"""`hpo best`: the winning trial as the YAML config `hpo train` reads."""

from __future__ import annotations

import platform
from dataclasses import replace
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy.engine
import yaml
from optuna.trial import FrozenTrial, TrialState

from data.dataset import DATASETS
from search.commands.progress import score_figure
from search.rules import attrs
from search.rules.config import TrialConfig
from search.rules.cost import pareto_front, trial_gflop
from search.rules.study import StudyError
from storage import DEFAULT_STORAGE_URL, backend_of, redact_url, sqlite_file

# What redact_url writes in place of a password.
REDACTED = "***"


def best_document(
    study: optuna.Study, storage_url: str, trial: FrozenTrial | None = None
) -> dict[str, Any]:
    """Config (model, train, augment) of the best trial (or of `trial`), with its metrics and
    provenance."""
    try:
        best = trial or study.best_trial
    except ValueError:
        raise StudyError(f"study {study.study_name!r} has no completed trial yet") from None
    stored = best.user_attrs
    if attrs.CONFIG not in stored:
        raise StudyError(f"trial {best.number} of {study.study_name!r} has no stored config")
    config = with_lr_trace(TrialConfig.from_dict(stored[attrs.CONFIG]), stored)
    return {
        **config.to_dict(),
        # All of the scored point: the trial's final epoch (search/training/objective.py `score`).
        "metrics": {
            # The trial's value, and which figure of its last epoch that is (as the epoch
            # lines name them): calibrated_ce in a study created with val_score.
            "score": best.value,
            "score_is": score_figure(study.user_attrs),
            "val_ce": last_epoch(stored).get("val_cross_entropy"),  # plain, at temperature 1
            "val_acc": stored.get(attrs.VAL_ACC),
            "epoch": best.last_step,
            "images_per_s": stored.get(attrs.IMAGES_PER_S),
            "params": stored.get(attrs.PARAMS),
            "device": stored.get(attrs.DEVICE),
        },
        "source": {
            "study": study.study_name,
            "trial": best.number,
            "storage": redact_url(portable_url(storage_url)),
            "architecture": stored.get(attrs.ARCHITECTURE),
            "data": data_section(study),
            "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        },
        "versions": package_versions(),
    }


def data_section(study: optuna.Study) -> dict[str, Any]:
    """What the config was trained on, for `hpo train`: the study's dataset identity (name,
    fingerprint, classes, image size, normalisation), or its name where it stores none."""
    settings = study.user_attrs.get(attrs.SETTINGS) or {}
    return settings.get("identity") or {"name": settings.get("dataset", DATASETS[0])}


def portable_url(url: str) -> str:
    """`url` as a config file keeps it: a relative SQLite or journal file made absolute, so
    `hpo train` finds the study from any folder."""
    database = sqlite_file(url)
    if database is not None and not database.is_absolute():
        absolute = sqlalchemy.engine.make_url(url).set(database=str(database.resolve()))
        return absolute.render_as_string(hide_password=False)
    if backend_of(url) == "journal-file":
        scheme, path = url.split("://", 1)
        return f"{scheme}://{Path(path).resolve()}"
    return url


def config_storage(given: str | None, document: dict[str, Any]) -> str:
    """Where `hpo train` attaches a config's results: --storage (or HPO_STORAGE) where given,
    else the storage of the study the config came from (as `hpo best` wrote it), else the
    default."""
    if given is not None:
        return given
    return (document.get("source") or {}).get("storage") or DEFAULT_STORAGE_URL


def is_redacted(url: str) -> bool:
    """Whether `url` is one redact_url wrote: its password is gone, it cannot be opened."""
    return REDACTED in url


def last_epoch(stored: dict[str, Any]) -> dict[str, Any]:
    epochs = stored.get(attrs.EPOCHS) or [{}]
    return epochs[-1]


def with_lr_trace(config: TrialConfig, stored: dict[str, Any]) -> TrialConfig:
    """A plateau config with the LR its trial followed per epoch, for `hpo train` to replay:
    the final run has no validation loss to watch, and its training loss rarely stalls."""
    if config.train.scheduler != "plateau":
        return config
    trace = tuple(record["lr"] for record in stored.get(attrs.EPOCHS, []) if "lr" in record)
    return replace(config, train=replace(config.train, lr_by_epoch=trace))


def trial_document(study: optuna.Study, storage_url: str, number: int) -> dict[str, Any]:
    """The document of trial `number`, which must be complete: only it has a score."""
    trial = next((t for t in study.get_trials(deepcopy=False) if t.number == number), None)
    if trial is None:
        raise StudyError(f"study {study.study_name!r} has no trial {number}")
    if trial.state != TrialState.COMPLETE:
        raise StudyError(
            f"trial {number} of {study.study_name!r} did not complete ({trial.state.name}): "
            "it has no final score to export"
        )
    return best_document(study, storage_url, trial)


def pareto_documents(study: optuna.Study, storage_url: str) -> list[dict[str, Any]]:
    """One document per trial on the accuracy-versus-cost front, cheapest first."""
    front = pareto_front(study.get_trials(deepcopy=False))
    if not front:
        raise StudyError(f"study {study.study_name!r} has no completed trial yet")
    documents = [best_document(study, storage_url, trial) for trial in front]
    for document, trial in zip(documents, front, strict=True):
        document["metrics"][attrs.GFLOPS] = trial_gflop(trial)  # what the front trades
    return documents


def to_yaml(document: dict[str, Any]) -> str:
    return yaml.safe_dump(document, sort_keys=False, default_flow_style=None)


def to_yaml_documents(documents: list[dict[str, Any]]) -> str:
    """A YAML stream of documents separated by `---`; `hpo train` reads one of them."""
    return yaml.safe_dump_all(documents, sort_keys=False, default_flow_style=None)


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in ("backbone-hpo", "torch", "torchvision", "optuna"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "not installed"
    return versions
