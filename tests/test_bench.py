"""Every script under bench/ still runs: each at its smallest size (`--smoke`, on the CPU), and
bench/gpu.sh's steps end to end, so that a module moved or renamed fails here, not on the one
GPU run. Benches are found by glob: one added later is covered, and must have a `--smoke`.
The benches that train, and bench/gpu.sh, run in tests/test_bench_training.py, a file of its
own, so that pytest-xdist (a worker takes a whole file) runs the two halves side by side."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCHES = sorted((ROOT / "bench").glob("*.py"))
TRAINING = ("levers.py", "oom.py", "resume.py", "study.py", "throughput.py")


@pytest.fixture
def scratch() -> Iterator[Path]:
    """The benches' temporary folders (tempfile's), removed after the test; not under pytest's
    tmp_path, which the postgres user of bench/fleet.py's own server cannot reach."""
    folder = Path(tempfile.mkdtemp(prefix="hpo-bench-test-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def bench_env(scratch: Path) -> dict[str, str]:
    """This tree's code first (an editable install may name another checkout)."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "TMPDIR": str(scratch), "OMP_NUM_THREADS": "1"}


def shown(run: subprocess.CompletedProcess) -> str:
    return (
        f"exit {run.returncode}\n--- stdout\n{run.stdout[-3000:]}\n--- stderr\n{run.stderr[-3000:]}"
    )


def test_the_benches_are_found() -> None:
    assert {"study.py", "oom.py", "throughput.py", *TRAINING} <= {b.name for b in BENCHES}


@pytest.mark.slow  # a process each, some with servers of their own: not the quick tier's rules
@pytest.mark.parametrize(
    "bench", [b for b in BENCHES if b.name not in TRAINING], ids=lambda bench: bench.name
)
def test_bench_runs_at_its_smallest_size(bench: Path, scratch: Path) -> None:
    assert_runs_at_its_smallest_size(bench, scratch)


def assert_runs_at_its_smallest_size(bench: Path, scratch: Path) -> None:
    # A script without the flag may ignore an unknown argument and run at full size.
    assert '"--smoke"' in bench.read_text(), f"{bench.name} has no --smoke"
    run = subprocess.run(
        [sys.executable, str(bench), "--smoke"],
        cwd=ROOT, env=bench_env(scratch), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, shown(run)
    assert any(char.isdigit() for char in run.stdout), f"no figures printed\n{shown(run)}"
