"""Tables that fit the terminal, a figure never cut short: where the columns do not fit the
width, the least wanted are left out (the caption names them), and the widest of the rest
wrap between words, never inside one."""

from __future__ import annotations

from dataclasses import dataclass

from rich.console import Console, ConsoleOptions, RenderResult
from rich.table import Table

# Rich's default table: one space of padding each side of a cell, a border between cells.
CELL_FRAME = 3


@dataclass(frozen=True)
class FittedTable:
    title: str
    columns: tuple[str, ...]
    rows: list[list[str]]
    least_wanted: tuple[str, ...] = ()  # left out first to last while the table is too wide

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        shown = list(self.columns)
        for column in self.least_wanted:
            if sum(self.longest_word(column) + CELL_FRAME for column in shown) < options.max_width:
                break
            shown.remove(column)
        yield self.table(shown, options.max_width - CELL_FRAME * len(shown) - 1)

    def cells(self, column: str) -> list[str]:
        index = self.columns.index(column)
        return [column, *(row[index] for row in self.rows)]

    def longest_word(self, column: str) -> int:
        return max(len(word) for cell in self.cells(column) for word in cell.split())

    def widths(self, shown: list[str], room: int) -> list[int]:
        """Each column as wide as its longest cell; while that is too wide, the widest column
        that can still wrap gives up a character (rich's own squeeze would cut words)."""
        widths = [max(map(len, self.cells(column))) for column in shown]
        least = [self.longest_word(column) for column in shown]
        while sum(widths) > room:
            can_wrap = [i for i, width in enumerate(widths) if width > least[i]]
            if not can_wrap:
                break
            widths[max(can_wrap, key=lambda i: widths[i])] -= 1
        return widths

    def table(self, shown: list[str], room: int) -> Table:
        left_out = [column for column in self.columns if column not in shown]
        caption = f"left out at this width: {', '.join(left_out)}" if left_out else None
        table = Table(title=self.title, title_justify="left", caption=caption)
        for column, width in zip(shown, self.widths(shown, room), strict=True):
            table.add_column(column, width=width, overflow="fold")  # folded, never cut
        indices = [self.columns.index(column) for column in shown]
        for row in self.rows:
            table.add_row(*(row[i] for i in indices))
        return table
