"""``drtool drill``: restore a snapshot into a throw-away stack and prove the messages intact.

Scratch stack up → restore (verified against the snapshot's fingerprints) → cross-store and
app-level checks → RTO/RPO against the definition's thresholds → report (local files, the
repository, metrics, a webhook on failure) → tear down, always: on failure, exception,
Ctrl-C or SIGTERM. "The backup job exited 0" proves nothing; this does.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

from drtool.config import Config, MinioConfig, PostgresConfig, RedisConfig, StackConfig
from drtool.drills.cluster import cluster_shape, scratch_redis, shard_checks
from drtool.drills.definition import DrillDefinition
from drtool.drills.report import (
    DrillReport,
    alert_payload,
    prometheus_textfile,
    read_webhook_url,
    send_webhook,
    write_local,
)
from drtool.drills.runtime_local import cleanup_local, drills_dir, local_scratch
from drtool.drills.sizing import log_sizes, size_limits
from drtool.drills.watchdog import DrillDeadline, Watchdog, watchdog
from drtool.endpoints import StackEndpoints
from drtool.errors import ConfigError, DrtoolError, NotFound, UsageError
from drtool.pipeline.header import InnerHeader
from drtool.pipeline.seal import seal
from drtool.repository import catalog, drill_log, layout
from drtool.repository.access import Repo, identities_of, open_repo
from drtool.repository.ids import new_id
from drtool.repository.part_times import part_window
from drtool.runtime.binaries import pg_bin_dir, pg_major_of
from drtool.services import key_proof, pitr_drill
from drtool.services.restore import moment as moment_plan
from drtool.services.restore.pitr import PitrResult
from drtool.services.restore.run import RestoreOptions, run_restore
from drtool.services.restore.stack_at import restore_stack_at
from drtool.sources import postgres as pg
from drtool.stores import canary, checks, registry
from drtool.timing import Timer, timed

log = logging.getLogger(__name__)

# beyond twice the RTO limit: the scratch stack's start and teardown and the data checks
DEADLINE_MARGIN_S = 600.0

# (home, drill id, definition, the snapshot's PostgreSQL major) -> the scratch stack
Scratch = Callable[[Path, str, DrillDefinition, int | None], AbstractContextManager[StackEndpoints]]


def _scratch(
    home: Path, drill_id: str, definition: DrillDefinition, pg_major: int | None
) -> AbstractContextManager[StackEndpoints]:
    """The scratch stack of the definition's runtime (local: of the snapshot's major)."""
    if definition.runtime == "docker":
        from drtool.drills.runtime_docker import docker_scratch  # imports docker: only here

        return docker_scratch(drill_id, definition.docker)
    return local_scratch(home, drill_id, pg_major)


def snapshot_pg_major(record: catalog.SnapshotRecord, spec: DrillDefinition) -> int | None:
    """The PostgreSQL major the drill must restore into: the snapshot's, if it drills postgres."""
    comp = record.manifest.component("postgres") if record.manifest else None
    if comp is None or "postgres" not in spec.components:
        return None
    return pg_major_of(comp.source_version)


def check_scratch_major(scratch: StackEndpoints, pg_major: int | None) -> None:
    """Refuse a scratch PostgreSQL of another major than the snapshot's.

    A drill proves that the snapshot restores as production would restore it; a restore
    into another major proves something else (a docker runtime's ``postgres_image`` of the
    wrong major is the usual cause).
    """
    if pg_major is None:
        return
    running = pg.server_version(replace(scratch.postgres, dbname="postgres"))
    if running != pg_major:
        raise UsageError(
            f"drill: the snapshot holds PostgreSQL {pg_major} data but the scratch server runs "
            f"PostgreSQL {running}; a drill restores into the snapshot's major "
            "(for the docker runtime set docker.postgres_image to a PostgreSQL "
            f"{pg_major} image)"
        )


@dataclass(frozen=True)
class Choice:
    """The snapshot a drill restores, and what it should have proven but cannot (and why).

    A drill exists to prove the snapshot a restore would use. When it passes over a newer
    snapshot that is INVALID or DAMAGED, finds no valid one, or is told to drill an invalid
    one, it has not proven what it should: that is a failed drill (exit 6, report, history,
    webhook, metric), not a pass on an older snapshot nor an error without a report.
    """

    record: catalog.SnapshotRecord | None
    skipped: tuple[str, ...] = ()
    named: str = ""  # the snapshot id asked for, when one was


