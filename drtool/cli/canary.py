"""``drtool canary``: write a canary to each store now, or show the newest ones."""

from __future__ import annotations

from datetime import UTC, datetime

import click

from drtool.cli.context import CliState, emit_json
from drtool.cli.render import print_table
from drtool.errors import SourceError
from drtool.services import canary as svc

json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")


@click.group()
def canary() -> None:
    """Canaries: a timed write to each store, so a restore measures what it lost."""


@canary.command()
@json_option
@click.pass_obj
def write(state: CliState, as_json: bool) -> None:
    """Write one canary to PostgreSQL, Redis and each protected bucket now.

    \b
    `drtool schedule run` writes them every canary.interval_s while
    canary.enabled; this writes one round by hand. Exit 3 when a store
    could not be written (the others still are).
    """
    result = svc.write(state.config())
    if as_json:
        emit_json({"at": result.at.isoformat(), "written": result.written, "failed": result.failed})
    else:
        for name in result.written:
            click.echo(f"{name}: canary {result.at.isoformat(timespec='seconds')}")
        for name, why in result.failed.items():
            click.echo(f"{name}: not written: {why}", err=True)
    if result.failed:
        raise SourceError(f"canary not written to {', '.join(sorted(result.failed))}")


@canary.command()
@json_option
@click.pass_obj
def show(state: CliState, as_json: bool) -> None:
    """The newest canary in each store of the configured stack, and its age."""
    now = datetime.now(UTC)
    found = svc.newest(state.config())
    rows = [
        [
            name,
            when.isoformat(timespec="seconds") if when else "none",
            f"{(now - when).total_seconds():.0f}" if when else "-",
        ]
        for name, when in found.items()
    ]
    if as_json:
        emit_json({name: when.isoformat() if when else None for name, when in found.items()})
        return
    print_table("newest canaries", ["store", "written", "age s"], rows)
