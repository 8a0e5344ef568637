"""The whole stack at one moment: PostgreSQL by WAL, Redis from its RDB, the buckets from the
listing snapshot plus the capture journal, then the cross-store invariants with counts.

One way for the operator's ``drtool restore --at TIME`` and the ``pitr:`` drill of all three
stores (docs/decisions/0027-one-moment-restore.md). The plan (:mod:`.moment`) decides each
store's effective moment and refuses before anything is touched; then:

1. PostgreSQL is recovered into a new data directory (``run_pitr``: the running cluster is
   never involved);
2. Redis is restored from the plan's snapshot through the snapshot restore (``run_restore``:
   its staging, its fingerprints, its ``--force`` rule for a non-empty target);
3. each bucket is put back as it was at the moment: :func:`drtool.capture.at.bucket_at`, plus
   the journaled object of every attachment row of the restored database that the journal
   captured only after the moment (an object is uploaded before its row commits, so the row
   proves it existed at the moment; the capture reads it up to a round later), through the
   snapshot restore's bucket code (blobs authenticated first, every object read back);
4. the invariants, with counts: attachment rows with their object present / missing, Redis
   references to rows that exist / do not; the newest canary of each restored store.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import psycopg

from drtool.capture.at import BucketAt, bucket_at, journal_since, restore_bucket_at
from drtool.config import Config
from drtool.endpoints import StackEndpoints
from drtool.errors import ConfigError, UsageError
from drtool.repository.access import Repo, identities_of, open_repo
from drtool.services.capture import capture_bucket
from drtool.services.restore.moment import MomentPlan
from drtool.services.restore.pitr import PitrOptions, PitrResult, run_pitr
from drtool.services.restore.run import RestoreOptions, run_restore, target_endpoints
from drtool.sources.minio import MinioStore
from drtool.stores import canary, checks
from drtool.stores.minio.restore import bucket_mapping, held_objects
from drtool.stores.redis.restore import target_keys
from drtool.timing import Timer

log = logging.getLogger(__name__)


@dataclass
class StackAtResult:
    """What each store's restore did, the invariants at the moment and the measured RPO."""

    moment: str
    pitr: PitrResult | None = None
    redis_snapshot: str = ""
    redis_detail: str = ""
    buckets: dict[str, str] = field(default_factory=dict)  # source bucket -> target bucket
    seconds: dict[str, float] = field(default_factory=dict)  # per store (RTO)
    restore_s: float = 0.0  # all stores restored and read back, before the checks (RTO)
    checks: list[checks.CheckResult] = field(default_factory=list)
    measured_rpo_s: dict[str, float | None] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)  # read-back differences

    @property
    def ok(self) -> bool:
        """Every store restored as planned and every invariant held."""
        return not self.problems and all(c.passed for c in self.checks)


def check_targets(
    cfg: Config, home: Path, plan: MomentPlan, target: str, *, force: bool
) -> dict[str, str]:
    """Refuse, before anything is touched, a non-empty Redis or bucket target without
    ``force`` (the snapshot restore's rule); return the bucket mapping source -> target.

    The plan lists the buckets in the snapshot's (the config's) order, so they map onto the
    target's buckets as the snapshot restore maps them: by position, never sorted.
    """
    endpoints = target_endpoints(cfg, home, target)
    mapping = bucket_targets(plan, endpoints)
    busy = []
    keys = target_keys(endpoints.redis)
    if keys:
        busy.append(f"redis {endpoints.redis.host}:{endpoints.redis.port} holds {keys:,} keys")
    store = MinioStore(endpoints.minio)
    for bucket in mapping.values():
        held = held_objects(store, bucket)
        if held:
            busy.append(f"bucket {bucket} holds {held:,} objects")
    if busy and not force:
        raise UsageError(
            f"restore to a moment: the target is not empty ({'; '.join(busy)}); nothing "
            "changed, use --force to replace it"
        )
    return mapping


def bucket_targets(plan: MomentPlan, endpoints: StackEndpoints) -> dict[str, str]:
    """Each planned bucket -> the target bucket it is restored into (the snapshot restore's
    :func:`bucket_mapping` over the plan's order, which is the snapshot's)."""
    return bucket_mapping([b.store.split(":", 1)[1] for b in plan.buckets()], endpoints.buckets)


