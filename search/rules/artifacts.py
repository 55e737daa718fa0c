"""Where a study's artifacts live and how often a trial checkpoints (torch-free: the
dashboard, status and settings read them; search/training/checkpoints.py writes the files)."""

from __future__ import annotations

import os
from pathlib import Path

from storage import DEFAULT_HEARTBEAT_S, default_artifact_dir

# Seconds of training between two checkpoints of a trial: what a crash can lose at most.
# No longer than the heartbeat interval, so a retried trial loses less than its grace.
DEFAULT_CHECKPOINT_INTERVAL_S = DEFAULT_HEARTBEAT_S


class ArtifactDirError(ValueError):
    """An artifact folder no retry can make usable: the user's mistake, not the machine's."""


def artifact_dir(given: Path | None, storage_url: str) -> Path:
    """The --artifact-dir given, else the storage's default (beside a SQLite file)."""
    return given if given is not None else default_artifact_dir(storage_url)


def check_artifact_dir(directory: Path) -> Path:
    """`directory`, where it is, or can be made, a folder this process may write in.

    A path through a file (a typo) or into a folder it may not write can never hold a
    checkpoint: refused before anything is stored. A disk that fills or vanishes later is the
    machine's fault, which a worker rides out (search/training/checkpoints.py)."""
    path = directory.absolute()
    existing = next(folder for folder in (path, *path.parents) if folder.exists())
    if not existing.is_dir():
        raise ArtifactDirError(f"artifact folder {directory}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ArtifactDirError(f"artifact folder {directory}: {existing} is not writable")
    return directory
