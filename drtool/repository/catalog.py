"""The catalog: which snapshots exist and whether each is complete and authentic.

Listing reads manifests (or their signed copies in the catalog index, ADR 0020) and
verification records, never the data. A snapshot is VALID when its
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
from datetime import UTC, datetime

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from drtool.errors import ConfigError, DrtoolError, IntegrityError, NotFound
from drtool.repository import catalog_index, chain, layout, rotation, signing_keys, verifications
from drtool.repository.catalog_index import Entry, Index, IndexUnusable
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
    manifest, problem = _open_stored(stored, snapshot_id, verify_keys, repo_id, periods)
    return manifest, manifest_sha256(stored), problem


def _open_stored(
    stored: bytes,
    snapshot_id: str,
    verify_keys: list[str],
    repo_id: str,
    periods: dict[str, signing_keys.Period] | None = None,
) -> tuple[Manifest | None, str | None]:
    """A stored manifest checked: signature, snapshot and repository; (manifest, problem)."""
    name = layout.manifest_key(snapshot_id)
    try:
        manifest = open_manifest(stored, verify_keys, name=name)
    except IntegrityError as exc:
        return None, str(exc)
    if manifest.snapshot_id != snapshot_id or manifest.repo_id != repo_id:
        return None, f"{name}: belongs to another snapshot or repository"
    late = signing_keys.late_signature(stored, periods, name=name) if periods else None
    if late:
        return None, late
    return manifest, None


def list_snapshots(
    storage: Storage, verify_keys: list[str], repo_id: str, *, use_index: bool = True
) -> list[SnapshotRecord]:
    """Every snapshot with its status, oldest first (see ``_list_all``).

    ``use_index=False`` reads and hashes every manifest (``verify``: the chain walk must see
    the stored bytes, not the index's copy).
    """
    index = _index_or_none(storage, verify_keys, repo_id) if use_index else None
    return _list_all(storage, verify_keys, repo_id, index)


def _list_all(
    storage: Storage, verify_keys: list[str], repo_id: str, index: Index | None
) -> list[SnapshotRecord]:
    """Every snapshot with its status, oldest first.

    The objects named by each manifest are checked against one listing of the repository
    (existence and size). A listing error raises; it never reads as "empty". The listing
    decides which snapshots exist; the catalog index (ADR 0020) only saves reading the
    manifests it holds a signed copy of (same size, and same MD5 where the store lists it),
    so it can neither hide a snapshot nor show one whose manifest is gone.
    """
    present: dict[str, ObjectInfo] = {}
    for prefix in (layout.SNAPSHOTS, layout.BLOBS):
        present.update((o.key, o) for o in storage.list(prefix))
    listed = catalog_index.manifests_listed(list(present.values()))
    entries = index.entries if index is not None else {}
    loaded = []
    rotated = rotation.load_map(storage, verify_keys, repo_id)  # ADR 0023: headers rewritten
    periods = signing_keys.periods_of(storage, verify_keys, repo_id)
    if rotated or periods:
        entries = {}  # the index's copies predate the rotation (see _index_or_none)
    for snapshot_id in sorted(listed):
        entry = entries.get(snapshot_id)
        manifest: Manifest | None
        digest: str | None
        if entry is not None and entry.matches(listed[snapshot_id]):
            manifest, digest, problem = entry.manifest, entry.sha256, None
        else:
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

    The backup's chain link. The index and its tail name the candidates newest first; the
    manifest itself is read (its sha256 is what the next manifest records), so the cost is a
    few requests whatever the history (ADR 0020).
    """
    index, ids = _candidates(storage, verify_keys, repo_id)
    entries = index.entries if index is not None else {}
    # without an index (keys were rotated, ADR 0023) a retired key's late signature must fail
    periods = signing_keys.periods_of(storage, verify_keys, repo_id) if index is None else None
    for snapshot_id in ids:
        record = _read_checked(
            storage, snapshot_id, entries.get(snapshot_id), verify_keys, repo_id, periods
        )
        if record is None:
            continue
        if record.manifest is not None:
            return record
        log.warning("snapshot %s skipped as the chain's previous: %s", snapshot_id, record.problem)
    return None


def recent_snapshots(
    storage: Storage, verify_keys: list[str], repo_id: str, last: int
) -> list[SnapshotRecord]:
    """The newest ``last`` snapshots with their status, oldest first (``list --last N``).

    Reads the index, its tail, and for each snapshot shown its manifest, one listing of its
    objects and its newest verification record: bounded by ``last``, not by the history.
    Without a usable index, the full listing. The hash chain is not walked (``verify`` does).
    """
    index, ids = _candidates(storage, verify_keys, repo_id)
    if index is None:
        return _list_all(storage, verify_keys, repo_id, None)[-last:] if last > 0 else []
    picked: list[SnapshotRecord] = []
    for snapshot_id in ids:
        if len(picked) >= last:
            break
        record = _read_checked(
            storage, snapshot_id, index.entries.get(snapshot_id), verify_keys, repo_id
        )
        if record is not None:
            picked.append(record)
    checker = _Checker(storage, verify_keys, repo_id, index)
    return [checker.complete(r) for r in reversed(picked)]


def find(
    storage: Storage,
    verify_keys: list[str],
    repo_id: str,
    ref: str,
    *,
    at: datetime | None = None,
    components: Collection[str] = (),
) -> SnapshotRecord:
    """``resolve`` without reading the whole catalog when ``ref`` is ``latest``.

    ``latest`` walks the index's snapshots newest first, skipping by the index's copy of the
    manifest those started after ``at`` or lacking a component, and checks each candidate
    fully (its stored manifest, objects, verification records) until one is VALID. An id
    (an operator choosing an older snapshot, where the chain's warnings help) and a
    repository without a usable index: ``resolve`` over the full listing.
    """
    if ref != "latest":
        return resolve(list_snapshots(storage, verify_keys, repo_id), ref)
    index, ids = _candidates(storage, verify_keys, repo_id)
    if index is None:
        records = _list_all(storage, verify_keys, repo_id, None)
        return resolve(records, ref, at=at, components=components)
    checker = _Checker(storage, verify_keys, repo_id, index)
    for snapshot_id in ids:
        if at is not None and id_time(snapshot_id) > at:
            continue
        entry = index.entries.get(snapshot_id)
        if entry is not None and not _holds(entry.manifest, components):
            continue
        record = _read_checked(storage, snapshot_id, entry, verify_keys, repo_id)
        if record is None or record.manifest is None or not _holds(record.manifest, components):
            continue
        record = checker.complete(record)
        if record.valid:
            return record
        log.info("snapshot %s passed over as latest: %s", snapshot_id, record.reason)
    when = f" at or before {at.isoformat()}" if at else ""
    what = f" holding {', '.join(components)}" if components else ""
    newest = ""
    if components:  # as ``resolve`` says: what the newest valid snapshot holds instead
        try:
            held = find(storage, verify_keys, repo_id, "latest")
            newest = f" (the newest holds {', '.join(stores(held))})"
        except NotFound:
            pass
    raise NotFound(f"snapshot: no valid snapshot{what}{when} in the repository{newest}")


def _holds(manifest: Manifest, components: Collection[str]) -> bool:
    return set(components) <= {c.name for c in manifest.components}


def _index_or_none(storage: Storage, verify_keys: list[str], repo_id: str) -> Index | None:
    """The catalog index, or None: none yet (quietly), or not trustworthy (a warning).

    Not used either once keys were rotated (ADR 0023): the index's manifest copies name the
    objects as they were before their headers were rewritten, and a manifest signed by a
    retired key is judged by its stored signature; the full listing applies both.
    """
    if rotation.load_map(storage, verify_keys, repo_id) or signing_keys.periods_of(
        storage, verify_keys, repo_id
    ):
        log.debug("catalog index not used: keys were rotated (ADR 0023)")
        return None
    try:
        return catalog_index.read_index(storage, verify_keys, repo_id)
    except IndexUnusable as exc:
        log.warning("catalog index not used (%s); reading the manifests instead", exc)
        return None


def _candidates(
    storage: Storage, verify_keys: list[str], repo_id: str
) -> tuple[Index | None, list[str]]:
    """The index (None without a usable one) and the snapshot ids to look at, newest first.

    The index's snapshots older than its tail, and every manifest the tail listing shows (an
    indexed snapshot inside the tail whose manifest is not listed is gone: left out). Without
    an index, or with one older than ``TAIL_MAX_DAYS``, every listed manifest.
    """
    index = _index_or_none(storage, verify_keys, repo_id)
    if index is not None:
        now = datetime.now(UTC)
        tail = catalog_index.tail_manifests(storage, catalog_index.tail_since(index), now)
        if tail is not None:
            start, listed = tail
            for sid in index.entries:
                if sid >= start and sid not in listed:
                    _gone(storage, sid)
            ids = {sid for sid in index.entries if sid < start} | set(listed)
            return index, sorted(ids, reverse=True)
        log.debug(
            "catalog index older than %d days: listing every manifest",
            catalog_index.TAIL_MAX_DAYS,
        )
    return index, list(reversed(snapshot_ids(storage)))


def _read_checked(
    storage: Storage,
    snapshot_id: str,
    entry: Entry | None,
    verify_keys: list[str],
    repo_id: str,
    periods: dict[str, signing_keys.Period] | None = None,
) -> SnapshotRecord | None:
    """One snapshot's stored manifest, checked; None when it is gone (forgotten or deleted).

    The index's copy is used when the stored bytes hash the same; otherwise the stored
    manifest is verified on its own (a replaced manifest is judged by its signature).
    """
    name = layout.manifest_key(snapshot_id)
    try:
        stored = storage.get_bytes(name)
    except NotFound:
        if entry is not None:
            _gone(storage, snapshot_id)
        return None
    digest = manifest_sha256(stored)
    if entry is not None and entry.sha256 == digest:
        return SnapshotRecord(snapshot_id, entry.manifest, digest, None)
    if entry is not None:
        log.warning("snapshot %s: its manifest differs from the catalog index's copy", snapshot_id)
    manifest, problem = _open_stored(stored, snapshot_id, verify_keys, repo_id, periods)
    return SnapshotRecord(snapshot_id, manifest, digest, problem)


def _gone(storage: Storage, snapshot_id: str) -> None:
    """An indexed snapshot whose manifest is gone: quiet when pruned (tombstone), else said."""
    if not any(storage.list(f"{chain.FORGOTTEN}{snapshot_id}.")):
        log.warning(
            "snapshot %s: the catalog index names it but its manifest is gone (deleted, not "
            "pruned; see drtool verify)",
            snapshot_id,
        )


class _Checker:
    """Completes a few records as the full listing would: objects and verification records.

    Damage follows the object (ADR 0013): a shared blob's state is the newest record of any
    snapshot naming it, so for a snapshot naming blobs the records of every indexed snapshot
    sharing one are read; a snapshot naming only its own objects reads only its own.
    """

    def __init__(self, storage: Storage, verify_keys: list[str], repo_id: str, index: Index):
        self.storage = storage
        self.verify_keys = verify_keys
        self.repo_id = repo_id
        self.manifests = {sid: e.manifest for sid, e in index.entries.items()}
        self._blobs: dict[str, ObjectInfo] | None = None
        self._naming: dict[str, set[str]] | None = None

    def complete(self, record: SnapshotRecord) -> SnapshotRecord:
        m = record.manifest
        if m is None or record.problem is not None:
            return record
        self.manifests[record.snapshot_id] = m
        present = {o.key: o for o in self.storage.list(layout.snapshot_prefix(m.snapshot_id))}
        shared = {o.key for o in m.objects() if o.key.startswith(layout.BLOBS)}
        if shared:
            present.update(self.blobs())
        problem = check_objects(m, present)
        sharing = {record.snapshot_id}
        for key in shared:
            sharing |= self.naming().get(key, set())
        if sharing == {record.snapshot_id}:
            ks = sorted(
                o.key
                for o in self.storage.list(verifications.snapshot_prefix(record.snapshot_id))
                if o.key.endswith(".json")
            )
            own = verifications.newest_of(
                self.storage, self.verify_keys, self.repo_id, record.snapshot_id, ks
            )
            checked = {record.snapshot_id: own} if own is not None else {}
        else:
            checked = verifications.latest_records(
                self.storage, self.verify_keys, self.repo_id, sharing
            )
        bad = verifications.damaged_objects(
            {sid: self.manifests[sid] for sid in checked if sid in self.manifests}, checked
        )
        damaged = tuple(o.key for o in m.objects() if o.key in bad)
        return SnapshotRecord(
            record.snapshot_id,
            m,
            record.manifest_sha256,
            problem,
            checked.get(record.snapshot_id),
            damaged,
        )

    def blobs(self) -> dict[str, ObjectInfo]:
        if self._blobs is None:
            self._blobs = {o.key: o for o in self.storage.list(layout.BLOBS)}
        return self._blobs

    def naming(self) -> dict[str, set[str]]:
        """Blob key -> the indexed snapshots naming it."""
        if self._naming is None:
            self._naming = {}
            for sid, m in self.manifests.items():
                for o in m.objects():
                    if o.key.startswith(layout.BLOBS):
                        self._naming.setdefault(o.key, set()).add(sid)
        return self._naming


def record_commit(
    storage: Storage,
    signing_key: Ed25519PrivateKey,
    verify_keys: list[str],
    repo_id: str,
    manifest: Manifest,
    stored: bytes,
) -> None:
    """After a backup's manifest: add it (and any manifest the index missed) to the index.

    One delta page (a full page every ``COMPACT_EVERY``), or a full rebuild when there is no
    usable index. The snapshot is committed already: a failure here is a warning, never a
    failed backup (the index is a cache; the next write or prune rebuilds it).
    """
    try:
        _record_commit(storage, signing_key, verify_keys, repo_id, manifest, stored)
    except DrtoolError as exc:
        log.warning("catalog index not updated (%s); the next write rebuilds it", exc)


def _record_commit(
    storage: Storage,
    signing_key: Ed25519PrivateKey,
    verify_keys: list[str],
    repo_id: str,
    manifest: Manifest,
    stored: bytes,
) -> None:
    now = datetime.now(UTC)
    index = _index_or_none(storage, verify_keys, repo_id)
    tail = (
        catalog_index.tail_manifests(storage, catalog_index.tail_since(index), now)
        if index is not None
        else None
    )
    if index is None or tail is None:
        rebuild_index(storage, signing_key, verify_keys, repo_id)
        return
    start, listed = tail
    added = [catalog_index.entry_for(manifest, stored)]
    for sid in sorted(set(listed) - set(index.entries) - {manifest.snapshot_id}):
        try:
            other = storage.get_bytes(layout.manifest_key(sid))
        except NotFound:
            continue
        found, _ = _open_stored(other, sid, verify_keys, repo_id)
        if found is not None:
            log.info("catalog index: snapshot %s was missing from it; added", sid)
            added.append(catalog_index.entry_for(found, other))
    gone = [sid for sid in index.entries if sid >= start and sid not in listed]
    full = index.deltas + 1 >= catalog_index.COMPACT_EVERY
    if full:
        kept = {sid: e for sid, e in index.entries.items() if sid not in gone}
        kept.update((e.snapshot_id, e) for e in added)
        added, gone = list(kept.values()), []
    catalog_index.write_page(
        storage,
        signing_key,
        repo_id=repo_id,
        seq=index.head_seq + 1,
        full=full,
        previous_sha256=index.head_sha256,
        added=added,
        forgotten=gone,
        covered=now,
    )


def rebuild_index(
    storage: Storage, signing_key: Ed25519PrivateKey, verify_keys: list[str], repo_id: str
) -> int:
    """Write a full page from one listing of every manifest; return its seq.

    Manifests the current index holds (same size and MD5) are not read again; the others are
    read and verified, and only authentic ones enter the index.
    """
    now = datetime.now(UTC)
    seqs = catalog_index.page_seqs(storage)
    index = _index_or_none(storage, verify_keys, repo_id) if seqs else None
    listed = catalog_index.manifests_listed(list(storage.list(layout.SNAPSHOTS)))
    entries = []
    for sid, info in sorted(listed.items()):
        entry = index.entries.get(sid) if index is not None else None
        if entry is not None and entry.matches(info):
            entries.append(entry)
            continue
        try:
            stored = storage.get_bytes(layout.manifest_key(sid))
        except NotFound:
            continue
        manifest, _ = _open_stored(stored, sid, verify_keys, repo_id)
        if manifest is not None:
            entries.append(catalog_index.entry_for(manifest, stored))
    seq = seqs[0] + 1 if seqs else 1
    catalog_index.write_page(
        storage,
        signing_key,
        repo_id=repo_id,
        seq=seq,
        full=True,
        previous_sha256=index.head_sha256 if index is not None else None,
        added=entries,
        forgotten=[],
        covered=now,
    )
    return seq


def compact_index(
    storage: Storage,
    signing_key: Ed25519PrivateKey | None,
    verify_keys: list[str],
    repo_id: str,
    *,
    forgot: bool,
) -> None:
    """Prune's part: a fresh full page, then the older pages deleted (prune may delete).

    Skipped when prune ``forgot`` nothing and the index is one page already. Without a
    signing key nothing is written (logged): the index then still names the forgotten
    snapshots, which every reader passes over (their manifests are gone).
    """
    if not forgot and len(catalog_index.page_seqs(storage)) == 1:
        return
    if signing_key is None:
        log.info("catalog index not compacted: no keys.signing_key_file configured to sign it")
        return
    try:
        seq = rebuild_index(storage, signing_key, verify_keys, repo_id)
        catalog_index.drop_pages_before(storage, seq)
    except DrtoolError as exc:
        log.warning("catalog index not compacted (%s); the next write rebuilds it", exc)


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
