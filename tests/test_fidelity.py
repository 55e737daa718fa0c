"""Do the pruner's rungs rank trials as their last epoch does? The rank correlation that
`hpo status` and `hpo report` show, checked against Spearman worked out by hand."""

from __future__ import annotations

import math
import uuid
from pathlib import Path

import optuna
import pytest
from conftest import run_hpo
from typer.testing import CliRunner

from search.cli import app
from search.rules.fidelity import (
    MIN_TRIALS,
    pruner_rungs,
    ranks,
    rung_fidelity,
    spearman,
    study_fidelity,
)
from search.rules.settings import StudySettings
from search.rules.study import create_or_join
from storage import open_storage, queue_retry

EPOCHS = 9  # Hyperband from epoch 1 judges at epochs 1 and 3
# Validation loss at epochs 1, 3 and 9 of the seven trials that run to the end.
COMPLETE = [
    (2.0, 0.9, 0.50),
    (2.0, 0.8, 0.60),
    (1.5, 1.0, 0.70),
    (2.5, 1.1, 0.80),
    (1.8, 1.2, 0.90),
    (3.0, 1.3, 1.00),
    (2.2, 1.4, 1.10),
]
# By hand. Epoch 3 against epoch 9: ranks 2 1 3 4 5 6 7 against 1..7, no ties, so
# 1 - 6 * sum(d^2) / (n (n^2 - 1)) = 1 - 6 * 2 / (7 * 48) = 0.9643.
AT_3 = 1 - 12 / 336
# Epoch 1 against epoch 9: the two 2.0s share ranks 3 and 4, so ranks 3.5 3.5 1 6 2 7 5;
# Pearson on ranks (both means 4): 12.5 / sqrt(27.5 * 28) = 0.4505.
AT_1 = 12.5 / math.sqrt(27.5 * 28)


def _tell(study: optuna.Study, losses: dict[int, float], complete: bool) -> None:
    trial = study.ask()  # a ticket, as a worker claims it
    for epoch, loss in losses.items():
        trial.report(loss, epoch)
    state = optuna.trial.TrialState.COMPLETE if complete else optuna.trial.TrialState.PRUNED
    study.tell(trial, losses[max(losses)] if complete else None, state=state)


def _shown(url: str, name: str, tmp_path: Path, env: dict[str, str]) -> tuple[str, str]:
    status = run_hpo("status", "--study", name, "--storage", url, env=env, cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    report = CliRunner().invoke(
        app, ["report", "--study", name, "-o", str(tmp_path / "r"), "--storage", url]
    )
    assert report.exit_code == 0, report.output
    return status.stdout, (tmp_path / "r" / "report.html").read_text()


@pytest.mark.slow
def test_status_and_report_show_each_rungs_rank_correlation(
    hpo_env: dict[str, str], tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    name = f"fidelity-{uuid.uuid4().hex[:8]}"
    settings = StudySettings.for_space(
        "tiny", epochs=EPOCHS, dataset="synthetic", pruner="hyperband", min_epochs=1
    )
    storage = open_storage(url)
    create_or_join(storage, name, settings, 12)
    study = optuna.load_study(study_name=name, storage=storage)
    assert pruner_rungs("hyperband", EPOCHS, 1) == [1, 3]
    for at_1, at_3, at_9 in COMPLETE[:4]:
        _tell(study, {1: at_1, 3: at_3, EPOCHS: at_9}, complete=True)
    for loss in (4.0, 4.5, 5.0):  # pruned at epoch 1: they never reach the last epoch
        _tell(study, {1: loss}, complete=False)
    status, page = _shown(url, name, tmp_path, hpo_env)
    few = f"epoch 1: too few trials (4 reached it and epoch {EPOCHS}; {MIN_TRIALS} needed)"
    assert few in status and few in page

    for at_1, at_3, at_9 in COMPLETE[4:]:
        _tell(study, {1: at_1, 3: at_3, EPOCHS: at_9}, complete=True)
    for losses in ({1: 3.5}, {1: 2.6, 3: 2.0}):  # pruned at epoch 1 and at epoch 3
        _tell(study, losses, complete=False)
    assert len(study.trials) == 12
    _, results = study_fidelity(study)
    assert [(r.rung, r.trials) for r in results] == [(1, 7), (3, 7)]
    assert results[0].spearman == pytest.approx(AT_1) and results[1].spearman == pytest.approx(AT_3)
    status, page = _shown(url, name, tmp_path, hpo_env)
    line = f"Spearman with epoch {EPOCHS}, epoch 1: +0.45 (n 7); epoch 3: +0.96 (n 7)"
    assert line in status and line in page


def test_ranks_share_ties_and_spearman_needs_spread() -> None:
    assert ranks([3.0, 1.0, 3.0, 2.0]) == [3.5, 1.0, 3.5, 2.0]
    assert spearman([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)
    assert spearman([1, 1, 1], [1, 2, 3]) is None


def test_a_chain_counts_once_and_a_nan_loss_not_at_all(tmp_path: Path) -> None:
    study = optuna.create_study(storage=open_storage(f"sqlite:///{tmp_path / 'f.db'}"))
    for at_1, at_3, at_9 in COMPLETE[:5]:
        _tell(study, {1: at_1, 3: at_3, EPOCHS: at_9}, complete=True)
    # The sixth chain reports its last epoch, then its worker dies; the retry inherits every
    # report, and completes.
    at_1, at_3, at_9 = COMPLETE[5]
    crashed = study.ask()
    for epoch, loss in {1: at_1, 3: at_3, EPOCHS: at_9}.items():
        crashed.report(loss, epoch)
    queue_retry(study, study.tell(crashed, state=optuna.trial.TrialState.FAIL))
    study.tell(study.ask(), at_9)
    _tell(study, {1: math.nan, 3: math.nan, EPOCHS: 2.0}, complete=True)  # NaN at both rungs
    assert len(study.trials) == 8

    results = [rung_fidelity(study.trials, rung, EPOCHS) for rung in (1, 3)]
    for result, column in zip(results, (0, 1), strict=True):
        assert result.trials == 6
        by_hand = spearman([c[column] for c in COMPLETE[:6]], [c[2] for c in COMPLETE[:6]])
        assert result.spearman == pytest.approx(by_hand)
