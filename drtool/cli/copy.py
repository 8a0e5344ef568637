"""``drtool copy``: fill a second repository (3-2-1) with the primary's snapshots."""

from __future__ import annotations

from dataclasses import asdict

import click

from drtool.cli.context import CliState, emit_json
from drtool.cli.render import human_bytes, print_table
from drtool.config import PRIMARY
from drtool.errors import IntegrityError, UsageError
from drtool.services import copy as svc


@click.command()
@click.argument("snapshots", nargs=-1)
@click.option(
    "--from",
    "source",
    default=PRIMARY,
    show_default=True,
    metavar="NAME",
    help=f"The repository to copy from: {PRIMARY} ([repository]) or a [repositories.NAME].",
)
@click.option(
    "--to",
    "destination",
    metavar="NAME",
    default=None,
    help="The [repositories.NAME] to copy to (default: the only one configured).",
)
@click.option(
    "--jobs",
    default=svc.DEFAULT_WORKERS,
    show_default=True,
    type=click.IntRange(1, 32),
    help="Objects copied at a time.",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def copy(
    state: CliState,
    snapshots: tuple[str, ...],
    source: str,
    destination: str | None,
    jobs: int,
    as_json: bool,
) -> None:
    """Copy snapshots (default: every valid one the destination lacks) to another repository.

    \b
    The encrypted objects are copied as they are: no identity is needed, so the
    backup host runs it (schedule kind "copy"). Each object is checked against the
    signed manifest on the way and read back on the destination; a snapshot's
    manifest is written last, so a killed copy shows no partial snapshot and the
    next run resumes without uploading again what is there. Without SNAPSHOT the
    WAL index and files are copied too. An empty destination becomes a copy of
    the source (same repository id and keys); one holding another repository is
    refused untouched. Each repository keeps its own retention and Object Lock
    (the destination's retain_days and object_lock_mode apply to the copies).
    Exits 5 when a snapshot could not be copied.
    """
    cfg = state.config()
    if destination is None:
        others = [n for n in cfg.repository_names() if n != source]
        if len(others) != 1:
            raise UsageError(
                "copy: --to NAME is needed (configured repositories: "
                f"{', '.join(cfg.repository_names())}; add [repositories.NAME] to the config)"
            )
        destination = others[0]
    result = svc.run_copy(
        cfg,
        home=state.home,
        source=source,
        destination=destination,
        snapshots=snapshots,
        workers=jobs,
    )
    if as_json:
        emit_json(asdict(result))
    else:
        print_table(
            f"copy {result.source} -> {result.destination}",
            ["snapshot", "result"],
            [[sid, "copied"] for sid in result.copied]
            + [[sid, f"not copied: {why}"] for sid, why in result.skipped.items()],
        )
        click.echo(
            f"{'initialised the destination; ' if result.initialised else ''}"
            f"{len(result.copied)} snapshots copied, {result.already} already there; "
            f"{result.uploaded} objects uploaded ({human_bytes(result.uploaded_bytes)}), "
            f"{result.checked} found there intact, {result.wal_chunks} WAL index chunks, "
            f"{result.tombstones} prune tombstones; newest on the destination: "
            f"{result.newest or 'none'} ({result.seconds:.1f} s)"
        )
    if result.problems:
        raise IntegrityError(f"copy: {'; '.join(result.problems)}")
