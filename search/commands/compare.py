"""`hpo compare`: did the search beat the report? The study's best configs and the report's
own Table 1/2 config, trained alike with the same seeds and tested once each, in one table.

One config's test accuracy moves by a few tenths of a percent from seed to seed, the size of
what a search gains, so every config is trained with the same seeds and the difference to the
report is taken seed by seed (paired), with a Student-t interval over those differences.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from search.commands.export import best_document
from search.commands.progress import SearchProgress, format_mean_std
from search.commands.tables import FittedTable
from search.rules import attrs
from search.rules.artifacts import artifact_dir
from search.rules.config import FINAL_EPOCHS, TrialConfig
from search.rules.data import check_data, fit_to_data, local_dataset, study_identity
from search.rules.faults import FilesNotWritten, machine_fault_line, write_or_say
from search.rules.settings import StudySettings
from search.rules.space import (
    DEFAULT_SPACE,
    LEVERS_OFF,
    SearchSpace,
    config_from_params,
    report_params_in,
    report_table1_params,
)
from search.rules.study import StudyError, budget, join, load_settings
from storage import open_storage

REPORT = "report"
FILES = ("compare.md", "compare.json")
# Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom (any statistics table).
T_975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip
COLUMNS = (
    "config",
    "search score",
    "test accuracy",
    "vs report (95% CI)",
    "params",
    "train GFLOP/image",
    "train time",
    "images/s",
)


@dataclass(frozen=True)
class CompareRequest:
    study: str
    storage: str
    output_dir: Path
    seeds: int = 3
    epochs: int | None = None  # FINAL_EPOCHS if None
    top: int = 1  # the study's best trials to train, by validation loss
    data_dir: Path | None = None
    artifact_dir: Path | None = None
    gpus: str | None = None
    dataset: str | None = None  # this machine's copy of the study's data; None: its own


@dataclass(frozen=True)
class Entry:
    """One config of the table: a trial's, or the report's."""

    name: str
    trial: int | None
    cfg: TrialConfig
    val_loss: float | None = None

    @property
    def folder(self) -> str:
        """Where its seeds' weights and metrics go, under the output folder."""
        return REPORT if self.name == REPORT else f"trial-{self.trial}"


def run_compare(request: CompareRequest, progress: SearchProgress) -> dict[str, Any]:
    """Train the top trials and the report's config per seed; write, attach and show the table."""
    storage = open_storage(request.storage, reader=True)
    study = join(storage, request.study)
    settings = load_settings(storage, request.study)
    epochs = request.epochs or FINAL_EPOCHS
    top = top_entries(study, request.storage, request.top, epochs)
    entries = [*top, report_entry(study, request.storage, settings, epochs)]
    # The training plane (torch) loads once the study is found: its table and a user's
    # mistakes need none.
    from data.dataset import load_with_identity
    from search.training.final import (
        make_output_dir,
        seed_devices,
        train_seeds,
        unwritten_files,
    )
    from search.training.objective import describe_architecture

    make_output_dir(request.output_dir)
    devices = seed_devices(request.gpus, progress.say)
    dataset = local_dataset(settings, request.dataset)
    images, found = load_with_identity(dataset, request.data_dir, image_size=settings.image_size)
    check_data(study_identity(settings), found)  # before anything trains
    seeds = list(range(request.seeds))
    trained: dict[str, dict[str, Any]] = {}
    for key, entry in training_plan(entries).items():
        progress.say(f"{entry.name}: {describe_architecture(entry.cfg)}")
        folder = request.output_dir / entry.folder
        say = _labelled(progress, entry.name)
        stats = (found.mean, found.std)
        trained[key] = train_seeds(entry.cfg, images, seeds, folder, devices, say, stats)
    runs = [(entry, trained[config_key(entry.cfg)]) for entry in entries]
    table = comparison(study.study_name, settings, epochs, seeds, runs)
    markdown = to_markdown(table)
    # Shown first: a disk that refuses the files below loses none of the trainings' results.
    progress.console.print(compare_table(table))
    progress.say(explanation(table))
    written = _write_files(request.output_dir, table, markdown, progress.say)
    progress.say(_attach(request, settings, table, markdown, written))
    if settings.tensorboard or settings.mlflow:
        from search.training.final import METRICS_FILE, open_for_writing
        from search.training.final_trackers import log_final

        tracked = open_for_writing(request.storage, request.study)
        files = [request.output_dir / name for name in written]
        for key, entry in training_plan(entries).items():
            label = f"compare-{entry.folder}"
            metrics_file = request.output_dir / entry.folder / METRICS_FILE
            kept = [metrics_file] if metrics_file.is_file() else []  # a full disk kept none
            log_final(tracked, settings, label, trained[key], [*kept, *files], progress.say)
    unwritten = [
        *(f"{entry.folder}/{file}" for entry in training_plan(entries).values()
          for file in unwritten_files(trained[config_key(entry.cfg)])),
        *(file for file in FILES if file not in written),
    ]  # fmt: skip
    if unwritten:
        raise FilesNotWritten(
            f"{', '.join(unwritten)} not written in {request.output_dir} (the disk refused "
            "them, as said above; the table above stands and is attached to the study)"
        )
    return table


