"""`hpo ablate`: which change bought the points, on the path from the report's config to the
best trial. Predicted (free: a forest fitted to the study's trials, search/rules/ablation.py),
and with --measure trained for real by `hpo compare`'s rule (its configs, seeds, epochs and
data), each step's paired difference to the one before and to the report.

The measured run keeps every (config, seed) result in its output folder as it comes, keyed by
the config's content: a stopped run resumes at the step and seed it reached, and a config that
`hpo compare` trained under the same rule (the report's, the best's) is taken from its table.
"""

from __future__ import annotations

import html
import json
import os
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import optuna
from optuna.trial import FrozenTrial, TrialState
from rich.table import Table

from search.commands.compare import (
    compare_note,
    config_key,
    format_difference,
    paired_difference,
    report_config,
    report_entry,
    report_trial,
    to_markdown,
)
from search.commands.export import trial_document
from search.commands.progress import SearchProgress
from search.rules import attrs
from search.rules.ablation import (
    AblationError,
    PredictedPath,
    complete_trials,
    describe_changes,
    largest_steps,
    predicted_path,
    with_group,
)
from search.rules.artifacts import artifact_dir
from search.rules.config import FINAL_EPOCHS, TrialConfig
from search.rules.cost import format_duration
from search.rules.data import check_data, fit_to_data, study_identity
from search.rules.faults import write_or_say
from search.rules.settings import StudySettings
from search.rules.space import DEFAULT_SPACE_NAME, SpaceError, config_from_params, report_params_in
from search.rules.study import budget, join, load_settings
from storage import open_storage

FIGURE = "ablation.png"
MEASURED_FIGURE = "ablation-measured.png"
RESULTS = "ablation-runs.json"  # (config, seed) -> its test figures, as they come
FILES = ("ablation.md", "ablation.json")


@dataclass(frozen=True)
class AblateRequest:
    study: str
    storage: str
    output_dir: Path
    trial: int | None = None  # the path's end; the best trial if None
    measure: bool = False
    seeds: int = 3
    epochs: int | None = None  # FINAL_EPOCHS if None
    steps: int | None = None  # measure the K largest predicted steps, the rest merged into one
    data_dir: Path | None = None
    artifact_dir: Path | None = None
    gpus: str | None = None


def study_path(
    study: optuna.Study, settings: StudySettings, trial: int | None = None
) -> PredictedPath:
    """The predicted path of `study` from its report's config to `trial` (else its best)."""
    trials = study.get_trials(deepcopy=False)
    start, start_trial = report_params(study, settings)
    target = target_trial(study, trials, trial, settings.direction == "minimize")
    return predicted_path(
        trials,
        start,
        dict(target.params),
        start_trial,
        target.number,
        minimize=settings.direction == "minimize",
    )


def report_params(
    study: optuna.Study, settings: StudySettings
) -> tuple[dict[str, Any], int | None]:
    """The report's config as parameters of the study, and its trial: the trial `hpo compare`
    takes as the report's entry (trial 0 of a default study), else, outside the default space,
    the report's parameters fitted to the space as `hpo compare` fits them."""
    space = settings.search_space()
    try:
        trial = report_trial(study, report_config(space, settings.epochs))
        if trial is not None:
            return dict(trial.params), trial.number
        if settings.space_name == DEFAULT_SPACE_NAME:
            raise AblationError(
                f"study {study.study_name!r} holds no complete trial of the report's config "
                "(the default space's first trial): the path has no start"
            )
        return report_params_in(space), None
    except SpaceError as err:
        raise AblationError(str(err)) from err


def target_trial(
    study: optuna.Study, trials: list[FrozenTrial], number: int | None, minimize: bool
) -> FrozenTrial:
    complete = complete_trials(trials)
    if number is None:
        if not complete:
            raise AblationError(f"study {study.study_name!r} has no completed trial yet")
        return (min if minimize else max)(complete, key=lambda t: t.value)
    found = next((t for t in complete if t.number == number), None)
    if found is None:
        state = next((t.state.name for t in trials if t.number == number), None)
        why = f"it is {state}" if state else "there is no such trial"
        raise AblationError(f"trial {number} of {study.study_name!r} is no end: {why}")
    return found


