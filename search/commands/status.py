"""`hpo status`: a study's trials by state, its best trial and what is running now."""

from __future__ import annotations

from collections import Counter
from datetime import datetime
from pathlib import Path

import optuna
from optuna.trial import TrialState
from rich.console import Group
from rich.table import Table

from search.commands.ablation import status_line as ablation_line
from search.commands.compare import compare_table
from search.commands.progress import best_summary, score_meaning
from search.rules import attrs
from search.rules.cost import format_duration, is_over_cap, study_pace
from search.rules.data import describe_data
from search.rules.faults import last_machine_fault
from search.rules.fidelity import fidelity_line
from search.rules.settings import StudySettings
from search.rules.study import join, load_settings, read_study
from search.rules.trackers import tracker_rows
from storage import HeartbeatPolicy, default_artifact_dir, open_storage
from storage.optuna_private import stale_trial_numbers


def study_status(storage_url: str, name: str, artifact_dir: Path | None = None) -> Group:
    """Opened once, as a reader; stale trials are told apart by the study's own heartbeat."""
    storage = open_storage(storage_url, reader=True)
    heartbeat = HeartbeatPolicy(interval_s=load_settings(storage, name).heartbeat_s)
    study = join(storage, name)
    stale = stale_trial_numbers(study, heartbeat.interval_s, heartbeat.grace_s)
    artifacts = artifact_dir or default_artifact_dir(storage_url)
    return study_table(study, stale, artifacts)


def study_table(
    study: optuna.Study,
    stale: set[int] | frozenset[int] = frozenset(),
    artifact_dir: Path | None = None,
) -> Group:
    view = read_study(study)
    trials, state = view.trials, view.budget
    counts = Counter(t.state.name.lower() for t in trials)
    summary = Table(title=f"study {study.study_name}", show_header=False, title_justify="left")
    summary.add_column()
    summary.add_column(overflow="fold")  # a long path or line wraps, never cut short
    summary.add_row("finished / target", f"{state.finished} / {state.target}")
    stored = study.user_attrs.get(attrs.SETTINGS)
    settings = StudySettings.from_dict(stored) if stored else None
    if settings is not None:
        summary.add_row("data", describe_data(settings))
    if state.given_up:
        given_up = f"{state.given_up} (counted as finished: an error, or crashed past max_retry)"
        summary.add_row("failed for good", given_up)
    summary.add_row(
        "trials by state",
        ", ".join(
            f"{name} {counts.get(name, 0)}"
            for name in ("complete", "pruned", "fail", "running", "waiting")
        ),
    )
    summary.add_row("not started", str(state.waiting))
    summary.add_row("skipped over max_gflops", str(sum(map(is_over_cap, trials))))
    summary.add_row("pace", pace_line(trials, state.finished, state.target))
    summary.add_row("best score", best_summary(study, trials))
    if settings is not None and (settings.tensorboard or settings.mlflow):
        for name, value in tracker_rows(settings, study.user_attrs, trials):
            summary.add_row(name, value)
    summary.add_row("score", score_meaning(study.user_attrs))
    summary.add_row("trial time", time_by_phase(trials))
    summary.add_row("rungs rank like the end", fidelity_line(study))
    if artifact_dir is not None:
        summary.add_row("checkpoints", folder_size(artifact_dir))
    fault = last_machine_fault(study.user_attrs)
    if fault is not None:
        summary.add_row("last machine fault", fault)
    if stale:
        numbers = ", ".join(map(str, sorted(stale)))
        summary.add_row("stale", f"{numbers} (no heartbeat: failed and retried at the next start)")
    if attrs.ABLATION in study.user_attrs:  # the latest `hpo ablate --measure`
        summary.add_row("measured path", ablation_line(study.user_attrs[attrs.ABLATION]))
    shown = [summary]
    if attrs.COMPARE in study.user_attrs:  # the latest `hpo compare`
        shown.append(compare_table(study.user_attrs[attrs.COMPARE]))
    running = [t for t in trials if t.state == TrialState.RUNNING]
    if not running:
        return Group(*shown)
    table = Table(title="running", title_justify="left")
    for column in ("trial", "epoch", "last score", "worker", "architecture"):
        table.add_column(column, overflow="fold")
    for trial in running:
        label = f"{trial.number} (stale)" if trial.number in stale else str(trial.number)
        last = (
            trial.intermediate_values.get(trial.last_step) if trial.last_step is not None else None
        )
        table.add_row(
            label,
            str(trial.last_step or 0),
            f"{last:.4f}" if last is not None else "-",
            str(trial.user_attrs.get(attrs.WORKER, "-")),
            str(trial.user_attrs.get(attrs.ARCHITECTURE, "-")),
        )
    return Group(*shown, table)


def pace_line(trials: list[optuna.trial.FrozenTrial], finished: int, target: int) -> str:
    if not any(t.datetime_start for t in trials):
        return "no trial started yet"
    pace = study_pace(trials, finished, target, datetime.now())
    if pace.per_hour is None:
        return f"elapsed {format_duration(pace.elapsed_s)}; no trial finished yet, no ETA"
    eta = "done" if finished >= target else f"ETA {format_duration(pace.eta_s or 0)}"
    return f"elapsed {format_duration(pace.elapsed_s)}, {pace.per_hour:.1f} trials/h, {eta}"


def studies_table(storage: optuna.storages.BaseStorage) -> Table:
    table = Table(title="studies", title_justify="left")
    for column in ("study", "trials", "best score"):
        table.add_column(column)
    for summary in optuna.get_all_study_summaries(storage):
        best = summary.best_trial
        table.add_row(
            summary.study_name, str(summary.n_trials), f"{best.value:.4f}" if best else "-"
        )
    return table


def time_by_phase(trials: list[optuna.trial.FrozenTrial]) -> str:
    """Where the finished trials' time went, from their `seconds` attribute (attrs.SECONDS)."""
    totals = Counter()
    for trial in trials:
        if trial.state.is_finished():
            totals.update(trial.user_attrs.get(attrs.SECONDS) or {})
    whole = sum(totals.values())
    if not whole:
        return "-"
    shares = ", ".join(f"{phase} {totals[phase] / whole:.1%}" for phase in attrs.TRIAL_PHASES)
    return f"{whole:,.0f} s: {shares}"


def folder_size(directory: Path) -> str:
    """The artifact folder's size: checkpoints of running and retried trials, final weights."""
    if not directory.is_dir():
        return f"none yet ({directory})"
    size = sum(path.stat().st_size for path in directory.rglob("*") if path.is_file())
    return f"{size / 1e6:,.1f} MB in {directory}"
