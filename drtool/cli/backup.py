"""``drtool backup``: take one snapshot now."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from typing import TYPE_CHECKING

import click

from drtool.cli.context import CliState, emit_json
from drtool.cli.render import human_bytes, print_table
from drtool.services.backup import Progress as ProgressFn
from drtool.services.backup import run_backup
from drtool.stores.registry import COMPONENTS

if TYPE_CHECKING:
    from rich.progress import TaskID


@contextmanager
def progress_reporter(enabled: bool) -> Iterator[ProgressFn]:
    """A byte counter per component, drawn as progress bars on a terminal."""
    if not enabled:
        yield lambda component, n: None
        return
    # rich's progress costs 25 ms to import: only a terminal draws bars (scheduled runs do not)
    from rich.progress import (
        DownloadColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TransferSpeedColumn,
    )

    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        DownloadColumn(),
        TransferSpeedColumn(),
        transient=True,
    ) as bars:
        tasks: dict[str, TaskID] = {}

        def report(component: str, n: int) -> None:
            if component not in tasks:
                tasks[component] = bars.add_task(component, total=None)
            bars.advance(tasks[component], n)

        yield report


@click.command()
@click.option(
    "--component",
    "components",
    default=",".join(COMPONENTS),
    show_default=True,
    help="Comma-separated stores to back up.",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable summary on stdout.")
@click.option(
    "--accept-rollback",
    metavar="REASON",
    default=None,
    help="Chain on although the repository is behind this host's last commit (logged).",
)
@click.pass_obj
def backup(state: CliState, components: str, as_json: bool, accept_rollback: str | None) -> None:
    """Take one snapshot of the stack: PostgreSQL, then Redis, then MinIO.

    \b
    Each store is streamed through zstd and age into the repository; the
    signed manifest is written last and the snapshot read back and verified.
    Exit 0 only for a committed and verified snapshot; on any failure no
    snapshot is listed and earlier ones are untouched. Refuses (exit 5) a
    repository whose newest authentic snapshot is older than the one this
    host committed last (deleted or rolled back), unless --accept-rollback.
    """
    cfg = state.config()
    chosen = tuple(c.strip() for c in components.split(",") if c.strip())
    with progress_reporter(sys.stderr.isatty() and not as_json) as report:
        result = run_backup(
            cfg,
            home=state.home,
            env=os.environ,
            components=chosen,
            progress=report,
            accept_rollback=accept_rollback,
        )
    for warning in result.warnings:
        click.echo(f"warning: {warning}", err=True)
    if as_json:
        emit_json({**asdict(result), "verified": result.verified})
        return
    print_table(
        f"snapshot {result.snapshot_id} {result.verified}",
        ["component", "plain", "stored", "ratio", "seconds", "MB/s"],
        [
            [
                c.name,
                human_bytes(c.plain_bytes),
                human_bytes(c.stored_bytes),
                f"{c.plain_bytes / c.stored_bytes:.2f}" if c.stored_bytes else "",
                f"{c.seconds:.1f}",
                f"{c.plain_bytes / 1e6 / c.seconds:.1f}" if c.seconds else "",
            ]
            for c in result.components
        ],
    )
    for c in result.components:
        if c.detail:
            click.echo(f"{c.name}: {c.detail}")
