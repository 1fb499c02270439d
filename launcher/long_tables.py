"""Print a table of runs: rich's framed, coloured table, or plain columns when it is long.

rich lays a table out by measuring every cell: about 3 s for the 1,000 rows of a large search on
our 2-core machine, longer than reading the 1,000 runs' files. Past `LONG` rows `sweep plan` and
`sweep status` print the same columns through tabulate (0.2 s for 1,000 rows), one line per run
(what a long listing is for: grep, less), with the table's title above and its caption below.
"""

from __future__ import annotations

from rich.console import Console
from rich.table import Table
from rich.text import Text
from tabulate import tabulate

LONG = 200


def plain(table: Table) -> str:
    """The table's title, rows and caption as aligned plain text."""
    columns = [[c.plain if isinstance(c, Text) else str(c) for c in column.cells] for column in table.columns]
    rows = list(zip(*columns, strict=True))
    body = tabulate(
        rows, headers=[str(c.header) for c in table.columns], tablefmt="simple", disable_numparse=True
    )
    return "\n".join(str(part) for part in (table.title, body, table.caption) if part)


def show(console: Console, table: Table) -> None:
    if table.row_count > LONG:
        console.print(plain(table), markup=False, highlight=False, soft_wrap=True)
    else:
        console.print(table)
