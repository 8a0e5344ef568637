"""``drtool doctor``: check the configured deployment before trusting it."""

from __future__ import annotations

import os
from dataclasses import asdict

import click

from drtool.cli.context import CliState, emit_json
from drtool.cli.render import print_table
from drtool.errors import CheckFailed
from drtool.services.doctor import run_doctor


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable rows on stdout.")
@click.pass_obj
def doctor(state: CliState, as_json: bool) -> None:
    """Check the deployment: sources, tools, repository, Object Lock, clock, keys.

    \b
    Each check is a row: pass, warn or fail, with one line of detail.
    The backup credential must NOT be able to delete: a probe object under
    doctor/ is written and a delete attempted; a refusal passes.
    Exit 0 when nothing failed (warnings allowed), 7 when a check failed.
    """
    cfg = state.config()
    checks = run_doctor(cfg, env=os.environ)
    if as_json:
        emit_json([asdict(c) for c in checks])
    else:
        print_table(
            "drtool doctor",
            ["check", "status", "detail"],
            [[c.name, c.status.upper(), c.detail] for c in checks],
        )
    failed = [c.name for c in checks if c.status == "fail"]
    if failed:
        raise CheckFailed(f"doctor: {len(failed)} check(s) failed: {', '.join(failed)}")