def choose_snapshot(
    records: list[catalog.SnapshotRecord],
    definition: DrillDefinition,
    override: str | None,
    now: datetime,
) -> Choice:
    """The snapshot to drill: an id, ``latest``, or a random valid one within a window.

    ``latest`` is the newest valid snapshot holding the drilled stores; every newer snapshot
    that is not valid (and may hold them: an unreadable manifest may) is named as skipped.
    An unknown id is NotFound (a typo, not a drill).
    """
    choice = override or definition.snapshot
    window = replace(definition, snapshot=choice).window()
    wanted = definition.components
    what = ", ".join(wanted)
    if window is None and choice != "latest":
        named = next((r for r in records if r.snapshot_id == choice), None)
        if named is None:
            raise NotFound(f"snapshot {choice}: not found (see `drtool list`)")
        if not named.valid:
            return Choice(None, (f"snapshot {choice} is {named.status}: {named.reason}",), choice)
        return Choice(named, (), choice)
    if window is None:
        valid = [r for r in records if r.valid and catalog.holds(r, wanted)]
        chosen = valid[-1] if valid else None
        newer = [
            r
            for r in records
            if not r.valid
            and (chosen is None or r.snapshot_id > chosen.snapshot_id)
            and (r.manifest is None or catalog.holds(r, wanted))
        ]
        skipped = tuple(f"passed over {r.snapshot_id}: {r.status}: {r.reason}" for r in newer)
        if chosen is None:
            skipped += (f"no valid snapshot holding {what} in the repository",)
        return Choice(chosen, skipped)
    candidates = [
        r for r in records if r.valid and now - r.time <= window and catalog.holds(r, wanted)
    ]
    if not candidates:
        return Choice(
            None, (f"no valid snapshot holding {what} within the last {window} ({choice})",)
        )
    return Choice(random.SystemRandom().choice(candidates))


def restore_tools(configured: str, pg_major: int) -> str:
    """The client tools a local drill restores with: the configured ones when their
    pg_restore is of the snapshot's major or newer, else the scratch major's own.

    An operator's explicit ``postgres.bin_dir`` is kept where it can read the dump (it may be
    the only client of that major, or a wrapper); one too old would refuse the dump.
    """
    if configured and pg.client_version(Path(configured) / "pg_restore") >= pg_major:
        return configured
    return str(pg_bin_dir(major=pg_major))


def guard_production(scratch: StackEndpoints, production: StackEndpoints) -> None:
    """Refuse a scratch endpoint that is a configured production endpoint."""
    pairs = [
        (
            "postgres",
            (scratch.postgres.host, scratch.postgres.port),
            (production.postgres.host, production.postgres.port),
        ),
        (
            "redis",
            (scratch.redis.host, scratch.redis.port),
            (production.redis.host, production.redis.port),
        ),
        ("minio", scratch.minio.endpoint_url, production.minio.endpoint_url),
    ]
    for name, mine, theirs in pairs:
        if mine == theirs:
            raise UsageError(
                f"drill: the scratch {name} endpoint {mine} is the production one; refusing to "
                "restore a drill into production"
            )


def scratch_target(endpoints: StackEndpoints) -> StackConfig:
    """The scratch stack as a restore target."""
    pg, rd, mn = endpoints.postgres, endpoints.redis, endpoints.minio
    return StackConfig(
        PostgresConfig(
            host=pg.host, port=pg.port, user=pg.user, dbname=pg.dbname, password=pg.password
        ),
        RedisConfig(host=rd.host, port=rd.port, username=rd.username or "", password=rd.password),
        MinioConfig(
            endpoint_url=mn.endpoint_url,
            region=mn.region,
            access_key=mn.access_key,
            secret_key=mn.secret_key,
            buckets=endpoints.buckets,
        ),
    )


def default_deadline(spec: DrillDefinition) -> float:
    """The whole drill may take twice its RTO limit plus a margin for the scratch stack."""
    return 2 * spec.thresholds.max_rto_s + DEADLINE_MARGIN_S


