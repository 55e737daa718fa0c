"""Trials where ML engineers already look: a study logged to a real MLflow tracking server
(SQLite backend, its own artifact folder, a free port) and to a TensorBoard folder, through real
`hpo` processes; read back with MLflow's client and TensorBoard's own reader and server, and
opened in headless Chromium. A tracker that is down is never the trial's problem."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import optuna
import pytest
from conftest import HPO, run_hpo
from optuna.trial import TrialState
from optuna_dashboard import get_note
from servers import OwnServer, free_port
from test_dashboard import render, visible_text
from test_pruning import GOOD
from typer.testing import CliRunner

from search.cli import app
from search.commands.launch import StudyRequest
from search.rules import attrs
from search.rules.study import budget, create_or_join, join
from search.rules.trackers import mlflow_run_id
from storage import open_storage
from storage.optuna_private import retry_of

STUDY = "tracked"
BIN = Path(sys.executable).parent
# Trials of the tiny space that learn (test_pruning's), and one that learns next to nothing:
# with four complete before it, the median pruner stops it after its first epoch.
BAD = {**GOOD, "lr": 1e-6}


# The tracking server alone: MLflow 3's background-job runners (three huey consumers, seconds
# of CPU each at every start) serve its GenAI jobs, which no test here uses.
SERVER_ENV = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


class OwnMlflow(OwnServer):
    """`mlflow server` on a free port: runs in SQLite, artifacts in a folder of its own,
    stopped and started again on the same port and files."""

    def __init__(self, folder: Path) -> None:
        super().__init__(folder)
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        log = (self.folder / "server.log").open("a")
        self.process = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{self.folder / 'mlflow.db'}",
             "--artifacts-destination", str(self.folder / "artifacts")],
            cwd=self.folder, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env=SERVER_ENV,
        )  # fmt: skip
        self.wait_until_up(timeout=120)

    def stop(self) -> None:
        if self.process is not None:
            os.killpg(self.process.pid, signal.SIGTERM)  # the server and its uvicorn worker
            self.process.wait(timeout=60)
            self.process = None

    def is_up(self) -> bool:
        assert self.process is not None and self.process.poll() is None, self.log()
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def log(self) -> str:
        return (self.folder / "server.log").read_text()[-3000:]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OwnMlflow]:
    server = OwnMlflow(tmp_path_factory.mktemp("mlflow"))
    server.start()
    yield server
    server.stop()


class Worker:
    """A real `hpo worker`, its lines collected as they come, to wait on."""

    def __init__(self, env: dict, cwd: Path) -> None:
        self.process = subprocess.Popen(
            [HPO, "worker", "--study", STUDY], env=env, cwd=cwd,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)

    def wait_for(self, pattern: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not any(re.search(pattern, line) for line in self.lines):
            assert self.process.poll() is None or self.reader.is_alive(), self.output()
            assert time.monotonic() < deadline, f"no {pattern!r} in: {self.output()}"
            time.sleep(0.05)

    def finish(self, timeout: float = 300) -> str:
        self.process.wait(timeout=timeout)
        self.reader.join(timeout=30)
        return self.output()

    def output(self) -> str:
        return "".join(self.lines)


def wait_until(condition: Callable[[], bool], worker: Worker, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert worker.process.poll() is None, worker.output()
        assert time.monotonic() < deadline, worker.output()
        time.sleep(0.05)


def tracked_study(env: dict, tensorboard: Path, mlflow_url: str) -> optuna.Study:
    """Five trials of the tiny space, two epochs, the median pruner from epoch 1, a checkpoint
    every epoch; made as `hpo create` makes one, with the four GOOD trials and the BAD one as
    its tickets (test_pruning's way to a pruned trial that does not depend on chance)."""
    storage = open_storage(env["HPO_STORAGE"])
    request = StudyRequest(
        STUDY, 0, env["HPO_STORAGE"], space="tiny", epochs=2, dataset="synthetic",
        pruner="median", min_epochs=1, checkpoint_interval=0,
        tensorboard=str(tensorboard), mlflow=mlflow_url,
    )  # fmt: skip
    create_or_join(storage, STUDY, request.new_settings(), 0)
    study = join(storage, STUDY)
    for params in (GOOD, GOOD, GOOD, GOOD, BAD):
        study.enqueue_trial(params)
    study.set_user_attr(attrs.TARGET, 5)
    return study


@pytest.mark.slow
# Real workers, an MLflow server, TensorBoard and a browser: about 60 s on a quiet 2-core
# machine; a busy CI machine must not cut it short mid-study (each of its waits is for an
# event).
@pytest.mark.timeout(900)
@pytest.mark.filterwarnings("ignore:Fixed parameter lr")
def test_a_study_in_mlflow_and_tensorboard_through_a_stop_and_a_server_restart(
    hpo_env: dict, tmp_path: Path, mlflow_server: OwnMlflow, monkeypatch: pytest.MonkeyPatch
) -> None:
    tensorboard = tmp_path / "tb"
    study = tracked_study(hpo_env, tensorboard, mlflow_server.url)

    # Trial 0 is stopped in its first epoch of two (SIGTERM once it runs: the worker's handlers
    # are in place): it checkpoints epoch 1, and its retry resumes from there.
    first = Worker(hpo_env, tmp_path)
    wait_until(lambda: study.get_trials()[0].state == TrialState.RUNNING, first)
    first.process.send_signal(signal.SIGTERM)
    assert first.finish() and first.process.returncode == 0, first.output()
    assert study.get_trials()[0].state == TrialState.FAIL

    # The server goes down before the next worker writes: it trains on and says so once. It
    # is frozen while the server comes back on the same files, then catches up.
    mlflow_server.stop()
    second = Worker(hpo_env, tmp_path)
    second.wait_for(r"mlflow not written")
    second.process.send_signal(signal.SIGSTOP)
    mlflow_server.start()
    second.process.send_signal(signal.SIGCONT)
    output = second.finish()
    assert second.process.returncode == 0, output
    assert output.count("mlflow not written") == 1, output
    assert "mlflow is back" in output and "dropped" not in output, output
    assert "Traceback" not in output, output

    state = budget(study)  # exactly five, the stopped trial's retry counted once
    assert (state.finished, state.given_up, state.running, state.waiting) == (5, 0, 0, 0)
    trials = study.get_trials()
    states = {t.number: t.state for t in trials}
    order = [  # for a failure: the order the trials ran in, and what the pruner saw
        (t.number, t.params.get("lr"), t.state.name, retry_of(t), t.intermediate_values)
        for t in sorted(trials, key=lambda t: t.datetime_start)
    ]
    assert states[4] == TrialState.PRUNED, order
    assert all(t.value is not None for t in trials if t.state == TrialState.COMPLETE)
    retry = next(t for t in trials if t.number == 5)
    assert retry.state == TrialState.COMPLETE
    assert retry.user_attrs[attrs.RESUMED_FROM_EPOCH] == 1
    # The machine's fault, where `hpo status` shows it (a process: its table as wide as the
    # COLUMNS it is given).
    shown = run_hpo("status", "--study", STUDY, env=hpo_env, cwd=tmp_path)
    assert "mlflow not written" in shown.stdout, shown.stdout
    assert f"mlflow {mlflow_server.url}" in shown.stdout, shown.stdout
    assert "best trial's run" in shown.stdout, shown.stdout

    # The best config's final training is logged beside the trials. (`hpo best` through
    # CliRunner in this process: `hpo` is `app()` and nothing more, without a process start.)
    monkeypatch.chdir(tmp_path)
    unset: dict[str, str | None] = {k: None for k in os.environ if k.startswith("HPO_")}
    exported = CliRunner(env={**unset, **hpo_env}).invoke(
        app, ["best", "--study", STUDY, "-o", "best.yaml"]
    )
    assert exported.exit_code == 0, exported.output
    trained = run_hpo(
        "train", "--config", "best.yaml", "--epochs", "1", "--seeds", "2", "--output-dir",
        "final", env=hpo_env, cwd=tmp_path,
    )  # fmt: skip
    assert trained.returncode == 0, trained.stdout + trained.stderr
    best = study.best_trial.number
    check_mlflow(study, mlflow_server.url)
    check_final_run(mlflow_server.url, best, tmp_path / "final")
    check_tensorboard(study, tensorboard / STUDY, tmp_path, best)


def check_mlflow(study: optuna.Study, url: str) -> None:
    """One parent run; one run per chain nested under it, its parameters, every epoch's
    metrics once (step = epoch), its tags and status; its id on the chain's trials."""
    from mlflow import MlflowClient

    client = MlflowClient(url)
    experiment = client.get_experiment_by_name(STUDY)
    assert experiment.experiment_id == study.user_attrs[attrs.MLFLOW_EXPERIMENT]
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("hpo.kind") == "study"]
    assert [p.info.run_id for p in parents] == [study.user_attrs[attrs.MLFLOW_PARENT_RUN]]
    assert parents[0].info.status == "FINISHED"  # its target met: ended by the last worker
    chains = {int(r.data.tags["hpo.chain"]): r for r in runs if r.data.tags.get("hpo.chain")}
    # Trial 0 and its retry 5 are one chain, one run: five runs, not six.
    assert sorted(chains) == [0, 1, 2, 3, 4], sorted(chains)
    trials = {t.number: t for t in study.get_trials()}
    status = {number: run.info.status for number, run in chains.items()}
    assert status == {0: "FINISHED", 1: "FINISHED", 2: "FINISHED", 3: "FINISHED", 4: "KILLED"}
    for number, run in chains.items():
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert run.data.tags["hpo.space"] == "tiny" and run.data.tags["hpo.host"]
        assert run.data.tags["hpo.gpu"] == "cpu"
        final = trials[5 if number == 0 else number]
        assert run.data.tags["hpo.trial"] == str(final.number)
        assert run.data.tags["hpo.state"] == final.state.name.lower()
        assert run.data.params == {key: str(value) for key, value in final.params.items()}
        assert mlflow_run_id(study.user_attrs, final) == run.info.run_id
        made_by = trials[number]  # the chain's trial that made the run, while it ran
        if attrs.MLFLOW_RUN in made_by.user_attrs:  # its dashboard note links the run
            note = get_note(optuna.Trial(study, made_by._trial_id))
            assert f"#/experiments/{experiment.experiment_id}/runs/{run.info.run_id}" in note
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "score")]
        assert steps == sorted(final.intermediate_values), (number, steps)
        for name in ("val_ce", "val_acc", "train_loss", "train_acc", "lr", "images_per_s"):
            assert name in run.data.metrics, (number, name)
    # Its score per epoch is the trial's (the resumed chain's first epoch: its checkpoint's).
    history = client.get_metric_history(chains[1].info.run_id, "score")
    assert {m.step: m.value for m in history} == trials[1].intermediate_values


