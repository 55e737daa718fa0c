"""The `hpo` command end to end, as a user runs it: real processes on a real SQLite file."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import HPO, run_hpo, tiny_start
from optuna.artifacts import FileSystemArtifactStore
from optuna.trial import TrialState
from test_dashboard import make_study
from typer.testing import CliRunner

from search.cli import app
from search.rules import attrs
from search.rules.artifacts import artifact_dir
from search.rules.config import TrialConfig
from search.rules.cost import gflops_per_image
from search.rules.study import budget
from storage import open_storage

# Each test runs several real `hpo` processes (seconds each): the quick tier leaves them out,
# tests/test_control_plane.py runs the commands' user errors in one interpreter.
pytestmark = pytest.mark.slow


def load(env: dict[str, str], name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=open_storage(env["HPO_STORAGE"]))


def test_start_status_best_train_and_the_target_moves(
    hpo_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One study through every step a user takes: start, a start whose target is met, one
    that moves the target, status, best, train."""
    started = run_hpo(*tiny_start("demo", 4), env=hpo_env, cwd=tmp_path)
    assert started.returncode == 0, started.stderr
    assert "created study 'demo'" in started.stdout
    assert "epoch   1/2" in started.stdout
    assert "CUDA is not available" in started.stdout
    assert "4/4 trials finished" in started.stdout

    # Pruned trials drop their checkpoints; complete ones keep theirs for the dashboard.
    checkpoints = artifact_dir(None, hpo_env["HPO_STORAGE"])
    complete = [t for t in load(hpo_env, "demo").trials if t.state == TrialState.COMPLETE]
    assert len([p for p in checkpoints.iterdir() if p.is_file()]) == len(complete)

    # Every trial records what it costs to train, and the objective has its name.
    for trial in complete:
        cfg = TrialConfig.from_dict(trial.user_attrs[attrs.CONFIG])
        gflop = float(f"{gflops_per_image(cfg.model):.4g}")
        assert trial.user_attrs[attrs.GFLOPS] == gflop > 0
    assert load(hpo_env, "demo").metric_names == ["validation loss"]

    # A met target runs nothing. (A flag that contradicts the study, refused with both values
    # and nothing changed: tests/test_hardening.py's refused start.)
    again = run_hpo(*tiny_start("demo", 4), env=hpo_env, cwd=tmp_path)
    assert again.returncode == 0 and "nothing to run" in again.stdout
    assert budget(load(hpo_env, "demo")).target == 4
    # A start with a higher target moves it, and runs only the trials it adds.
    extended = run_hpo("start", "--study", "demo", "--trials", "5", env=hpo_env, cwd=tmp_path)
    assert extended.returncode == 0, extended.stderr
    state = budget(load(hpo_env, "demo"))
    assert (state.finished, state.target) == (5, 5)

    # status and best through CliRunner in this process (`hpo` is `app()` and nothing more:
    # the same code without a process start of seconds each).
    monkeypatch.chdir(tmp_path)
    runner = CliRunner(env={**{k: None for k in os.environ if k.startswith("HPO_")}, **hpo_env})
    status = runner.invoke(app, ["status", "--study", "demo"])
    assert status.exit_code == 0, status.output
    assert "5 / 5" in status.stdout

    best = runner.invoke(app, ["best", "--study", "demo", "-o", "best.yaml"])
    assert best.exit_code == 0, best.output
    document = yaml.safe_load((tmp_path / "best.yaml").read_text())
    assert set(document) == {"model", "train", "augment", "metrics", "source", "versions"}
    study = load(hpo_env, "demo")
    assert document["source"]["trial"] == study.best_trial.number
    assert document["metrics"]["score"] == study.best_value
    assert document["train"]["epochs"] == 2

    trained = run_hpo(
        "train", "--config", "best.yaml", "--dataset", "synthetic", "--epochs", "1",
        "--output-dir", "final", env=hpo_env, cwd=tmp_path,
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr
    assert "test accuracy" in trained.stdout
    metrics = json.loads((tmp_path / "final" / "metrics.json").read_text())
    assert 0.0 <= metrics["test_acc"]["mean"] <= 1.0 and metrics["epochs"] == 1
    weights = (tmp_path / "final" / "model-seed0.pt").read_bytes()
    assert weights

    # The weights and metrics are artifacts of the study the config came from.
    assert "attached model-seed0.pt, metrics.json, learning-rate.png" in trained.stdout
    final = load(hpo_env, "demo").user_attrs[attrs.FINAL]
    assert final["trial"] == study.best_trial.number
    assert final["test_acc"] == metrics["test_acc"]["mean"]
    store = FileSystemArtifactStore(str(artifact_dir(None, hpo_env["HPO_STORAGE"])))
    with store.open_reader(final["artifacts"]["model-seed0.pt"]) as stored:
        assert stored.read() == weights


def test_two_starts_on_one_sqlite_file_stop_at_exactly_n(
    hpo_env: dict[str, str], tmp_path: Path
) -> None:
    command = [HPO, *tiny_start("shared", 7)]
    workers = [
        subprocess.Popen(command, env=hpo_env, cwd=tmp_path, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [worker.communicate(timeout=600)[0] for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0], outputs
    study = load(hpo_env, "shared")
    trials = study.get_trials()
    assert len(trials) == 7
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    assert sorted(t.number for t in trials) == list(range(7))
    # Both processes did part of the work, and no trial ran twice.
    ran = [re.findall(r"^\[\d+/7\] trial (\d+)", output, re.MULTILINE) for output in outputs]
    assert all(ran), outputs
    assert sorted(int(n) for n in ran[0] + ran[1]) == list(range(7))


def expect_user_error(result: subprocess.CompletedProcess, *words: str) -> None:
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    message = result.stderr.strip()
    assert message.count("\n") == 0, message
    for word in words:
        assert word in message


def test_bad_input_is_one_line_and_exit_2(
    hpo_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker and start paths as real processes; the rest of the user errors through
    CliRunner in this process (`hpo` is `app()` and nothing more: the same code, no process
    start of seconds each)."""
    monkeypatch.chdir(tmp_path)  # the relative files below, as a user's shell has them
    runner_env: dict[str, str | None] = {k: None for k in os.environ if k.startswith("HPO_")}

    def hpo(*args: str, **env: str) -> subprocess.CompletedProcess:
        result = CliRunner(env={**runner_env, **hpo_env, **env}).invoke(app, args)
        crashed = result.exception is not None and not isinstance(result.exception, SystemExit)
        assert not crashed, result.output  # a traceback, had it been a process
        return subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)

    # A study with no finished trial (`hpo start --timeout 0` leaves one so).
    make_study(hpo_env["HPO_STORAGE"], "empty", complete=0, pruned=0, failed=0)

    # Real processes: a worker on a study that is not there, a start with no dataset.
    worker = run_hpo("worker", "--study", "nope", env=hpo_env, cwd=tmp_path)
    expect_user_error(worker, "no study named 'nope'")
    empty = tmp_path / "no-cifar"
    started = run_hpo(
        "start", "--study", "real", "--trials", "1", "--data-dir", str(empty),
        env=hpo_env, cwd=tmp_path,
    )  # fmt: skip
    expect_user_error(started, "cifar-10", str(empty))

    expect_user_error(hpo("status", "--storage", "sqlite:/x.db"), "storage URL")
    expect_user_error(hpo("status", "--storage", "oracle://u:secret@h/db"), "u:***@h")
    missing = tmp_path / "elsewhere" / "hpo.db"
    elsewhere = f"sqlite:///{missing}"
    expect_user_error(hpo("status", "--storage", elsewhere), "no SQLite database")
    expect_user_error(hpo("worker", "--study", "s", "--storage", elsewhere), "no SQLite database")
    assert not missing.parent.exists()

    expect_user_error(hpo("best", "--study", "empty"), "no completed trial")
    expect_user_error(hpo("status", "--study", "nope"), "no study named 'nope'")
    expect_user_error(hpo("best", "--study", "nope"), "no study named 'nope'")

    (tmp_path / "space.yaml").write_text("width: [64]\n")
    expect_user_error(hpo(*tiny_start("s", 2, "--space", "space.yaml")), "width")
    (tmp_path / "space2.yaml").write_text("widht: [8, 16]\n")
    expect_user_error(hpo(*tiny_start("s", 2, "--space", "space2.yaml")), "widht")
    expect_user_error(hpo(*tiny_start("s", 2, "--space", "missing.yaml")), "missing.yaml")

    (tmp_path / "bad.yaml").write_text(
        "model: {channels: [[3, 16], [32, 64]], blocks: [1, 1]}\ntrain: {}\n"
    )
    expect_user_error(hpo("train", "--config", "bad.yaml", "--dataset", "synthetic"), "channels")
    expect_user_error(hpo("train", "--config", "nothing.yaml"), "nothing.yaml")

    server = "postgresql+psycopg://postgres@127.0.0.1:1/hpo_test"
    for timeout in ("soon", "0", "inf"):
        result = hpo("worker", "--study", "s", "--storage", server, HPO_STORAGE_TIMEOUT_S=timeout)
        expect_user_error(
            result, f"HPO_STORAGE_TIMEOUT_S must be a positive number, not {timeout!r}"
        )


def test_train_attaches_to_the_study_its_config_came_from_in_any_folder(
    hpo_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`hpo best` in the study's folder (the default, relative `sqlite:///hpo.db`), then
    `hpo train --config` from another folder without --storage: the results go to that
    study. A config whose storage had its password redacted is attached nowhere, said once."""
    env = {k: v for k, v in hpo_env.items() if k != "HPO_STORAGE"}
    search, elsewhere = tmp_path / "search", tmp_path / "elsewhere"
    search.mkdir()
    elsewhere.mkdir()
    make_study(f"sqlite:///{search / 'hpo.db'}", "demo", complete=1, pruned=0, failed=0)
    monkeypatch.chdir(search)  # `hpo best` in this process, run from the study's folder
    best = CliRunner(env={k: None for k in os.environ if k.startswith("HPO_")}).invoke(
        app, ["best", "--study", "demo", "-o", "best.yaml"]
    )
    assert best.exit_code == 0, best.output
    config = search / "best.yaml"
    document = yaml.safe_load(config.read_text())
    assert document["source"]["storage"] == f"sqlite:///{search / 'hpo.db'}"  # absolute
    train = ["train", "--dataset", "synthetic", "--epochs", "1", "--output-dir", "final"]
    trained = run_hpo(*train, "--config", str(config), env=env, cwd=elsewhere)
    assert trained.returncode == 0, trained.stderr
    assert "to study 'demo'" in trained.stdout and "not attached" not in trained.stdout
    study = optuna.load_study(study_name="demo", storage=open_storage(f"sqlite:///{search}/hpo.db"))
    assert study.user_attrs[attrs.FINAL]["trial"] == document["source"]["trial"]
    assert not (elsewhere / "hpo.db").exists()

    document["source"]["storage"] = "postgresql+psycopg://hpo:***@127.0.0.1:5432/hpo"
    redacted = tmp_path / "redacted.yaml"
    redacted.write_text(yaml.safe_dump(document))
    train[-1] = str(elsewhere / "final")
    refused = CliRunner(env={"HPO_STORAGE": None, "HPO_DATA_DIR": env["HPO_DATA_DIR"]}).invoke(
        app, [*train, "--config", str(redacted)]
    )  # in this process: one training less to start
    assert refused.exit_code == 0, refused.output
    assert (
        "not attached to study 'demo': the config's storage "
        "postgresql+psycopg://hpo:***@127.0.0.1:5432/hpo has its password redacted; give "
        "--storage (or HPO_STORAGE) to attach"
    ) in refused.stdout.replace("\n", " ")