def _write_files(
    folder: Path, table: dict[str, Any], markdown: str, say: Callable[[str], None]
) -> list[str]:
    """compare.md and compare.json, each the machine's to refuse (said in one line); the
    files written."""
    texts = dict(zip(FILES, (markdown, json.dumps(table, indent=2) + "\n"), strict=True))
    written = [
        name
        for name, text in texts.items()
        if write_or_say(folder / name, lambda file, text=text: file.write(text.encode()), say)
    ]
    if written:
        say(f"wrote {', '.join(written)} in {folder}")
    return written


def top_entries(study: optuna.Study, storage_url: str, count: int, epochs: int) -> list[Entry]:
    """The `count` complete trials with the lowest validation loss, best first, each config
    as `hpo best` exports it for `hpo train`."""
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    if not complete:
        raise StudyError(f"study {study.study_name!r} has no completed trial yet")
    entries = []
    for rank, trial in enumerate(sorted(complete, key=lambda t: t.value)[:count], start=1):
        document = best_document(study, storage_url, trial)
        cfg = TrialConfig.from_dict(document).with_epochs(epochs)
        name = f"trial {trial.number} ({'best' if rank == 1 else f'#{rank}'})"
        entries.append(Entry(name, trial.number, cfg, trial.value))
    return entries


def training_plan(entries: list[Entry]) -> dict[str, Entry]:
    """Each distinct config once, under the first entry that names it: the report's config
    is trained once even when its trial is also among the top ones."""
    plan: dict[str, Entry] = {}
    for entry in entries:
        plan.setdefault(config_key(entry.cfg), entry)
    return plan


def config_key(cfg: TrialConfig) -> str:
    return json.dumps(cfg.to_dict(), sort_keys=True)


def report_entry(
    study: optuna.Study, storage_url: str, settings: StudySettings, epochs: int
) -> Entry:
    """The report's Table 1/2 config by the top trials' rule: where the study holds a complete
    trial of it (trial 0 of the default space), that trial as `hpo best` exports it; elsewhere
    the config as a trial of this study's length, scaled to `epochs` the same way."""
    # Fitted to the data as the study's trials are: one classifier output per class.
    cfg = report_config(settings.search_space(), settings.epochs)
    cfg = fit_to_data(cfg, settings)
    trial = report_trial(study, cfg)
    if trial is not None:
        document = best_document(study, storage_url, trial)
        cfg = TrialConfig.from_dict(document).with_epochs(epochs)
        return Entry(REPORT, trial.number, cfg, trial.value)
    return Entry(REPORT, None, cfg.with_epochs(epochs))


def report_config(space: SearchSpace, epochs: int) -> TrialConfig:
    """The report's recipe (AdamW, no smoothing, no weight average, no cutout, no mixing, no
    test-time views, its plateau or the nearest stand-in) on the report's network fitted to
    `space`. Drawn in the space with every lever off, whatever `space` fixes them to: a space
    offering only SGD, or smoothing fixed at 0.1, cannot express the report's run."""
    recipe_off = replace(space, **{name: tuple(off) for name, off in LEVERS_OFF.items()})
    return config_from_params(report_params_in(recipe_off), recipe_off, epochs)


def published_config(epochs: int) -> TrialConfig:
    """The report's run itself, as a trial of the default space of `epochs` makes it."""
    return config_from_params(report_table1_params(), DEFAULT_SPACE, epochs)


def report_trial(study: optuna.Study, cfg: TrialConfig) -> FrozenTrial | None:
    """The first complete trial that ran `cfg` (the study's first trial, or a retry)."""
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return next((t for t in trials if _stored_config(t) == cfg), None)


