"""One moment across the three stores: where each store can be put back, and how far apart.

A restore to a moment T brings back PostgreSQL exactly at T (its WAL replays to the
microsecond), but Redis only from an RDB (taken by a scheduled backup) and the bucket from a
listing snapshot plus the objects the capture journaled since. Each store therefore has its
own **effective moment**, and the **skew** (T minus it) says how much older that store's copy
is than the moment asked for:

- PostgreSQL: T itself when the WAL window reaches it; otherwise the PITR planner's own
  refusal (outside the window, behind a gap: exit 10) is the plan's;
- Redis: the newest valid snapshot whose Redis part had surely ended at or before T; its
  effective moment is when that part *started* (the RDB holds every write before it): the
  manifest records both (older manifests: conservative bounds, repository/part_times.py);
- each bucket: the newest valid snapshot whose MinIO part (the listing) had ended at or
  before T (:func:`drtool.capture.at.bucket_bases`, the base of ``bucket_at`` too); T
  itself when the capture journal covers T (a round of that bucket that had caught up
  started at or after T: it read every row committed before it), else the start of the
  newest caught-up round after the listing and at or before T, else the start of the
  snapshot's MinIO part. Rounds that left rows unread (a full batch) or ids owed, and
  records written before that was recorded, prove nothing; an idle capture commits a
  heartbeat record every few minutes so a quiet period still proves coverage.

A store whose skew exceeds ``max_skew`` is named and the plan refuses (exit 10) unless told
to accept it. The default limit is the interval (plus its jitter) of the schedule's most
frequent backup job holding Redis: the RDB is the store a moment cannot reach more closely,
and a restore further apart than that means a backup did not run (docs/decisions/0027).
Nothing here reads a byte of data: the signed snapshot list, WAL index and capture chain only.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path

from drtool.capture import chain as capture_chain
from drtool.capture.at import bucket_bases
from drtool.config import Config
from drtool.errors import DrtoolError, IntegrityError, NotFound
from drtool.repository import catalog, part_times
from drtool.repository.access import Repo, open_repo
from drtool.repository.catalog import SnapshotRecord
from drtool.services.restore import pitr_plan
from drtool.services.scheduling.jobs import load_schedules
from drtool.stores import canary
from drtool.wal.index import WalIndex, load_index

log = logging.getLogger(__name__)

POSTGRES, REDIS, MINIO = "postgres", "redis", "minio"
#: when no schedule can be read: the included schedule's Redis job (schedules/default.toml)
FALLBACK_MAX_SKEW_S = 3600.0


@dataclass(frozen=True)
class StoreMoment:
    """One store's effective moment for the moment asked, and where it comes from."""

    store: str  # postgres, redis or minio:<bucket>
    effective: datetime | None  # None: the store cannot be restored to the moment (``error``)
    source: str  # what it is restored from, for people
    skew_s: float | None = None
    snapshot_id: str = ""  # Redis and buckets: the snapshot restored from
    error: str = ""


