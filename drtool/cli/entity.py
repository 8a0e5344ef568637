"""``drtool restore-entity``: one room or one user back from a snapshot, planned, reversible."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import click

from drtool.cli.context import CliState, emit_json
from drtool.cli.render import human_bytes, print_table, require_terminal
from drtool.errors import UsageError
from drtool.services.entity.run import (
    EntityOptions,
    EntityPlan,
    EntityResult,
    UndoResult,
    run_restore_entity,
    run_undo,
)

SHOWN = 10


def _show_plan(plan: EntityPlan, dry_run: bool) -> None:
    print_table(
        f"restore-entity plan: {plan.kind} {plan.entity_id} from snapshot {plan.snapshot_id} "
        f"-> production (conflicts: keep {plan.prefer})"
        + (" (dry run, nothing changed)" if dry_run else ""),
        ["table", "in snapshot", "insert", "conflict", "identical"],
        [[t.table, t.snapshot, t.insert, t.conflict, t.identical] for t in plan.tables],
    )
    o = plan.objects
    if o is None:
        click.echo("objects: the snapshot holds no attachments bucket; none restored")
    else:
        click.echo(
            f"objects in {o.bucket}: restore {len(o.restore)} ({human_bytes(o.restore_bytes)}), "
            f"identical {o.identical}, conflict {len(o.conflicts)} (never overwritten), "
            f"not in the snapshot {len(o.not_in_snapshot)}"
        )
        for key in (o.conflicts + o.not_in_snapshot)[:SHOWN]:
            click.echo(
                f"  object {key}: " + ("conflict" if key in o.conflicts else "not in snapshot")
            )
    keys = (
        f"{plan.keys_to_change} of {plan.keys_checked} change"
        if plan.keys_to_change >= 0
        else "rebuilt"
    )
    click.echo(
        f"redis: room:<id>:recent and unread fields of {len(plan.rooms)} rooms ({keys}); "
        "sessions, presence, rate limits untouched"
    )
    lines = [line for t in plan.tables for line in t.conflicts]
    for line in lines[:SHOWN]:
        click.echo(f"conflict: {line}")
    if sum(t.conflict for t in plan.tables) > min(len(lines), SHOWN):
        click.echo("conflict: ... (the first ones shown)")
    for line in plan.blocked:
        click.echo(f"blocked: {line}")


def _confirm(plan: EntityPlan) -> bool:
    """Show the plan; on a terminal, the operator says yes."""
    require_terminal("restore-entity")
    _show_plan(plan, False)
    return click.confirm(f"Merge {plan.kind} {plan.entity_id} into production?", default=False)


def _confirm_undo(doc: dict[str, Any]) -> bool:
    require_terminal("restore-entity --undo")
    rows = sum(len(p.get("inserted", [])) for p in doc["rows"].values())
    return click.confirm(
        f"Undo the restore of {doc.get('kind')} {doc.get('id')} ({rows} rows, "
        f"{len(doc.get('objects', {}).get('added', []))} objects)?",
        default=False,
    )


def _parse_id(kind: str | None, value: str | None) -> tuple[str, int]:
    if kind is None or value is None:
        raise UsageError(
            "restore-entity: say what to restore: `room ID` or `user ID` (or --undo JOURNAL)"
        )
    if kind not in ("room", "user"):
        raise UsageError(f"restore-entity: room or user (got {kind})")
    if not value.isdigit() or int(value) < 1:
        raise UsageError(f"restore-entity: {kind} ID must be a positive integer (got {value})")
    return kind, int(value)


@click.command("restore-entity")
@click.argument("kind", required=False, metavar="room|user")
@click.argument("entity_id", required=False, metavar="ID")
@click.option(
    "--from",
    "ref",
    default="latest",
    show_default=True,
    metavar="SNAPSHOT",
    help="The snapshot id, or `latest` (the newest valid one holding PostgreSQL).",
)
@click.option(
    "--dry-run",
    is_flag=True,
    help="Print the plan (counts per table, objects, keys); change nothing.",
)
@click.option(
    "--yes", is_flag=True, help="Do not ask for confirmation (needed without a terminal)."
)
@click.option(
    "--prefer",
    type=click.Choice(["production", "snapshot"]),
    default="production",
    show_default=True,
    help="Rows that exist with other values: keep production's (listed as conflicts) or take "
    "the snapshot's (the old values go to the journal). Objects are never overwritten.",
)
@click.option(
    "--jobs",
    default=2,
    show_default=True,
    help="pg_restore parallel jobs for the scratch database.",
)
@click.option(
    "--undo",
    "undo",
    type=click.Path(path_type=Path),
    metavar="JOURNAL",
    help="Reverse the restore this journal records: remove what it added, put back what "
    "it replaced.",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable result on stdout.")
@click.pass_obj
def restore_entity(
    state: CliState,
    kind: str | None,
    entity_id: str | None,
    ref: str,
    dry_run: bool,
    yes: bool,
    prefer: str,
    jobs: int,
    undo: Path | None,
    as_json: bool,
) -> None:
    """Restore one room or one user from a snapshot into production, merged.

    \b
    The snapshot's database is staged in a scratch database on the production
    server (dropped afterwards); the entity's rows (chat_stack/entity_map.py)
    are merged: missing rows inserted, rows that differ listed as conflicts
    and kept (unless --prefer snapshot), sequences never moved backwards, one
    transaction. Its attachment objects come back from the snapshot (an
    existing object is never overwritten), its Redis keys (recent list,
    unread counters) are rebuilt from the merged rows. Every change is written
    to a journal in the state dir first: `--undo JOURNAL` reverses it.
    Point-in-time (--at) is not offered yet: pick a snapshot with --from.
    """
    if undo is not None:
        if kind is not None or dry_run:
            raise UsageError("--undo: takes only the journal (no room/user, no --dry-run)")
        done = run_undo(state.config(), path=undo, confirm=_confirm_undo, yes=yes)
        _show_undo(done, as_json)
        return
    what, number = _parse_id(kind, entity_id)
    options = EntityOptions(
        what, number, ref=ref, dry_run=dry_run, yes=yes, prefer=prefer, jobs=jobs
    )
    result = run_restore_entity(state.config(), home=state.home, options=options, confirm=_confirm)
    if as_json:
        emit_json(asdict(result))
        return
    if dry_run or result.journal is None:
        _show_plan(result.plan, dry_run)
        if not dry_run:
            click.echo("nothing to change")
        return
    _show_result(result)


def _show_result(result: EntityResult) -> None:
    p = result.plan
    click.echo(
        f"restored {p.kind} {p.entity_id} from snapshot {p.snapshot_id} in {result.seconds:.1f} s: "
        f"{result.rows_inserted} rows inserted, {result.rows_replaced} replaced, "
        f"{sum(t.conflict for t in p.tables) if p.prefer == 'production' else 0} conflicts kept, "
        f"{result.objects_added} objects added, {result.keys_changed} Redis keys rebuilt"
    )
    for s in result.sequences:
        click.echo(f"sequence {s['sequence']} moved forward to {s['set']}")
    for line in [line for t in p.tables for line in t.conflicts][:SHOWN]:
        click.echo(f"conflict kept: {line}")
    click.echo(
        f"journal: {result.journal} (undo with `drtool restore-entity --undo {result.journal}`)"
    )


def _show_undo(done: UndoResult, as_json: bool) -> None:
    if as_json:
        emit_json(asdict(done))
        return
    click.echo(
        f"undone {done.journal}: {done.rows_deleted} rows deleted, {done.rows_put_back} put back, "
        f"{done.objects_deleted} objects deleted, {done.keys_put_back} Redis keys put back"
    )
    for line in done.left:
        click.echo(f"left: {line}")
