"""Whose scratch folder a clean-up may remove (search/training/checkpoints.py): a write in
flight is its writer's as long as it lives, whatever its PID or hostname look like elsewhere;
another machine's is kept for a day."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from search.training.checkpoints import SCRATCH_PREFIX, STALE_SCRATCH_S, CheckpointStore

PAUSED_MID_WRITE = """
import os, sys
from pathlib import Path
import optuna
from search.training.checkpoints import CheckpointStore

class Pause:
    def __reduce__(self):  # pickled inside torch.save: half the file is in the scratch folder
        print(os.getpid(), flush=True)
        sys.stdin.readline()
        return (int, (0,))

study = optuna.create_study(storage=f"sqlite:///{sys.argv[2]}")
CheckpointStore(Path(sys.argv[1])).save(study.ask(), {"epoch": 1, "pause": Pause()})
print("saved", flush=True)
"""
STARTS = "import os, sys; from pathlib import Path; " + (
    "from search.training.checkpoints import CheckpointStore; "
    "CheckpointStore(Path(sys.argv[1])); print(os.getpid())"
)
# A process of its own PID namespace is its PID 1, as a container's first process is.
AS_PID_1 = ["unshare", "--pid", "--fork"]


def pid_namespaces_here() -> bool:
    try:
        return subprocess.run([*AS_PID_1, "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def scratch_folders(directory: Path) -> list[Path]:
    return sorted(directory.glob(f"{SCRATCH_PREFIX}*"))


@pytest.mark.slow  # three processes, each importing torch
@pytest.mark.skipif(not pid_namespaces_here(), reason="unshare --pid needs root (CAP_SYS_ADMIN)")
def test_a_start_as_pid_1_leaves_another_pid_1_s_write_in_flight(tmp_path: Path) -> None:
    """Two containers on one host, sharing its hostname (host networking), each its own PID
    namespace: both workers are PID 1. Before: the second one's start took the first one's
    scratch for its own leftovers and removed it mid-write."""
    directory = tmp_path / "artifacts"
    directory.mkdir()
    writer = subprocess.Popen(
        [*AS_PID_1, sys.executable, "-c", PAUSED_MID_WRITE, str(directory), tmp_path / "s.db"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert writer.stdout.readline().strip() == "1"  # paused inside torch.save
        [in_flight] = scratch_folders(directory)
        start = [*AS_PID_1, sys.executable, "-c", STARTS, str(directory)]
        other = subprocess.run(start, capture_output=True, text=True, timeout=120)
        assert other.returncode == 0 and other.stdout.strip() == "1", other.stderr
        assert in_flight.is_dir()  # the other PID 1's start left it alone
        writer.stdin.write("\n")
        writer.stdin.flush()
        assert writer.stdout.readline().strip() == "saved"
        assert writer.wait(timeout=60) == 0
    finally:
        writer.kill()
        writer.wait()
    assert scratch_folders(directory) == []
    assert [file.name for file in directory.iterdir()] != []  # the checkpoint, written


def test_another_machine_s_scratch_is_kept_for_a_day(tmp_path: Path) -> None:
    """Another kernel's lock may not reach this one (a network filesystem), so its write is
    judged by age alone: a folder that old belongs to no write in flight."""
    directory = tmp_path / "artifacts"
    directory.mkdir()
    now = time.time()
    ages = {"hours": STALE_SCRATCH_S - 3600, "a day": STALE_SCRATCH_S + 3600}
    folders = {}
    for name, age in ages.items():
        folder = directory / f"{SCRATCH_PREFIX}elsewhere@{uuid.uuid4()}-{name.replace(' ', '')}"
        folder.mkdir()
        (folder / "trial-0-checkpoint.pt").write_bytes(b"PK half a checkpoint")
        os.utime(folder, (now - age, now - age))
        folders[name] = folder
    CheckpointStore(directory)
    assert folders["hours"].is_dir()  # maybe still being written
    assert not folders["a day"].exists()
