"""`hpo report`: a study's plots and best trials as one offline HTML page, plus PNGs.

The page draws with plotly (optuna.visualization), its plotly.js inlined once, so it opens
without network. The PNGs come from optuna's matplotlib twins: plotly's own PNG export
needs kaleido and a Chrome install, matplotlib renders anywhere with its Agg backend.
"""

from __future__ import annotations

import errno
import html
import math
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import matplotlib
import optuna
import plotly.graph_objects as go
import plotly.offline
import yaml
from matplotlib.axes import Axes
from matplotlib.ticker import MaxNLocator
from optuna.trial import FrozenTrial, TrialState
from plotly.graph_objects import Figure

from search.commands.compare import COLUMNS, explanation, table_rows
from search.rules import attrs
from search.rules.cost import pareto_front, trial_gflop
from search.rules.data import describe_data
from search.rules.faults import FilesNotWritten, machine_fault_line
from search.rules.fidelity import fidelity_line
from search.rules.settings import METRIC_NAME, StudySettings
from search.rules.study import name_objective
from search.rules.trackers import tracker_rows

matplotlib.use("Agg")  # files only: no display, no GUI toolkit
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

PAGE_NAME = "report.html"
# PED-ANOVA with fewer complete trials compares a single best trial with one or two others.
MIN_TRIALS_FOR_IMPORTANCES = 3
# One legend entry per trial: past this many the PNG's legend is taller than the plot.
MAX_LEGEND_TRIALS = 12


# A path that can never be the report's folder: the user's to change, not the machine's.
USER_PATH_ERRORS = (errno.ENOTDIR, errno.EEXIST, errno.EISDIR, errno.EACCES, errno.ENAMETOOLONG)


class ReportError(ValueError):
    """The report cannot be written where asked; the message is one printable line."""


@dataclass(frozen=True)
class Plot:
    name: str  # the PNG's stem and the HTML anchor
    title: str
    plotly: Callable[[optuna.Study, list[str] | None], Figure]
    matplotlib: Callable[[optuna.Study, list[str] | None], Axes]
    skip: Callable[[list[FrozenTrial]], str | None]  # why there is nothing to draw, if so


@dataclass(frozen=True)
class Report:
    page: Path
    images: list[Path]
    skipped: list[str]  # one line per plot left out, with the reason


def write_report(study: optuna.Study, output: Path, top: int = 10) -> Report:
    """Write report.html and one PNG per plot under `output`. A folder the user named that
    cannot be one (a file, no permission) is one line (ReportError, exit 2); a disk that
    refuses it (full, read-only, failing) is the machine's (FilesNotWritten, exit 75)."""
    try:
        output.mkdir(parents=True, exist_ok=True)
        return _write_report(study, output, top)
    except OSError as err:
        if err.errno in USER_PATH_ERRORS:
            raise ReportError(f"cannot write the report to {output}: {err.strerror}") from err
        raise FilesNotWritten(
            machine_fault_line(err, f"{PAGE_NAME} and its figures", output)
        ) from err


def _write_report(study: optuna.Study, output: Path, top: int) -> Report:
    if attrs.SETTINGS in study.user_attrs:
        name_objective(study)  # a study made before the objective was named
    trials = study.get_trials(deepcopy=False)
    params = common_params(trials)
    sections, images, skipped = [], [], []
    for plot in PLOTS:
        reason = plot.skip(trials)
        if reason is not None:
            skipped.append(f"{plot.title}: skipped, {reason}")
            sections.append(_section(plot, f'<p class="note">Skipped: {html.escape(reason)}.</p>'))
            continue
        with _quiet():
            figure = plot.plotly(study, params)
            images.append(_save_png(plot, plot.matplotlib(study, params), output))
        sections.append(_section(plot, _figure_html(figure) + _png_link(plot)))
    section, figure, reason = _ablation(study, output)
    sections.append(section)
    images += [figure] if figure else []
    skipped += [f"{ABLATION_TITLE}: skipped, {reason}"] if reason else []
    page = output / PAGE_NAME
    best = top_trials(trials, study, top)
    page.write_text(_page(study, trials, sections, best, pareto_front(trials)))
    return Report(page=page, images=images, skipped=skipped)


def common_params(trials: list[FrozenTrial]) -> list[str] | None:
    """Parameters every complete trial sampled: the axes a parallel plot can draw for all."""
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if not complete:
        return None
    names = set.intersection(*(set(t.params) for t in complete))
    return [name for name in complete[0].params if name in names] or None


def top_trials(trials: list[FrozenTrial], study: optuna.Study, count: int) -> list[FrozenTrial]:
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    reverse = study.direction == optuna.study.StudyDirection.MAXIMIZE
    return sorted(complete, key=lambda t: t.value, reverse=reverse)[:count]