def run_drill(
    cfg: Config,
    *,
    home: Path,
    spec: DrillDefinition,
    snapshot: str | None = None,
    now: datetime | None = None,
    scratch: Scratch = _scratch,
    deadline_s: float | None = None,
) -> DrillReport:
    """Run one drill and return its report (``passed`` says how it went).

    The drill is stopped and reported failed once it has run ``deadline_s`` seconds (default:
    :func:`default_deadline`); its phase is logged every 30 s meanwhile.
    """
    if not cfg.keys.identity_file:
        raise ConfigError("keys.identity_file: a drill decrypts, it needs the operators' identity")
    now = now or datetime.now(UTC)
    if pitr_drill.is_pitr(snapshot or spec.snapshot):
        spec = replace(spec, snapshot=snapshot or spec.snapshot)
        return _pitr(cfg, home, spec, now, deadline_s, scratch)
    repo = open_repo(cfg)
    records = catalog.list_snapshots(repo.storage, repo.verify_keys, repo.info.repo_id)
    choice = choose_snapshot(records, spec, snapshot, now)
    record = choice.record
    drill_id = new_id(now)
    report = DrillReport(
        drill_id=drill_id,
        definition=spec.name,
        runtime=spec.runtime,
        snapshot_id=record.snapshot_id if record else choice.named,
        snapshot_time=record.time.isoformat() if record else "",
        started=now.isoformat(timespec="seconds"),
        rpo_s=round((now - record.time).total_seconds(), 1) if record else 0.0,
    )
    if choice.skipped:
        for why in choice.skipped:
            log.warning("drill %s: %s", drill_id, why)
        report.checks.append(
            checks.CheckResult(
                "newest snapshot drilled",
                False,
                "; ".join(choice.skipped),
                examples=list(choice.skipped[: checks.MAX_EXAMPLES]),
            )
        )
    if record is None:
        report.error = "; ".join(choice.skipped)
    else:
        log.info(
            "drill %s of snapshot %s on the %s runtime", drill_id, record.snapshot_id, spec.runtime
        )
        _prove_keys(cfg, repo, spec, record, report)
        deadline = deadline_s or default_deadline(spec)
        with _failures_reported(report), watchdog(drill_id, deadline) as dog:
            _drill(cfg, home, spec, record, report, scratch, dog)
    report.finished = datetime.now(UTC).isoformat(timespec="seconds")
    _publish(repo, spec, report)
    return report


@contextmanager
def _failures_reported(report: DrillReport) -> Iterator[None]:
    """A deadline, drtool's own errors and any unexpected error end the drill as a failed,
    reported drill: never a traceback, never a scheduler stopped by a drill."""
    try:
        yield
    except DrillDeadline as exc:
        report.error = str(exc)
        report.passed = False
    except DrtoolError as exc:
        report.error = exc.message
        report.passed = False
    except Exception as exc:  # a bug or an unexpected library error: still a reported failure
        log.exception("drill %s: unexpected error", report.drill_id)
        report.error = f"internal error: {type(exc).__name__}: {exc}"
        report.passed = False


def _pitr(
    cfg: Config,
    home: Path,
    spec: DrillDefinition,
    now: datetime,
    deadline_s: float | None,
    scratch: Scratch = _scratch,
) -> DrillReport:
    """A drill of the physical chain (services/pitr_drill.py), reported, stored and published
    like every drill: PostgreSQL alone into a new data directory, or, for a moment with more
    stores than PostgreSQL, the whole stack at that moment (:func:`_moment`).

    Its ``snapshot_id`` is the choice (``pitr:lsn-of-latest``), never a snapshot's id: the
    drill restored a base backup and WAL, not that snapshot, so it must not count as that
    snapshot's drill for retention (drill_log.drilled).
    """
    drill_id = new_id(now)
    report = DrillReport(
        drill_id=drill_id,
        definition=spec.name,
        runtime="local",
        snapshot_id=spec.snapshot,
        snapshot_time="",
        started=now.isoformat(timespec="seconds"),
    )
    with _failures_reported(report):
        choice = pitr_drill.choose(cfg, spec.snapshot, spec.window(), now, spec.components)
        report.snapshot_time = (choice.at or choice.newest).isoformat(timespec="seconds")
        # how old the newest thing this drill proves is: the logical snapshot, or the
        # window's end (the newest moment restorable)
        report.rpo_s = round((now - choice.newest).total_seconds(), 1)
        log.info("drill %s: %s (%s)", drill_id, spec.snapshot, choice.lsn or choice.at)
        whole = choice.at is not None and set(spec.components) != {"postgres"}
        with watchdog(drill_id, deadline_s or default_deadline(spec)) as dog:
            if whole:
                assert choice.at is not None
                _moment(cfg, home, spec, choice.at, report, scratch, dog)
            else:
                dog.enter(f"restoring PostgreSQL to {choice.lsn or choice.at} (base + WAL)")
                pitr_drill.run_pitr_drill(cfg, home, choice, report)
        report.checks += _threshold_checks(spec, report, measured=whole)
        report.passed = all(c.passed for c in report.checks)
    report.finished = datetime.now(UTC).isoformat(timespec="seconds")
    _publish(open_repo(cfg), spec, report)
    return report


