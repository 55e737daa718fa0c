"""A compile the disk refuses (a full disk under torch.compile's caches) is the machine's
fault, not the config's: a trial is handed back (a stop, re-queued) and its worker exits 75;
`hpo train`, which compiles on CUDA, says it in one line and exits 75 too. Real compiles on
the CPU, their caches on a full tmpfs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from conftest import run_hpo, tiny_start
from optuna.trial import TrialState
from test_machine_faults import fill, small_disk  # noqa: F401  (a fixture, found by name)

from search.rules import attrs
from search.rules.faults import EXIT_MACHINE_FAULT
from search.rules.study import budget
from storage import open_storage
from storage.optuna_private import replaced_number

# Each test compiles for real, in a process of its own.
pytestmark = pytest.mark.slow

# A command of the real `hpo` app that compiles as `hpo train` does on CUDA (a CPU never does).
COMPILES_UNDER_THE_CLI = """
import torch
from search.cli import app, user_errors

@app.command("compile-one")
def compile_one() -> None:
    with user_errors():
        torch.compile(torch.nn.Conv2d(3, 4, 3))(torch.randn(2, 3, 8, 8))

app(["compile-one"])
"""


def caches_on(disk: Path, env: dict[str, str]) -> dict[str, str]:
    cache = disk / "compile"
    return {**env, "TORCHINDUCTOR_CACHE_DIR": str(cache), "TRITON_CACHE_DIR": str(cache / "t")}


def test_a_trial_whose_compile_the_disk_refuses_is_handed_back(
    small_disk: Path,  # noqa: F811
    hpo_env: dict,
    tmp_path: Path,
) -> None:
    """Before: the trial failed for good as the config's error, and the next one the same."""
    fill(small_disk)
    env = caches_on(small_disk, hpo_env)
    result = run_hpo(*tiny_start("c", 2, "--compile", "on"), env=env, cwd=tmp_path)
    said = result.stdout + result.stderr
    assert result.returncode == EXIT_MACHINE_FAULT and "Traceback" not in said, said
    assert result.stderr.count("\n") == 1, said
    assert result.stderr.startswith(
        f"error: trial 0: torch.compile's cache not written to {small_disk}"
    )
    assert "No space left on device; handed back" in result.stderr, said
    study = optuna.load_study(study_name="c", storage=open_storage(hpo_env["HPO_STORAGE"]))
    assert budget(study).given_up == 0
    [handed_back] = study.get_trials(states=(TrialState.FAIL,))
    assert handed_back.user_attrs[attrs.FAIL_REASON].startswith(attrs.STOPPED_PREFIX)
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert [replaced_number(t) for t in waiting].count(handed_back.number) == 1  # its retry
    shown = run_hpo("status", "--study", "c", env=hpo_env, cwd=tmp_path)
    assert "No space left on device" in shown.stdout, shown.stdout


def test_a_command_whose_compile_the_disk_refuses_exits_75_in_one_line(
    small_disk: Path,  # noqa: F811
    hpo_env: dict,
    tmp_path: Path,
) -> None:
    """What `hpo train` meets on CUDA, where it compiles from the start. Before: a traceback."""
    fill(small_disk)
    result = subprocess.run(
        [sys.executable, "-c", COMPILES_UNDER_THE_CLI],
        env=caches_on(small_disk, hpo_env), cwd=tmp_path, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    said = result.stdout + result.stderr
    assert result.returncode == EXIT_MACHINE_FAULT and "Traceback" not in said, said
    assert result.stderr.startswith("error: torch.compile's cache not written to ")
    assert result.stderr.endswith(": No space left on device\n"), said
    assert result.stderr.count("\n") == 1, said
