"""`hpo dashboard` as a user runs it: a real server process, its JSON API, headless Chromium."""

from __future__ import annotations

import json
import math
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import optuna
import pytest
from conftest import HPO, run_hpo, tiny_start
from optuna.trial import TrialState
from optuna_dashboard import get_note
from servers import IN_CI
from typer.testing import CliRunner

from model.counts import count_parameters
from model.network import build_model
from search.cli import app
from search.commands.dashboard import (
    DashboardError,
    exposure_warning,
    open_dashboard,
    write_study_note,
)
from search.rules import attrs
from search.rules.artifacts import artifact_dir
from search.rules.cost import gflops_per_image
from search.rules.settings import StudySettings
from search.rules.space import load_space, sample_config
from search.rules.study import budget, create_or_join, join, load_settings
from search.training.checkpoints import CheckpointStore
from search.training.objective import describe_architecture
from storage import open_storage

EPOCHS = 3
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1400,1000",
    # Virtual time stands still while a fetch is pending, so the SPA's API calls finish.
    "--virtual-time-budget=15000",
)


# --- helpers shared with test_report.py -------------------------------------------------


def make_study(
    url: str, name: str, complete: int, pruned: int = 1, failed: int = 1
) -> optuna.Study:
    """A study made as `hpo start` makes one (settings, note, tickets), its trials told by hand
    instead of trained: sampled configs, per-epoch validation losses, the objective's user
    attrs and a checkpoint artifact each. Pruned and failed trials come second and third."""
    storage = open_storage(url)
    settings = StudySettings(
        space_name="tiny",
        space=load_space("tiny").to_dict(),
        epochs=EPOCHS,
        dataset="synthetic",
        pruner="median",
        seed=0,
        heartbeat_s=60,
    )
    states = [TrialState.COMPLETE] * complete
    states[1:1] = [TrialState.PRUNED] * pruned + [TrialState.FAIL] * failed
    create_or_join(storage, name, settings, len(states))
    write_study_note(join(storage, name), settings, len(states))
    # Seeded: the same configs every run (a random front of one trial made tests flaky).
    sampler = optuna.samplers.RandomSampler(seed=0)
    study = optuna.load_study(study_name=name, storage=storage, sampler=sampler)
    checkpoints = CheckpointStore(artifact_dir(None, url))
    for state in states:
        _tell_trial(study, settings, state, checkpoints)
    return study


def _tell_trial(
    study: optuna.Study, settings: StudySettings, state: TrialState, store: CheckpointStore
) -> None:
    trial = study.ask()  # claims the next ticket, as a worker does
    cfg = sample_config(trial, settings.search_space(), settings.epochs)
    trial.set_user_attr("config", cfg.to_dict())
    trial.set_user_attr("architecture", describe_architecture(cfg))
    trial.set_user_attr("params", count_parameters(build_model(cfg.model)))
    trial.set_user_attr(attrs.GFLOPS, gflops_per_image(cfg.model))
    trial.set_user_attr("gpu", "cpu")
    trial.set_user_attr("host", "test")
    if state == TrialState.FAIL:
        trial.set_user_attr("fail_reason", "RuntimeError: out of memory")
        study.tell(trial, state=state)
        return
    epochs = 1 if state == TrialState.PRUNED else settings.epochs
    losses = [2.3 * math.exp(-epoch * cfg.train.lr * 20) for epoch in range(1, epochs + 1)]
    for epoch, loss in enumerate(losses, start=1):
        trial.report(loss, epoch)
        store.save(trial, {"epoch": epoch, "model": {}})
    trial.set_user_attr("val_acc", round(1 - min(losses) / 2.5, 4))
    trial.set_user_attr("images_per_s", 1234.5)
    study.tell(trial, min(losses) if state == TrialState.COMPLETE else None, state=state)


