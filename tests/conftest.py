"""Shared fixtures: a small synthetic CIFAR set on disk and a way to run the real `hpo`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

# Under pytest-xdist, four workers share two cores: one compute thread each, in this process
# and in every process it starts. Two threads a worker would spin-wait on each other's core
# (an OpenMP barrier burns CPU while it waits), up to 4x a training test's CPU time. Set
# before torch is imported: torch reads it once.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"

from data.synthetic import write_synthetic  # noqa: E402

HPO = str(Path(sys.executable).parent / "hpo")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    leave_out_smoke(config, items)
    slow_files_first(items)


def leave_out_smoke(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The smoke test (docker/smoke.sh: minutes of podman) runs only where a -m expression
    names it (`pytest -m smoke`): a selection of its own, `-m "not slow"`, leaves it out."""
    if "smoke" in config.option.markexpr:
        return
    smoke = [item for item in items if item.get_closest_marker("smoke")]
    if smoke:
        config.hook.pytest_deselected(items=smoke)
        items[:] = [item for item in items if not item.get_closest_marker("smoke")]


def slow_files_first(items: list[pytest.Item]) -> None:
    """Files with the most slow tests first, each file's tests in their order. Under
    `pytest -n 4 --dist loadfile --no-loadscope-reorder` a worker takes a whole file at a
    time (its module-scoped servers start once), so the files taken last are short ones."""
    slow = Counter(item.path for item in items if item.get_closest_marker("slow"))
    items.sort(key=lambda item: -slow[item.path])


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic set small enough that a tiny trial takes a second or two on a CPU."""
    root = tmp_path_factory.mktemp("data")
    write_synthetic(root, train_per_class=60, test_per_class=20)
    return root


@pytest.fixture
def hpo_env(data_dir: Path, tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HPO_")}
    env.update(
        HPO_DATA_DIR=str(data_dir),
        HPO_STORAGE=f"sqlite:///{tmp_path / 'hpo.db'}",
        COLUMNS="200",
        OMP_NUM_THREADS="1",  # two workers on two cores: no oversubscription
    )
    return env


@pytest.fixture
def own_folder() -> Iterator[Path]:
    """A folder for a server of the test's own (tests/servers.py OwnServer)."""
    # Not under pytest's tmp_path: the postgres user must reach it, and root's is private.
    folder = Path(tempfile.mkdtemp(prefix="hpo-own-server-"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def run_hpo(
    *args: str, env: dict[str, str], cwd: Path, timeout: float = 300
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [HPO, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def tiny_start(study: str, trials: int, *extra: str) -> list[str]:
    return [
        "start", "--study", study, "--trials", str(trials), "--space", "tiny",
        "--dataset", "synthetic", "--epochs", "2", *extra,
    ]  # fmt: skip
