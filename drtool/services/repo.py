"""Repository services: init, list, show, verify, prune, unlock."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal, cast

from drtool import keys
from drtool.config import Config
from drtool.errors import ConfigError, IntegrityError, NotFound
from drtool.pipeline.header import InnerHeader
from drtool.pipeline.seal import unseal
from drtool.repository import catalog, drill_log, layout, retention
from drtool.repository.locks import LockInfo, repository_lock, unlock
from drtool.repository.manifest import Manifest, ObjectEntry
from drtool.storage import Storage, StorageOptions, open_storage

log = logging.getLogger(__name__)

MiB = 1 << 20


@dataclass(frozen=True)
class Repo:
    """An opened repository: its storage, header and the keys trusted for its manifests."""

    storage: Storage
    info: layout.RepoInfo
    verify_keys: list[str]


def storage_for(cfg: Config) -> Storage:
    """The storage backend named by ``repository.url``."""
    r = cfg.repository
    if not r.url:
        raise ConfigError(
            "repository.url: not set (got nothing); e.g. s3://bucket/drtool or file:///srv/drtool"
        )
    mode = r.object_lock_mode.upper() or None
    if mode not in (None, "GOVERNANCE", "COMPLIANCE"):
        raise ConfigError(
            f"repository.object_lock_mode: expected GOVERNANCE or COMPLIANCE (got {mode})"
        )
    options = StorageOptions(
        endpoint_url=r.endpoint_url or None,
        region=r.region,
        access_key=r.access_key,
        secret_key=r.secret_key,
        path_style=r.path_style,
        part_size=r.part_size_mb * MiB,
        object_lock_mode=cast(Literal["GOVERNANCE", "COMPLIANCE"] | None, mode),
    )
    return open_storage(r.url, options)


def open_repo(cfg: Config) -> Repo:
    """Open the configured repository and decide which verify keys to trust."""
    storage = storage_for(cfg)
    info = layout.read_repo_info(storage)
    return Repo(storage, info, catalog.trusted_verify_keys(info, cfg.keys.verify_key))


def init_repo(cfg: Config) -> layout.RepoInfo:
    """Create a repository for the configured recipients and signing key."""
    recipients = keys.load_recipients(cfg.keys.recipients)
    if not cfg.keys.signing_key_file:
        raise ConfigError(
            "keys.signing_key_file: not set (got nothing); create one with "
            "`drtool keys signing-key PATH`"
        )
    verify_key = keys.verify_key_text(keys.load_signing_key(cfg.keys.signing_key_file).public_key())
    return layout.init_repository(storage_for(cfg), recipients, verify_key)


def list_records(cfg: Config) -> list[catalog.SnapshotRecord]:
    """Every snapshot with its status (VALID or INVALID and why), oldest first."""
    repo = open_repo(cfg)
    return catalog.list_snapshots(repo.storage, repo.verify_keys, repo.info.repo_id)


def record_summary(record: catalog.SnapshotRecord) -> dict[str, Any]:
    """A JSON-ready row for ``list``."""
    m = record.manifest
    return {
        "id": record.snapshot_id,
        "status": "VALID" if record.valid else "INVALID",
        "problem": record.problem,
        "time": record.time.isoformat(),
        "components": [c.name for c in m.components] if m else [],
        "plain_bytes": m.plain_bytes if m else None,
        "stored_bytes": m.stored_bytes if m else None,
        "host": m.host if m else None,
    }


@dataclass
class ShowResult:
    """A snapshot, and its fingerprints when an identity was available."""

    record: catalog.SnapshotRecord
    fingerprints: dict[str, Any] = field(default_factory=dict)


def identities_of(cfg: Config) -> list[str]:
    """The identities configured for reading (restore/drill side); empty when none."""
    if not cfg.keys.identity_file:
        return []
    return keys.load_identities(Path(cfg.keys.identity_file), cfg.keys.identity_passphrase)


def read_object(
    repo: Repo, entry: ObjectEntry, header: InnerHeader, identities: list[str]
) -> bytes:
    """Read a small object whole: stored hash checked, decrypted, header checked."""
    raw = repo.storage.get_bytes(entry.key)
    problem = entry.mismatch(len(raw), hashlib.sha256(raw).hexdigest())
    if problem:
        raise IntegrityError(problem)
    return b"".join(
        unseal(
            [raw],
            identities=identities,
            expected=header,
            name=entry.key,
            recipients_hint=list(repo.info.recipients),
        )
    )


def snapshot_header(m: Manifest, component: str, kind: str) -> InnerHeader:
    """The inner header an object of snapshot ``m`` must carry."""
    return InnerHeader(m.repo_id, m.snapshot_id, component, kind)


def show_snapshot(cfg: Config, ref: str) -> ShowResult:
    """One snapshot's manifest and, with an identity configured, its fingerprints."""
    repo = open_repo(cfg)
    records = catalog.list_snapshots(repo.storage, repo.verify_keys, repo.info.repo_id)
    record = _find(records, ref)
    result = ShowResult(record)
    identities = identities_of(cfg)
    if record.manifest is None or not identities:
        return result
    for comp in record.manifest.components:
        for obj in comp.objects:
            if obj.kind == "fingerprints":
                header = snapshot_header(record.manifest, comp.name, obj.kind)
                data = read_object(repo, obj, header, identities)
                result.fingerprints[comp.name] = json.loads(data)
    return result


