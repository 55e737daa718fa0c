"""`hpo train` and `hpo compare` runs beside the study's trials, where the study logs them:
TensorBoard a run folder per seed (its curves, test accuracy at the last step), MLflow a run per
config under the study's run (per-seed test accuracy, the config and figures as artifacts).

Written once the training is done, each tracker tried once within MLflow's request bounds: a
tracker that refuses loses none of the results, and is said in one line.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna

from search.rules.settings import StudySettings
from search.training.tracker_chain import describe_error

Say = Callable[[str], None]


def log_final(
    study: optuna.Study,
    settings: StudySettings,
    label: str,
    metrics: dict[str, Any],
    files: list[Path],
    say: Say,
) -> None:
    """`label`: the run's name (train-trial-7, compare-report, ...); `files`: its artifacts."""
    name = study.study_name
    if settings.tensorboard:
        try:
            _tensorboard(Path(settings.tensorboard) / name, label, metrics)
            say(f"tensorboard: {label} logged in {Path(settings.tensorboard) / name}")
        except Exception as err:  # a full disk, say: the results above stand
            say(f"tensorboard: {label} not logged ({describe_error(err)})")
    if settings.mlflow:
        try:
            run_id = _mlflow(study, settings.mlflow, label, metrics, files)
            say(f"mlflow: {label} logged as run {run_id}")
        except Exception as err:  # a server down: the results above stand
            say(f"mlflow: {label} not logged ({describe_error(err)})")


def _tensorboard(root: Path, label: str, metrics: dict[str, Any]) -> None:
    from torch.utils.tensorboard import SummaryWriter

    for run in metrics["seeds"]:
        with SummaryWriter(str(root / f"{label}-seed{run['seed']}")) as writer:
            for name in ("train_loss", "train_acc", "lr"):
                for epoch, value in enumerate(run[name], start=1):
                    writer.add_scalar(name, value, epoch)
            for name in ("test_acc", "test_loss"):
                writer.add_scalar(name, run[name], len(run["lr"]))


def _mlflow(
    study: optuna.Study, uri: str, label: str, metrics: dict[str, Any], files: list[Path]
) -> str:
    from mlflow.entities import Metric, Param

    from search.training.mlflow_sink import KIND, MlflowSink

    sink = MlflowSink(uri, study.study_name)
    parent = sink.study_run(study)
    tags = {KIND: "final", "mlflow.parentRunId": parent, "hpo.study": study.study_name}
    run_id = sink.client.create_run(sink.experiment(study), run_name=label, tags=tags).info.run_id
    now = int(time.time() * 1000)
    points = [
        Metric("test_acc_mean", metrics["test_acc"]["mean"], now, 0),
        Metric("epochs", metrics["epochs"], now, 0),
    ]
    for run in metrics["seeds"]:
        seed = run["seed"]
        points += [Metric("test_acc", run["test_acc"], now, seed)]  # step = seed
        points += [Metric("test_loss", run["test_loss"], now, seed)]
        for name in ("train_loss", "train_acc", "lr"):
            points += [
                Metric(f"seed{seed}/{name}", value, now, epoch)
                for epoch, value in enumerate(run[name], start=1)
            ]
    params = [Param("seeds", str(len(metrics["seeds"]))), Param("params", str(metrics["params"]))]
    for start in range(0, len(points), 1000):  # MLflow's most metrics in one log_batch
        sink.client.log_batch(run_id, metrics=points[start : start + 1000], params=params)
        params = []
    for file in files:
        sink.client.log_artifact(run_id, str(file))
    sink.client.set_terminated(run_id, "FINISHED")
    return run_id
