"""Each validation figure has one name wherever a user reads it: an epoch line prints plain
cross-entropy as `val_ce` and the one at the fitted temperature as `calibrated_ce`; a trial's
closing line, `hpo status`, best.yaml and the dashboard call the trial's value its `score`
and say which of the two it is. Old studies' stored names are still read."""

from __future__ import annotations

import re
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import run_hpo, tiny_start
from rich.console import Console
from test_dashboard import make_study

from search.commands.dashboard import study_note
from search.commands.export import trial_document
from search.commands.progress import score_figure
from search.commands.status import study_table
from search.rules.study import load_settings
from search.training.trainer import EpochStats
from storage import open_storage

EPOCH_LINE = re.compile(
    r"trial +(?P<trial>\d+) epoch +2/2 .* val_ce (?P<plain>\d\.\d{4})  "
    r"calibrated_ce (?P<calibrated>\d\.\d{4})  acc"
)
CLOSING_LINE = re.compile(r"trial (?P<trial>\d+) complete  score (?P<score>\d\.\d{4})  acc")


def shown(renderable: object) -> str:
    console = Console(width=250, record=True)
    console.print(renderable)
    return console.export_text()


def test_an_epoch_line_names_both_figures() -> None:
    stats = EpochStats(
        epoch=2, train_loss=1.1, train_acc=0.6, val_loss=0.92, val_acc=0.7, seconds=1.0,
        images_per_s=100.0, lr=1e-3, start_lr=1e-3, val_calibrated_loss=0.43,
    )  # fmt: skip
    line = stats.line("trial 3", 10)
    assert "val_ce 0.9200  calibrated_ce 0.4300  acc 70.00%" in line, line
    assert " val " not in line and "val_loss" not in line


@pytest.mark.slow
def test_a_real_trial_names_its_figures_and_its_score_one_event_a_line(
    hpo_env: dict, tmp_path: Path
) -> None:
    """Also the log read by machines: piped, without COLUMNS (as under Docker or Slurm), a
    long study name, every event on a line of its own."""
    piped = {k: v for k, v in hpo_env.items() if k != "COLUMNS"}
    name = "a-study-with-a-rather-long-name-for-a-log"
    started = run_hpo(*tiny_start(name, 1), env=piped, cwd=tmp_path)
    assert started.returncode == 0, started.stdout + started.stderr
    lines = started.stdout.splitlines()
    epochs = [line for line in lines if " epoch " in line]
    ends = [line for line in lines if line.startswith("[")]
    assert len(epochs) == 2 and len(ends) == 1, lines
    epoch_line = (
        r"trial +\d+ epoch +\d+/2  lr \S+  train \S+  val_ce \S+(  calibrated_ce \S+)?  "
        r"acc +\S+%  \S+ img/s  \S+s"
    )
    assert all(re.fullmatch(epoch_line, line) for line in epochs), epochs
    trial_end = r"\[1/1\] trial 0 .*  best score \S+ \(trial 0\)(, val acc \S+%)?"
    assert all(re.fullmatch(trial_end, line) for line in ends), ends
    assert any(
        line.startswith(f"created study '{name}'") and "target 1 trials" in line for line in lines
    ), lines

    epoch = EPOCH_LINE.search(started.stdout)
    closing = CLOSING_LINE.search(started.stdout)
    assert epoch and closing, started.stdout
    assert "val_loss" not in started.stdout
    # A new study scores the calibrated figure: the closing score is the last epoch's
    # calibrated_ce, and not its val_ce.
    assert closing["score"] == epoch["calibrated"] != epoch["plain"], started.stdout
    assert f"best score {closing['score']} (trial {closing['trial']})" in started.stdout

    best = run_hpo("best", "--study", name, "-o", "best.yaml", env=hpo_env, cwd=tmp_path)
    assert best.returncode == 0, best.stderr
    metrics = yaml.safe_load((tmp_path / "best.yaml").read_text())["metrics"]
    assert metrics["score_is"] == "calibrated_ce"
    assert f"{metrics['score']:.4f}" == closing["score"]
    assert f"{metrics['val_ce']:.4f}" == epoch["plain"]
    assert "val_loss" not in metrics and "val_cross_entropy" not in metrics

    status = run_hpo("status", "--study", name, env=hpo_env, cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    assert re.search(rf"best score +│ {closing['score']} \(trial", status.stdout), status.stdout
    assert "calibrated_ce of a trial's last epoch" in status.stdout, status.stdout


def test_an_old_studys_score_is_named_from_what_it_stored(tmp_path: Path) -> None:
    """A study stored before val_score scores plain cross-entropy: every place says val_ce,
    read from the stored settings and epochs (`val_loss`, `val_cross_entropy`)."""
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    study = make_study(url, "old", complete=1, pruned=0, failed=0)  # no val_score stored
    settings = load_settings(open_storage(url), "old")
    assert not settings.calibrated
    metrics = trial_document(study, url, 0)["metrics"]
    assert metrics["score_is"] == "val_ce" and metrics["score"] == study.trials[0].value
    table = shown(study_table(study))
    assert "val_ce of a trial's last epoch (validation cross-entropy)" in table, table
    assert "the score: val_ce of a trial's last epoch" in study_note("old", settings, 1)

    plain = optuna.create_study(study_name="plain", storage=open_storage(url))
    plain.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=1)
    assert score_figure(plain.user_attrs) is None  # not hpo's: no figure to name
    assert "the trial's value" in shown(study_table(plain))