def restore_stack_at(
    cfg: Config,
    *,
    home: Path,
    plan: MomentPlan,
    into: Path,
    target: str,
    force: bool = False,
    port: int | None = None,
    on_postgres: list[PitrResult] | None = None,
    changed: list[str] | None = None,
    check: Callable[[StackEndpoints], list[checks.CheckResult]] | None = None,
) -> StackAtResult:
    """Restore every store of ``plan`` (already confirmed, refusal checked by the caller).

    ``target``: the ``[targets.NAME]`` (or local stack) for Redis and the buckets; ''
    is production, which the caller allows only under the plan/confirmation/--force rules.
    ``on_postgres`` receives the PostgreSQL copy as soon as it runs, so a caller can stop it
    whatever fails afterwards; ``changed`` is told each store as soon as it is in place
    (``redis into second``), so a caller can say what a failure left changed. ``check``
    runs on the restored stack (default :func:`invariants`; a drill passes its own data
    checks, which include them).
    """
    mapping = check_targets(cfg, home, plan, target, force=force)
    result = StackAtResult(plan.moment.isoformat())
    whole = clock = Timer()
    result.pitr = run_pitr(
        cfg,
        options=PitrOptions(at=plan.moment, into=into, yes=True, port=port),
        confirm=lambda r: True,
    )
    if on_postgres is not None:
        on_postgres.append(result.pitr)
    result.seconds["postgres"] = round(clock.elapsed(), 3)
    done = changed if changed is not None else []
    endpoints = moment_endpoints(cfg, home, target, result.pitr.port)
    redis = plan.store("redis")
    clock = Timer()
    restored = run_restore(
        cfg,
        home=home,
        options=RestoreOptions(
            ref=redis.snapshot_id, components=("redis",), target=target, force=force, yes=True
        ),
        confirm=lambda r: True,
    )
    result.seconds["redis"] = round(clock.elapsed(), 3)
    done.append(f"redis into {target or 'production'} (its keys replaced)")
    result.redis_snapshot = redis.snapshot_id
    result.redis_detail = "; ".join(c.detail for c in restored.components)
    result.problems += [p for c in restored.components for p in c.problems]
    repo, identities = open_repo(cfg), identities_of(cfg)
    rows = attachment_keys(endpoints)
    for bucket, target_bucket in mapping.items():
        clock = Timer()
        state = with_rows(repo, identities, bucket_at(repo, identities, bucket, plan.moment), rows)
        work = into.parent / f".{into.name}.bucket-{target_bucket}"
        work.mkdir(exist_ok=True)
        try:
            outcome, problems = restore_bucket_at(
                repo,
                identities,
                state,
                MinioStore(endpoints.minio),
                target_bucket,
                work,
                force=force,
            )
        finally:
            shutil.rmtree(work, ignore_errors=True)  # never hides the restore's own error
        result.seconds[f"minio:{bucket}"] = round(clock.elapsed(), 3)
        result.buckets[bucket] = target_bucket
        done.append(f"bucket {bucket} into {target_bucket}")
        result.problems += problems
        log.info(
            "bucket %s at %s into %s: %d objects (%d from the journal), %d uploaded",
            bucket,
            plan.moment.isoformat(),
            target_bucket,
            len(state.entries),
            state.from_journal,
            outcome.uploaded,
        )
    at_moment = replace(endpoints, buckets=attachments_first(cfg, mapping) or endpoints.buckets)
    result.restore_s = round(whole.elapsed(), 3)  # the RTO: the checks are not restoring
    result.checks = (check or invariants)(at_moment)
    newest = canary.newest_canaries(at_moment, at_moment.buckets)
    source_of = {canary.minio_name(t): canary.minio_name(b) for b, t in mapping.items()}
    named = {source_of.get(store, store): found for store, found in newest.items()}
    result.measured_rpo_s = canary.measured_rpo(plan.moment, named)  # as the plan names them
    result.problems += canary.past_the_moment(result.measured_rpo_s)
    return result


def attachments_first(cfg: Config, mapping: dict[str, str]) -> tuple[str, ...]:
    """The target buckets, the attachments' first: the checks read the attachment rows'
    objects from the first bucket, which must be where ``capture.bucket`` was restored."""
    try:
        attachments = mapping.get(capture_bucket(cfg), "")
    except ConfigError:  # buckets = ["*"] and no capture.bucket: the mapping's order
        attachments = ""
    rest = [t for t in mapping.values() if t != attachments]
    return tuple([attachments, *rest] if attachments else rest)


def moment_endpoints(cfg: Config, home: Path, target: str, port: int) -> StackEndpoints:
    """The restore target with PostgreSQL pointed at the recovered copy (same roles)."""
    endpoints = target_endpoints(cfg, home, target)
    production = cfg.stack().postgres
    return replace(endpoints, postgres=replace(production, host="127.0.0.1", port=port))


def attachment_keys(endpoints: StackEndpoints) -> set[str]:
    """The object keys the restored database's attachment rows name (all committed before
    the moment: the copy was recovered to it)."""
    with psycopg.connect(**endpoints.postgres.connect_kwargs(), connect_timeout=10) as conn:
        exists = conn.execute("SELECT to_regclass('attachments')").fetchone()
        if not exists or exists[0] is None:
            return set()
        return {str(r[0]) for r in conn.execute("SELECT object_key FROM attachments")}


def with_rows(repo: Repo, identities: list[str], state: BucketAt, keys: set[str]) -> BucketAt:
    """``state`` plus the journaled objects of ``keys`` captured after the moment.

    A row committed before the moment names an object uploaded before it; the capture reads
    that object up to one round later, so its journal entry may be dated after the moment.
    Only keys the restored rows name are added (no object written after the moment comes
    back with them); the entry is the newest capture of that key (attachments are written
    once).
    """
    have = {e.key for e in state.entries}
    wanted = keys - have
    if not wanted:
        return state
    later = journal_since(repo, identities, state.bucket, state.moment, datetime.now(UTC))
    added = [later[k] for k in sorted(wanted) if k in later]
    entries = sorted([*state.entries, *added], key=lambda e: e.key)
    return replace(state, entries=entries, from_journal=state.from_journal + len(added))


def invariants(endpoints: StackEndpoints) -> list[checks.CheckResult]:
    """The cross-store invariants at the moment, with counts: the drill's own checks."""
    return [
        checks.attachments_have_objects(endpoints),
        checks.redis_points_to_existing_rows(endpoints, redis_older=True),
    ]