def check_final_run(url: str, best: int, output: Path) -> None:
    """`hpo train`'s run: nested under the study's, test accuracy per seed (step = seed),
    the exported YAML, metrics and figures as artifacts."""
    from mlflow import MlflowClient

    client = MlflowClient(url)
    experiment = client.get_experiment_by_name(STUDY).experiment_id
    (run,) = client.search_runs([experiment], "tags.`hpo.kind` = 'final'")
    assert run.info.run_name == f"train-trial-{best}" and run.info.status == "FINISHED"
    assert run.data.tags["mlflow.parentRunId"]
    metrics = json.loads((output / "metrics.json").read_text())
    history = client.get_metric_history(run.info.run_id, "test_acc")
    assert {m.step: m.value for m in history} == {
        r["seed"]: r["test_acc"] for r in metrics["seeds"]
    }
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"best.yaml", "metrics.json", "learning-rate.png"} <= artifacts, artifacts


def check_tensorboard(study: optuna.Study, root: Path, tmp_path: Path, best: int) -> None:
    """A run folder per chain; every step once across the resume (TensorBoard's own reader);
    `tensorboard --logdir` lists the trials in its HParams tab."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    finals = [f"train-trial-{best}-seed{seed}" for seed in (0, 1)]
    assert sorted(p.name for p in root.iterdir()) == sorted(
        [*finals, *(f"trial-{n}" for n in range(5))]
    )
    seed = EventAccumulator(str(root / finals[0]))
    seed.Reload()
    assert [e.step for e in seed.Scalars("test_acc")] == [1]
    trials = {t.number: t for t in study.get_trials()}
    for number in range(5):
        events = EventAccumulator(str(root / f"trial-{number}"))
        events.Reload()
        final = trials[5 if number == 0 else number]
        steps = [e.step for e in events.Scalars("score")]
        assert steps == sorted(final.intermediate_values), (number, steps)
        values = [e.value for e in events.Scalars("score")]
        expected = [final.intermediate_values[step] for step in steps]
        assert values == pytest.approx(expected, rel=1e-6), number
    # The stopped run wrote epoch 1 in a file of its own: the retry's purge made it unread.
    assert len(list((root / "trial-0").glob("events.out.tfevents.*"))) >= 2
    check_hparams_tab(root.parent, tmp_path)


def check_hparams_tab(logdir: Path, tmp_path: Path) -> None:
    """The HParams tab renders its table inside shadow DOM, which --dump-dom leaves out: the
    trials are read from the data route the tab's table asks, and the tab is opened in
    Chromium for its screenshot (tmp_path/hparams.png: a row per trial, sortable)."""
    port = free_port()
    server = subprocess.Popen(
        [str(BIN / "tensorboard"), "--logdir", str(logdir), "--host", "127.0.0.1",
         "--port", str(port), "--load_fast", "false"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        groups = hparams_sessions(base, server)
        screenshot = tmp_path / "hparams.png"
        text = visible_text(render(f"{base}/#hparams", tmp_path / "chromium", screenshot))
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert sorted(group["name"] for group in groups) == [f"trial-{n}" for n in range(5)]
    for group in groups:
        assert {"dropout", "state", "trial"} <= set(group["hparams"]), group["hparams"]
        metrics = {value["name"]["tag"] for value in group["metricValues"]}
        assert {"score", "val_acc", "best_score"} <= metrics, metrics
    states = sorted(group["hparams"]["state"] for group in groups)
    assert states == ["complete"] * 4 + ["pruned"], states
    assert "hparams" in text and screenshot.stat().st_size > 10_000


def hparams_sessions(base: str, server: subprocess.Popen) -> list[dict]:
    """The HParams tab's session groups, from the data route its page asks."""
    deadline = time.monotonic() + 120
    body = json.dumps({"experimentName": "", "allowedStatuses": [
        "STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"],
        "colParams": [], "startIndex": 0, "sliceSize": 100}).encode()  # fmt: skip
    while True:
        assert server.poll() is None, "tensorboard exited"
        try:
            request = urllib.request.Request(
                f"{base}/data/plugin/hparams/session_groups", data=body,
                headers={"Content-Type": "application/json", "X-TensorBoard-Feature-Flags": "{}"},
            )  # fmt: skip
            with urllib.request.urlopen(request, timeout=10) as response:
                groups = json.load(response).get("sessionGroups", [])
            if len(groups) >= 5 or time.monotonic() > deadline:
                return groups
        except OSError:
            assert time.monotonic() < deadline, "tensorboard did not answer"
        time.sleep(0.5)