def chromium() -> str:
    """Chromium's path; CI must have it, elsewhere its absence skips the browser test."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if IN_CI:
        pytest.fail("chromium is missing in CI (.ci/run installs Debian's chromium package)")
    pytest.skip("chromium is not installed (apt-get install -y chromium)")


def render(url: str, profile: Path, screenshot: Path, *flags: str) -> str:
    """The DOM of `url` after headless Chromium ran its scripts; a screenshot beside it."""
    done = subprocess.run(
        [
            chromium(),
            *CHROMIUM_FLAGS,
            f"--user-data-dir={profile}",
            f"--screenshot={screenshot}",
            "--dump-dom",
            *flags,
            url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    print(f"screenshot: {screenshot}")
    return done.stdout


def visible_text(dom: str) -> str:
    dom = re.sub(r"<(style|script)\b.*?</\1>", " ", dom, flags=re.DOTALL)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom))


# --- the dashboard process ---------------------------------------------------------------


@dataclass(frozen=True)
class Served:
    base: str  # http://127.0.0.1:PORT
    stderr: Path

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(self.base + path, timeout=30) as response:
            return json.load(response)

    def study_id(self, name: str) -> int | None:
        studies = self.get("/api/studies")["study_summaries"]
        return next((s["study_id"] for s in studies if s["study_name"] == name), None)


@contextmanager
def dashboard(
    env: dict[str, str], cwd: Path, *args: str, background: bool = False
) -> Iterator[Served]:
    """`hpo dashboard --port 0 ARGS` until the block ends, then Ctrl-C, which must exit 0.

    background: start it as a script's `cmd &` does, with SIGINT ignored.
    """
    out, err = cwd / "dashboard.out", cwd / "dashboard.err"
    ignore_sigint = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if background else None
    with out.open("w") as stdout, err.open("w") as stderr:
        process = subprocess.Popen(
            [HPO, "dashboard", "--port", "0", *args],
            env=env, cwd=cwd, stdout=stdout, stderr=stderr, preexec_fn=ignore_sigint,
        )  # fmt: skip
    try:
        port = _wait_for_port(process, out, err)
        yield Served(base=f"http://127.0.0.1:{port}", stderr=err)
    finally:
        process.send_signal(signal.SIGINT)
        code = process.wait(timeout=30)
    assert code == 0, err.read_text()


def _wait_for_port(process: subprocess.Popen, out: Path, err: Path) -> int:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        found = re.search(r"at http://\S+:(\d+)/dashboard", out.read_text())
        if found:
            return int(found.group(1))
        assert process.poll() is None, f"hpo dashboard exited: {err.read_text()}"
        time.sleep(0.2)
    raise AssertionError(f"hpo dashboard printed no URL: {out.read_text()} {err.read_text()}")


# --- tests --------------------------------------------------------------------------------


@pytest.mark.slow
def test_dashboard_shows_the_study_in_chromium(hpo_env: dict[str, str], tmp_path: Path) -> None:
    chromium()  # skips (or fails, in CI) before any work
    study = make_study(hpo_env["HPO_STORAGE"], "mixed", complete=3)
    with dashboard(hpo_env, tmp_path) as served:
        study_id = served.study_id("mixed")
        assert study_id is not None
        detail = served.get(f"/api/studies/{study_id}")
        states = Counter(trial["state"] for trial in detail["trials"])
        assert states == {"Complete": 3, "Pruned": 1, "Fail": 1}
        assert "Backbone search `mixed`" in detail["note"]["body"]
        best = study.best_trial
        shown = next(t for t in detail["trials"] if t["number"] == best.number)
        attrs = {attr["key"] for attr in shown["user_attrs"]}
        assert {"val_acc", "images_per_s", "params", "architecture", "config"} <= attrs
        assert [s["step"] for s in shown["intermediate_values"]] == list(range(1, EPOCHS + 1))
        # The checkpoint is an artifact the dashboard can hand out.
        checkpoint = best.user_attrs["checkpoint"]["artifact_id"]
        assert checkpoint in {a["artifact_id"] for a in shown["artifacts"]}
        artifact = f"/artifacts/{study_id}/{shown['trial_id']}/{checkpoint}"
        with urllib.request.urlopen(served.base + artifact, timeout=30) as response:
            assert response.status == 200 and response.read()

        screenshot = tmp_path / "dashboard.png"
        page = f"{served.base}/dashboard/studies/{study_id}/trials"
        text = visible_text(render(page, tmp_path / "chromium", screenshot))
    assert "mixed" in text
    for trial in study.trials:
        assert f"Trial {trial.number}" in text
    assert {"Complete", "Pruned", "Fail"} <= set(text.split())
    assert screenshot.stat().st_size > 10_000


@pytest.mark.slow
def test_dashboard_polling_beside_a_running_worker_locks_nothing(
    hpo_env: dict[str, str], tmp_path: Path
) -> None:
    make_study(hpo_env["HPO_STORAGE"], "other", complete=1)  # the file the dashboard opens
    with dashboard(hpo_env, tmp_path, "--host", "0.0.0.0") as served:
        # Polling runs from before the worker starts until after it ends.
        poller = Poller(served, "live")
        poller.start()
        worker = run_hpo(*tiny_start("live", 2), env=hpo_env, cwd=tmp_path)
        poller.stop_once_finished(2)
    output = worker.stdout + worker.stderr
    assert worker.returncode == 0, output
    assert "database is locked" not in output and "Traceback" not in output
    assert not poller.errors, poller.errors[:3]
    assert poller.reads > 10
    assert poller.last_finished == 2  # the dashboard followed the worker's trials live
    live = optuna.load_study(study_name="live", storage=open_storage(hpo_env["HPO_STORAGE"]))
    assert budget(live).finished == 2
    assert "no authentication" in served.stderr.read_text()


class Poller(threading.Thread):
    """Asks the dashboard's API 20 times a second, far more often than the page does."""

    def __init__(self, served: Served, study: str):
        super().__init__(daemon=True)
        self.served, self.study = served, study
        self.halt = threading.Event()
        self.target, self.reached = 0, threading.Event()
        self.reads, self.last_finished = 0, 0
        self.errors: list[str] = []

    def run(self) -> None:
        while not self.halt.is_set():
            try:
                self._poll()
            except Exception as err:  # any failed read is what the test reports
                self.errors.append(repr(err))
            self.reads += 1
            time.sleep(0.05)

    def _poll(self) -> None:
        study_id = self.served.study_id(self.study)
        if study_id is None:
            return
        trials = self.served.get(f"/api/studies/{study_id}")["trials"]
        self.last_finished = sum(t["state"] in ("Complete", "Pruned", "Fail") for t in trials)
        if self.target and self.last_finished >= self.target:
            self.reached.set()

    def stop_once_finished(self, trials: int) -> None:
        """Stop after a read shows `trials` finished (the dashboard caches for 2 s)."""
        self.target = trials
        self.reached.wait(timeout=60)
        self.halt.set()
        self.join(timeout=60)