def _label(path: PredictedPath, index: int) -> str:
    step = path.steps[index]
    if index == len(path.steps) - 1 and index > 0:
        return f"{step.label} (= trial {path.target_trial})"
    if index == 0 and path.start_trial is not None:
        return f"{step.label} (trial {path.start_trial})"
    return step.label


def path_rows(path: PredictedPath) -> list[list[str]]:
    return [
        [str(i), _label(path, i), describe_changes(step.changes) or "-", _score(step.mean, step.sd)]
        for i, step in enumerate(path.steps)
    ]


PATH_COLUMNS = ("step", "change", "parameters", "predicted score (± sd over trees)")


def path_title(path: PredictedPath) -> str:
    return (
        f"Predicted path from the report's config to trial {path.target_trial} (a random forest "
        f"fitted to {path.trials} complete trials: a prediction, not a measurement)"
    )


def path_table(path: PredictedPath) -> Table:
    table = Table(title=path_title(path), title_justify="left")
    for column in PATH_COLUMNS:
        table.add_column(column, overflow="fold")
    for row in path_rows(path):
        table.add_row(*row)
    return table


def _score(mean: float, sd: float) -> str:
    return f"{mean:.4f} ± {sd:.4f}"


def path_png(path: PredictedPath, file: Path) -> Path:
    """The predicted score per step with the trees' spread as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, ax = plt.subplots(figsize=(10, 5.5))
    x = range(len(path.steps))
    ax.errorbar(
        x, [s.mean for s in path.steps], yerr=[s.sd for s in path.steps], fmt="o-", capsize=4
    )
    ax.set_xticks(list(x), [_label(path, i) for i in x], rotation=30, ha="right")
    ax.set_ylabel("predicted score (lower is better)")
    ax.set_title(
        f"Predicted, not measured: random forest on {path.trials} complete trials\n"
        f"greedy path from the report's config to trial {path.target_trial}"
    )
    figure.savefig(file, dpi=110, bbox_inches="tight")
    plt.close(figure)
    return file


def path_html(path: PredictedPath) -> str:
    """The path's table for the report's page (the PNG beside it)."""
    return (
        f'<p class="summary">{html.escape(path_title(path))}. Each step flips the one group of '
        "differences whose change to the target's values predicts the best score; error bars "
        "are the spread of the forest's trees. <code>hpo ablate --measure</code> trains it.</p>"
        f'<p><img src="{FIGURE}" alt="predicted path" style="max-width:100%"></p>'
        + html_table(PATH_COLUMNS, path_rows(path))
    )


def html_table(columns: list[str] | tuple[str, ...], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def run_ablate(request: AblateRequest, progress: SearchProgress) -> dict[str, Any] | None:
    """Print the predicted path and draw it; with --measure, train it and attach the table."""
    storage = open_storage(request.storage, reader=True)
    study = join(storage, request.study)
    settings = load_settings(storage, request.study)
    path = study_path(study, settings, request.trial)
    progress.console.print(path_table(path))
    try:
        request.output_dir.mkdir(parents=True, exist_ok=True)
        progress.say(f"wrote {path_png(path, request.output_dir / FIGURE)}")
    except OSError as err:  # the path above stands; a folder that refuses it is one line
        raise AblationError(f"--output-dir {request.output_dir}: {err.strerror or err}") from err
    if not request.measure:
        return None
    return measure(request, progress, study, settings, path)


@dataclass(frozen=True)
class MeasuredStep:
    label: str
    changes: str
    cfg: TrialConfig
    predicted: float | None  # the forest's score of the step, where the step is on its path


def measured_steps(
    request: AblateRequest,
    study: optuna.Study,
    settings: StudySettings,
    path: PredictedPath,
    epochs: int,
) -> list[MeasuredStep]:
    """The configs along the path, each by `hpo compare`'s rule: the report's entry and the
    target's export as compare builds them; every config between as a trial of the study's
    space and length would run it, scaled to `epochs` as the trials are."""
    minimize = settings.direction == "minimize"
    groups = largest_steps(path, request.steps or len(path.steps), minimize)
    space = settings.search_space()
    report = report_entry(study, request.storage, settings, epochs)
    document = trial_document(study, request.storage, path.target_trial)
    target_cfg = TrialConfig.from_dict(document).with_epochs(epochs)
    target = path.steps[-1].params
    # A measured config on the predicted path has its prediction (with --steps, some are not).
    predicted = {_params_key(step.params): step.mean for step in path.steps}
    steps = [MeasuredStep(_label(path, 0), "-", report.cfg, path.steps[0].mean)]
    params = path.steps[0].params
    for index, merged in enumerate(groups):
        before = params
        for group in merged:
            params = with_group(params, target, group)
        changes = {n: (before.get(n), params.get(n)) for n in sorted({*before, *params})}
        changes = {n: pair for n, pair in changes.items() if pair[0] != pair[1]}
        last = index == len(groups) - 1
        between = fit_to_data(config_from_params(params, space, settings.epochs), settings)
        cfg = target_cfg if last else between
        label = "+ " + ", ".join(merged) + (f" (= trial {path.target_trial})" if last else "")
        predicted_score = predicted.get(_params_key(params))
        steps.append(
            MeasuredStep(label, describe_changes(changes), cfg.with_epochs(epochs), predicted_score)
        )
    return steps


def _params_key(params: dict[str, Any]) -> str:
    return json.dumps(params, sort_keys=True)


def measure(
    request: AblateRequest,
    progress: SearchProgress,
    study: optuna.Study,
    settings: StudySettings,
    path: PredictedPath,
) -> dict[str, Any]:
    """Train every step's config per seed (those not trained yet), then the table."""
    epochs = request.epochs or FINAL_EPOCHS
    steps = measured_steps(request, study, settings, path, epochs)
    seeds = list(range(request.seeds))
    # The training plane (torch) loads once the path is drawn: a user's mistakes need none.
    from data.dataset import load_with_identity
    from search.training.final import make_output_dir, seed_devices, train_seeds

    make_output_dir(request.output_dir)
    devices = seed_devices(request.gpus, progress.say)
    images, found = load_with_identity(
        settings.dataset, request.data_dir, image_size=settings.image_size
    )
    check_data(study_identity(settings), found)  # before anything trains, as hpo compare
    shape = {
        "dataset": settings.dataset,
        "epochs": epochs,
        "train_images": len(images.train_labels),
    }
    results = _load_results(request.output_dir / RESULTS, shape)
    reused = _from_compare(study, path, steps, shape, results)
    keys = [config_key(step.cfg) for step in steps]
    left = [
        (i, s) for i, key in enumerate(keys) for s in seeds if str(s) not in results.get(key, {})
    ]
    distinct = len(set(keys))
    progress.say(
        f"measuring {len(steps)} steps ({distinct} distinct configs) x {len(seeds)} seeds x "
        f"{epochs} epochs = {distinct * len(seeds)} trainings: {len(left)} to train, "
        f"{distinct * len(seeds) - len(left)} already done ({reused} from `hpo compare`); "
        + _eta(study, len(left) * epochs * shape["train_images"])
    )
    for index, step in enumerate(steps):
        key = keys[index]
        missing = [s for s in seeds if str(s) not in results.get(key, {})]
        # One device: seed by seed, each kept as it ends; several: the missing seeds side by side.
        chunks = [[s] for s in missing] if len(devices) == 1 else [missing] if missing else []
        for chunk in chunks:
            progress.say(f"training step {index} ({step.label}) seed(s) {chunk}")
            where = request.output_dir / f"step-{index}" / "-".join(f"seed{s}" for s in chunk)
            say = _labelled(progress, index)
            stats = (found.mean, found.std)
            metrics = train_seeds(step.cfg, images, chunk, where, devices, say, stats)
            for run in metrics["seeds"]:
                results.setdefault(key, {})[str(run["seed"])] = {
                    "test_acc": run["test_acc"],
                    "test_loss": run["test_loss"],
                    "train_seconds": run["train_seconds"],
                }
            _save_results(request.output_dir / RESULTS, shape, results, progress.say)
    table = measured_table(study.study_name, shape, seeds, steps, [results[k] for k in keys])
    markdown = measured_markdown(table)
    progress.console.print(measured_rich(table))
    # Each file the disk's to refuse (said in one line): the table above stands, and goes to
    # the study below all the same.
    texts = {FILES[0]: markdown, FILES[1]: json.dumps(table, indent=2) + "\n"}
    say, folder = progress.say, request.output_dir
    written = [
        name
        for name, text in texts.items()
        if write_or_say(folder / name, lambda file, text=text: file.write(text.encode()), say)
    ]
    png = folder / MEASURED_FIGURE
    if write_or_say(png, lambda file: measured_png(table, file), say):
        written.append(png.name)
    progress.say(f"wrote {', '.join(written) or 'nothing'} in {request.output_dir}")
    figures = [png] if png.name in written else []
    progress.say(_attach(request, settings, table, markdown, figures))
    return table