def _stored_config(trial: FrozenTrial) -> TrialConfig | None:
    try:
        return TrialConfig.from_dict(trial.user_attrs[attrs.CONFIG])
    except (KeyError, ValueError):  # none stored, or one this version cannot read
        return None


def report_scaling(settings: StudySettings, report: Entry) -> str:
    """How the report's config was fitted to the study's space and trained, in words: each
    way it trains otherwise than the published run, and nothing else."""
    source = _report_source(settings, report)
    published = published_config(settings.epochs).with_epochs(report.cfg.train.epochs)
    changes = config_changes(published, report.cfg)
    if not changes:
        return f"the report's Table 1/2 config exactly as published ({source})"
    return (
        f"the report's Table 1/2 config fitted to the study's `{settings.space_name}` space "
        f"({'; '.join(changes)}); everything else as published; {source}"
    )


def config_changes(published: TrialConfig, fitted: TrialConfig) -> list[str]:
    """Each field `fitted` trains with otherwise than `published`, as `name old -> new`. The LR
    trace a trial's export carries is left out: it replays the schedule named."""
    old, new = published.to_dict(), fitted.to_dict()
    changes = []
    if old["model"]["channels"] != new["model"]["channels"]:
        before, after = (_widths(c.model.channels) for c in (published, fitted))
        changes.append(f"widths {before} -> {after}")
    schedules = [_schedule(c) for c in (published, fitted)]
    if schedules[0] != schedules[1]:
        changes.append(f"scheduler {schedules[0]} -> {schedules[1]}")
    skip = {"channels", "scheduler", "scheduler_args", "lr_by_epoch"}
    for section, fields in new.items():
        changes += [
            f"{name} {old[section][name]} -> {value}"
            for name, value in fields.items()
            if name not in skip and old[section][name] != value
        ]
    return changes


def _widths(channels: list[list[int]]) -> str:
    return ", ".join(str(width) for chain in channels for width in chain[1:])


def _schedule(cfg: TrialConfig) -> str:
    args = ", ".join(f"{name} {value}" for name, value in cfg.train.scheduler_args.items())
    return f"{cfg.train.scheduler} ({args})" if args else cfg.train.scheduler


def _report_source(settings: StudySettings, report: Entry) -> str:
    if report.trial is not None:
        return f"the study's trial {report.trial}, exported as `hpo best --trial` exports it"
    rule = (
        f"not a trial of this study: its config over the study's {settings.epochs} trial "
        "epochs, scaled to the final run as the trials are"
    )
    if report.cfg.train.scheduler == "plateau":
        rule += "; with no LR trace to replay, its plateau schedule watches the training loss"
    return rule


def comparison(
    study: str,
    settings: StudySettings,
    epochs: int,
    seeds: list[int],
    runs: list[tuple[Entry, dict[str, Any]]],
) -> dict[str, Any]:
    """The table as data: per config its per-seed test scores, their mean and std, and the
    paired difference to the report with its 95% interval."""
    from search.training.objective import describe_architecture

    report_run = next(run for run in runs if run[0].name == REPORT)
    report = report_run[1]
    baseline = [run["test_acc"] for run in report["seeds"]]
    configs = []
    for entry, metrics in runs:
        acc = [run["test_acc"] for run in metrics["seeds"]]
        configs.append(
            {
                "name": entry.name,
                "trial": entry.trial,
                "val_loss": entry.val_loss,
                "architecture": describe_architecture(entry.cfg),
                "params": metrics["params"],
                "train_gflop_per_image": metrics["train_gflop_per_image"],
                "test_acc": acc,
                "test_loss": [run["test_loss"] for run in metrics["seeds"]],
                "test_acc_mean": metrics["test_acc"]["mean"],
                "test_acc_std": metrics["test_acc"]["std"],
                "vs_report": None if entry.name == REPORT else paired_difference(acc, baseline),
                "train_seconds": statistics.fmean(r["train_seconds"] for r in metrics["seeds"]),
                "images_per_s": statistics.fmean(r["images_per_s"] for r in metrics["seeds"]),
            }
        )
    return {
        "study": study,
        "dataset": settings.dataset,
        "epochs": epochs,
        "seeds": seeds,
        "train_images": report["train_images"],
        "test_images": report["test_images"],
        "report_config": report_scaling(settings, report_run[0]),
        "configs": configs,
    }