@pytest.mark.slow
def test_ctrl_c_stops_a_dashboard_started_in_the_background(
    hpo_env: dict[str, str], tmp_path: Path
) -> None:
    make_study(hpo_env["HPO_STORAGE"], "s", complete=1, pruned=0, failed=0)
    with dashboard(hpo_env, tmp_path, background=True) as served:
        assert served.get("/api/studies")["study_summaries"]
    # Leaving the block sent SIGINT and asserted exit code 0.


def test_dashboard_refuses_a_missing_file_and_a_busy_port(
    hpo_env: dict[str, str], tmp_path: Path
) -> None:
    typo = f"sqlite:///{tmp_path / 'typo.db'}"
    missing = CliRunner().invoke(app, ["dashboard", "--storage", typo])
    assert missing.exit_code == 2
    assert missing.stderr.startswith("error: no SQLite database at")
    assert missing.stderr.count("\n") == 1
    assert not (tmp_path / "typo.db").exists()

    url = hpo_env["HPO_STORAGE"]
    make_study(url, "s", complete=1, pruned=0, failed=0)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(DashboardError, match=f"cannot listen on 127.0.0.1:{port}"):
            open_dashboard(url, "127.0.0.1", port, tmp_path / "artifacts")


def test_only_loopback_hosts_are_quiet_and_passwords_stay_hidden(tmp_path: Path) -> None:
    for host in ("127.0.0.1", "::1", "localhost"):
        assert exposure_warning(host) is None
    for host in ("0.0.0.0", "192.168.1.7", "dashboard.example.org"):
        assert "no authentication" in (exposure_warning(host) or "")

    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    make_study(url, "s", complete=1, pruned=0, failed=0)
    opened = open_dashboard(url, "127.0.0.1", 0, tmp_path / "artifacts")
    opened.server.server_close()
    secret = replace(opened, storage_url="postgresql+psycopg://hpo:s3cret@db:5432/hpo")
    assert "s3cret" not in secret.banner() and "hpo:***@db:5432" in secret.banner()


def test_a_new_study_carries_a_note_with_its_settings(tmp_path: Path) -> None:
    study = make_study(f"sqlite:///{tmp_path / 'hpo.db'}", "noted", complete=1, pruned=0, failed=0)
    note = get_note(study)
    assert "Backbone search `noted`" in note
    assert "| target | 1 finished trials" in note
    assert "| epochs per trial | 3 |" in note
    assert "| pruner | median" in note
    assert "schedulers:" in note  # the whole search space, as YAML


@pytest.mark.slow
def test_dashboard_calls_the_objective_validation_loss(
    hpo_env: dict[str, str], tmp_path: Path
) -> None:
    chromium()  # skips (or fails, in CI) before any work
    url = hpo_env["HPO_STORAGE"]
    make_study(url, "named", complete=2, pruned=0, failed=0)
    # A study made before `hpo` named the objective: the dashboard names it when it opens.
    storage = open_storage(url)
    older = optuna.create_study(study_name="older", storage=storage)
    older.set_user_attr("hpo:settings", load_settings(storage, "named").to_dict())
    older.add_trial(optuna.trial.create_trial(value=1.5, intermediate_values={1: 1.7, 2: 1.5}))
    assert older.metric_names is None
    with dashboard(hpo_env, tmp_path) as served:
        ids = {name: served.study_id(name) for name in ("named", "older")}
        for study_id in ids.values():
            detail = served.get(f"/api/studies/{study_id}")
            assert detail["objective_names"] == ["validation loss"]
        page = f"{served.base}/dashboard/studies/{ids['older']}"
        text = visible_text(render(page, tmp_path / "chromium", tmp_path / "older.png"))
    # The history plot's axis and the trial table's column, as the user reads them.
    assert "validation loss" in text
    assert "Objective 0" not in text