def _complete(trials: list[FrozenTrial]) -> int:
    return sum(t.state == TrialState.COMPLETE for t in trials)


def _needs_complete(count: int) -> Callable[[list[FrozenTrial]], str | None]:
    def skip(trials: list[FrozenTrial]) -> str | None:
        have = _complete(trials)
        if have >= count:
            return None
        return f"needs at least {count} complete trials, the study has {have}"

    return skip


def _needs_curves(trials: list[FrozenTrial]) -> str | None:
    if any(t.intermediate_values for t in trials):
        return None
    return "no trial has reported a validation loss yet"


def _history(study: optuna.Study, _params: list[str] | None) -> Figure:
    figure = optuna.visualization.plot_optimization_history(study, target_name=METRIC_NAME)
    return _integer_x(figure)


def _history_png(study: optuna.Study, _params: list[str] | None) -> Axes:
    ax = optuna.visualization.matplotlib.plot_optimization_history(study, target_name=METRIC_NAME)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # trial numbers
    return ax


def _curves(study: optuna.Study, _params: list[str] | None) -> Figure:
    figure = optuna.visualization.plot_intermediate_values(study)
    return _integer_x(figure.update_layout(xaxis_title="epoch", yaxis_title=METRIC_NAME))


def _integer_x(figure: Figure) -> Figure:
    """Ticks on whole numbers only (epochs, trial numbers): plotly has no integer locator, so
    a step of about a tenth of the axis, at least 1."""
    highest = max((max(trace.x) for trace in figure.data if trace.x), default=1)
    return figure.update_xaxes(tick0=0, dtick=max(1, math.ceil(highest / 10)))


def _curves_png(study: optuna.Study, _params: list[str] | None) -> Axes:
    ax = optuna.visualization.matplotlib.plot_intermediate_values(study)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs
    ax.set_xlabel("epoch")
    ax.set_ylabel(METRIC_NAME)
    if len(ax.get_lines()) > MAX_LEGEND_TRIALS and ax.get_legend() is not None:
        ax.get_legend().remove()
    return ax


def _importances(study: optuna.Study, _params: list[str] | None) -> Figure:
    return optuna.visualization.plot_param_importances(study)


def _importances_png(study: optuna.Study, _params: list[str] | None) -> Axes:
    return optuna.visualization.matplotlib.plot_param_importances(study)


def _parallel(study: optuna.Study, params: list[str] | None) -> Figure:
    return optuna.visualization.plot_parallel_coordinate(
        study, params=params, target_name=METRIC_NAME
    )


def _parallel_png(study: optuna.Study, params: list[str] | None) -> Axes:
    return optuna.visualization.matplotlib.plot_parallel_coordinate(
        study, params=params, target_name=METRIC_NAME
    )


def _needs_costed(trials: list[FrozenTrial]) -> str | None:
    if pareto_front(trials):
        return None
    return "no complete trial has a validation accuracy and a config yet"


def _front_points(study: optuna.Study) -> tuple[list[tuple], list[tuple]]:
    """(GFLOP per image, validation accuracy, trial number) of every complete trial that has
    both, and of those on the Pareto front."""
    trials = study.get_trials(deepcopy=False)
    front = {t.number for t in pareto_front(trials)}
    points = [
        (trial_gflop(t), t.user_attrs[attrs.VAL_ACC], t.number)
        for t in trials
        if t.state == TrialState.COMPLETE and attrs.VAL_ACC in t.user_attrs
    ]
    points = sorted(p for p in points if p[0] is not None)
    return points, [p for p in points if p[2] in front]


def _pareto(study: optuna.Study, _params: list[str] | None) -> Figure:
    points, front = _front_points(study)
    figure = go.Figure()
    for name, shown, style in (
        ("complete trials", points, {"mode": "markers", "marker": {"color": "#9aa5b1"}}),
        ("Pareto front", front, {"mode": "lines+markers", "line": {"shape": "hv"}}),
    ):
        x, y, numbers = (list(column) for column in zip(*shown, strict=True))
        figure.add_trace(
            go.Scatter(
                x=x, y=y, customdata=numbers, name=name,
                hovertemplate="trial %{customdata}<br>%{x:.4g} GFLOP/image<br>"
                "val acc %{y:.2%}<extra></extra>",
                **style,
            )
        )  # fmt: skip
    return figure.update_layout(
        xaxis={"title": "train GFLOP per image (log)", "type": "log"},
        yaxis={"title": "validation accuracy", "tickformat": ".0%"},
    )


