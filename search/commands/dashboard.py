"""`hpo dashboard`: optuna-dashboard on the study storage, and the note it shows for a study."""

from __future__ import annotations

import ipaddress
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import optuna
import optuna_dashboard
import yaml
from optuna.artifacts import FileSystemArtifactStore

from search.commands.progress import describe_score
from search.rules import attrs
from search.rules.data import describe_data
from search.rules.settings import StudySettings
from search.rules.study import join, name_objective
from search.rules.trackers import tracker_line
from storage import open_storage, redact_url


class DashboardError(ValueError):
    """The dashboard cannot start as asked; the message is one printable line."""


class _Server(ThreadingMixIn, WSGIServer):
    # Page loads and polling overlap; Ctrl-C should not wait for open connections.
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_request(self, *args: Any) -> None:
        """The page polls every few seconds: one access line each would bury everything else."""


@dataclass(frozen=True)
class Dashboard:
    server: WSGIServer
    url: str
    storage_url: str
    artifacts: Path

    def banner(self) -> str:
        return (
            f"optuna-dashboard for {redact_url(self.storage_url)} at {self.url} "
            f"(artifacts in {self.artifacts}); Ctrl-C stops it"
        )

    def serve(self, on_ready: Callable[[], None] = lambda: None) -> None:
        """Serve until Ctrl-C or SIGTERM, then exit 0. `on_ready` runs once a stop is
        handled, so whoever reads the banner may stop it at once."""
        # Set, not assumed: a process started in the background inherits SIGINT ignored.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        try:
            on_ready()
            self.server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            self.server.server_close()


def open_dashboard(storage_url: str, host: str, port: int, artifacts: Path) -> Dashboard:
    """optuna-dashboard on the storage and artifact store, bound but not yet serving.

    On SQLite it only reads beside running workers: open_storage puts the file in WAL mode,
    where readers never block a writer, and gives every connection a long busy timeout.
    """
    storage = open_storage(storage_url, reader=True)
    name_objectives(storage)
    artifacts.mkdir(parents=True, exist_ok=True)
    app = optuna_dashboard.wsgi(storage, artifact_store=FileSystemArtifactStore(str(artifacts)))
    try:
        server = make_server(host, port, app, server_class=_Server, handler_class=_QuietHandler)
    except OSError as err:
        raise DashboardError(f"cannot listen on {host}:{port}: {err.strerror or err}") from err
    url_host = f"[{host}]" if ":" in host else host
    url = f"http://{url_host}:{server.server_port}/dashboard"
    return Dashboard(server=server, url=url, storage_url=storage_url, artifacts=artifacts)


def name_objectives(storage: optuna.storages.BaseStorage) -> None:
    """Name the objective of this project's studies made before it was named at creation."""
    for summary in optuna.get_all_study_summaries(storage, include_best_trial=False):
        if attrs.SETTINGS in summary.user_attrs:
            name_objective(join(storage, summary.study_name))


def exposure_warning(host: str) -> str | None:
    if _is_loopback(host):
        return None
    return (
        f"warning: the dashboard on {host} has no authentication: anyone who can reach this "
        "port can read, edit and delete studies"
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # any other host name may resolve to a public address


def write_study_note(
    study: optuna.Study, settings: StudySettings, target: int, appendix: str = ""
) -> None:
    """The dashboard's note for a study: what it searches and with which settings, then
    `appendix` (the `hpo compare` table, once there is one) and the latest measured ablation
    path (`hpo ablate --measure`), kept whichever of the two writes the note."""
    note = study_note(study.study_name, settings, target) + appendix
    optuna_dashboard.save_note(study, note + ablation_note(study.user_attrs))


def ablation_note(study_attrs: dict[str, Any]) -> str:
    """The measured path's section of the note, once there is one."""
    table = study_attrs.get(attrs.ABLATION)
    if table is None:
        return ""
    return f"\n### Which change bought the points (`hpo ablate --measure`)\n\n{table['markdown']}"


def study_note(name: str, settings: StudySettings, target: int) -> str:
    rows = [
        ("target", f"{target} finished trials (a later `hpo start --trials` may raise it)"),
        ("objective", f"{settings.direction} the score: {describe_score(settings)}"),
        ("search space", f"`{settings.space_name}`"),
        ("epochs per trial", str(settings.epochs)),
        ("dataset", describe_data(settings)),
        (
            "pruner",
            f"{settings.pruner}, on the score after each epoch from epoch {settings.min_epochs}",
        ),
        ("seed", str(settings.seed)),
        ("heartbeat", f"{settings.heartbeat_s} s"),
        ("checkpoints", f"every {settings.checkpoint_interval_s} s of training"),
    ]
    if settings.tensorboard or settings.mlflow:  # each trial's note links its MLflow run
        rows.append(("trackers", tracker_line(settings.tensorboard, settings.mlflow, {})))
    table = "\n".join(f"| {key} | {value} |" for key, value in rows)
    described = ", ".join(f"`{attr}`" for attr in attrs.DESCRIBED)
    space = yaml.safe_dump(settings.space, sort_keys=False, default_flow_style=None)
    return (
        f"## Backbone search `{name}`\n\n"
        "Searches the Backbone CNN's architecture and training recipe; the test set is never "
        "used.\n\n"
        f"| setting | value |\n|---|---|\n{table}\n\n"
        "Each trial reports its score per epoch as intermediate values, carries "
        f"{described} as user attributes and keeps its latest epoch checkpoint as an artifact.\n\n"
        f"### Search space\n\n```yaml\n{space}```\n"
    )
