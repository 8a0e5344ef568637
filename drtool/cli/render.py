"""Rendering for people: tables on stdout (rich), nothing else decides layout."""

from __future__ import annotations

import sys
from collections.abc import Sequence

import click

from drtool.errors import UsageError

# Off a terminal (cron logs, pipes, scripts) rich assumes 80 columns and cuts cells with "…";
# there a table takes the width it needs instead.
UNBOUNDED_WIDTH = 10_000
# Columns whose cells are copied into other commands: never cut or wrapped, even on a terminal.
ID_COLUMNS = ("id", "snapshot", "job", "drill")


def _is_id_column(name: str) -> bool:
    """Whether ``name`` heads a column of identifiers (``id``, ``snapshot``, ``drill id``)."""
    return any(word in ID_COLUMNS for word in name.lower().replace("_", " ").split())


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Print a titled table to stdout; identifiers are printed whole whatever the width.

    rich is imported here, when a table is printed (20 ms): a backup's first byte must not
    wait for the layout of its summary (issue 14.2).
    """
    from rich.console import Console
    from rich.table import Table

    cells = [["" if cell is None else str(cell) for cell in row] for row in rows]
    table = Table(title=title, title_justify="left", show_edge=False, header_style="bold")
    for index, column in enumerate(columns):
        if _is_id_column(column):
            widest = max([len(column), *(len(row[index]) for row in cells if index < len(row))])
            table.add_column(column, no_wrap=True, min_width=widest, overflow="ignore")
        else:
            table.add_column(column)
    for row in cells:
        table.add_row(*row)
    width = None if sys.stdout.isatty() else UNBOUNDED_WIDTH
    Console(soft_wrap=True, width=width).print(table)


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def require_terminal(command: str) -> None:
    """A confirmation needs a terminal; without one the operator must pass ``--yes``."""
    if not sys.stdin.isatty():
        raise UsageError(f"{command}: not a terminal, so nothing to confirm with; pass --yes")


def typed_confirmation(name: str) -> bool:
    """The operator types the name of what is about to be replaced (a typo says no)."""
    typed = click.prompt(f"Type {name!r} to restore into it", default="", show_default=False)
    return bool(typed == name)