def _labelled(progress: SearchProgress, step: int) -> Callable[[str], None]:
    return lambda line: progress.say(f"step {step} | {line}")


def _eta(study: optuna.Study, images: int) -> str:
    """From the study's own median training throughput (its trials' images/s)."""
    speeds = [
        t.user_attrs[attrs.IMAGES_PER_S]
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if t.user_attrs.get(attrs.IMAGES_PER_S)
    ]
    if not images:
        return "nothing to train"
    if not speeds:
        return "no ETA (no trial recorded its images/s)"
    speed = statistics.median(speeds)
    return (
        f"ETA ~{format_duration(images / speed)} at the trials' median {speed:,.0f} images/s "
        "(training only, on this study's devices)"
    )


def _load_results(file: Path, shape: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The results of a run stopped before, where it trained under the same rule."""
    try:
        stored = json.loads(file.read_text())
    except (OSError, ValueError):
        return {}
    return stored["results"] if stored.get("shape") == shape else {}


def _save_results(
    file: Path, shape: dict[str, Any], results: dict[str, Any], say: Callable[[str], None]
) -> None:
    """Whole or not at all: a run stopped while writing keeps the results before. A disk that
    refuses them is said; this run goes on, a later one trains these seeds again."""
    partial = file.with_suffix(".partial")
    text = json.dumps({"shape": shape, "results": results}).encode()
    if write_or_say(partial, lambda out: out.write(text), say):
        os.replace(partial, file)


def _from_compare(
    study: optuna.Study,
    path: PredictedPath,
    steps: list[MeasuredStep],
    shape: dict[str, Any],
    results: dict[str, dict[str, Any]],
) -> int:
    """Seeds `hpo compare` trained of the report's and the target's configs, by the same rule
    (dataset, epochs, training images): taken, not trained again. The number taken."""
    table = study.user_attrs.get(attrs.COMPARE)
    if not table or any(table.get(k) != v for k, v in shape.items()):
        return 0
    taken = 0
    ends = {0: ("report", path.start_trial), len(steps) - 1: (None, path.target_trial)}
    for index, (name, trial) in ends.items():
        config = next(
            (
                c
                for c in table["configs"]
                if (name is None or c["name"] == name) and c["trial"] == trial
            ),
            None,
        )
        if config is None:
            continue
        key = config_key(steps[index].cfg)
        for seed, acc, loss in zip(
            table["seeds"], config["test_acc"], config["test_loss"], strict=True
        ):
            if str(seed) not in results.get(key, {}):
                results.setdefault(key, {})[str(seed)] = {"test_acc": acc, "test_loss": loss}
                taken += 1
    return taken


def measured_table(
    study: str,
    shape: dict[str, Any],
    seeds: list[int],
    steps: list[MeasuredStep],
    runs: list[dict[str, Any]],
) -> dict[str, Any]:
    """Per step: test accuracy per seed, mean and sd, the paired difference to the step before
    and to the report."""
    accuracy = [[run[str(s)]["test_acc"] for s in seeds] for run in runs]
    rows = []
    for index, (step, acc) in enumerate(zip(steps, accuracy, strict=True)):
        rows.append(
            {
                "step": index,
                "label": step.label,
                "changes": step.changes,
                "predicted_score": step.predicted,
                "test_acc": acc,
                "test_acc_mean": statistics.fmean(acc),
                "test_acc_std": statistics.stdev(acc) if len(acc) > 1 else None,
                "vs_previous": paired_difference(acc, accuracy[index - 1]) if index else None,
                "vs_report": paired_difference(acc, accuracy[0]) if index else None,
            }
        )
    return {"study": study, **shape, "seeds": seeds, "steps": rows}


MEASURED_COLUMNS = (
    "step", "change", "predicted score", "test accuracy", "vs previous (95% CI)",
    "vs report (95% CI)",
)  # fmt: skip


def measured_rows(table: dict[str, Any]) -> list[list[str]]:
    return [
        [
            str(row["step"]),
            row["label"] + ("" if row["changes"] == "-" else f": {row['changes']}"),
            "-" if row["predicted_score"] is None else f"{row['predicted_score']:.4f}",
            f"{row['test_acc_mean']:.2%}"
            + ("" if row["test_acc_std"] is None else f" ± {row['test_acc_std']:.2%}"),
            format_difference(row["vs_previous"]),
            format_difference(row["vs_report"]),
        ]
        for row in table["steps"]
    ]


def measured_title(table: dict[str, Any]) -> str:
    return (
        f"Measured path ({table['epochs']} epochs, seeds "
        f"{', '.join(map(str, table['seeds']))}, `{table['dataset']}` test set)"
    )


def measured_rich(table: dict[str, Any]) -> Table:
    shown = Table(title=measured_title(table), title_justify="left")
    for column in MEASURED_COLUMNS:
        shown.add_column(column, overflow="fold")
    for row in measured_rows(table):
        shown.add_row(*row)
    return shown


def measured_markdown(table: dict[str, Any]) -> str:
    head = "| " + " | ".join(MEASURED_COLUMNS) + " |\n|" + "---|" * len(MEASURED_COLUMNS) + "\n"
    rows = "".join("| " + " | ".join(row) + " |\n" for row in measured_rows(table))
    return f"{measured_title(table)}\n\n{head}{rows}\n{MEASURED_NOTE}\n"


MEASURED_NOTE = (
    "Each step trained as `hpo compare` trains its configs (same epochs, seeds and data), "
    "tested once per seed. Differences are paired by seed, in percentage points, with a 95% "
    "Student-t interval (none from one seed)."
)


def measured_html(table: dict[str, Any]) -> str:
    return (
        f"<h3>{html.escape(measured_title(table))}</h3>"
        + html_table(MEASURED_COLUMNS, measured_rows(table))
        + f'<p class="summary">{html.escape(MEASURED_NOTE)}</p>'
    )


def measured_png(table: dict[str, Any], file: Path | BinaryIO) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = table["steps"]
    figure, ax = plt.subplots(figsize=(10, 5.5))
    x = range(len(rows))
    ax.errorbar(
        x,
        [100 * r["test_acc_mean"] for r in rows],
        yerr=[100 * (r["test_acc_std"] or 0) for r in rows],
        fmt="o-",
        capsize=4,
    )
    ax.set_xticks(list(x), [r["label"] for r in rows], rotation=30, ha="right")
    ax.set_ylabel("test accuracy (%), mean ± sd over seeds")
    ax.set_title(measured_title(table))
    figure.savefig(file, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)


def status_line(table: dict[str, Any]) -> str:
    """The measured path in one line, for `hpo status`."""
    rows = table["steps"]
    gains = ", ".join(
        f"{row['label']} {100 * row['vs_previous']['mean']:+.2f} pts" for row in rows[1:]
    )
    return (
        f"report {rows[0]['test_acc_mean']:.2%} -> {rows[-1]['test_acc_mean']:.2%}: {gains} "
        f"({len(table['seeds'])} seed(s), {table['epochs']} epochs)"
    )


def _attach(
    request: AblateRequest,
    settings: StudySettings,
    table: dict[str, Any],
    markdown: str,
    files: list[Path],
) -> str:
    """The table in a study attribute (status, report, the dashboard's note); the figure as
    an artifact, where the artifact store takes it."""
    from search.commands.dashboard import write_study_note
    from search.training.final import attach_to_study, open_for_writing

    study = open_for_writing(request.storage, request.study)
    artifacts = artifact_dir(request.artifact_dir, request.storage)
    try:
        ids = attach_to_study(study, artifacts, files)
    except OSError:  # the machine's fault: the table still goes to the study
        ids = {}
    study.set_user_attr(attrs.ABLATION, {**table, "markdown": markdown, "artifacts": ids})
    compared = study.user_attrs.get(attrs.COMPARE)
    appendix = compare_note(to_markdown(compared)) if compared else ""
    write_study_note(study, settings, budget(study).target, appendix)
    return f"attached the measured path to study {request.study!r}"
