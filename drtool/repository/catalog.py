"""The catalog: which snapshots exist and whether each is complete and authentic.

Listing reads manifests and verification records, never the data. A snapshot is VALID when its
manifest verifies against a trusted key, every object it names exists with the recorded size,
and no authentic verification record found one of its objects damaged; anything else is
INVALID (or DAMAGED) with the reason, and is never restorable or counted by retention. What
listing cannot see (a flipped byte) it does not claim: each record carries the last
verification of its snapshot, or none ("never verified").
"""

from __future__ import annotations

import json
import logging
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime

from drtool.errors import ConfigError, IntegrityError, NotFound
from drtool.repository import chain, layout, rotation, signing_keys, verifications
from drtool.repository.ids import id_time, is_id
from drtool.repository.manifest import Manifest, manifest_sha256, open_manifest
from drtool.storage.base import ObjectInfo, Storage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SnapshotRecord:
    """One listed snapshot: its id, the manifest when readable, and its status."""

    snapshot_id: str
    manifest: Manifest | None
    manifest_sha256: str | None
    problem: str | None
    verification: verifications.Verification | None = None  # the last authentic one
    damaged: tuple[str, ...] = ()  # its objects a verification found damaged

    @property
    def valid(self) -> bool:
        """Complete, authentic, not known damaged: restorable."""
        return self.problem is None and self.manifest is not None and not self.damaged

    @property
    def reason(self) -> str | None:
        """Why it is not valid (None when it is)."""
        if self.problem is not None:
            return self.problem
        if self.damaged:
            return f"{self.damaged[0]} failed its last verification"
        return None if self.manifest is not None else "manifest unreadable"

    @property
    def status(self) -> str:
        """VALID, DAMAGED (a verification found bad data) or INVALID."""
        if self.valid:
            return "VALID"
        return "DAMAGED" if self.problem is None and self.damaged else "INVALID"

    @property
    def verified(self) -> bool:
        """Its data passed the last verification (stored hashes at least)."""
        return self.valid and self.verification is not None and self.verification.ok

    def verification_text(self) -> str:
        """What ``list`` shows: the last verification, or ``never verified``."""
        if self.damaged:
            return f"DAMAGED: {', '.join(self.damaged)}"
        if self.verification is None:
            return "never verified"
        return self.verification.describe()

    @property
    def time(self) -> datetime:
        """When the snapshot was started (from its id)."""
        return id_time(self.snapshot_id)


def stores(record: SnapshotRecord) -> list[str]:
    """The components a snapshot holds, in backup order."""
    return [c.name for c in record.manifest.components] if record.manifest else []


def holds(record: SnapshotRecord, components: Collection[str]) -> bool:
    """Whether a snapshot holds every one of ``components``."""
    return set(components) <= set(stores(record))


def trusted_verify_keys(info: layout.RepoInfo, pinned: str, own: str = "") -> list[str]:
    """The keys manifests (and verification records) must be signed with.

    The pinned ``keys.verify_key``; else, on the backup host, the verify key of its own
    signing key (``own``). Never the keys listed in the repository header: anyone who can
    write the repository can add one there and sign a forged snapshot with it (issue 18.8,
    docs/decisions/0014-verify-key-pinning.md). Without either, reading fails closed.
    """
    anchor = pinned or own
    if pinned and pinned not in info.verify_keys:
        log.warning("the configured verify key is not listed in the repository header")
    if anchor:  # plus the keys it handed over to or vouched for (signing_keys.py, ADR 0023)
        periods = signing_keys.trusted(info.repo_id, list(info.signing_keys), [anchor])
        return [anchor, *sorted(k for k in periods if k != anchor)]
    header = ", ".join(info.verify_keys) or "none"
    raise ConfigError(
        "keys.verify_key: not set; drtool does not trust the keys in the repository header "
        "(anyone who can write the repository can add one). Pin the backup host's key: run "
        "`drtool keys verify-key SIGNING_KEY_FILE` on the backup host (or take it from its "
        "config) and set keys.verify_key to it; the header lists "
        f"{header}, which must include it"
    )


def snapshot_ids(storage: Storage) -> list[str]:
    """Ids of every snapshot that has a manifest object, oldest first."""
    ids = set()
    for obj in storage.list(layout.SNAPSHOTS):
        parts = obj.key.split("/")
        if len(parts) == 3 and parts[2] == "manifest.json" and is_id(parts[1]):
            ids.add(parts[1])
    return sorted(ids)


def check_objects(manifest: Manifest, present: dict[str, ObjectInfo]) -> str | None:
    """The first problem with the objects a manifest names, or None when all are there."""
    for obj in manifest.objects():
        found = present.get(obj.key)
        if found is None:
            return f"missing object {obj.key}"
        if found.size != obj.size:
            return f"object {obj.key} is {found.size} bytes, manifest says {obj.size}"
    return None


