"""The benches that train, each at its smallest size (see tests/test_bench.py, which runs the
others), and bench/gpu.sh's steps end to end: a file of their own so that pytest-xdist runs
them beside the rest. The GPU script's smoke run is the smoke run of the training benches it
calls (one run each, not two); the others run here on their own."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import test_bench
from test_bench import ROOT, TRAINING, assert_runs_at_its_smallest_size, bench_env, shown

scratch = test_bench.scratch  # the fixture, found by name here

GPU_SCRIPT = ROOT / "bench" / "gpu.sh"
# The benches `bench/gpu.sh --smoke` runs, each at its smallest size, and the steps it names.
IN_GPU_SCRIPT = ("throughput.py", "study.py", "oom.py", "resume.py")


@pytest.mark.slow
@pytest.mark.parametrize("name", [name for name in TRAINING if name not in IN_GPU_SCRIPT])
def test_training_bench_runs_at_its_smallest_size(name: str, scratch: Path) -> None:
    assert_runs_at_its_smallest_size(ROOT / "bench" / name, scratch)


@pytest.mark.slow
def test_gpu_script_runs_every_step_on_the_cpu(scratch: Path) -> None:
    smoke = GPU_SCRIPT.read_text().rsplit('if [[ "$SMOKE" == true ]]', 1)[1].split("elif")[0]
    assert all(f"bench/{name} --smoke" in smoke for name in IN_GPU_SCRIPT), smoke
    out = scratch / "figures.txt"
    env = {**bench_env(scratch), "PYTHON": sys.executable, "OUT": str(out),
           "DATA": str(scratch / "data")}  # fmt: skip
    run = subprocess.run(
        ["bash", str(GPU_SCRIPT), "--smoke"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, shown(run)  # set -e: any step that fails ends it
    figures = out.read_text()
    for step in (*IN_GPU_SCRIPT, "search.cli start"):
        assert f"{step} " in figures, f"no {step} step\n{figures[-3000:]}"
    assert "complete 2, pruned 0, fail 0" in figures, figures[-3000:]  # two jobs, one study
    assert figures.rstrip().splitlines()[-1].startswith("done ")
