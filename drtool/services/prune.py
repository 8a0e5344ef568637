"""Prune: plan what a retention policy keeps and removes, then execute that plan.

As restic's prune does, the whole plan (snapshots to forget, unreferenced data to delete) is
computed before anything is deleted, under the repository's exclusive lock, so a dry run shows
exactly what a real run would do and an interrupted run has deleted only planned objects.

Retention must never delete the last good copy: a snapshot counts toward the keep rules only
when a signed verification record (ADR 0013) or a passed drill says its data is intact (unless
``count_unverified``), and whatever the policy, prune keeps the newest snapshot proven by a
read-data verification or a drill, and the newest verified snapshot of every store.

WAL (``drtool wal stream``) is pruned with the snapshots: every segment from the oldest kept
base backup's start onward stays, older ones go (drtool/services/wal_prune.py).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from drtool import keys
from drtool.capture.chain import referenced_blobs as capture_refs
from drtool.config import Config
from drtool.errors import ConfigError
from drtool.repository import catalog, chain, drill_log, layout, retention, verifications
from drtool.repository.access import Repo, open_repo
from drtool.repository.locks import repository_lock
from drtool.repository.manifest import manifest_sha256
from drtool.services import wal_prune
from drtool.services.wal_prune import WalPrunePlan, execute_wal, plan_wal
from drtool.wal.index import WAL


@dataclass
class PrunePlan:
    """What prune keeps (and why) and removes."""

    keep: dict[str, list[str]]
    forget: list[str]
    invalid: list[str]
    garbage: list[str]
    stale_uploads: int = 0
    done: bool = False
    verified: list[str] = field(default_factory=list)  # counted toward the rules
    #: snapshot id or object key -> Object Lock retain-until (ISO): cannot be deleted yet,
    #: so left alone (a later prune removes it); a snapshot is deferred whole
    deferred: dict[str, str] = field(default_factory=dict)
    #: a versioned bucket keeps deleted objects as noncurrent versions: no space freed yet
    versioned: bool = False
    #: keys the storage still lists after their delete (reported, never claimed deleted)
    survived: list[str] = field(default_factory=list)
    #: WAL retention: segments older than the oldest kept base backup
    wal: WalPrunePlan = field(default_factory=WalPrunePlan)


def prune(
    cfg: Config,
    policy: retention.Policy,
    *,
    dry_run: bool,
    grace: timedelta = timedelta(hours=24),
    now: datetime | None = None,
    count_unverified: bool = False,
) -> PrunePlan:
    """Apply a GFS policy: plan under the exclusive lock, then (unless ``dry_run``) execute.

    Data not referenced by any remaining manifest is deleted only when older than ``grace``, so
    a backup running elsewhere never loses objects it has written but not yet committed.
    """
    policy.check()
    cutoff = (now or datetime.now(UTC)) - grace
    repo = open_repo(cfg)
    with repository_lock(repo.storage, "prune") as held:
        plan = plan_prune(repo, policy, cutoff, count_unverified=count_unverified)
        defer_retained(repo, plan, now or datetime.now(UTC))
        signer = _signer(cfg, repo)
        if not dry_run:
            held.ensure_held()  # a lost lock (heartbeat failed) must not delete
            execute_prune(repo, plan, cutoff, signer)
            catalog.compact_index(
                repo.storage,
                signer,
                repo.verify_keys,
                repo.info.repo_id,
                forgot=bool(plan.forget),
            )
    return plan


def plan_prune(
    repo: Repo, policy: retention.Policy, cutoff: datetime, *, count_unverified: bool = False
) -> PrunePlan:
    """What ``policy`` keeps and forgets, and which data older than ``cutoff`` is garbage.

    Reads only: the caller holds the exclusive lock so the plan stays true until executed.
    """
    records = catalog.list_snapshots(repo.storage, repo.verify_keys, repo.info.repo_id)
    valid_records = [r for r in records if r.valid]
    valid = [(r.snapshot_id, r.time) for r in valid_records]
    passed_drills = drill_log.drilled(repo.storage)
    drilled = max(passed_drills & {sid for sid, _ in valid}, default=None)
    verified = [r for r in valid_records if r.verified or r.snapshot_id in passed_drills]
    verified_ids = {r.snapshot_id for r in verified}
    keep = retention.select(valid, policy, None if count_unverified else verified_ids)
    for sid, why in _anchors(verified, drilled):
        keep.setdefault(sid, []).append(why)
    forget = [sid for sid, _ in valid if sid not in keep]
    invalid = [r.snapshot_id for r in records if not r.valid]
    plan = PrunePlan(keep, forget, invalid, [], verified=sorted(verified_ids))
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
    referenced |= capture_refs(repo.storage)  # blobs the attachment capture journaled
    protected = tuple(layout.snapshot_prefix(sid) for sid in invalid)
    for prefix in (layout.SNAPSHOTS, layout.BLOBS):
        for obj in repo.storage.list(prefix):
            if obj.key in referenced or obj.key.startswith(protected):
                continue
            in_forgotten = any(obj.key.startswith(layout.snapshot_prefix(s)) for s in forget)
            old = obj.last_modified is not None and obj.last_modified < cutoff
            if in_forgotten or old:
                plan.garbage.append(obj.key)
    forgotten_records = tuple(verifications.snapshot_prefix(sid) for sid in forget)
    if forgotten_records:
        plan.garbage += [
            o.key
            for o in repo.storage.list(verifications.PREFIX)
            if o.key.startswith(forgotten_records)
        ]
    plan.garbage += verifications.old_summaries(repo.storage)  # the newest one says it all
    plan.stale_uploads = len(repo.storage.stale_uploads(cutoff))
    plan.wal = plan_wal(repo, records, set(keep))
    return plan


def defer_retained(repo: Repo, plan: PrunePlan, now: datetime) -> None:
    """Take out of ``plan`` what Object Lock still retains, so prune claims only real deletes.

    A delete of a retained object on a versioned bucket "succeeds" by adding a delete marker
    while the locked version stays: nothing is freed, and a snapshot whose manifest is hidden
    that way vanishes from the list while its data remains. So a forgotten snapshot whose
    manifest is still retained is deferred whole (its own objects with it), and so is every
    retained piece of garbage; a later prune, after the date, removes them. One
    GetObjectRetention per planned object, on a store with Object Lock only.
    """
    storage = repo.storage
    if not storage.capabilities.object_lock or not storage.object_lock_enabled():
        return
    plan.versioned = storage.versioned()
    manifests = [layout.manifest_key(sid) for sid in plan.forget]
    planned = manifests + plan.garbage + plan.wal.keys
    with ThreadPoolExecutor(8) as pool:
        dates = dict(zip(planned, pool.map(storage.retention, planned), strict=True))
    retained = {k: d for k, d in dates.items() if d is not None and d > now}
    for sid, key in zip(list(plan.forget), manifests, strict=True):
        if key in retained:
            plan.forget.remove(sid)
            plan.deferred[sid] = retained[key].isoformat(timespec="seconds")
    own = tuple(layout.snapshot_prefix(sid) for sid in plan.deferred)
    kept = []
    for key in plan.garbage:
        if own and key.startswith(own):
            continue  # deferred with its snapshot
        if key in retained:
            plan.deferred[key] = retained[key].isoformat(timespec="seconds")
        else:
            kept.append(key)
    plan.garbage = kept
    plan.deferred.update(wal_prune.defer_locked(plan.wal, retained, set(plan.deferred)))


def _anchors(verified: list[catalog.SnapshotRecord], drilled: str | None) -> list[tuple[str, str]]:
    """Snapshots kept whatever the policy: the last proofs that a store can be restored.

    The newest drilled (M2) and the newest read-data verified snapshot, and for each store the
    newest verified snapshot holding it: schedules back stores up separately, and a rule
    satisfied by Redis-only snapshots must not take the last verified PostgreSQL one.
    """
    anchors = [(drilled, "newest drilled")] if drilled is not None else []
    read_data = [
        r
        for r in verified
        if r.verification is not None and r.verification.mode == verifications.READ_DATA
    ]
    if read_data:
        anchors.append((read_data[-1].snapshot_id, "newest read-data verified"))
    for store in sorted({c for r in verified for c in catalog.stores(r)}):
        newest = [r for r in verified if store in catalog.stores(r)][-1]
        anchors.append((newest.snapshot_id, f"newest verified {store}"))
    return anchors


def execute_prune(
    repo: Repo,
    plan: PrunePlan,
    cutoff: datetime,
    signing_key: Ed25519PrivateKey | None = None,
) -> None:
    """Delete what ``plan`` names: manifests first (a snapshot disappears whole), then data,
    then WAL older than the oldest kept base backup (recorded first, signed by
    ``signing_key``; without one, WAL stays).

    Each forgotten manifest leaves a tombstone first, so ``verify``'s chain walk can tell a
    pruned snapshot from a deleted one.
    Then one listing checks what is really gone: a key still listed is reported in
    ``survived``, never counted as deleted.
    """
    for sid in plan.forget:
        stored = repo.storage.get_bytes(layout.manifest_key(sid))
        repo.storage.put_bytes(chain.tombstone_key(sid, manifest_sha256(stored)), b"")
        repo.storage.delete(layout.manifest_key(sid))
    for key in plan.garbage:
        repo.storage.delete(key)
    repo.storage.abort_stale_uploads(cutoff)
    execute_wal(repo, plan.wal, signing_key)
    gone = {layout.manifest_key(sid) for sid in plan.forget} | set(plan.garbage)
    gone |= set(plan.wal.keys)
    listed = {
        o.key for prefix in (layout.SNAPSHOTS, layout.BLOBS, WAL) for o in repo.storage.list(prefix)
    }
    plan.survived = sorted(gone & listed)
    plan.done = True


def _signer(cfg: Config, repo: Repo) -> Ed25519PrivateKey | None:
    """The key prune signs WAL removal records and the catalog index with, when configured.

    Refused when the repository does not trust it (an operator-side key, a wrong file): a
    record nobody can verify would stop the WAL streamer and every later WAL prune.
    """
    if not cfg.keys.signing_key_file:
        return None
    signer = keys.load_signing_key(cfg.keys.signing_key_file)
    if keys.verify_key_text(signer.public_key()) not in repo.verify_keys:
        raise ConfigError(
            f"keys.signing_key_file: {cfg.keys.signing_key_file} is not a signing key this "
            "repository trusts (its verify key is not pinned or handed over); prune signs "
            "records with it, nothing deleted"
        )
    return signer
