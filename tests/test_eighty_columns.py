"""What `hpo` prints reads well in an 80-column terminal: no sentence of `--help` broken by a
line break of its own, and no figure of a table cut short (a column that does not fit is
left out, and the table says which)."""

from __future__ import annotations

import io
import re
from pathlib import Path

import optuna
import pytest
from rich.console import Console
from typer.testing import CliRunner

from search.cli import app
from search.commands.compare import COLUMNS, compare_table, table_rows
from search.rules import attrs

WIDTH = 80
COMMANDS = sorted(command.name or command.callback.__name__ for command in app.registered_commands)


def render_help(*command: str) -> list[str]:
    shown = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": str(WIDTH)})
    assert shown.exit_code == 0, shown.output
    return shown.output.splitlines()


def text_of(line: str) -> tuple[int, str, int]:
    """Where a line's text starts, the text, and the last column text may use: inside a
    panel's borders, or the terminal's width less the help's right margin."""
    if line.startswith("│"):
        inner = line[1 : line.rindex("│")]
        right = len(inner) - 1
    else:
        inner, right = line, WIDTH - 1
    text = inner.strip()
    return (inner.index(text) if text else -1), text, right


def early_breaks(lines: list[str]) -> list[str]:
    """Lines that end mid-sentence (a lowercase word or a comma) before the terminal had to:
    the next line goes on with a lowercase word (at the same indent outside a panel; inside
    one, under a blank first column) that would have fitted. Only a line break in the help
    text itself does that."""
    found = []
    for line, after in zip(lines, lines[1:], strict=False):
        start, text, right = text_of(line)
        next_start, next_text, _ = text_of(after)
        in_panel = line.startswith("│") and after.startswith("│")
        continues = next_start > 1 if in_panel else next_start == start
        if not (text and next_text and continues) or line.startswith("╭"):
            continue
        if not (re.search(r"[\w,]$", text) and re.match(r"[a-z]", next_text)):
            continue
        if start + len(text) + 1 + len(next_text.split()[0]) <= right:
            found.append(f"{line.rstrip()!r} / {after.rstrip()!r}")
    return found


@pytest.mark.parametrize("command", ["", *COMMANDS])
def test_help_never_breaks_a_sentence_of_its_own(command: str) -> None:
    lines = render_help(*filter(None, [command]))
    assert not early_breaks(lines), "\n".join(early_breaks(lines))


def test_the_check_sees_a_hard_break() -> None:
    lines = [" Study settings are stored when the", " study is created; later starts reuse them."]
    assert early_breaks(lines)
    assert not early_breaks([" " + " ".join(word * 7 for word in "abcdefghijk"), " lm"])


def test_option_help_has_no_line_break() -> None:
    """Typer wraps an option's help in its column: a break of the text's own is never right."""
    for command in app.registered_commands:
        for name, option in command.callback.__annotations__.items():
            for meta in getattr(option, "__metadata__", ()):
                assert "\n" not in (getattr(meta, "help", None) or ""), (command, name)


# --- tables ----------------------------------------------------------------------------------

ROW = {
    "val_loss": 0.0038217, "test_acc_mean": 0.9412, "test_acc_std": 0.0021,
    "params": 1_234_567, "train_gflop_per_image": 0.80412, "train_seconds": 12345.6,
    "images_per_s": 23456.0,
}  # fmt: skip
TABLE = {
    "study": "wide", "dataset": "synthetic", "epochs": 3, "seeds": [0, 1, 2],
    "train_images": 50_000, "test_images": 10_000, "report_config": "Table 1",
    "configs": [
        {"name": "trial 12", **ROW, "vs_report": {"mean": 0.622, "low": 0.5012, "high": 0.7431}},
        {"name": "trial 7", **ROW, "vs_report": {"mean": -0.0123, "low": None, "high": None}},
        {"name": "report", **ROW, "val_loss": None, "vs_report": None},
    ],
}  # fmt: skip


def rendered(renderable: object, width: int) -> str:
    out = io.StringIO()
    Console(file=out, width=width, color_system=None).print(renderable)
    return out.getvalue()


@pytest.mark.parametrize("width", [60, WIDTH, 200])
def test_compare_table_drops_columns_and_cuts_no_figure(width: int) -> None:
    shown = rendered(compare_table(TABLE), width)
    assert "…" not in shown, shown
    assert max(map(len, shown.splitlines())) <= width
    body, _, caption = shown.partition("left out at this width:")
    words = set(body.split())
    kept = [c for c in COLUMNS if all(word in words for word in c.split())]
    assert {"config", "test accuracy", "vs report (95% CI)"} <= set(kept), shown
    for row in table_rows(TABLE):
        for column, cell in zip(COLUMNS, row, strict=True):
            if column in kept:  # every word of every figure, whole
                assert set(cell.split()) <= words, (column, cell, shown)
    left_out = [c for c in COLUMNS if c not in kept]
    assert (width == 200) == (not left_out), shown
    for column in left_out:
        assert column in " ".join(caption.split()), f"{column} left out unsaid: {shown}"


def test_status_at_80_columns_cuts_no_figure(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    made = CliRunner().invoke(app, ["create", "--study", "wide", "--trials", "1", "--storage", url])
    assert made.exit_code == 0, made.output
    optuna.load_study(study_name="wide", storage=url).set_user_attr(attrs.COMPARE, TABLE)
    shown = CliRunner().invoke(
        app, ["status", "--study", "wide", "--storage", url], env={"COLUMNS": str(WIDTH)}
    )
    assert shown.exit_code == 0, shown.output
    assert "…" not in shown.output, shown.output
    assert "+62.20" in shown.output and "baseline" in shown.output, shown.output
