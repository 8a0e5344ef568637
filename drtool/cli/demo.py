"""``drtool demo``: the whole loop on a throw-away local stack."""

from __future__ import annotations

import os
import sys

import click

from drtool.cli.backup import progress_reporter
from drtool.cli.context import CliState
from drtool.cli.render import human_bytes, print_table
from drtool.errors import DrillFailed
from drtool.services.demo import DemoSizes, run_demo


@click.command()
@click.option("--messages", default=20_000, show_default=True, type=int, help="Messages to seed.")
@click.option(
    "--attachments", default=200, show_default=True, type=int, help="Attachments to seed."
)
@click.pass_obj
def demo(state: CliState, messages: int, attachments: int) -> None:
    """Run the main job end to end on embedded defaults, no configuration needed.

    \b
    stack up -> seed -> keys -> init a local repository -> backup
    -> verify with the identity -> list -> restore drill into a scratch
    stack -> report -> WAL streamed, a base backup, canary, moment, canary
    -> restore drill of PostgreSQL to that moment -> report -> stack down
    (always). Exit 6 when a drill fails. Keys, configs, the repository and
    the reports stay in <home>/demo/.
    """
    sizes = DemoSizes(messages=messages, attachments=attachments)
    with progress_reporter(sys.stderr.isatty()) as report:
        result = run_demo(
            state.home,
            os.environ,
            sizes,
            step=lambda text: click.echo(f"-> {text}", err=True),
            progress=report,
        )
    if result.seeded:
        print_table(
            "seeded",
            ["table", "rows"],
            [[t, n] for t, n in result.seeded.counts.items()]
            + [["redis keys", result.seeded.redis_keys], ["objects", result.seeded.objects]],
        )
    if result.backup:
        print_table(
            f"backup {result.backup.snapshot_id}",
            ["component", "plain", "stored", "seconds"],
            [
                [
                    c.name,
                    human_bytes(c.plain_bytes),
                    human_bytes(c.stored_bytes),
                    f"{c.seconds:.1f}",
                ]
                for c in result.backup.components
            ],
        )
    for record in result.snapshots or []:
        click.echo(f"snapshot {record.snapshot_id}: {'VALID' if record.valid else 'INVALID'}")
    if result.drill:
        click.echo(result.drill.to_markdown())
    if result.base and result.moment:
        click.echo(
            f"base backup {result.base.snapshot_id}; restore to the moment "
            f"{result.moment.isoformat(timespec='milliseconds')} (one canary before it, one after):"
        )
    if result.moment_drill:
        click.echo(result.moment_drill.to_markdown())
    click.echo(f"demo files: {result.directory}")
    click.echo(f"  drtool --config {result.operator_config} list")
    click.echo(f"  drtool --config {result.operator_config} verify --read-data")
    for what, drilled in (
        ("restore drill", result.drill),
        ("drill to a moment", result.moment_drill),
    ):
        if drilled and not drilled.passed:
            raise DrillFailed(f"demo: the {what} failed: {drilled.error or 'see the report'}")