def _pareto_png(study: optuna.Study, _params: list[str] | None) -> Axes:
    points, front = _front_points(study)
    _figure, ax = plt.subplots()
    ax.scatter([p[0] for p in points], [p[1] for p in points], color="#9aa5b1", label="trials")
    ax.step([p[0] for p in front], [p[1] for p in front], "o-", where="post", label="Pareto front")
    for x, y, number in front:
        ax.annotate(str(number), (x, y), textcoords="offset points", xytext=(4, -10))
    ax.set_xscale("log")
    ax.set_xlabel("train GFLOP per image")
    ax.set_ylabel("validation accuracy")
    ax.legend()
    return ax


PLOTS = (
    Plot("history", "Optimization history", _history, _history_png, _needs_complete(1)),
    Plot("learning-curves", "Learning curves", _curves, _curves_png, _needs_curves),
    Plot(
        "importances",
        "Parameter importances",
        _importances,
        _importances_png,
        _needs_complete(MIN_TRIALS_FOR_IMPORTANCES),
    ),
    Plot(
        "parallel-coordinates",
        "Parallel coordinates",
        _parallel,
        _parallel_png,
        _needs_complete(2),
    ),
    Plot("accuracy-vs-cost", "Accuracy against cost", _pareto, _pareto_png, _needs_costed),
)


@contextmanager
def _quiet() -> Iterator[None]:
    """Optuna warns that its matplotlib plots are experimental and that small studies make
    rough importances; the page says what each plot is drawn from, so the terminal need not."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _save_png(plot: Plot, ax: Axes, output: Path) -> Path:
    for loc in ("left", "center", "right"):  # optuna puts some titles left, some centred
        ax.set_title("", loc=loc)
    ax.set_title(plot.title)
    figure, path = ax.figure, output / f"{plot.name}.png"
    figure.set_size_inches(10, 5.5)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)
    return path


def _figure_html(figure: Figure) -> str:
    figure.update_layout(title=None, margin={"t": 30})  # the section's heading names it
    return figure.to_html(
        full_html=False,
        include_plotlyjs=False,  # inlined once in the page's head
        default_height="460px",
        config={"displaylogo": False},
    )


def _png_link(plot: Plot) -> str:
    return f'<p class="png">PNG: <a href="{plot.name}.png">{plot.name}.png</a></p>'


def _section(plot: Plot, body: str) -> str:
    return f'<section id="{plot.name}"><h2>{html.escape(plot.title)}</h2>{body}</section>'


def _page(
    study: optuna.Study,
    trials: list[FrozenTrial],
    sections: list[str],
    best: list[FrozenTrial],
    front: list[FrozenTrial],
) -> str:
    name = html.escape(study.study_name)
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>Study {name}: search report</title>
<style>{CSS}</style>
<script>window.PlotlyConfig = {{MathJaxConfig: 'local'}};</script>
<script>{plotly.offline.get_plotlyjs()}</script>
</head><body>
<h1>Study {name}</h1>
<p class="summary">{html.escape(_summary(study, trials))}</p>
<p class="summary">Do the pruner's rungs rank trials as their last epoch does?
{html.escape(fidelity_line(study))}.</p>
<p class="summary">Generated {generated} by <code>hpo report</code>.</p>
{_trackers(study, trials)}
{_comparison(study)}
{"".join(sections)}
<section id="pareto-front"><h2>Pareto front: the most accurate trial at each cost</h2>
<p class="summary">No other complete trial is as accurate for as few GFLOP per image; cheapest
first. <code>hpo best --pareto</code> exports these configs.</p>{_top_table(front)}</section>
<section id="top-trials"><h2>Top trials</h2>{_top_table(best)}</section>
</body></html>
"""


def _summary(study: optuna.Study, trials: list[FrozenTrial]) -> str:
    counts = Counter(t.state.name.lower() for t in trials)
    states = ", ".join(f"{counts[state]} {state}" for state in sorted(counts))
    settings = study.user_attrs.get(attrs.SETTINGS)
    how = (
        f"space {settings['space_name']}, {settings['epochs']} epochs per trial, "
        f"{describe_data(StudySettings.from_dict(settings))}, pruner {settings['pruner']}; "
        if settings
        else ""
    )
    return f"{how}{len(trials)} trials: {states or 'none yet'}."


def _trackers(study: optuna.Study, trials: list[FrozenTrial]) -> str:
    """Where the trials are logged besides this page, and the best trial's MLflow run."""
    stored = study.user_attrs.get(attrs.SETTINGS)
    settings = StudySettings.from_dict(stored) if stored else None
    if settings is None or not (settings.tensorboard or settings.mlflow):
        return ""
    rows = tracker_rows(settings, study.user_attrs, trials)
    cells = []
    for name, value in rows:
        shown = html.escape(value)
        link = f'<a href="{shown}">{shown}</a>' if value.startswith("http") else shown
        cells.append(f"{html.escape(name)}: {link}")
    return f'<p class="summary">{"; ".join(cells)}.</p>'