@dataclass
class MomentPlan:
    """Every store's effective moment for ``moment``, the skew limit and where it came from."""

    moment: datetime
    max_skew_s: float
    max_skew_from: str
    stores: list[StoreMoment] = field(default_factory=list)
    pitr: pitr_plan.PitrPlan | None = None
    pitr_error: DrtoolError | None = None

    def store(self, name: str) -> StoreMoment:
        """The entry of store ``name``."""
        return next(s for s in self.stores if s.store == name)

    def buckets(self) -> list[StoreMoment]:
        """The buckets' entries."""
        return [s for s in self.stores if s.store.startswith(f"{MINIO}:")]

    def postgres_short_of_the_moment(self, reached_time: str | None) -> MomentPlan:
        """This plan with PostgreSQL's effective moment replaced by what its recovery reached.

        The WAL window's end is the newest segment's *sealed* time, which can be seconds after
        the WAL it holds ends: recovery then stops at the end of the WAL held, and the copy is
        as at its last replayed transaction. Its skew is counted from there (an unreadable
        time is no effective moment, which fails a skew check), never shown as 0.
        """
        try:
            reached = datetime.fromisoformat(reached_time) if reached_time else None
        except ValueError:
            reached = None
        stores = [
            replace(
                s,
                effective=reached,
                skew_s=(self.moment - reached).total_seconds() if reached else None,
                source=f"{s.source}; recovery ended at the end of the WAL held, before the moment",
            )
            if s.store == POSTGRES
            else s
            for s in self.stores
        ]
        return replace(self, stores=stores)

    def over_skew(self) -> list[StoreMoment]:
        """The stores whose skew exceeds the limit."""
        return [s for s in self.stores if s.skew_s is not None and s.skew_s > self.max_skew_s]

    def skew_text(self) -> str:
        """``redis 5400 s, minio:attachments 30 s`` (the largest first)."""
        found = sorted(
            (s for s in self.stores if s.skew_s is not None), key=lambda s: -(s.skew_s or 0)
        )
        return ", ".join(f"{s.store} {s.skew_s:.0f} s" for s in found)

    def refusal(self, *, accept_skew: bool) -> DrtoolError | None:
        """Why the restore must not start, if it must not: a store that cannot reach the
        moment at all (PostgreSQL's window first), then a skew above the limit."""
        if self.pitr_error is not None:
            return self.pitr_error
        unreachable = [s for s in self.stores if s.effective is None]
        if unreachable:
            return NotFound(f"restore to {self.moment.isoformat()}: {unreachable[0].error}")
        over = self.over_skew()
        if over and not accept_skew:
            named = ", ".join(f"{s.store} by {s.skew_s:.0f} s ({s.source})" for s in over)
            return NotFound(
                f"restore to {self.moment.isoformat()}: {named} behind the moment, more than "
                f"max_skew {self.max_skew_s:.0f} s ({self.max_skew_from}); nothing changed, "
                "pass --accept-skew to restore anyway"
            )
        return None


def default_max_skew(schedule_dir: Path) -> tuple[float, str]:
    """The period of the most frequent backup job holding Redis in ``schedule_dir``, plus its
    ``jitter_s`` (a run may start that much late, so two RDBs can be that much further apart).

    Falls back to one hour (the included schedule's Redis job) when no schedule can be read,
    and says so: the operator restoring on another host may not have the schedule files.
    """
    try:
        jobs = load_schedules(schedule_dir)
    except DrtoolError as exc:
        why = exc.message.split(";")[0]
        return FALLBACK_MAX_SKEW_S, f"default 1h: no schedule read ({why})"
    periods = [
        (job.period_s + job.jitter_s, job.period_s, job.jitter_s, job.name)
        for job in jobs
        if job.kind == "backup" and REDIS in job.components
    ]
    if not periods:
        return FALLBACK_MAX_SKEW_S, f"default 1h: no backup job holds redis in {schedule_dir}"
    limit, period, jitter, name = min(periods)
    return float(limit), (
        f"the Redis job {name}'s interval {period} s + its jitter {jitter} s in {schedule_dir}"
    )


def max_skew(cfg: Config, override: float | None = None) -> tuple[float, str]:
    """The limit and where it came from: given, ``restore.max_skew_s``, or the schedule's."""
    if override:
        return override, "given"
    if cfg.restore.max_skew_s > 0:
        return cfg.restore.max_skew_s, "restore.max_skew_s"
    return default_max_skew(Path(os.environ.get("DRTOOL_SCHEDULE_DIR", "schedules")))


def plan_moment(cfg: Config, moment: datetime, *, max_skew_s: float | None = None) -> MomentPlan:
    """Read the repository's signed records and plan ``moment`` for every store."""
    repo = open_repo(cfg)
    records = catalog.list_snapshots(repo.storage, repo.verify_keys, repo.info.repo_id)
    index = load_index(repo.storage, repo.verify_keys, repo.info.repo_id)
    limit, why = max_skew(cfg, max_skew_s)
    if not max_skew_s and cfg.restore.max_skew_s <= 0:  # the schedule's: plus the margin
        margin = redis_margin(records)
        if margin:
            limit, why = limit + margin, f"{why} + the longest Redis part {margin:.0f} s"
    return plan_from(repo, records, index, moment, limit, why)


def redis_margin(records: list[SnapshotRecord]) -> float:
    """The longest Redis part of the valid snapshots, in seconds.

    Just before the next RDB's part ends, the moment still gets the previous RDB: its skew
    is then one interval (plus jitter) plus that part's duration, and the schedule's limit
    alone would refuse a healthy schedule there.
    """
    spans = [
        (w[1] - w[0]).total_seconds()
        for r in records
        if r.valid and (w := component_window(r, REDIS))
    ]
    return round(max(spans, default=0.0), 1)


