"""Where a study's artifacts live and how often a trial checkpoints (torch-free: the
dashboard, status and settings read them; search/training/checkpoints.py writes the files)."""

from __future__ import annotations

from pathlib import Path

from storage import DEFAULT_HEARTBEAT_S, default_artifact_dir

# Seconds of training between two checkpoints of a trial: what a crash can lose at most.
# No longer than the heartbeat interval, so a retried trial loses less than its grace.
DEFAULT_CHECKPOINT_INTERVAL_S = DEFAULT_HEARTBEAT_S


def artifact_dir(given: Path | None, storage_url: str) -> Path:
    """The --artifact-dir given, else the storage's default (beside a SQLite file)."""
    return given if given is not None else default_artifact_dir(storage_url)