# --- fast: what a user gets wrong, and a tracker that is down ----------------------------


def test_a_bad_tracker_value_is_one_line_and_stores_nothing(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    a_file = tmp_path / "file"
    a_file.write_text("")
    base = ["create", "--study", "s", "--trials", "1", "--space", "tiny", "--storage", url]
    for args, env, said in [
        (["--tensorboard", str(a_file / "tb")], {}, "is not a folder"),
        (["--mlflow", "nosuch://host"], {}, "MLflow cannot use it"),
        ([], {"MLFLOW_TRACKING_URI": "nosuch://host"}, "MLFLOW_TRACKING_URI=nosuch://host"),
    ]:
        result = CliRunner().invoke(app, base + args, env=env)
        assert result.exit_code == 2, result.output
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
        assert said in result.stderr, result.stderr
        assert not (tmp_path / "hpo.db").exists()


def test_a_down_tracker_never_reaches_the_trial(tmp_path: Path) -> None:
    """MLflow's client facing a port nothing listens on, TensorBoard's writer under a path
    that is a file: the trial's calls return, each tracker is said down once (and recorded),
    and what they could not write is said dropped at the end."""
    from search.training.mlflow_sink import MlflowSink
    from search.training.tensorboard_sink import TensorBoardSink
    from search.training.trackers import Trackers

    blocked = tmp_path / "file"
    blocked.write_text("")
    said: list[str] = []
    recorded: list[str] = []
    sinks = [TensorBoardSink(blocked, STUDY), MlflowSink(f"http://127.0.0.1:{free_port()}", STUDY)]
    trackers = Trackers(sinks, said.append, recorded.append)
    study = optuna.create_study(storage=open_storage(f"sqlite:///{tmp_path / 's.db'}"))
    trial = study.ask()
    trial.suggest_float("lr", 1e-3, 1e-1, log=True)
    chain = trackers.started(trial, {"hpo.host": "h"}, None)
    for epoch in (1, 2, 3):
        trackers.epoch(chain, {"epoch": epoch, "val_loss": 2.0 / epoch, "val_acc": 0.1 * epoch})
    trackers.ended(chain, "complete")
    finished = study.tell(trial, 0.5)
    trackers.close(timeout_s=0.2)

    assert finished.state == TrialState.COMPLETE and finished.value == 0.5
    assert sorted(line.split()[0] for line in recorded) == ["mlflow", "tensorboard"], recorded
    for name in ("tensorboard", "mlflow"):
        assert sum(line.startswith(f"{name} not written") for line in said) == 1, said
        assert any(line.startswith(f"{name}: dropped 5 write(s)") for line in said), said


@pytest.mark.slow
def test_a_chain_failed_for_good_ends_its_run_failed(
    tmp_path: Path, mlflow_server: OwnMlflow
) -> None:
    """A worker killed mid-trial leaves its run RUNNING; once the study shows the chain
    failed for good (stale past max_retry), the worker that sees it ends the run FAILED."""
    from mlflow import MlflowClient

    from search.training.mlflow_sink import MlflowSink
    from search.training.trackers import Trackers

    name = "given-up"
    study = optuna.create_study(
        study_name=name, storage=open_storage(f"sqlite:///{tmp_path / 's.db'}")
    )
    dead = Trackers([MlflowSink(mlflow_server.url, name)], print, print)
    trial = study.ask()
    chain = dead.started(trial, {}, None)
    dead.epoch(chain, {"epoch": 1, "val_loss": 2.0, "val_acc": 0.1})
    dead.close()  # the worker dies here: no end is sent
    failed = study.tell(trial, state=TrialState.FAIL)  # as fail_stale_trials leaves a crash
    client = MlflowClient(mlflow_server.url)
    run_id = failed.user_attrs[attrs.MLFLOW_RUN]
    assert client.get_run(run_id).info.status == "RUNNING"

    survivor = Trackers([MlflowSink(mlflow_server.url, name)], print, print)
    survivor.given_up(study, [failed])
    survivor.close()
    run = client.get_run(run_id)
    assert (run.info.status, run.data.tags["hpo.state"]) == ("FAILED", "failed")


@pytest.mark.slow
def test_the_study_run_ends_at_its_target_and_runs_again_for_a_larger_one(
    tmp_path: Path, mlflow_server: OwnMlflow
) -> None:
    from mlflow import MlflowClient

    from search.training.mlflow_sink import MlflowSink
    from search.training.trackers import Trackers

    name = "extended"
    study = optuna.create_study(
        study_name=name, storage=open_storage(f"sqlite:///{tmp_path / 's.db'}")
    )
    client = MlflowClient(mlflow_server.url)

    def a_worker_runs_one_trial(done: bool) -> str:
        trackers = Trackers([MlflowSink(mlflow_server.url, name)], print, print)
        trial = study.ask()
        chain = trackers.started(trial, {}, None)
        trackers.ended(chain, "complete")
        study.tell(trial, 0.5)
        if done:  # the last worker out, as run_local_worker calls it
            trackers.study_done(study)
        trackers.close()
        return client.get_run(study.user_attrs[attrs.MLFLOW_PARENT_RUN]).info.status

    assert a_worker_runs_one_trial(done=True) == "FINISHED"
    assert a_worker_runs_one_trial(done=False) == "RUNNING"  # the target moved: trials again
    assert a_worker_runs_one_trial(done=True) == "FINISHED"


@pytest.mark.slow
def test_a_worker_logs_where_its_own_mlflow_address_points(
    hpo_env: dict, tmp_path: Path, mlflow_server: OwnMlflow
) -> None:
    """The study names a server this machine cannot reach (another network's address);
    `hpo worker --mlflow` gives this machine's, and the trial's run lands there, unhindered.
    A worker's flag moves a tracker the study has, and adds none."""
    from mlflow import MlflowClient

    name = "moved"
    unset: dict[str, str | None] = {k: None for k in os.environ if k.startswith("HPO_")}
    runner = CliRunner(env={**unset, **hpo_env, "MLFLOW_TRACKING_URI": None})
    create = ["create", "--study", name, "--trials", "1", "--space", "tiny", "--epochs", "1"]
    made = runner.invoke(app, [*create, "--dataset", "synthetic", "--mlflow", "http://nowhere:1"])
    assert made.exit_code == 0, made.output
    for flag, said in [
        (["--mlflow", "nosuch://host"], "MLflow cannot use it"),
        (["--tensorboard", str(tmp_path / "tb")], "the study logs to no TensorBoard folder"),
    ]:
        refused = runner.invoke(app, ["worker", "--study", name, *flag])
        assert refused.exit_code == 2 and refused.stderr.count("\n") == 1, refused.output
        assert said in refused.stderr, refused.stderr

    worked = run_hpo("worker", "--study", name, "--mlflow", mlflow_server.url, env=hpo_env,
                     cwd=tmp_path)  # fmt: skip
    assert worked.returncode == 0, worked.stdout + worked.stderr
    assert "mlflow not written" not in worked.stdout + worked.stderr
    client = MlflowClient(mlflow_server.url)
    experiment = client.get_experiment_by_name(name).experiment_id
    runs = client.search_runs([experiment], "tags.`hpo.kind` = 'trial'")
    assert [run.info.status for run in runs] == ["FINISHED"]
