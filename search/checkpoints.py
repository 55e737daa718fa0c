"""Epoch checkpoints of a trial as Optuna artifacts, so a retried trial resumes, not restarts."""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.artifacts import FileSystemArtifactStore, download_artifact, upload_artifact
from optuna.artifacts.exceptions import ArtifactNotFound

CHECKPOINT_ATTR = "checkpoint"


class CheckpointStore:
    def __init__(self, directory: Path):
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.artifacts = FileSystemArtifactStore(str(directory))

    def save(self, trial: optuna.Trial, state: dict[str, Any]) -> None:
        """Store `state` for the trial, replacing its previous checkpoint."""
        previous = trial.user_attrs.get(CHECKPOINT_ATTR)
        with tempfile.TemporaryDirectory() as scratch:
            path = Path(scratch) / f"trial-{trial.number}-epoch-{state['epoch']}.pt"
            torch.save(state, path)
            artifact_id = upload_artifact(
                artifact_store=self.artifacts, file_path=str(path), study_or_trial=trial
            )
        record = {"artifact_id": artifact_id, "epoch": state["epoch"], "owner": trial.number}
        trial.set_user_attr(CHECKPOINT_ATTR, record)
        # An inherited checkpoint still belongs to the failed trial; only our own is replaced.
        if previous and previous["owner"] == trial.number:
            self._remove(previous["artifact_id"])

    def load(self, trial: optuna.Trial) -> dict[str, Any] | None:
        """The checkpoint a retried trial inherited from the trial it replaces, if any."""
        record = trial.user_attrs.get(CHECKPOINT_ATTR)
        if not record:
            return None
        with tempfile.TemporaryDirectory() as scratch:
            path = Path(scratch) / "checkpoint.pt"
            try:
                download_artifact(
                    artifact_store=self.artifacts,
                    artifact_id=record["artifact_id"],
                    file_path=str(path),
                )
            except ArtifactNotFound:
                # Written on a machine that does not share this artifact directory.
                return None
            return torch.load(path, map_location="cpu", weights_only=False)

    def _remove(self, artifact_id: str) -> None:
        # Already gone (another worker cleaned up): nothing left to free.
        with contextlib.suppress(Exception):
            self.artifacts.remove(artifact_id)
