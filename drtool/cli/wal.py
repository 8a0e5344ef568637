"""``drtool wal``: continuous WAL capture (stream), the recoverable window (status), verify."""

from __future__ import annotations

import signal
import threading
from dataclasses import asdict
from types import FrameType

import click

from drtool.cli.context import CliState, emit_json, repository_option
from drtool.cli.render import human_bytes, print_table
from drtool.errors import IntegrityError
from drtool.services import wal as svc
from drtool.services.scheduling.metrics import WAL_DEFAULT_PORT, MetricsServer, WalMetrics

json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")


@click.group()
def wal() -> None:
    """Continuous PostgreSQL protection: WAL streamed into the repository."""


@wal.command()
@click.option("--once", "mode", flag_value="once", help="Seal what is closed in the spool; exit.")
@click.option(
    "--until-idle",
    "mode",
    flag_value="until-idle",
    help="Receive, close the current segment, seal everything closed, exit.",
)
@click.option(
    "--metrics-port",
    envvar="DRTOOL_METRICS_PORT",
    default=0,
    show_default=True,
    type=int,
    help=f"Prometheus metrics port while streaming (0: none; the compose service sets "
    f"{WAL_DEFAULT_PORT}; env DRTOOL_METRICS_PORT).",
)
@click.option(
    "--metrics-address",
    envvar="DRTOOL_METRICS_ADDRESS",
    default="127.0.0.1",
    show_default=True,
    help="Metrics bind address (the image sets 0.0.0.0; env DRTOOL_METRICS_ADDRESS).",
)
@click.pass_obj
def stream(state: CliState, mode: str | None, metrics_port: int, metrics_address: str) -> None:
    """Run pg_receivewal into the spool and seal every closed segment into wal/.

    \b
    Long-running: restarts pg_receivewal with a backoff when the server goes
    away, keeps WAL in the spool while the repository is unreachable, and closes
    the current segment (pg_switch_wal) when WAL advanced and wal.flush_interval
    passed. SIGTERM or Ctrl-C: seal what is closed, stop pg_receivewal, exit 0.
    The role needs REPLICATION and EXECUTE on pg_switch_wal() (docs/OPERATIONS.md).
    From a standby, wal.primary_host names its primary, used only to close
    segments (ADR 0030).
    Metrics (lag, PITR window, spool, a lost slot) are served while it streams
    (not with --once or --until-idle).
    """
    cfg = state.config()
    stop = threading.Event()
    metrics = WalMetrics() if mode is None and metrics_port else None
    server = MetricsServer(metrics, metrics_address, metrics_port) if metrics else None

    def _stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        stats = svc.run_stream(cfg, state.home, mode=mode or "forever", stop=stop, metrics=metrics)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if server is not None:
            server.close()
    click.echo(
        f"sealed {stats.sealed} WAL files ({human_bytes(stats.stored_bytes)} stored), "
        f"{stats.already_stored} already stored"
    )


@wal.command()
@json_option
@click.pass_obj
def status(state: CliState, as_json: bool) -> None:
    """The recoverable WAL stretch (first and last segment of the last unbroken run), gaps,
    the spool and the age of the newest sealed segment."""
    result = svc.wal_status(state.config(), state.home)
    if as_json:
        emit_json(result)
        return
    window = result["window"]
    if window["to"] is None:
        click.echo("no WAL in the repository")
    else:
        click.echo(
            f"WAL from {window['from']['segment']} (sealed {window['from']['sealed']}) "
            f"to {window['to']['segment']} (sealed {window['to']['sealed']}): "
            f"{result['segments']} segments, {human_bytes(result['stored_bytes'])} stored"
        )
        click.echo(f"newest sealed segment is {result['newest_sealed_age_s']:.0f} s old")
    for gap in result["gaps"]:
        click.echo(f"gap: {gap}")
    for problem in result["problems"]:
        click.echo(f"problem: {problem}")
    source = result["source"]
    if source["server"]:
        click.echo(
            f"streaming from {source['server']} ({source['role'] or 'role unknown'}); "
            f"segments closed by {source['segments_closed_by']}"
        )
    spool = result["spool"]
    click.echo(
        f"spool {spool['dir']}: {human_bytes(spool['bytes'])}, "
        f"{spool['closed_waiting']} closed files waiting"
    )


@wal.command()
@click.option(
    "--read-data", is_flag=True, help="Also decrypt every WAL file (needs keys.identity_file)."
)
@json_option
@repository_option
@click.pass_obj
def verify(state: CliState, read_data: bool, as_json: bool, repository: str | None) -> None:
    """Prove WAL continuity key-less: the signed index chain, every file present with its
    size and sha256, no missing segment, a history file for each timeline switch.

    Exits 5 naming what is wrong.
    """
    outcome = svc.wal_verify(state.config(repository=repository), read_data=read_data)
    if as_json:
        emit_json(asdict(outcome))
    else:
        print_table(
            "wal verify" + (" (data read)" if read_data else " (stored bytes)"),
            ["files", "segments", "from", "to", "result"],
            [
                [
                    outcome.files,
                    outcome.segments,
                    outcome.window_from or "",
                    outcome.window_to or "",
                    "ok" if not outcome.problems else f"{len(outcome.problems)} problems",
                ]
            ],
        )
        for problem in outcome.problems:
            click.echo(f"problem: {problem}")
    if outcome.problems:
        raise IntegrityError(f"wal verify: {outcome.problems[0]}")