def _moment(
    cfg: Config,
    home: Path,
    spec: DrillDefinition,
    at: datetime,
    report: DrillReport,
    scratch: Scratch,
    dog: Watchdog,
) -> None:
    """The whole stack at one moment into the scratch stack (services/restore/stack_at.py):
    PostgreSQL by WAL into a new data directory, Redis and the buckets per the plan into the
    scratch servers; then the drill's data checks at the moment (cross-store invariants with
    counts), the canaries' measured RPO per store and the skew against its threshold.

    The plan is checked before anything starts; a store that cannot reach the moment fails
    the drill with the planner's message. A skew above the threshold does not stop the drill
    (the restore still proves the rest) but fails its check, naming the store.
    """
    phases = report.phases_s
    plan = moment_plan.plan_moment(cfg, at, max_skew_s=spec.thresholds.max_skew_s or None)
    report.checks.append(_skew_check(plan))
    refusal = plan.refusal(accept_skew=True)
    if refusal is not None:
        raise refusal
    assert plan.pitr is not None
    work = pitr_drill.work_dir(home, report.drill_id)
    copies: list[PitrResult] = []
    try:
        up = Timer()
        pg_major = pg_major_of(plan.pitr.base.component.source_version)
        report.pg_major = pg_major
        dog.enter(f"starting the {spec.runtime} scratch stack")
        with scratch(home, report.drill_id, spec, pg_major) as endpoints:
            phases["up"] = round(up.elapsed(), 3)
            guard_production(endpoints, cfg.stack())
            target = f"drill-{report.drill_id}"
            drill_cfg = replace(cfg, targets={**cfg.targets, target: scratch_target(endpoints)})
            dog.enter(f"restoring the stack to {at.isoformat()}")
            restoring = Timer()
            try:
                result = restore_stack_at(
                    drill_cfg,
                    home=home,
                    plan=plan,
                    into=work / "data",
                    target=target,
                    on_postgres=copies,
                    check=lambda eps: _data_checks(eps, spec, at_moment=True),
                )
            finally:  # a failure: the time up to it
                report.restore_s = phases["restore"] = round(restoring.elapsed(), 3)
            # the RTO is the restore's own time; the data checks after it are a phase
            phases["checks"] = round(report.restore_s - result.restore_s, 3)
            report.restore_s = phases["restore"] = result.restore_s
            report.rto_s.update(result.seconds)
            pitr = result.pitr
            assert pitr is not None
            report.checks.append(
                checks.CheckResult(
                    "restored to the moment",
                    not result.problems,
                    f"PostgreSQL reached {pitr.reached_time or '?'} from base "
                    f"{pitr.base_snapshot}; Redis from {result.redis_snapshot}; buckets "
                    f"{', '.join(result.buckets)} as at the moment"
                    + (
                        f"; {len(result.problems)} read-back differences" if result.problems else ""
                    ),
                    examples=result.problems[: checks.MAX_EXAMPLES],
                )
            )
            if not pitr.target_reached:  # judged by what the server reached, not the plan
                plan = plan.postgres_short_of_the_moment(pitr.reached_time)
                report.checks = [
                    _skew_check(plan) if c.name == SKEW_CHECK else c for c in report.checks
                ]
            report.checks += result.checks
            report.measured_rpo_s = result.measured_rpo_s
            down = Timer()
        phases["down"] = round(down.elapsed(), 3)
    finally:
        pitr_drill.stop_copy(work / "data", copies[0] if copies else None)
        shutil.rmtree(work, ignore_errors=True)


SKEW_CHECK = "skew within threshold"


