"""Prune: plan what a retention policy keeps and removes, then execute that plan.

As restic's prune does, the whole plan (snapshots to forget, unreferenced data to delete) is
computed before anything is deleted, under the repository's exclusive lock, so a dry run shows
exactly what a real run would do and an interrupted run has deleted only planned objects.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from drtool.config import Config
from drtool.repository import catalog, drill_log, layout, retention
from drtool.repository.access import Repo, open_repo
from drtool.repository.locks import repository_lock


@dataclass
class PrunePlan:
    """What prune keeps (and why) and removes."""

    keep: dict[str, list[str]]
    forget: list[str]
    invalid: list[str]
    garbage: list[str]
    stale_uploads: int = 0
    done: bool = False


def prune(
    cfg: Config,
    policy: retention.Policy,
    *,
    dry_run: bool,
    grace: timedelta = timedelta(hours=24),
    now: datetime | None = None,
) -> PrunePlan:
    """Apply a GFS policy: plan under the exclusive lock, then (unless ``dry_run``) execute.

    Data not referenced by any remaining manifest is deleted only when older than ``grace``, so
    a backup running elsewhere never loses objects it has written but not yet committed.
    """
    policy.check()
    cutoff = (now or datetime.now(UTC)) - grace
    repo = open_repo(cfg)
    with repository_lock(repo.storage, "prune") as held:
        plan = plan_prune(repo, policy, cutoff)
        if not dry_run:
            held.ensure_held()  # a lost lock (heartbeat failed) must not delete
            execute_prune(repo, plan, cutoff)
    return plan


def plan_prune(repo: Repo, policy: retention.Policy, cutoff: datetime) -> PrunePlan:
    """What ``policy`` keeps and forgets, and which data older than ``cutoff`` is garbage.

    Reads only: the caller holds the exclusive lock so the plan stays true until executed.
    """
    records = catalog.list_snapshots(repo.storage, repo.verify_keys, repo.info.repo_id)
    valid = [(r.snapshot_id, r.time) for r in records if r.valid]
    keep = retention.select(valid, policy)
    drilled = drill_log.newest_drilled(repo.storage, {sid for sid, _ in valid})
    if drilled is not None:  # M2: the newest proof of a restorable snapshot stays
        keep.setdefault(drilled, []).append("newest drilled")
    forget = [sid for sid, _ in valid if sid not in keep]
    invalid = [r.snapshot_id for r in records if not r.valid]
    plan = PrunePlan(keep, forget, invalid, [])
    referenced = {
        o.key
        for r in records
        if r.snapshot_id in keep and r.manifest is not None
        for o in r.manifest.objects()
    } | {layout.manifest_key(sid) for sid in keep}
    # INVALID snapshots are never deleted by prune: after a key rotation or tampering
    # they are evidence for an operator to look at, so their data stays too.
    for sid in invalid:
        referenced |= catalog.unverified_object_keys(repo.storage, sid)
    protected = tuple(layout.snapshot_prefix(sid) for sid in invalid)
    for prefix in (layout.SNAPSHOTS, layout.BLOBS):
        for obj in repo.storage.list(prefix):
            if obj.key in referenced or obj.key.startswith(protected):
                continue
            in_forgotten = any(obj.key.startswith(layout.snapshot_prefix(s)) for s in forget)
            old = obj.last_modified is not None and obj.last_modified < cutoff
            if in_forgotten or old:
                plan.garbage.append(obj.key)
    plan.stale_uploads = len(repo.storage.stale_uploads(cutoff))
    return plan


def execute_prune(repo: Repo, plan: PrunePlan, cutoff: datetime) -> None:
    """Delete what ``plan`` names: manifests first (a snapshot disappears whole), then data."""
    for sid in plan.forget:
        repo.storage.delete(layout.manifest_key(sid))
    for key in plan.garbage:
        repo.storage.delete(key)
    repo.storage.abort_stale_uploads(cutoff)
    plan.done = True
