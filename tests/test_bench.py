"""Every script under bench/ still runs: each at its smallest size (`--smoke`, on the CPU), and
bench/gpu.sh's steps end to end, so that a module moved or renamed fails here, not on the one
GPU run. Benches are found by glob: one added later is covered, and must have a `--smoke`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCHES = sorted((ROOT / "bench").glob("*.py"))


def bench_env(tmp_path: Path) -> dict[str, str]:
    """This tree's code first (an editable install may name another checkout); scratch
    folders (tempfile's) under the test's own folder."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "TMPDIR": str(tmp_path), "OMP_NUM_THREADS": "1"}


def shown(run: subprocess.CompletedProcess) -> str:
    return (
        f"exit {run.returncode}\n--- stdout\n{run.stdout[-3000:]}\n--- stderr\n{run.stderr[-3000:]}"
    )


def test_the_benches_are_found() -> None:
    assert {"study.py", "oom.py", "throughput.py"} <= {bench.name for bench in BENCHES}


@pytest.mark.parametrize("bench", BENCHES, ids=lambda bench: bench.name)
def test_bench_runs_at_its_smallest_size(bench: Path, tmp_path: Path) -> None:
    # A script without the flag may ignore an unknown argument and run at full size.
    assert '"--smoke"' in bench.read_text(), f"{bench.name} has no --smoke"
    run = subprocess.run(
        [sys.executable, str(bench), "--smoke"],
        cwd=ROOT, env=bench_env(tmp_path), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, shown(run)
    assert any(char.isdigit() for char in run.stdout), f"no figures printed\n{shown(run)}"


@pytest.mark.slow
def test_gpu_script_runs_every_step_on_the_cpu(tmp_path: Path) -> None:
    out = tmp_path / "figures.txt"
    env = {**bench_env(tmp_path), "PYTHON": sys.executable, "OUT": str(out),
           "DATA": str(tmp_path / "data")}  # fmt: skip
    run = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu.sh"), "--smoke"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, shown(run)
    figures = out.read_text()
    for step in ("throughput.py", "study.py", "search.cli start", "oom.py", "resume.py"):
        assert f"{step} " in figures, f"no {step} step\n{figures[-3000:]}"
    assert "complete 2, pruned 0, fail 0" in figures, figures[-3000:]  # two jobs, one study
    assert figures.rstrip().splitlines()[-1].startswith("done ")
