"""`hpo report`: one offline HTML page and PNGs, opened in headless Chromium with no network."""

from __future__ import annotations

import json
import re
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import run_hpo
from test_dashboard import chromium, make_study, render, visible_text
from typer.testing import CliRunner

from search.cli import app
from search.commands.figures import TRAINING_FIGURES, training_figure
from search.commands.report import PAGE_NAME, PLOTS, ReportError, write_report
from search.rules import attrs
from search.rules.config import TrialConfig
from search.rules.study import create_or_join, load_settings
from storage import open_storage

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Every name lookup fails and every proxied request goes to a closed port: no network at all.
OFFLINE = ("--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=http://127.0.0.1:9")


@pytest.mark.slow
def test_report_opens_offline_with_every_plot_drawn(
    hpo_env: dict[str, str], tmp_path: Path
) -> None:
    chromium()  # skips (or fails, in CI) before any work
    study = make_study(hpo_env["HPO_STORAGE"], "mixed", complete=6)
    done = run_hpo("report", "--study", "mixed", "-o", "out", env=hpo_env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert not [plot.title for plot in PLOTS if f"{plot.title}: skipped" in done.stdout]
    assert "too few trials: 6 complete" in done.stdout  # the predicted path needs more

    out = tmp_path / "out"
    for plot in PLOTS:
        assert (out / f"{plot.name}.png").read_bytes().startswith(PNG_MAGIC)
    page = (out / PAGE_NAME).read_text()
    assert page.count("* plotly.js v") == 1  # the library, inlined once
    assert not re.search(r"<(script|link|img)[^>]+(src|href)=", page)  # nothing to fetch

    screenshot = tmp_path / "report.png"
    dom = render((out / PAGE_NAME).as_uri(), tmp_path / "chromium", screenshot, *OFFLINE)
    sections = dict(re.findall(r'<section id="([\w-]+)">(.*?)</section>', dom, re.DOTALL))
    for plot in PLOTS:
        assert 'class="main-svg"' in sections[plot.name], f"{plot.name} was not drawn"
    table = visible_text(sections["top-trials"])
    best = study.best_trial
    assert f"1 {best.number} {best.value:.4f}" in table
    assert best.user_attrs["architecture"] in table


def test_a_small_study_skips_what_it_cannot_draw(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    small = write_report(make_study(url, "small", complete=1), tmp_path / "small")
    assert [line.split(":")[0] for line in small.skipped] == [
        "Parameter importances",
        "Parallel coordinates",
        "Which change bought the points",  # the predicted ablation path: too few trials
    ]
    assert "needs at least 3 complete trials, the study has 1" in small.skipped[0]
    assert [p.name for p in small.images] == [
        "history.png",
        "learning-curves.png",
        "accuracy-vs-cost.png",
    ]
    assert not (tmp_path / "small" / "importances.png").exists()
    assert "Skipped: needs at least 3 complete trials" in small.page.read_text()

    storage = open_storage(url)
    create_or_join(storage, "empty", load_settings(storage, "small"), 2)
    empty = write_report(optuna.load_study(study_name="empty", storage=storage), tmp_path / "e")
    assert len(empty.skipped) == len(PLOTS) + 1 and not empty.images  # + the ablation path
    assert "No complete trial yet." in empty.page.read_text()


def test_report_errors_are_one_line(hpo_env: dict[str, str], tmp_path: Path) -> None:
    make_study(hpo_env["HPO_STORAGE"], "s", complete=1, pruned=0, failed=0)
    args = ["report", "--study", "nope", "-o", str(tmp_path / "out")]
    unknown = CliRunner().invoke(app, [*args, "--storage", hpo_env["HPO_STORAGE"]])
    assert unknown.exit_code == 2
    assert unknown.stderr == "error: no study named 'nope' in this storage\n"

    (tmp_path / "a-file").write_text("")
    study = optuna.load_study(study_name="s", storage=open_storage(hpo_env["HPO_STORAGE"]))
    with pytest.raises(ReportError, match="cannot write the report to"):
        write_report(study, tmp_path / "a-file")


def plotly_data(page: str, section: str) -> list[dict]:
    """The traces a section's plotly figure draws, as the page hands them to Plotly.newPlot."""
    body = page[page.index(f'<section id="{section}">') :]
    rest = body[body.index("Plotly.newPlot(") + len("Plotly.newPlot(") :]
    decoder = json.JSONDecoder()
    _div, end = decoder.raw_decode(rest.lstrip())
    rest = rest.lstrip()[end:].lstrip().removeprefix(",").lstrip()
    return decoder.raw_decode(rest)[0]


@pytest.mark.slow
def test_report_marks_the_pareto_front_and_best_exports_it(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    study = make_study(url, "costs", complete=8)  # one pruned and one failed trial too
    page = write_report(study, tmp_path / "out").page.read_text()
    traces = {trace["name"]: trace for trace in plotly_data(page, "accuracy-vs-cost")}

    # The front, worked out here by its definition: no other complete trial is at least as
    # accurate for at most the same GFLOP (an exact twin: the lower trial number stands).
    def point(t: optuna.trial.FrozenTrial) -> tuple[float, float]:
        return t.user_attrs[attrs.GFLOPS], t.user_attrs["val_acc"]

    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]

    def beaten(t: optuna.trial.FrozenTrial) -> bool:
        (g, a) = point(t)
        return any(
            point(u)[0] <= g and point(u)[1] >= a and (point(u) != (g, a) or u.number < t.number)
            for u in complete
            if u is not t
        )

    front = sorted((t for t in complete if not beaten(t)), key=point)
    assert traces["Pareto front"]["customdata"] == [t.number for t in front]
    assert traces["Pareto front"]["x"] == [point(t)[0] for t in front]
    assert sorted(traces["complete trials"]["customdata"]) == [t.number for t in complete]
    assert len(front) < len(complete)  # all 8 on the front: 1 chance in 8!

    # The front's configs are listed under the plot...
    listed = visible_text(page[page.index('<section id="pareto-front">') :].split("</section>")[0])
    for t in front:
        assert t.user_attrs["architecture"] in listed
    # ... and `hpo best --pareto` exports them, cheapest first, one YAML document each.
    done = CliRunner().invoke(app, ["best", "--study", "costs", "--pareto", "--storage", url])
    assert done.exit_code == 0, done.output
    documents = list(yaml.safe_load_all(done.stdout))
    assert [d["source"]["trial"] for d in documents] == [t.number for t in front]
    for document, trial in zip(documents, front, strict=True):
        assert TrialConfig.from_dict(document).to_dict() == trial.user_attrs["config"]
        assert document["metrics"][attrs.GFLOPS] == point(trial)[0]


def test_a_front_file_names_its_trials_and_best_exports_one_of_them(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    make_study(url, "costs", complete=8)  # trial 1 is pruned, trial 2 failed

    def hpo(*args: str):
        return CliRunner().invoke(app, list(args))

    front = tmp_path / "front.yaml"
    assert (
        hpo("best", "--study", "costs", "--pareto", "--storage", url, "-o", str(front)).exit_code
        == 0
    )
    documents = list(yaml.safe_load_all(front.read_text()))
    numbers = [document["source"]["trial"] for document in documents]
    assert len(numbers) > 1

    # `hpo train` cannot guess which of them: it names them and how to export one.
    refused = hpo("train", "--config", str(front))
    assert refused.exit_code == 2 and refused.stderr.count("\n") == 1, refused.output
    assert f"trials {', '.join(map(str, numbers))}" in refused.stderr
    assert "hpo best --study costs --trial N" in refused.stderr

    one = hpo("best", "--study", "costs", "--trial", str(numbers[-1]), "--storage", url)
    assert one.exit_code == 0, one.output
    exported = yaml.safe_load(one.stdout)
    assert exported["source"]["trial"] == numbers[-1]
    assert TrialConfig.from_dict(exported) == TrialConfig.from_dict(documents[-1])

    for number, reason in ((1, "PRUNED"), (2, "FAIL"), (99, "no trial 99")):
        refused = hpo("best", "--study", "costs", "--trial", str(number), "--storage", url)
        assert refused.exit_code == 2 and reason in refused.stderr, refused.output
    both = hpo("best", "--study", "costs", "--trial", "0", "--pareto", "--storage", url)
    assert both.exit_code == 2 and "one of them" in both.stderr


def _drawn_ticks(ax) -> list[float]:
    """The x ticks a saved figure shows: drawn, and inside the axis."""
    ax.figure.canvas.draw()
    low, high = ax.get_xlim()
    return [tick for tick in ax.get_xticks() if low <= tick <= high]


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_epochs_and_trial_numbers_are_drawn_on_whole_numbers(tmp_path: Path) -> None:
    """Three epochs drawn with matplotlib's default ticks read 1.25, 1.5, ...: a run has no
    epoch 1.5. The report's curves and history, and `hpo train`'s figures."""
    import matplotlib.pyplot as plt

    study = make_study(f"sqlite:///{tmp_path / 'hpo.db'}", "ticks", complete=2)  # 3 epochs
    plots = {plot.name: plot for plot in PLOTS}
    for name in ("learning-curves", "history"):
        ax = plots[name].matplotlib(study, None)
        ticks = _drawn_ticks(ax)
        assert len(ticks) >= 2 and all(tick == int(tick) for tick in ticks), (name, ticks)
        plt.close(ax.figure)
        layout = plots[name].plotly(study, None).layout.xaxis
        assert layout.dtick == int(layout.dtick) >= 1 and layout.tick0 == 0, (name, layout)
    seeds = [
        {"seed": seed, "lr": [1e-3] * 3, "train_loss": [2.0, 1.5, 1.2], "train_acc": [0.3] * 3}
        for seed in (0, 1)
    ]
    for series, label, log in TRAINING_FIGURES.values():
        figure = training_figure(seeds, series, label, log)
        ticks = _drawn_ticks(figure.axes[0])
        assert ticks == [1.0, 2.0, 3.0], (series, ticks)
        plt.close(figure)