def _skew_check(plan: moment_plan.MomentPlan) -> checks.CheckResult:
    """Each store's effective moment and skew against the limit; the stores over it named."""
    over = plan.over_skew()
    figures: dict[str, Any] = {
        s.store: {
            "effective": s.effective.isoformat() if s.effective else None,
            "skew_s": s.skew_s,
            "source": s.source,
        }
        for s in plan.stores
    }
    figures["max_skew_s"] = plan.max_skew_s
    limit = f"limit {plan.max_skew_s:.0f} s, {plan.max_skew_from}"
    detail = f"skew {plan.skew_text() or 'unknown'} ({limit})"
    if over:
        detail = f"{', '.join(s.store for s in over)} beyond the limit: " + detail
    return checks.CheckResult(
        SKEW_CHECK,
        not over and all(s.effective is not None for s in plan.stores),
        detail,
        figures,
        [f"{s.store}: {s.skew_s:.0f} s behind ({s.source})" for s in over],
    )


def _drill(
    cfg: Config,
    home: Path,
    spec: DrillDefinition,
    record: catalog.SnapshotRecord,
    report: DrillReport,
    scratch: Scratch,
    dog: Watchdog,
) -> None:
    """Scratch stack up, restore, data checks, stack down: each phase timed and announced.

    The stack is torn down by its context manager whatever happens, and the restore's time
    is recorded even when it fails, so the report's RTO counts the whole attempt.
    """
    phases = report.phases_s
    up = Timer()
    pg_major = snapshot_pg_major(record, spec)
    if spec.runtime == "docker":
        spec = _docker_sized(spec, record, report.drill_id, dog)
    dog.enter(f"starting the {spec.runtime} scratch stack")
    # a Redis Cluster snapshot on the local runtime: a scratch cluster of its shape (ADR 0021)
    shape = cluster_shape(record, spec)
    with (
        scratch(home, report.drill_id, spec, pg_major) as stack,
        scratch_redis(drills_dir(home) / report.drill_id, stack, shape) as endpoints,
    ):
        phases["up"] = round(up.elapsed(), 3)
        guard_production(endpoints, cfg.stack())
        check_scratch_major(endpoints, pg_major)
        report.pg_major = pg_major
        target = f"drill-{report.drill_id}"
        drill_cfg = replace(cfg, targets={**cfg.targets, target: scratch_target(endpoints)})
        dog.enter(f"restoring snapshot {record.snapshot_id}")
        if spec.runtime == "local" and pg_major is not None:
            bin_dir = restore_tools(cfg.postgres.bin_dir, pg_major)
            drill_cfg = replace(drill_cfg, postgres=replace(cfg.postgres, bin_dir=bin_dir))
        restoring = Timer()
        try:
            restored = run_restore(
                drill_cfg,
                home=home,
                options=RestoreOptions(
                    ref=record.snapshot_id, components=spec.components, target=target, yes=True
                ),
                confirm=lambda result: True,
            )
        except DrtoolError as exc:
            # a damaged or missing object stops the restore: the report names it as a check
            report.checks.append(
                checks.CheckResult("snapshot restores", False, exc.message, examples=[exc.message])
            )
            raise
        finally:  # the whole restore, up to a failure too
            report.restore_s = phases["restore"] = round(restoring.elapsed(), 3)
        for comp in restored.components:
            report.rto_s[comp.name] = round(comp.seconds, 3)
            report.checks.append(
                checks.CheckResult(
                    f"{comp.name} fingerprints equal the snapshot's",
                    comp.passed,
                    comp.detail if comp.passed else "; ".join(comp.problems[:3]),
                    examples=comp.problems[: checks.MAX_EXAMPLES],
                )
            )
        dog.enter("checking the restored data")
        with timed() as checking:
            if shape is not None:
                report.checks += shard_checks(cfg, record, endpoints)
            report.checks += _data_checks(endpoints, spec)
        phases["checks"] = round(checking.seconds, 3)
        report.measured_rpo_s = _measured_rpo(endpoints, spec, record)
        dog.enter("tearing the scratch stack down")
        down = Timer()
    phases["down"] = round(down.elapsed(), 3)
    report.checks += _threshold_checks(spec, report)
    report.passed = all(c.passed for c in report.checks)


