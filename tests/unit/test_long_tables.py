"""A long table of runs (launcher/commands/sweep.py `plain`) lays one-line ASCII cells out itself:
byte for byte what tabulate's "simple" format gives, which still lays out anything else."""

from __future__ import annotations

import pytest
from rich.table import Table
from rich.text import Text
from tabulate import tabulate

from launcher.commands.sweep import plain

EDGES = ["", " ", "  pad", "pad  ", "True", "False", "1", "0.10", "1e5", "-", "two words", "None", "a" * 30]


def _table(headers: list[str], rows: list[list[str]], title: str | None = "sweep s: 3 runs") -> Table:
    table = Table(title=title)
    for header in headers:
        table.add_column(header)
    for row in rows:
        table.add_row(*[Text(cell) if i % 2 else cell for i, cell in enumerate(row)])
    table.caption = "3 completed"
    return table


def _tabulated(table: Table) -> str:
    columns = [[c.plain if isinstance(c, Text) else str(c) for c in column.cells] for column in table.columns]
    body = tabulate(
        list(zip(*columns, strict=True)),
        headers=[str(c.header) for c in table.columns],
        tablefmt="simple",
        disable_numparse=True,
    )
    return "\n".join(str(part) for part in (table.title, body, table.caption) if part)


@pytest.mark.parametrize(
    "cells",
    [
        EDGES,  # whitespace, numbers and bools as text, empty cells, a cell wider than its header
        ["m0.9-lr0.001-s0", "a4ce08a7", "completed", "128/128 (100%)", "5.200", "", "70.5", "-"] * 2,
        ["é", "x", "y"],  # a wide-character-aware width: tabulate's
        ["two\nlines", "x", "y"],
        ["\x1b[1mbold\x1b[0m", "x", "y"],
    ],
)
def test_a_long_table_is_laid_out_as_tabulate_lays_it_out(cells):
    headers = ["run", "id", "a b", ""]
    rows = [[cells[(r + c) % len(cells)] for c in range(len(headers))] for r in range(6)]
    for title in ("sweep s: 3 runs", None):
        table = _table(headers, rows, title)
        assert plain(table) == _tabulated(table)
