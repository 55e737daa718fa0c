"""`hpo best`: the winning trial as the YAML config `hpo train` reads."""

from __future__ import annotations

import platform
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import optuna
import yaml

from search.config import TrialConfig
from search.study import StudyError
from storage import redact_url


def best_document(study: optuna.Study, storage_url: str) -> dict[str, Any]:
    """Config (model, train, augment) of the best trial, with its metrics and provenance."""
    try:
        best = study.best_trial
    except ValueError:
        raise StudyError(f"study {study.study_name!r} has no completed trial yet") from None
    if "config" not in best.user_attrs:
        raise StudyError(f"trial {best.number} of {study.study_name!r} has no stored config")
    config = TrialConfig.from_dict(best.user_attrs["config"])
    attrs = best.user_attrs
    return {
        **config.to_dict(),
        "metrics": {
            "val_loss": best.value,
            "val_acc": attrs.get("val_acc"),
            "epochs_trained": best.last_step,
            "images_per_s": attrs.get("images_per_s"),
            "params": attrs.get("params"),
            "device": attrs.get("device"),
        },
        "source": {
            "study": study.study_name,
            "trial": best.number,
            "storage": redact_url(storage_url),
            "architecture": attrs.get("architecture"),
            "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        },
        "versions": package_versions(),
    }


def to_yaml(document: dict[str, Any]) -> str:
    return yaml.safe_dump(document, sort_keys=False, default_flow_style=None)


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in ("backbone-hpo", "torch", "torchvision", "optuna"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "not installed"
    return versions