def _prove_keys(
    cfg: Config,
    repo: Repo,
    spec: DrillDefinition,
    record: catalog.SnapshotRecord,
    report: DrillReport,
) -> None:
    """Decrypt a sample object with each identity given (key_proof.py).

    With identities given it is a check of the drill; without, only the configured identity
    is tried and recorded as proven (the restore itself fails if it cannot decrypt).
    """
    try:
        proof = key_proof.prove_keys(
            repo, record, [Path(p) for p in spec.identities], identities_of(cfg)
        )
    except DrtoolError as exc:
        if spec.identities:
            report.checks.append(checks.CheckResult(key_proof.CHECK_NAME, False, exc.message))
        else:
            log.warning("drill %s: key proof skipped: %s", report.drill_id, exc.message)
        return
    if spec.identities:
        report.checks.append(proof.check(required=True))
    report.keys_proven = proof.proven


def _docker_sized(
    spec: DrillDefinition, record: catalog.SnapshotRecord, drill_id: str, dog: Watchdog
) -> DrillDefinition:
    """The definition with its unset container limits sized from the snapshot (logged), and
    the watchdog looking at the containers' memory on each progress tick."""
    from drtool.drills.runtime_docker import watch_memory  # imports docker: only here

    images, sized = size_limits(spec.docker, record.manifest)
    log_sizes(drill_id, sized)
    dog.monitor = partial(watch_memory, drill_id)
    return replace(spec, docker=images)


def _measured_rpo(
    endpoints: StackEndpoints, spec: DrillDefinition, record: catalog.SnapshotRecord
) -> dict[str, float | None]:
    """Per restored store: when its part of the snapshot ended minus the newest canary it
    holds (None: no canary) — what a loss at that moment would have cost. The snapshot's own
    time is its start, to the second: a canary written during the backup would read as
    negative against it."""
    newest = canary.newest_canaries(
        endpoints, endpoints.buckets if "minio" in spec.components else ()
    )
    chosen = set(spec.components)
    measured: dict[str, float | None] = {}
    for name, found in newest.items():
        part = name.split(":", 1)[0]
        if part not in chosen:
            continue
        window = part_window(record.manifest, part) if record.manifest else None
        moment = window[1] if window is not None else record.time
        measured.update(canary.measured_rpo(moment, {name: found}))
    return measured


def _data_checks(
    endpoints: StackEndpoints, spec: DrillDefinition, *, at_moment: bool = False
) -> list[checks.CheckResult]:
    """The stores' application checks whose stores were all restored, in the registry's
    order; ``at_moment``: a restore to a moment, each check's variant for it when it has one."""
    chosen = set(spec.components)
    return [
        ((at_moment and check.at_moment) or check.run)(endpoints, spec.sample_rooms)
        for store in registry.STORES
        for check in store.drill_checks()
        if check.needs <= chosen
    ]


def _threshold_checks(
    spec: DrillDefinition, report: DrillReport, *, measured: bool = False
) -> list[checks.CheckResult]:
    """RTO against its limit; RPO as the snapshot's age, or (``measured``: a drill at a
    moment) as each store's canary-measured RPO."""
    rto = report.restore_s  # the whole restore, not only the components' own times
    limits = spec.thresholds
    if measured:
        return [_rto_check(rto, limits.max_rto_s), _measured_rpo_check(report, limits.max_rpo_s)]
    return [
        _rto_check(rto, limits.max_rto_s),
        checks.CheckResult(
            "RPO within threshold",
            report.rpo_s <= limits.max_rpo_s,
            f"snapshot age {report.rpo_s / 3600:.1f} h (limit {limits.max_rpo_s / 3600:.1f} h)",
            {"rpo_s": report.rpo_s, "max_rpo_s": limits.max_rpo_s},
        ),
    ]


def _rto_check(rto: float, limit: float) -> checks.CheckResult:
    return checks.CheckResult(
        "RTO within threshold",
        rto <= limit,
        f"restore took {rto:.1f} s (limit {limit:.0f} s)",
        {"rto_s": rto, "max_rto_s": limit},
    )


