"""Where a study's trials are logged besides Optuna: a TensorBoard folder and an MLflow
tracking URI, study settings checked before anything is stored (torch-free: the control plane
checks them; search/training/trackers.py writes to them).

Precedence of the MLflow URI, as MLflow's own users expect: `--mlflow URI` where given, else
$MLFLOW_TRACKING_URI of the process that creates the study; stored in the study, so every
worker logs to the same place. A worker's `--tensorboard DIR` moves the study's folder on a
machine that mounts it elsewhere.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from optuna.trial import FrozenTrial, TrialState

from search.rules import attrs
from storage.optuna_private import retry_of

if TYPE_CHECKING:
    from search.rules.settings import StudySettings

MLFLOW_ENV = "MLFLOW_TRACKING_URI"
# What `pip install` needs for each tracker (pyproject's extras).
EXTRAS = {"tensorboard": "tensorboard", "mlflow": "mlflow"}
# MLflow's own HTTP retries and timeout (its defaults retry for minutes): a worker's tracker
# thread retries on its own schedule, so one request is bounded. And its "View run ... at"
# line per run ended, twice per trial in a worker's log: the run's id is kept on the trial,
# which `hpo status` and the dashboard's note link to. A user's values win.
MLFLOW_HTTP_BOUNDS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
}


class TrackerError(ValueError):
    """A tracker setting the user gave that cannot work: one line, exit 2, nothing stored."""


def check_tensorboard_dir(given: str | Path) -> str:
    """The folder as an absolute path, where it is, or can be made, a folder this process
    may write in, and the tensorboard package is installed."""
    _require("tensorboard", f"--tensorboard {given}")
    path = Path(given).expanduser().absolute()
    existing = next(folder for folder in (path, *path.parents) if folder.exists())
    if not existing.is_dir():
        raise TrackerError(f"--tensorboard {given}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise TrackerError(f"--tensorboard {given}: {existing} is not writable")
    return str(path)


def check_mlflow_uri(uri: str, label: str | None = None) -> str:
    """The URI where MLflow's client can use its scheme (http, https, databricks, sqlite,
    postgresql, ...); a server that is down is no mistake of the user's and is not asked.
    `label`: how the user gave it, for the error (--mlflow URI)."""
    label = label or f"--mlflow {uri}"
    _require("mlflow", label)
    bound_mlflow_http()
    from mlflow import MlflowClient  # its registry of stores knows the schemes it takes
    from mlflow.exceptions import MlflowException

    try:
        MlflowClient(tracking_uri=uri)
    except MlflowException as err:
        first = str(err).strip().splitlines()[0]
        raise TrackerError(f"{label}: MLflow cannot use it ({first[:160]})") from None
    return uri


def chosen_mlflow_uri(flag: str | None) -> str | None:
    """A new study's URI, checked: --mlflow where given, else $MLFLOW_TRACKING_URI (the
    module's precedence); None where neither is."""
    if flag:
        return check_mlflow_uri(flag)
    from_env = os.environ.get(MLFLOW_ENV)
    return check_mlflow_uri(from_env, f"{MLFLOW_ENV}={from_env}") if from_env else None


def bound_mlflow_http() -> None:
    """Set MLFLOW_HTTP_BOUNDS in this process unless the user set them: before MLflow reads
    them."""
    for name, value in MLFLOW_HTTP_BOUNDS.items():
        os.environ.setdefault(name, value)


def _require(package: str, what: str) -> None:
    if importlib.util.find_spec(package) is None:
        extra = EXTRAS[package]
        raise TrackerError(
            f"{what}: the {package} package is not installed (pip install 'backbone-hpo[{extra}]')"
        )


def mlflow_run_url(uri: str | None, experiment_id: str | None, run_id: str) -> str:
    """A run's page in MLflow's UI where the URI is a server's; the bare id elsewhere."""
    if uri and urlsplit(uri).scheme in ("http", "https") and experiment_id:
        return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    return run_id


def tracker_line(settings_tensorboard: str | None, settings_mlflow: str | None, study: dict) -> str:
    """Where a study's trials are logged, in one line (`hpo status`, the report)."""
    parts = []
    if settings_tensorboard:
        parts.append(f"tensorboard --logdir {settings_tensorboard}")
    if settings_mlflow:
        experiment = study.get(attrs.MLFLOW_EXPERIMENT)
        where = f" (experiment {experiment})" if experiment else ""
        parts.append(f"mlflow {settings_mlflow}{where}")
    return "; ".join(parts) or "none (--tensorboard DIR, --mlflow URI)"


def chain_number(trial: FrozenTrial) -> int:
    """A finished trial's chain: its first trial's number (its own for a first trial)."""
    first = retry_of(trial)
    return trial.number if first is None else first


def mlflow_run_id(study: dict, trial: FrozenTrial) -> str | None:
    """The MLflow run of a trial's chain: on the trial, or, where the run was made after the
    trial had ended (the server was down), in the study's attrs under the chain's number."""
    return trial.user_attrs.get(attrs.MLFLOW_RUN) or study.get(
        f"{attrs.MLFLOW_CHAIN_RUN}{chain_number(trial)}"
    )


def trial_run_line(uri: str | None, study: dict, trial: FrozenTrial) -> str | None:
    """The MLflow run of a trial's chain, as a link where one can be made; None if none."""
    run_id = mlflow_run_id(study, trial)
    if not run_id:
        return None
    return mlflow_run_url(uri, study.get(attrs.MLFLOW_EXPERIMENT), run_id)


def tracker_rows(
    settings: StudySettings, study_attrs: dict, trials: list[FrozenTrial]
) -> list[tuple[str, str]]:
    """Where the trials are logged, and the best trial's MLflow run."""
    rows = [("trackers", tracker_line(settings.tensorboard, settings.mlflow, study_attrs))]
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    if complete:
        best = min(complete, key=lambda t: t.value)
        run = trial_run_line(settings.mlflow, study_attrs, best)
        if run:
            rows.append(("best trial's run", run))
    return rows