def paired_difference(values: list[float], baseline: list[float]) -> dict[str, float | None]:
    """Mean of the per-seed differences and its two-sided 95% Student-t interval (none from
    one seed: one difference says nothing about the spread)."""
    diffs = [a - b for a, b in zip(values, baseline, strict=True)]
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return {"mean": mean, "low": None, "high": None}
    half = t_975(len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return {"mean": mean, "low": mean - half, "high": mean + half}


def t_975(df: int) -> float:
    if df <= len(T_975):
        return T_975[df - 1]
    # Past the table, Cornish-Fisher's expansion around the normal quantile: off by < 1e-4.
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def table_rows(table: dict[str, Any]) -> list[list[str]]:
    """One row of text per config, under COLUMNS: what status, report and note show."""
    return [
        [
            config["name"],
            "-" if config["val_loss"] is None else f"{config['val_loss']:.4f}",
            format_mean_std(
                {"mean": config["test_acc_mean"], "std": config["test_acc_std"]}, percent=True
            ),
            format_difference(config["vs_report"]),
            f"{config['params']:,}",
            f"{config['train_gflop_per_image']:.4g}",
            f"{config['train_seconds']:,.1f} s",
            f"{config['images_per_s']:,.0f}",
        ]
        for config in table["configs"]
    ]


def format_difference(diff: dict[str, float | None] | None) -> str:
    """A paired difference in points with its 95% interval; `baseline` for the reference."""
    if diff is None:
        return "baseline"
    mean = f"{100 * diff['mean']:+.2f} pts"
    if diff["low"] is None:
        return f"{mean} (one seed: no interval)"
    return f"{mean} [{100 * diff['low']:+.2f}, {100 * diff['high']:+.2f}]"


def compare_table(table: dict[str, Any]) -> FittedTable:
    """The table for a terminal: compare.md and compare.json keep every column."""
    return FittedTable(
        "best configs against the report's (test set)",
        COLUMNS,
        table_rows(table),
        least_wanted=("images/s", "train time", "params", "train GFLOP/image", "search score"),
    )


def to_markdown(table: dict[str, Any]) -> str:
    head = "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS) + "\n"
    rows = "".join("| " + " | ".join(row) + " |\n" for row in table_rows(table))
    return head + rows + "\n" + explanation(table) + "\n"


def explanation(table: dict[str, Any]) -> str:
    """What the table means, in a paragraph under it."""
    seeds = table["seeds"]
    return (
        f"Each config trained {table['epochs']} epoch(s) on all {table['train_images']:,} "
        f"training images of `{table['dataset']}` with seeds {', '.join(map(str, seeds))}, then "
        f"tested once on the {table['test_images']:,} test images (fp32). Test accuracy is the "
        "mean ± sample standard deviation over seeds. *vs report* is the mean of the per-seed "
        "differences to the report's config with the same seed, in percentage "
        "points, with a 95% Student-t interval: an interval that excludes 0 is a difference "
        "larger than seed-to-seed noise. *report* is "
        f"{table['report_config']}. *search score* is the config's score in the search "
        "(its trial's value; - where it was no trial): where test accuracy ranks the "
        "configs as it does, the search's short runs predicted the long ones. Train time is "
        "per seed; images/s is training throughput."
    )


def _attach(
    request: CompareRequest,
    settings: StudySettings,
    table: dict[str, Any],
    markdown: str,
    written: list[str],
) -> str:
    """The table in a study attribute (for status and report) and in the dashboard's study
    note; the files written as study artifacts, where the artifact store takes them."""
    from search.commands.dashboard import write_study_note
    from search.training.final import attach_to_study, open_for_writing

    study = open_for_writing(request.storage, request.study)
    artifacts = artifact_dir(request.artifact_dir, request.storage)
    try:
        ids = attach_to_study(study, artifacts, [request.output_dir / file for file in written])
        kept = f"{' and '.join(written)} in {artifacts}" if written else "no file"
    except OSError as err:  # the machine's fault: the table still goes to the study
        ids, kept = {}, machine_fault_line(err, "artifacts", artifacts)
    study.set_user_attr(attrs.COMPARE, {**table, "artifacts": ids})
    write_study_note(study, settings, budget(study).target, compare_note(markdown))
    return f"attached the table to study {request.study!r} (artifacts: {kept})"


def compare_note(markdown: str) -> str:
    """The table's section of the dashboard's study note."""
    return f"\n### Best configs against the report's (`hpo compare`)\n\n{markdown}"


def _labelled(progress: SearchProgress, name: str) -> Callable[[str], None]:
    return lambda line: progress.say(f"{name} | {line}")