def plan_from(
    repo: Repo,
    records: list[SnapshotRecord],
    index: WalIndex,
    moment: datetime,
    limit: float,
    why: str,
) -> MomentPlan:
    """The plan from records already read (one way for the restore and the drill)."""
    plan = MomentPlan(moment, limit, why)
    try:
        plan.pitr = pitr_plan.plan(records, index, pitr_plan.Target(at=moment))
        base = plan.pitr.base
        plan.stores.append(
            StoreMoment(POSTGRES, moment, f"base {base.snapshot_id} + WAL", 0.0, base.snapshot_id)
        )
    except (NotFound, IntegrityError) as exc:
        plan.pitr_error = exc
        plan.stores.append(StoreMoment(POSTGRES, None, "base + WAL", error=exc.message))
    plan.stores.append(_redis(records, moment))
    plan.stores += _buckets(repo, records, moment)
    return plan


def component_window(record: SnapshotRecord, name: str) -> tuple[datetime, datetime] | None:
    """When part ``name`` of a snapshot was taken, at the earliest and the latest (None: the
    snapshot lacks it, or its manifest was not read): :func:`part_times.part_window`."""
    return part_times.part_window(record.manifest, name) if record.manifest else None


def earliest_reachable(records: list[SnapshotRecord], stores: tuple[str, ...]) -> datetime | None:
    """The first moment at which each of ``stores`` (redis, minio) has a copy: the end of the
    oldest valid snapshot's Redis part, and of its MinIO part (the listing). None
    when none of them is named, or one has no copy at all (the plan then names it)."""
    found: list[datetime] = []
    for store in stores:
        if store not in (REDIS, MINIO):
            continue
        ends = [w[1] for r in records if r.valid and (w := component_window(r, store))]
        if not ends:
            return None
        found.append(min(ends))
    return max(found, default=None)


def _minio_started(record: SnapshotRecord) -> datetime:
    window = component_window(record, MINIO)
    return window[0] if window else record.time


def _redis(records: list[SnapshotRecord], moment: datetime) -> StoreMoment:
    best: tuple[datetime, SnapshotRecord] | None = None
    for record in records:
        window = component_window(record, REDIS) if record.valid else None
        if window is None or window[1] > moment:
            continue
        if best is None or window[0] > best[0]:
            best = (window[0], record)
    if best is None:
        return StoreMoment(
            REDIS,
            None,
            "snapshot",
            error=f"no valid snapshot holds a Redis RDB taken before {moment.isoformat()}",
        )
    start, record = best
    skew = round((moment - start).total_seconds(), 1)
    return StoreMoment(REDIS, start, f"snapshot {record.snapshot_id}", skew, record.snapshot_id)


def _buckets(repo: Repo, records: list[SnapshotRecord], moment: datetime) -> list[StoreMoment]:
    """Every bucket with a base at the moment (:func:`bucket_bases`, as ``bucket_at``
    chooses it), with what the capture journal adds (its signed chain records only)."""
    bases = {b: record for b, (record, _) in bucket_bases(records, moment).items()}
    if not bases:
        return [
            StoreMoment(
                MINIO,
                None,
                "snapshot",
                error=f"no valid snapshot listed a bucket before {moment.isoformat()}",
            )
        ]
    found = capture_chain.load_chain(repo.storage, repo.verify_keys, repo.info.repo_id)
    if found.problems:
        raise IntegrityError(
            f"capture chain: {found.problems[0]} (run `drtool capture verify`); nothing restored"
        )
    plans = []
    for bucket, base in bases.items():  # never sorted: the order maps onto the target
        # only rounds that had caught up prove coverage: every row committed before the
        # round's start (``created``) was read; a full batch or an owed id proves nothing
        starts = [
            datetime.fromisoformat(r.created)
            for _, r in found.records
            if r.bucket == bucket and r.proves_coverage
        ]
        covered = any(start >= moment for start in starts)
        before = [start for start in starts if start <= moment]
        source = f"snapshot {base.snapshot_id}"
        listed = _minio_started(base)
        if covered:
            effective, source = moment, f"{source} + capture journal (covers the moment)"
        elif before and max(before) > listed:
            effective = max(before)
            source += " + capture journal (ends before the moment)"
        else:  # the listing started then: every object older than that is in it
            effective = listed
        skew = round(max(0.0, (moment - effective).total_seconds()), 1)
        plans.append(
            StoreMoment(canary.minio_name(bucket), effective, source, skew, base.snapshot_id)
        )
    return plans
