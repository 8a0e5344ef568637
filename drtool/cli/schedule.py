"""``drtool schedule run|list|health``: the backup-cron loop and its checks."""

from __future__ import annotations

import os
import sys
from dataclasses import asdict
from pathlib import Path

import click

from drtool.cli.context import CliState, emit_json
from drtool.cli.render import print_table
from drtool.services.canary import CanaryLoop
from drtool.services.scheduling import scheduler as svc
from drtool.services.scheduling.jobs import load_schedules
from drtool.services.scheduling.metrics import DEFAULT_PORT, Metrics, MetricsServer

schedule_dir_option = click.option(
    "--schedule-dir",
    envvar="DRTOOL_SCHEDULE_DIR",
    default="schedules",
    show_default=True,
    type=click.Path(path_type=Path),
    help="Directory of *.toml schedule files (env DRTOOL_SCHEDULE_DIR).",
)


@click.group()
def schedule() -> None:
    """Run backups, prune, verify and drills on their schedules (the backup-cron container)."""


@schedule.command()
@schedule_dir_option
@click.option("--once", "once", metavar="JOB", help="Run JOB now, once, and exit with its code.")
@click.option(
    "--metrics-port",
    envvar="DRTOOL_METRICS_PORT",
    default=DEFAULT_PORT,
    show_default=True,
    type=int,
    help="Prometheus metrics port (0: no endpoint; env DRTOOL_METRICS_PORT).",
)
@click.option(
    "--metrics-address",
    envvar="DRTOOL_METRICS_ADDRESS",
    default="127.0.0.1",
    show_default=True,
    help="Metrics bind address (the image sets 0.0.0.0; env DRTOOL_METRICS_ADDRESS).",
)
@click.option(
    "--grace",
    default=svc.DEFAULT_GRACE_S,
    show_default=True,
    type=float,
    help="Seconds a running job may finish after SIGTERM before it is aborted.",
)
@click.pass_obj
def run(
    state: CliState,
    schedule_dir: Path,
    once: str | None,
    metrics_port: int,
    metrics_address: str,
    grace: float,
) -> None:
    """Run the scheduled jobs forever (or one job with --once).

    \b
    Jobs run one at a time; a job missed while stopped runs at start; failed
    attempts are retried with backoff; one job's failure never stops the loop.
    On SIGTERM no new job starts and the running one gets --grace seconds,
    then it is aborted (no partial snapshot is ever listed). State per job:
    <state_dir>/schedule/<job>.json.
    """
    specs = load_schedules(schedule_dir)
    cfg = state.config()
    if once is not None:
        runner = svc.Runner(specs, cfg, home=state.home, env=os.environ, grace_s=grace)
        outcome = runner.run_once(once)
        if outcome.error is not None:
            raise outcome.error
        click.echo(f"job {once}: {outcome.message}")
        return
    metrics = Metrics()
    server = MetricsServer(metrics, metrics_address, metrics_port) if metrics_port else None
    canaries = CanaryLoop(cfg) if cfg.canary.enabled else None
    try:
        runner = svc.Runner(
            specs, cfg, home=state.home, env=os.environ, metrics=metrics, grace_s=grace
        )
        if canaries is not None:
            canaries.start()
        runner.run()
    finally:
        if canaries is not None:
            canaries.close()
        if server is not None:
            server.close()


@schedule.command(name="list")
@schedule_dir_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def list_(state: CliState, schedule_dir: Path, as_json: bool) -> None:
    """Each job: its schedule, next run and last result."""
    rows = svc.job_rows(load_schedules(schedule_dir), state.config(), state.home)
    if as_json:
        emit_json([asdict(r) for r in rows])
        return
    print_table(
        "scheduled jobs",
        ["job", "kind", "schedule", "next run", "last success", "last exit", "message"],
        [
            [
                r.job,
                r.kind,
                r.schedule,
                r.next_run,
                r.last_success or "never",
                r.exit_code,
                r.message,
            ]
            for r in rows
        ],
    )


@schedule.command()
@schedule_dir_option
@click.pass_obj
def health(state: CliState, schedule_dir: Path) -> None:
    """Exit 1 when a job's last success is older than its threshold (Docker HEALTHCHECK).

    The threshold is the job's max_age, by default twice its period. Prints each job's state.
    """
    rows = svc.job_rows(load_schedules(schedule_dir), state.config(), state.home)
    for r in rows:
        click.echo(f"{'ok' if r.healthy else 'STALE':5} {r.job}: {r.why}")
    if not all(r.healthy for r in rows):
        sys.exit(1)  # stale backups are a state, not an error: the reasons are printed above