def _measured_rpo_check(report: DrillReport, limit: float) -> checks.CheckResult:
    """Each store's measured RPO (the moment minus its newest canary) within ``max_rpo_s``.

    A store without a canary is named as not measured, never counted as 0; with no canary
    at all (canaries off) the check fails as "not proven"; a canary newer than the moment
    (the store holds data from past it) fails it too, named "past the moment".
    """
    measured = {k: v for k, v in report.measured_rpo_s.items() if v is not None}
    unmeasured = sorted(k for k, v in report.measured_rpo_s.items() if v is None)
    over = [f"{k}: {v:.0f} s" for k, v in measured.items() if v > limit]
    past = canary.past_the_moment(report.measured_rpo_s)
    parts = ", ".join(f"{k} {v:.0f} s" for k, v in sorted(measured.items()))
    if not measured:  # canaries off: nothing proves the RPO, which is not a pass
        detail = "not proven: no store holds a canary (canaries off?)"
    else:
        detail = f"measured RPO {parts} (limit {limit:.0f} s)"
        if past:
            detail += f"; past the moment: {', '.join(p.split(':')[0] for p in past)}"
    if unmeasured and measured:
        detail += f"; no canary in {', '.join(unmeasured)}"
    return checks.CheckResult(
        "measured RPO within threshold",
        bool(measured) and not over and not past,
        detail,
        {"measured_rpo_s": report.measured_rpo_s, "max_rpo_s": limit},
        [*over, *past],
    )


def _publish(repo: Repo, spec: DrillDefinition, report: DrillReport) -> None:
    """Local JSON + Markdown, the Prometheus textfile, the alert on failure, the repository copy.

    Each channel is delivered on its own: one that fails (a full disk, a deleted webhook file,
    an unreachable repository) is logged as an error and never stops the others, above all
    not the alert of a failed drill. Metrics of scheduled drills come from the job's result.
    """
    channels: list[tuple[str, Callable[[], None]]] = [
        ("local report", lambda: _write_local(report, Path(spec.report.dir))),
    ]
    if spec.report.textfile:
        channels.append(
            ("textfile", lambda: prometheus_textfile(report, Path(spec.report.textfile)))
        )
    if not report.passed and spec.report.webhook_url_file:
        channels.append(("webhook", lambda: _alert(spec, report)))
    channels.append(("repository copy", lambda: _store(repo, report)))
    for name, deliver in channels:
        try:
            deliver()
        except Exception as exc:  # one broken channel never stops the next
            detail = exc.message if isinstance(exc, DrtoolError) else f"{type(exc).__name__}: {exc}"
            log.error("drill %s: %s not delivered: %s", report.drill_id, name, detail)


def _write_local(report: DrillReport, directory: Path) -> None:
    json_path, _ = write_local(report, directory)
    log.info("drill report written to %s", json_path)


def _alert(spec: DrillDefinition, report: DrillReport) -> None:
    url = read_webhook_url(Path(spec.report.webhook_url_file))
    send_webhook(url, alert_payload(report, spec.report.webhook_format))


def _store(repo: Repo, report: DrillReport) -> None:
    """The clear summary and the encrypted full report, in the repository."""
    prefix = f"{layout.DRILLS}{report.drill_id}/"
    summary = json.dumps(report.summary()).encode()
    repo.storage.put_bytes(drill_log.summary_key(report.drill_id), summary)
    header = InnerHeader(repo.info.repo_id, report.drill_id, "drill", "drill_report")
    sealed = seal([report.to_json().encode()], header=header, recipients=list(repo.info.recipients))
    repo.storage.put(prefix + "report.json.zst.age", sealed.stream)


def drill_history(cfg: Config) -> list[dict[str, Any]]:
    """The clear summaries of past drills stored in the repository, oldest first."""
    return drill_log.read_summaries(open_repo(cfg).storage)


@dataclass(frozen=True)
class Cleanup:
    """What ``drill cleanup`` removed, and which drills it left alone (with why)."""

    removed: list[str]
    kept: list[str]


def cleanup(home: Path) -> Cleanup:
    """Remove what dead drills left: local stacks, labelled containers and networks.

    A drill whose process still runs (or cannot be checked from here) keeps its stack.
    """
    cleaned, kept = cleanup_local(home)
    removed = [f"local stack {d}" for d in cleaned]
    try:
        from drtool.drills.runtime_docker import cleanup_docker  # imports docker: only here
    except ImportError:
        return Cleanup(removed, kept)
    gone, kept_docker = cleanup_docker()
    return Cleanup(removed + gone, kept + kept_docker)
