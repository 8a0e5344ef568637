"""``drtool capture``: continuous attachment capture (run), its state (status), verify."""

from __future__ import annotations

import signal
import threading
from dataclasses import asdict
from types import FrameType

import click

from drtool.cli.context import CliState, emit_json
from drtool.cli.render import print_table
from drtool.errors import IntegrityError
from drtool.services import capture as svc

json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")


@click.group()
def capture() -> None:
    """Continuous attachment capture: new attachment objects sealed into the repository."""


@capture.command()
@click.option("--once", is_flag=True, help="One round, then exit (errors exit non-zero).")
@click.option(
    "--from-start",
    is_flag=True,
    help="First run only: capture every existing row, not only rows added from now on.",
)
@click.pass_obj
def run(state: CliState, once: bool, from_start: bool) -> None:
    """Follow new `attachments` rows and seal the objects they name as blobs.

    \b
    Long-running: a round every capture.interval_s (default 60 s). Rows are
    followed by id, late commits included; the bucket is never listed.
    SIGTERM or Ctrl-C: the round in progress finishes, then exit 0.
    The role needs SELECT on attachments (docs/OPERATIONS.md).
    """
    cfg = state.config()
    stop = threading.Event()

    def _stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        total = svc.run_capture(cfg, state.home, once=once, from_start=from_start, stop=stop)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    click.echo(
        f"captured {total.captured} objects ({total.uploaded} uploaded, {total.reused} reused), "
        f"{total.absent} rows waiting for their object"
    )
    for problem in total.problems:
        click.echo(f"problem: {problem}")


@capture.command()
@json_option
@click.pass_obj
def status(state: CliState, as_json: bool) -> None:
    """Where the capture stands: the highest id followed, ids still owed, the last round."""
    result = svc.capture_status(state.config(), state.home)
    if as_json:
        emit_json(result)
        return
    if result["high"] is None:
        click.echo("attachment capture has not run")
        return
    age = result["last_round_age_s"]
    click.echo(
        f"bucket {result['bucket']}: followed up to id {result['high']}, "
        f"{result['missing']} ids not committed yet, {result['absent']} rows waiting for "
        f"their object; last round {age:.0f} s ago"
        if age is not None
        else f"bucket {result['bucket']}: followed up to id {result['high']}"
    )
    click.echo(
        f"captured {result['captured']} objects ({result['uploaded']} uploaded), "
        f"chain record {result['seq']}; dropped: {result['gaps_dropped']} ids never committed, "
        f"{result['objects_lost']} rows whose object never appeared"
    )
    if result["last_error"]:
        click.echo(f"last error: {result['last_error']}")


@capture.command()
@click.option(
    "--read-data", is_flag=True, help="Also decrypt every journal (needs keys.identity_file)."
)
@json_option
@click.pass_obj
def verify(state: CliState, read_data: bool, as_json: bool) -> None:
    """Prove the capture key-less: the signed chain unbroken, every journal and blob present
    with its size and sha256.

    Exits 5 naming what is wrong.
    """
    outcome = svc.capture_verify(state.config(), read_data=read_data)
    if as_json:
        emit_json(asdict(outcome))
    else:
        print_table(
            "capture verify" + (" (journals read)" if read_data else " (stored bytes)"),
            ["records", "blobs", "entries", "result"],
            [
                [
                    outcome.records,
                    outcome.blobs,
                    outcome.entries if read_data else "",
                    "ok" if not outcome.problems else f"{len(outcome.problems)} problems",
                ]
            ],
        )
        for problem in outcome.problems:
            click.echo(f"problem: {problem}")
    if outcome.problems:
        raise IntegrityError(f"capture verify: {outcome.problems[0]}")


@capture.command()
@click.option("--dry-run", is_flag=True, help="Say what would be removed; remove nothing.")
@click.pass_obj
def prune(state: CliState, dry_run: bool) -> None:
    """Remove the journal captured before the oldest valid MinIO snapshot started.

    A signed marker (capture/pruned.json) records where the chain now starts, so
    `capture verify` still proves it. Run it after `drtool prune`; `drtool prune`
    then sweeps the blobs no snapshot reuses.
    """
    result = svc.capture_prune(state.config(), dry_run=dry_run)
    if result.oldest_snapshot is None:
        click.echo("no valid MinIO snapshot: the whole journal is needed, nothing removed")
    elif result.upto_seq is None:
        click.echo(f"nothing captured before snapshot {result.oldest_snapshot} started")
    else:
        verb = "removed" if result.done else "would remove"
        click.echo(
            f"{verb} chain records up to {result.upto_seq} and their journals "
            f"({len(result.removed)} objects): captured before snapshot "
            f"{result.oldest_snapshot} started"
        )
