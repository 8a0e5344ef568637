"""Repository command handlers: init, list, show, verify, unlock (prune: ``services.prune``)."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any

from drtool import keys
from drtool.config import Config
from drtool.errors import ConfigError, IntegrityError, NotFound
from drtool.pipeline.header import InnerHeader
from drtool.pipeline.seal import unseal
from drtool.repository import catalog, layout, object_lock
from drtool.repository.access import (
    Repo,
    identities_of,
    open_repo,
    read_object,
    snapshot_header,
    storage_for,
)
from drtool.repository.locks import LockInfo, unlock
from drtool.repository.manifest import Manifest, ObjectEntry

log = logging.getLogger(__name__)


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
            problems += [
                f"{key}: locked for less than the snapshot's own retention (Object Lock)"
                for key in object_lock.short_locked(repo.storage, m) or []
            ]
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


def unlock_repo(
    cfg: Config, *, everything: bool, lock_id: str | None = None
) -> list[tuple[LockInfo, str]]:
    """Remove the locks of dead holders (or the lock ``lock_id``, or every lock), with why."""
    return unlock(storage_for(cfg), everything=everything, lock_id=lock_id)
