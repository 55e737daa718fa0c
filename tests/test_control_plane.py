"""The control plane answers without torch: every command that only reads or writes the study,
every --help and every user error runs in a fresh interpreter that never imports torch (and
plotting loads only in `hpo report`). Each case is one real `hpo` process."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from test_dashboard import make_study

from search.cli import app
from search.export import best_document, to_yaml

STUDY = "plane"
TRAINING = {"torch", "torchvision"}
PLOTTING = {"plotly", "matplotlib"}
# `hpo` as its entry point runs it, and at exit the heavy packages it imported.
RUN_HPO = """
import atexit, json, os, sys
HEAVY = {"torch", "torchvision", "plotly", "matplotlib"}
def record():
    with open(os.environ["HPO_MODULES_OUT"], "w") as out:
        json.dump(sorted(HEAVY & {name.split(".")[0] for name in sys.modules}), out)
atexit.register(record)
from search.cli import main
sys.argv[0] = "hpo"
main()
"""

SUBCOMMANDS = sorted(typer.main.get_command(app).commands)  # type: ignore[attr-defined]
HELP = [["--help"], *([name, "--help"] for name in SUBCOMMANDS)]
READS = [
    ["status"],
    ["status", "--study", STUDY],
    ["best", "--study", STUDY],
    ["best", "--study", STUDY, "--pareto"],
    ["best", "--study", STUDY, "--trial", "0"],
    ["best", "--study", STUDY, "-o", "best.yaml"],
    ["create", "--study", "fresh", "--trials", "3", "--space", "tiny", "--dataset", "synthetic"],
]
USER_ERRORS = [
    ["status", "--no-such-flag"],
    ["status", "--storage", "nosuch://host/db"],
    ["best", "--study", "missing"],
    ["create", "--study", "x", "--trials", "2", "--space", "missing.yaml"],
    ["start", "--study", "x", "--trials", "2", "--space", "bad-space.yaml"],
    ["worker", "--study", "missing"],
    ["train", "--config", "missing.yaml"],
    ["train", "--config", "bad-config.yaml"],
    ["train", "--config", "best.yaml", "--storage", "nosuch://host/db"],
    ["compare", "--study", "missing"],
    ["dashboard", "--storage", "nosuch://host/db"],
]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite study with complete trials, its best config, a bad space file and a bad config."""
    folder = tmp_path_factory.mktemp("plane")
    study = make_study(storage(folder), STUDY, complete=3)
    (folder / "best.yaml").write_text(to_yaml(best_document(study, storage(folder))))
    (folder / "bad-space.yaml").write_text("channels: [not a list of ints\n")
    (folder / "bad-config.yaml").write_text("model: {n_backbones: -1}\n")
    return folder


def heavy_modules(
    args: list[str], workdir: Path, env: dict[str, str]
) -> tuple[subprocess.CompletedProcess, set[str]]:
    modules = workdir / "modules.json"
    modules.unlink(missing_ok=True)
    done = subprocess.run(
        [sys.executable, "-c", RUN_HPO, *args],
        cwd=workdir,
        env=plane_env(env, workdir, modules),
        capture_output=True,
        text=True,
        timeout=120,
    )
    return done, set(json.loads(modules.read_text()))


@pytest.mark.parametrize("args", HELP + READS, ids=" ".join)
def test_light_commands_never_import_torch_or_plotting(
    args: list[str], workdir: Path, hpo_env: dict[str, str]
) -> None:
    done, heavy = heavy_modules(args, workdir, hpo_env)
    assert done.returncode == 0, done.stderr
    assert not heavy, f"hpo {' '.join(args)} imported {sorted(heavy)}"


@pytest.mark.parametrize("args", USER_ERRORS, ids=" ".join)
def test_user_errors_never_import_torch(
    args: list[str], workdir: Path, hpo_env: dict[str, str]
) -> None:
    done, heavy = heavy_modules(args, workdir, hpo_env)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert not heavy, f"hpo {' '.join(args)} imported {sorted(heavy)}"


def test_report_loads_plotting_but_not_torch(workdir: Path, hpo_env: dict[str, str]) -> None:
    done, heavy = heavy_modules(["report", "--study", STUDY, "-o", "report"], workdir, hpo_env)
    assert done.returncode == 0, done.stderr
    assert heavy == PLOTTING
    done, heavy = heavy_modules(["report", "--study", "missing", "-o", "report"], workdir, hpo_env)
    assert done.returncode == 2, done.stderr
    assert not heavy & TRAINING


def test_the_dashboard_serves_without_torch(workdir: Path, hpo_env: dict[str, str]) -> None:
    modules = workdir / "dashboard-modules.json"
    env = plane_env(hpo_env, workdir, modules)
    args = [sys.executable, "-c", RUN_HPO, "dashboard", "--port", "0"]
    with subprocess.Popen(args, cwd=workdir, env=env, stdout=subprocess.PIPE, text=True) as server:
        try:
            assert server.stdout is not None
            banner = server.stdout.readline()  # printed once it serves
            assert "http://" in banner, banner
        finally:
            server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0
    assert not set(json.loads(modules.read_text())), "hpo dashboard imported heavy packages"


def storage(workdir: Path) -> str:
    return f"sqlite:///{workdir / 'hpo.db'}"


def plane_env(hpo_env: dict[str, str], workdir: Path, modules: Path) -> dict[str, str]:
    """The module study's storage, where the modules go, and no GPU (where one can be, `hpo
    create` rightly loads torch to probe it)."""
    return {
        **hpo_env,
        "HPO_STORAGE": storage(workdir),
        "HPO_MODULES_OUT": str(modules),
        "CUDA_VISIBLE_DEVICES": "",
    }