def _comparison(study: optuna.Study) -> str:
    """The latest `hpo compare` table, when there is one."""
    table = study.user_attrs.get(attrs.COMPARE)
    if table is None:
        return ""
    head = "".join(f"<th>{html.escape(column)}</th>" for column in COLUMNS)
    rows = "".join(
        "<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>"
        for row in table_rows(table)
    )
    return (
        '<section id="compare"><h2>Best configs against the report\'s (test set)</h2>'
        f'<table><tr>{head}</tr>{rows}</table><p class="summary">'
        f"{html.escape(explanation(table))}</p></section>"
    )


ABLATION_TITLE = "Which change bought the points: the path from the report's config"


def _ablation(study: optuna.Study, output: Path) -> tuple[str, Path | None, str | None]:
    """The predicted path (and the measured one, once `hpo ablate --measure` ran): the section,
    its PNG, and why it is skipped, if it is."""
    from search.commands.ablation import FIGURE, measured_html, path_html, path_png, study_path
    from search.rules.ablation import AblationError

    measured = study.user_attrs.get(attrs.ABLATION)
    tail = measured_html(measured) if measured else ""
    head = f'<section id="ablation"><h2>{html.escape(ABLATION_TITLE)}</h2>'
    if attrs.SETTINGS not in study.user_attrs:
        reason = "not a study `hpo create` made (no settings)"
    else:
        try:
            path = study_path(study, StudySettings.from_dict(study.user_attrs[attrs.SETTINGS]))
            figure = path_png(path, output / FIGURE)
            return f"{head}{path_html(path)}{tail}</section>", figure, None
        except AblationError as err:
            reason = str(err)
    note = f'<p class="note">Skipped: {html.escape(reason)}.</p>'
    return f"{head}{note}{tail}</section>", None, reason


def _top_table(best: list[FrozenTrial]) -> str:
    if not best:
        return '<p class="note">No complete trial yet.</p>'
    head = (
        "<tr><th>rank</th><th>trial</th><th>score</th><th>val acc</th><th>params</th>"
        "<th>GFLOP/image</th><th>images/s</th><th>epochs</th><th>architecture</th><th>recipe</th>"
        "<th>config</th></tr>"
    )
    rows = "".join(_top_row(rank, trial) for rank, trial in enumerate(best, start=1))
    return f"<table>{head}{rows}</table>"


def _top_row(rank: int, trial: FrozenTrial) -> str:
    stored = trial.user_attrs
    config = stored.get(attrs.CONFIG)
    cells = [
        str(rank),
        str(trial.number),
        f"{trial.value:.4f}",
        f"{stored[attrs.VAL_ACC]:.2%}" if attrs.VAL_ACC in stored else "-",
        f"{stored[attrs.PARAMS]:,}" if attrs.PARAMS in stored else "-",
        f"{gflop:.4g}" if (gflop := trial_gflop(trial)) is not None else "-",
        f"{stored[attrs.IMAGES_PER_S]:,.0f}" if attrs.IMAGES_PER_S in stored else "-",
        str(len(trial.intermediate_values)),
        html.escape(str(stored.get(attrs.ARCHITECTURE, "-"))),
        html.escape(_recipe(config)),
        _config_details(config),
    ]
    return "<tr>" + "".join(f"<td>{cell}</td>" for cell in cells) + "</tr>"


def _recipe(config: dict | None) -> str:
    if not config or "train" not in config:
        return "-"
    train = config["train"]
    args = ", ".join(f"{k} {v:.3g}" for k, v in train.get("scheduler_args", {}).items())
    return (
        f"lr {train['lr']:.2e}, wd {train['weight_decay']:.1e}, clip {train['grad_clip']:.2g}, "
        f"batch {train['batch_size']}, {train['scheduler']}" + (f" ({args})" if args else "")
    )


def _config_details(config: dict | None) -> str:
    if not config:
        return "-"
    text = yaml.safe_dump(config, sort_keys=False, default_flow_style=None)
    return f"<details><summary>YAML</summary><pre>{html.escape(text)}</pre></details>"


CSS = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1200px; color: #222; }
h1 { margin-bottom: .2rem; } h2 { margin-top: 2.2rem; border-bottom: 1px solid #ddd; }
.summary, .png { color: #555; margin: .2rem 0; } .note { color: #a15c00; font-style: italic; }
table { border-collapse: collapse; font-size: .85rem; width: 100%; }
th, td { border: 1px solid #ddd; padding: .3rem .5rem; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } pre { margin: .3rem 0; font-size: .8rem; }
"""
