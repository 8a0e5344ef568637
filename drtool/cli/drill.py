"""``drtool drill``: restore drills that prove the newest snapshot restores intact."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import click

from drtool.cli.context import CliState, emit_json, repository_option
from drtool.cli.render import print_table
from drtool.drills.definition import load_definition
from drtool.errors import DrillFailed
from drtool.services import drill as svc


@click.group()
def drill() -> None:
    """Restore a snapshot into a throw-away stack and prove the messages are intact.

    \b
    A drill brings up a scratch stack (local processes or Docker containers),
    restores the snapshot, checks fingerprints, attachment files, Redis
    references and the latest messages of sampled rooms, measures RTO and RPO
    against the definition's thresholds, writes a report and tears down.
    It needs the operators' identity (keys.identity_file): run it on a
    machine that may hold it, never in the backup-cron container.
    """


@drill.command()
@click.option(
    "--definition",
    type=click.Path(path_type=Path),
    default=None,
    help="Drill definition TOML (e.g. restore_drills/weekly.toml); defaults without one.",
)
@click.option("--snapshot", default=None, help="latest, an id, or random-within:7d.")
@click.option(
    "--identity",
    "identities",
    multiple=True,
    type=click.Path(path_type=Path),
    help="An identity file to prove (repeatable; one per recipient, e.g. the escrow key).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the full report as JSON.")
@repository_option
@click.pass_obj
def run(
    state: CliState,
    definition: Path | None,
    snapshot: str | None,
    identities: tuple[Path, ...],
    as_json: bool,
    repository: str | None,
) -> None:
    """Run one drill now. Exit 0 when every check passed, 6 when one failed.

    A drill that does not prove the snapshot it should have (a newer INVALID or DAMAGED
    snapshot passed over, no valid snapshot, an invalid one named) is a failed drill too,
    with its report; the check "newest snapshot drilled" says what was skipped and why.
    """
    spec = load_definition(definition)
    if identities:
        spec = replace(spec, identities=(*spec.identities, *map(str, identities)))
    report = svc.run_drill(
        state.config(repository=repository), home=state.home, spec=spec, snapshot=snapshot
    )
    if as_json:
        click.echo(report.to_json())
    else:
        click.echo(report.to_markdown())
    if not report.passed:
        failed = [c.name for c in report.checks if not c.passed]
        raise DrillFailed(f"drill {report.drill_id} failed: {report.error or ', '.join(failed)}")


@drill.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@repository_option
@click.pass_obj
def history(state: CliState, as_json: bool, repository: str | None) -> None:
    """Past drills stored in the repository: result, snapshot, RTO and RPO."""
    rows = svc.drill_history(state.config(repository=repository))
    if as_json:
        emit_json(rows)
        return
    print_table(
        "drills",
        ["drill", "result", "snapshot", "RTO s", "RPO h", "failed checks / error"],
        [
            [
                r["drill_id"],
                "pass" if r["passed"] else "FAIL",
                r["snapshot_id"],
                f"{r.get('restore_s') or sum(r['rto_s'].values()):.1f}",
                f"{r['rpo_s'] / 3600:.1f}",
                ", ".join(map(str, r.get("failed_checks") or [])) or str(r.get("error") or ""),
            ]
            for r in rows
        ],
    )


@drill.command()
@click.pass_obj
def cleanup(state: CliState) -> None:
    """Remove what killed drills left behind (local stacks; containers labelled drtool.drill).

    \b
    Only dead drills' leftovers go: a drill whose process still runs keeps its
    stack, so this is safe while drills run. A drill started in another
    container counts as dead once that container is gone, stopped or
    restarted; one started on another host is left for that host to clean.
    """
    result = svc.cleanup(state.home)
    for name in result.removed:
        click.echo(f"removed {name}")
    for why in result.kept:
        click.echo(f"kept {why}")
