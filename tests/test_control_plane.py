"""The control plane answers without torch: every command that only reads or writes the study,
every --help and every user error runs in an interpreter that has not imported torch, and
imports none (plotting loads only in `hpo report`).

One fresh interpreter runs the commands one after another (typer's CliRunner, in-process)
and notes which heavy packages each one loaded first: if none is loaded after all of them,
none of them loads one alone. The dashboard runs as the real `hpo` process it is."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer
from test_dashboard import make_study

from search.cli import app
from search.commands.export import best_document, to_yaml

STUDY = "plane"
TRAINING = {"torch", "torchvision"}
PLOTTING = {"plotly", "matplotlib"}
HEAVY = TRAINING | PLOTTING
# argv[1]: a JSON list of `hpo` argument lists; argv[2]: where each one's outcome goes.
RUN_COMMANDS = f"""
import json, sys
from typer.testing import CliRunner
from search.cli import app
def heavy():
    return set({sorted(HEAVY)!r}) & {{name.split(".")[0] for name in sys.modules}}
outcomes, loaded = [], set()  # the first command is charged with what `search.cli` loads
for args in json.loads(sys.argv[1]):
    result = CliRunner().invoke(app, args, prog_name="hpo")
    crashed = result.exception is not None and not isinstance(result.exception, SystemExit)
    now = heavy()
    outcomes.append(dict(code=result.exit_code, output=result.output, crashed=crashed,
                         loaded=sorted(now - loaded)))
    loaded = now
open(sys.argv[2], "w").write(json.dumps(outcomes))
"""
# `hpo` as its entry point runs it; at exit, the heavy packages it imported.
RUN_HPO = f"""
import atexit, json, os, sys
def record():
    loaded = set({sorted(HEAVY)!r}) & {{name.split(".")[0] for name in sys.modules}}
    with open(os.environ["HPO_MODULES_OUT"], "w") as out:
        json.dump(sorted(loaded), out)
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
    ["best", "--study", STUDY, "-o", "best-again.yaml"],
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
    ["ablate", "--study", "missing"],
    ["dashboard", "--storage", "nosuch://host/db"],
]
# Last: they load plotting.
REPORT = ["report", "--study", STUDY, "-o", "report"]
REPORT_ERROR = ["report", "--study", "missing", "-o", "report"]
COMMANDS = [*HELP, *READS, *USER_ERRORS, REPORT, REPORT_ERROR]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite study with complete trials, its best config, a bad space file and a bad config."""
    folder = tmp_path_factory.mktemp("plane")
    study = make_study(storage(folder), STUDY, complete=3)
    (folder / "best.yaml").write_text(to_yaml(best_document(study, storage(folder))))
    (folder / "bad-space.yaml").write_text("channels: [not a list of ints\n")
    (folder / "bad-config.yaml").write_text("model: {n_backbones: -1}\n")
    return folder


@pytest.fixture(scope="module")
def outcomes(workdir: Path) -> dict[str, dict[str, Any]]:
    """Every command of COMMANDS, in order, in one fresh interpreter."""
    out = workdir / "outcomes.json"
    subprocess.run(
        [sys.executable, "-c", RUN_COMMANDS, json.dumps(COMMANDS), str(out)],
        cwd=workdir,
        env=plane_env(workdir),
        check=True,
        timeout=280,
    )
    return dict(zip(map(" ".join, COMMANDS), json.loads(out.read_text()), strict=True))


@pytest.mark.parametrize("args", HELP + READS, ids=" ".join)
def test_light_commands_never_import_torch_or_plotting(
    args: list[str], outcomes: dict[str, dict[str, Any]]
) -> None:
    outcome = outcomes[" ".join(args)]
    assert outcome["code"] == 0, outcome["output"]
    assert not outcome["loaded"], f"hpo {' '.join(args)} imported {outcome['loaded']}"


@pytest.mark.parametrize("args", USER_ERRORS, ids=" ".join)
def test_user_errors_never_import_torch(
    args: list[str], outcomes: dict[str, dict[str, Any]]
) -> None:
    outcome = outcomes[" ".join(args)]
    assert outcome["code"] == 2 and not outcome["crashed"], outcome["output"]
    assert not outcome["loaded"], f"hpo {' '.join(args)} imported {outcome['loaded']}"


def test_report_loads_plotting_but_not_torch(outcomes: dict[str, dict[str, Any]]) -> None:
    outcome = outcomes[" ".join(REPORT)]
    assert outcome["code"] == 0, outcome["output"]
    assert set(outcome["loaded"]) == PLOTTING
    mistake = outcomes[" ".join(REPORT_ERROR)]
    assert mistake["code"] == 2 and not mistake["crashed"], mistake["output"]
    assert not mistake["loaded"]  # nothing beyond the plotting the report loaded


def test_the_dashboard_serves_without_torch(workdir: Path) -> None:
    modules = workdir / "dashboard-modules.json"
    env = {**plane_env(workdir), "HPO_MODULES_OUT": str(modules)}
    args = [sys.executable, "-c", RUN_HPO, "dashboard", "--port", "0"]
    with subprocess.Popen(args, cwd=workdir, env=env, stdout=subprocess.PIPE, text=True) as server:
        try:
            assert server.stdout is not None
            banner = server.stdout.readline()  # printed once it serves
            assert "http://" in banner, banner
        finally:
            server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0
    assert not json.loads(modules.read_text()), "hpo dashboard imported heavy packages"


def storage(workdir: Path) -> str:
    return f"sqlite:///{workdir / 'hpo.db'}"


def plane_env(workdir: Path) -> dict[str, str]:
    """The module's study, and no GPU visible (where one can be, `hpo create` rightly loads
    torch to probe it)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HPO_")}
    return {**env, "HPO_STORAGE": storage(workdir), "CUDA_VISIBLE_DEVICES": "", "COLUMNS": "200"}


def test_the_configs_both_planes_share_import_without_torch() -> None:
    shared = (
        "data, model, search.rules.config, search.rules.space, search.rules.settings, "
        "search.commands.export"
    )
    code = f"import json, sys, {shared}; print(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert not {name.split(".")[0] for name in json.loads(done.stdout)} & HEAVY