def _find(records: list[catalog.SnapshotRecord], ref: str) -> catalog.SnapshotRecord:
    if ref == "latest":
        return catalog.resolve(records, "latest")
    for record in records:
        if record.snapshot_id == ref:
            return record
    raise NotFound(f"snapshot {ref}: not found (see `drtool list`)")


@dataclass
class VerifyOutcome:
    """What verify found for one snapshot."""

    snapshot_id: str
    problems: list[str]
    objects: int
    read_data: bool


def verify(cfg: Config, ref: str | None, *, read_data: bool) -> list[VerifyOutcome]:
    """Check snapshots: signature, every object present with its size and stored sha256.

    ``read_data`` also decrypts every object and checks inner headers and plaintext (needs an
    identity). ``ref`` None means every snapshot.
    """
    repo = open_repo(cfg)
    identities = identities_of(cfg) if read_data else []
    if read_data and not identities:
        raise ConfigError("keys.identity_file: --read-data needs an identity (got none)")
    records = catalog.list_snapshots(repo.storage, repo.verify_keys, repo.info.repo_id)
    chosen = records if ref is None else [_find(records, ref)]
    if not chosen:
        raise NotFound("verify: the repository has no snapshots")
    checked_blobs: set[str] = set()
    outcomes = []
    for record in chosen:
        problems = [record.problem] if record.problem else []
        m = record.manifest
        count = 0
        if m is not None and not problems:
            for comp in m.components:
                for obj in comp.objects:
                    if obj.kind == "blob" and obj.key in checked_blobs:
                        continue
                    checked_blobs.add(obj.key)
                    count += 1
                    problem = _verify_object(repo, m, comp.name, obj, identities)
                    if problem:
                        problems.append(problem)
        outcomes.append(VerifyOutcome(record.snapshot_id, problems, count, read_data))
    return outcomes


def _verify_object(
    repo: Repo, m: Manifest, component: str, obj: ObjectEntry, identities: list[str]
) -> str | None:
    """Stream one object: stored size and sha256; with identities, authenticate and decrypt."""
    digest = hashlib.sha256()
    size = 0

    def counted() -> Any:
        nonlocal size
        for chunk in repo.storage.get(obj.key):
            digest.update(chunk)
            size += len(chunk)
            yield chunk

    try:
        if identities:
            blob_id = obj.key.rsplit("/", 1)[-1].split(".")[0]
            header = (
                InnerHeader(m.repo_id, blob_id, "minio", "blob")
                if obj.kind == "blob"
                else snapshot_header(m, component, obj.kind)
            )
            for _ in unseal(
                counted(),
                identities=identities,
                expected=header,
                name=obj.key,
                recipients_hint=list(repo.info.recipients),
            ):
                pass
        else:
            for _ in counted():
                pass
    except (IntegrityError, NotFound) as exc:
        return str(exc)
    return obj.mismatch(size, digest.hexdigest())


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
    """Apply a GFS policy: forget manifests first, then delete unreferenced data.

    Data not referenced by any remaining manifest is deleted only when older than ``grace``, so
    a backup running elsewhere never loses objects it has written but not yet committed.
    """
    policy.check()
    now = now or datetime.now(UTC)
    repo = open_repo(cfg)
    with repository_lock(repo.storage, "prune") as held:
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
        cutoff = now - grace
        for prefix in (layout.SNAPSHOTS, layout.BLOBS):
            for obj in repo.storage.list(prefix):
                if obj.key in referenced or obj.key.startswith(protected):
                    continue
                in_forgotten = any(obj.key.startswith(layout.snapshot_prefix(s)) for s in forget)
                old = obj.last_modified is not None and obj.last_modified < cutoff
                if in_forgotten or old:
                    plan.garbage.append(obj.key)
        plan.stale_uploads = len(repo.storage.stale_uploads(cutoff))
        if dry_run:
            return plan
        held.ensure_held()
        for sid in forget:
            repo.storage.delete(layout.manifest_key(sid))
        for key in plan.garbage:
            repo.storage.delete(key)
        repo.storage.abort_stale_uploads(cutoff)
        plan.done = True
    return plan


def unlock_repo(
    cfg: Config, *, everything: bool, lock_id: str | None = None
) -> list[tuple[LockInfo, str]]:
    """Remove the locks of dead holders (or the lock ``lock_id``, or every lock), with why."""
    return unlock(storage_for(cfg), everything=everything, lock_id=lock_id)
