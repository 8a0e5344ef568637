"""``drtool restore``: put a snapshot back, verified before and after."""

from __future__ import annotations

import shutil
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from click.core import ParameterSource

from drtool.cli.context import CliState, emit_json, repository_option
from drtool.cli.render import human_bytes, print_table, require_terminal, typed_confirmation
from drtool.config import Config
from drtool.errors import DrtoolError, IntegrityError, NotFound, UsageError
from drtool.services.restore.run import (
    PRODUCTION,
    RestoreOptions,
    RestoreResult,
    run_restore,
    target_endpoints,
)
from drtool.stores.registry import COMPONENTS

if TYPE_CHECKING:  # a snapshot restore does not pay for the moment and WAL code (ADR 0032)
    from drtool.services.restore import moment, stack_at
    from drtool.services.restore.pitr import PitrResult


def _parse_at(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        at = datetime.fromisoformat(value)
    except ValueError:
        raise UsageError(
            f"--at: not an ISO time, e.g. 2026-11-25T02:00:00Z (got {value})"
        ) from None
    return at if at.tzinfo else at.replace(tzinfo=UTC)


def _parse_moment(value: str) -> datetime:
    """A point-in-time target: ISO 8601 with its zone (a naive time is refused, not guessed)."""
    try:
        at = datetime.fromisoformat(value)
    except ValueError:
        raise UsageError(
            f"--at: not an ISO time, e.g. 2026-11-25T02:00:00Z (got {value})"
        ) from None
    if at.tzinfo is None:
        raise UsageError(
            f"--at: a restore to a moment needs the time with its zone, e.g. {value}Z for UTC "
            f"or {value}+01:00 (got {value})"
        )
    return at


def _show_pitr_plan(result: PitrResult) -> None:
    where = f"new {result.data_dir}" if result.volume else f"new data directory {result.data_dir}"
    print_table(
        f"restore plan: PostgreSQL at {result.target} -> {where}"
        + (" (dry run, nothing changed)" if result.dry_run else ""),
        ["base backup (snapshot)", "base finished", "WAL segments first staged", "window"],
        [[result.base_snapshot, result.base_finished, result.segments_planned, result.window]],
    )


def _confirm_pitr(result: PitrResult) -> bool:
    require_terminal("restore")
    _show_pitr_plan(result)
    return typed_confirmation(result.volume or result.data_dir)


def _restore_to_moment(
    state: CliState,
    snapshot: str,
    at: str | None,
    lsn: str | None,
    where: tuple[str | None, str | None, int | None],  # --into, --into-volume, --port
    components: tuple[str, ...],
    dry_run: bool,
    yes: bool,
    as_json: bool,
) -> None:
    from drtool.services.restore.pitr import PitrOptions, run_pitr

    into, into_volume, port = where
    if snapshot != "latest":
        raise UsageError(f"--at/--lsn with --into: a moment, not a snapshot id (got {snapshot})")
    if components != ("postgres",):
        raise UsageError(
            "restore to a moment: PostgreSQL alone (--component postgres) or the whole stack "
            f"(no --component, with --at); not {','.join(components)}"
        )
    options = PitrOptions(
        at=_parse_moment(at) if at is not None else None,
        lsn=lsn,
        into=Path(into) if into else None,
        into_volume=into_volume,
        dry_run=dry_run,
        yes=yes,
        port=port,
    )
    result = run_pitr(state.config(), options=options, confirm=_confirm_pitr)
    if as_json:
        emit_json(asdict(result))
        return
    if dry_run:
        _show_pitr_plan(result)
        click.echo(
            f"{result.hash_checked} objects the restore reads first (the base and its WAL): "
            "stored size and sha256 match the signed records"
        )
        return
    print_table(
        f"PostgreSQL restored to {result.target} into {result.data_dir} in {result.seconds:.1f} s",
        [
            "reached (last commit replayed)",
            "WAL position",
            "image" if result.volume else "port",
            "segments staged",
        ],
        [
            [
                result.reached_time or "?",
                result.reached_lsn or "?",
                result.image if result.volume else result.port,
                result.segments_staged,
            ]
        ],
    )
    for note in result.notes:
        click.echo(f"note: {note}")
    if result.volume:
        click.echo(
            f"volume {result.volume} holds the promoted data directory (stopped); mount it at "
            f"/var/lib/postgresql/data of a {result.image} container (docs/OPERATIONS.md)"
        )
        return
    click.echo(
        f"the copy runs on 127.0.0.1:{result.port}; stop it with: "
        f"{result.pg_ctl} -D {result.data_dir} stop (as the postgres user)"
    )


def _show_moment_plan(
    plan: moment.MomentPlan, into: str, target: str, dry_run: bool, buckets: dict[str, str]
) -> None:
    from drtool.stores import canary

    where = {"postgres": f"new data directory {into}"}
    where.update(
        {canary.minio_name(b): f"{target or PRODUCTION} bucket {t}" for b, t in buckets.items()}
    )
    print_table(
        f"restore plan: the stack at {plan.moment.isoformat()} (max skew "
        f"{plan.max_skew_s:.0f} s: {plan.max_skew_from})"
        + (" (dry run, nothing changed)" if dry_run else ""),
        ["store", "effective moment", "skew (s)", "restored from", "into"],
        [
            [
                s.store,
                s.effective.isoformat() if s.effective else f"none: {s.error}",
                "" if s.skew_s is None else f"{s.skew_s:.1f}",
                s.source,
                where.get(s.store, target or PRODUCTION),
            ]
            for s in plan.stores
        ],
    )


def _restore_stack_to_moment(
    state: CliState,
    repository: str | None,
    at: str,
    into: str,
    *,
    target: str,
    force: bool,
    yes: bool,
    dry_run: bool,
    accept_skew: bool,
    port: int | None,
    as_json: bool,
) -> None:
    """The whole stack at one moment (ADR 0027): plan, refusal, confirmation, restore, the
    invariants with counts. Exit 5 when a read-back or an invariant fails."""
    from drtool.services.restore import moment, stack_at
    from drtool.services.restore.pitr import PitrOptions, check_options

    when = _parse_moment(at)
    check_options(PitrOptions(at=when, into=Path(into)))
    cfg = state.config(repository=repository)
    plan = moment.plan_moment(cfg, when)
    if not as_json:
        buckets = stack_at.bucket_targets(plan, target_endpoints(cfg, state.home, target))
        _show_moment_plan(plan, into, target, dry_run, buckets)
    refusal = plan.refusal(accept_skew=accept_skew)
    if refusal is not None:
        raise refusal
    stack_at.check_targets(cfg, state.home, plan, target, force=force)
    if dry_run:
        if as_json:
            emit_json({"plan": [asdict(s) for s in plan.stores], "dry_run": True})
        return
    if not yes:
        require_terminal("restore")
        if not typed_confirmation(target or PRODUCTION):
            raise UsageError("restore: not confirmed; nothing changed")
    result = _stack_or_clean_up(cfg, state, plan, Path(into), target, force=force, port=port)
    if result.pitr is not None and not result.pitr.target_reached:
        # recovery ended at the end of the WAL held: PostgreSQL is as at its last replayed
        # transaction, and its skew counts from there (a sealed time overstates the window)
        plan = plan.postgres_short_of_the_moment(result.pitr.reached_time)
    short = [] if accept_skew else plan.over_skew()
    ok = result.ok and not short
    if as_json:
        emit_json({**asdict(result), "plan": [asdict(s) for s in plan.stores], "ok": ok})
    else:
        _show_stack_result(plan, result)
    if not result.ok:
        failed = [c.detail for c in result.checks if not c.passed] + result.problems
        raise IntegrityError(f"restore to {result.moment}: {failed[0]}")
    if short:
        raise NotFound(
            f"restore to {result.moment}: restored, but "
            + ", ".join(f"{s.store} is {s.skew_s:.0f} s short of the moment" for s in short)
            + f" (beyond restore.max_skew_s {plan.max_skew_s:.0f} s: the WAL held ended "
            "before it); the copy is kept as restored"
        )


def _whole_stack_options(target: str, how: dict[str, Any]) -> None:
    """Refuse, before anything is read, what the whole-stack restore to a moment would not
    honour: no --target (Redis and the buckets of production would go back to the moment
    while production PostgreSQL stays at now: the copy goes to --into only), and any
    per-store option of the snapshot restore (the moment restore has one way per store)."""
    if not target:
        raise UsageError(
            "restore --at with --into (the whole stack): name --target; without it the "
            "production Redis and buckets would be rolled back to the moment while production "
            "PostgreSQL stays at now (the copy goes to --into only); nothing changed"
        )
    ctx = click.get_current_context()
    flags = {p.name: p.opts[0] for p in ctx.command.params}
    given = [
        flags.get(name, name)
        for name in how
        if ctx.get_parameter_source(name) not in (None, ParameterSource.DEFAULT)
    ]
    if given:
        raise UsageError(
            f"restore --at with --into (the whole stack): {', '.join(sorted(given))} not "
            "supported there (Redis online, buckets merged in full); nothing changed"
        )


def _stack_or_clean_up(
    cfg: Config,
    state: CliState,
    plan: moment.MomentPlan,
    into: Path,
    target: str,
    *,
    force: bool,
    port: int | None,
) -> stack_at.StackAtResult:
    """The whole-stack restore; when it fails, the PostgreSQL copy is stopped and the data
    directory this run filled is removed, and the error names the stores already replaced
    (they are not put back: the operator must know what changed)."""
    from drtool.services.pitr_drill import stop_copy
    from drtool.services.restore import stack_at

    copies: list[PitrResult] = []
    restored: list[str] = []
    try:
        return stack_at.restore_stack_at(
            cfg,
            home=state.home,
            plan=plan,
            into=into,
            target=target,
            force=force,
            port=port,
            on_postgres=copies,
            changed=restored,
        )
    except BaseException as exc:
        stop_copy(into, copies[0] if copies else None)
        if into.exists():  # check_options allowed only an absent or empty directory
            shutil.rmtree(into, ignore_errors=True)
        if not isinstance(exc, DrtoolError):
            raise
        changed = "; ".join(restored) or "nothing outside the data directory"
        raise type(exc)(
            f"{exc.message}; already restored before the failure: {changed}; the PostgreSQL "
            f"copy was stopped and {into} removed"
        ) from None


def _show_stack_result(plan: moment.MomentPlan, result: stack_at.StackAtResult) -> None:
    pitr = result.pitr
    assert pitr is not None
    for note in pitr.notes:  # e.g. recovery ended at the end of the WAL held
        click.echo(f"note: {note}")
    print_table(
        f"the stack restored to {result.moment}",
        ["store", "effective moment", "skew (s)", "measured RPO (s)", "seconds (RTO)"],
        [
            [
                s.store,
                pitr.reached_time or "?" if s.store == "postgres" else s.effective,
                s.skew_s,
                result.measured_rpo_s.get(s.store, "no canary"),
                result.seconds.get(s.store, ""),
            ]
            for s in plan.stores
        ],
    )
    print_table(
        "cross-store invariants at the moment",
        ["check", "result", "counts"],
        [[c.name, "PASS" if c.passed else "FAIL", c.detail] for c in result.checks],
    )
    for problem in result.problems[:5]:
        click.echo(f"read back: {problem}")
    click.echo(
        f"PostgreSQL runs on 127.0.0.1:{pitr.port}; stop it with: "
        f"{pitr.pg_ctl} -D {pitr.data_dir} stop (as the postgres user)"
    )


def _show_plan(result: RestoreResult) -> None:
    print_table(
        f"restore plan: snapshot {result.snapshot_id} -> {result.target}"
        + (" (dry run, nothing changed)" if result.dry_run else ""),
        ["component", "snapshot holds", "size", "target", "target holds", "action"],
        [
            [p.component, p.source, human_bytes(p.plain_bytes), p.target, p.holds, p.action]
            for p in result.plan
        ],
    )
    for p in result.plan:
        for note in p.notes:
            click.echo(f"note ({p.component}): {note}")


def _confirm(result: RestoreResult) -> bool:
    """Show the plan; on a terminal, the operator types the target's name."""
    require_terminal("restore")
    _show_plan(result)
    return typed_confirmation(result.target)


@click.command()
@click.argument("snapshot", default="latest")
@click.option(
    "--at",
    "at",
    metavar="TIME",
    help="With `latest`: the newest snapshot not after TIME (ISO, UTC if no zone). With "
    "--into: restore PostgreSQL to exactly that moment (base backup + WAL; the zone is required). "
    "After a failover it follows the newest timeline: a moment on another timeline cannot be "
    "chosen.",
)
@click.option(
    "--lsn",
    metavar="LSN",
    help="With --into: restore PostgreSQL to that WAL position (e.g. 16/B374D848).",
)
@click.option(
    "--into",
    metavar="DIR",
    help="Restore to a moment (--at/--lsn) into this NEW data directory; the copy starts on a "
    "free loopback port, the running cluster is not touched. With --at and no --component: "
    "the whole stack at that moment (Redis and the buckets into --target).",
)
@click.option(
    "--into-volume",
    "into_volume",
    metavar="NAME",
    help="Restore to a moment into this NEW Docker volume instead (the Docker deployment): "
    "recovered and promoted in a throw-away container of postgres.image (the base backup's "
    "PostgreSQL build), then stopped; no existing volume or container is touched.",
)
@click.option("--port", type=int, default=None, help="With --into: the copy's port (default free).")
@click.option(
    "--component",
    "components",
    default=",".join(COMPONENTS),
    show_default=True,
    help="Comma-separated stores to restore.",
)
@click.option(
    "--target",
    default="",
    metavar="NAME",
    help="[targets.NAME] from the config, or the local stack NAME; default the production stack.",
)
@click.option(
    "--dry-run",
    is_flag=True,
    help="Print the plan (what goes where, what it replaces) and check the stored sha256 of "
    "every object the restore reads; change nothing.",
)
@click.option(
    "--force",
    is_flag=True,
    help="Restore into a non-empty target (PostgreSQL: beside it, switched last).",
)
@click.option("--yes", is_flag=True, help="Do not ask for confirmation (for scripts).")
@click.option(
    "--accept-skew",
    is_flag=True,
    help="Restore to a moment (the whole stack) even when a store is further behind the "
    "moment than restore.max_skew_s (default: the schedule's Redis interval plus its jitter).",
)
@click.option(
    "--drop-old", is_flag=True, help="Drop the replaced PostgreSQL database instead of keeping it."
)
@click.option("--jobs", default=2, show_default=True, help="pg_restore parallel jobs.")
@click.option(
    "--redis-mode",
    type=click.Choice(["online", "offline"]),
    default="online",
    show_default=True,
    help="online: copy keys into the running Redis (any server). offline: stop it, replace "
    "its RDB, start it (a local stack, or redis.container of the target; exact, no mix).",
)
@click.option(
    "--redis-node-dir",
    "redis_node_dirs",
    multiple=True,
    metavar="DIR",
    help="With --redis-mode offline and a Redis Cluster snapshot: the data dir (nodes.conf, "
    "dump.rdb) of each STOPPED node of a cluster with the snapshot's slot ranges; each gets "
    "its shard's RDB. Repeat for every master (and replica).",
)
@click.option(
    "--redis-wait-started",
    type=float,
    default=0.0,
    metavar="SECONDS",
    help="With --redis-node-dir: once the RDBs are placed, wait up to SECONDS for you to start "
    "the nodes, then compare each master with its shard (exit 5 on a difference).",
)
@click.option(
    "--redis-rdb-dir",
    default="",
    metavar="DIR",
    help="With --redis-mode offline and a Redis Cluster snapshot: write each shard's checked "
    "RDB into DIR as shard-<i>-slots-<ranges>.rdb, for nodes on other hosts (you place them).",
)
@click.option(
    "--prefix", default="", metavar="P", help="MinIO: only objects whose key starts with P."
)
@click.option(
    "--minio-mode",
    type=click.Choice(["merge", "mirror"]),
    default="merge",
    show_default=True,
    help="merge: objects the snapshot lacks stay in the bucket (counted in the result). "
    "mirror: they are removed (only under --prefix), after every snapshot object is in place.",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable result on stdout.")
@repository_option
@click.pass_obj
def restore(
    state: CliState,
    snapshot: str,
    repository: str | None,
    at: str | None,
    lsn: str | None,
    into: str | None,
    port: int | None,
    components: str,
    target: str,
    dry_run: bool,
    force: bool,
    yes: bool,
    as_json: bool,
    **how: Any,  # into_volume, per-store options (redis_mode, redis_node_dirs, ...); accept_skew
) -> None:
    """Restore a snapshot (an id or `latest`) into the stack or a named target.

    \b
    `latest` is the newest valid snapshot holding every chosen store: the
    nightly full one for all three, an hourly one for `--component redis`.
    Nothing is touched before the snapshot verifies: signature, every object's
    stored sha256, authenticated decryption into the scratch dir. A non-empty
    target needs --force; a terminal asks you to type the target's name.
    Afterwards the target's fingerprints are compared with the snapshot's:
    exit 0 only when all match, 5 on a mismatch. Objects in a bucket that the
    snapshot lacks are kept and counted, or removed with --minio-mode mirror.

    \b
    To a moment: `--at TIME` (with its zone) or `--lsn LSN`, `--component
    postgres --into DIR`: the newest base backup before it plus the WAL up to
    it, each file checked before PostgreSQL reads it (the base and the WAL to
    the target before DIR is created), recovered and promoted in DIR on a
    free port. Outside the window (or behind a WAL gap): exit 10, naming it;
    a damaged file: exit 5, naming it, DIR not left behind. `--into-volume
    NAME` instead of `--into DIR`: the same into a new Docker volume, recovered
    with postgres.image's server in throw-away containers, then stopped.

    \b
    The whole stack to a moment: `--at TIME --into DIR` without --component:
    PostgreSQL as above, Redis from the newest RDB taken before TIME, each
    bucket as it was at TIME (snapshot + capture journal), Redis and the
    buckets into --target, which is required (production's PostgreSQL would
    stay at now; --force for a target holding data; the per-store options
    above are refused there). On a failure the copy is stopped, DIR removed,
    and the error names what was already replaced. The plan names each store's
    effective moment and skew; a skew above restore.max_skew_s (default:
    the schedule's Redis interval) stops it (exit 10) unless --accept-skew.
    The result counts the cross-store invariants; exit 5 when one fails.
    """
    chosen = tuple(c.strip() for c in components.split(",") if c.strip())
    accept_skew = bool(how.pop("accept_skew"))
    into_volume: str | None = how.pop("into_volume")
    if accept_skew and (into is None or at is None):
        raise UsageError("--accept-skew: only for the whole stack to a moment (--at with --into)")
    if into is not None and lsn is None and at is not None and set(chosen) == set(COMPONENTS):
        if snapshot != "latest":
            raise UsageError(f"--at with --into: a moment, not a snapshot id (got {snapshot})")
        _whole_stack_options(target, how)
        _restore_stack_to_moment(
            state,
            repository,
            at,
            into,
            target=target,
            force=force,
            yes=yes,
            dry_run=dry_run,
            accept_skew=accept_skew,
            port=port,
            as_json=as_json,
        )
        return
    if lsn is not None or into is not None or into_volume is not None:
        if target or force:
            raise UsageError(
                "restore to a moment: it goes into a new data directory (--into DIR) only, or "
                "a new Docker volume (--into-volume NAME); "
                "--target/--force replace a running database and are for snapshot restores "
                "(to put the copy in production's place, see docs/OPERATIONS.md); nothing changed"
            )
        where = (into, into_volume, port)
        _restore_to_moment(state, snapshot, at, lsn, where, chosen, dry_run, yes, as_json)
        return
    if at is not None and chosen == ("postgres",):
        raise UsageError(
            "--at with --component postgres: for a restore to that exact moment add --into DIR "
            "(a new data directory) or --into-volume NAME (a new Docker volume); for an older "
            "logical snapshot, name it by id (drtool list)"
        )
    options = RestoreOptions(
        ref=snapshot,
        at=_parse_at(at),
        components=chosen,
        target=target,
        dry_run=dry_run,
        force=force,
        yes=yes,
        **how,
    )
    cfg = state.config(repository=repository)
    result = run_restore(cfg, home=state.home, options=options, confirm=_confirm)
    if as_json:
        emit_json({**asdict(result), "ok": result.ok})
    elif dry_run:
        _show_plan(result)
        click.echo(
            f"{result.hash_checked} objects the restore reads: stored size and sha256 match "
            "the signed manifest"
        )
    else:
        print_table(
            f"snapshot {result.snapshot_id} restored into {result.target} "
            f"in {result.seconds:.1f} s",
            ["component", "fingerprints", "seconds (RTO)", "detail"],
            [
                [
                    c.name,
                    "PASS" if c.passed else "FAIL: " + "; ".join(c.problems),
                    f"{c.seconds:.1f}",
                    c.detail,
                ]
                for c in result.components
            ],
        )
    if not result.ok:
        failed = [c for c in result.components if not c.passed]
        raise IntegrityError(
            f"restore: {failed[0].name} differs from the snapshot after the restore: "
            f"{failed[0].problems[0]}"
        )