def unverified_object_keys(storage: Storage, snapshot_id: str) -> set[str]:
    """Object keys an INVALID manifest names, read without trusting it (to protect them)."""
    try:
        body = json.loads(storage.get_bytes(layout.manifest_key(snapshot_id)))["body"]
        return {o["key"] for c in body["components"] for o in c["objects"]}
    except (NotFound, ValueError, KeyError, TypeError):
        return set()


def load_snapshot(
    storage: Storage,
    snapshot_id: str,
    verify_keys: list[str],
    repo_id: str,
    periods: dict[str, signing_keys.Period] | None = None,
) -> tuple[Manifest | None, str | None, str | None]:
    """Read and verify one manifest: (manifest, its stored sha256, problem)."""
    name = layout.manifest_key(snapshot_id)
    try:
        stored = storage.get_bytes(name)
    except NotFound:
        return None, None, "manifest missing"
    try:
        manifest = open_manifest(stored, verify_keys, name=name)
    except IntegrityError as exc:
        return None, manifest_sha256(stored), str(exc)
    if manifest.snapshot_id != snapshot_id or manifest.repo_id != repo_id:
        return None, manifest_sha256(stored), f"{name}: belongs to another snapshot or repository"
    late = signing_keys.late_signature(stored, periods, name=name) if periods else None
    if late:
        return None, manifest_sha256(stored), late
    return manifest, manifest_sha256(stored), None


def list_snapshots(storage: Storage, verify_keys: list[str], repo_id: str) -> list[SnapshotRecord]:
    """Every snapshot with its status, oldest first.

    The objects named by each manifest are checked against one listing of the repository
    (existence and size). A listing error raises; it never reads as "empty".
    """
    present: dict[str, ObjectInfo] = {}
    for prefix in (layout.SNAPSHOTS, layout.BLOBS):
        present.update((o.key, o) for o in storage.list(prefix))
    loaded = []
    rotated = rotation.load_map(storage, verify_keys, repo_id)  # ADR 0023: headers rewritten
    periods = signing_keys.periods_of(storage, verify_keys, repo_id)
    for snapshot_id in snapshot_ids(storage):
        manifest, digest, problem = load_snapshot(
            storage, snapshot_id, verify_keys, repo_id, periods
        )
        if manifest is not None:
            manifest = rotation.apply_to_manifest(manifest, rotated)
            problem = check_objects(manifest, present)
        loaded.append((snapshot_id, manifest, digest, problem))
    manifests = {sid: m for sid, m, _, _ in loaded if m is not None}
    checked = verifications.latest_records(storage, verify_keys, repo_id, manifests)
    bad = verifications.damaged_objects(manifests, checked)
    records = []
    for sid, manifest, digest, problem in loaded:
        damaged = tuple(o.key for o in manifest.objects() if o.key in bad) if manifest else ()
        records.append(SnapshotRecord(sid, manifest, digest, problem, checked.get(sid), damaged))
    for sid, problems in chain.link_problems(records, chain.tombstones(storage)).items():
        for text in problems:
            log.warning("hash chain: snapshot %s: %s (drtool verify fails on it)", sid, text)
    return records


def newest_authentic(
    storage: Storage, verify_keys: list[str], repo_id: str
) -> SnapshotRecord | None:
    """The newest snapshot whose manifest verifies (objects not checked), or None.

    Reads manifests newest first and stops at the first authentic one, so a backup's start
    does not grow with the number of snapshots kept.
    """
    for snapshot_id in reversed(snapshot_ids(storage)):
        manifest, digest, problem = load_snapshot(storage, snapshot_id, verify_keys, repo_id)
        if manifest is not None:
            return SnapshotRecord(snapshot_id, manifest, digest, problem)
        log.warning("snapshot %s skipped as the chain's previous: %s", snapshot_id, problem)
    return None


def resolve(
    records: list[SnapshotRecord],
    ref: str,
    *,
    at: datetime | None = None,
    components: Collection[str] = (),
) -> SnapshotRecord:
    """Pick a snapshot by id or ``latest``.

    ``latest`` is the newest valid snapshot not after ``at`` that holds every one of
    ``components`` (schedules back the stores up separately: the newest may hold Redis only).
    """
    valid = [r for r in records if r.valid]
    if ref == "latest":
        candidates = [r for r in valid if (at is None or r.time <= at) and holds(r, components)]
        if not candidates:
            when = f" at or before {at.isoformat()}" if at else ""
            what = f" holding {', '.join(components)}" if components else ""
            newest = f" (the newest holds {', '.join(stores(valid[-1]))})" if valid and what else ""
            raise NotFound(f"snapshot: no valid snapshot{what}{when} in the repository{newest}")
        return candidates[-1]
    for record in records:
        if record.snapshot_id == ref:
            if not record.valid:
                raise IntegrityError(f"snapshot {ref} is {record.status}: {record.reason}")
            return record
    raise NotFound(f"snapshot {ref}: not found (see `drtool list`)")
