"""Writing one snapshot: data objects first, each confirmed; the signed manifest last.

Nothing is listed until ``commit`` writes the manifest, so a failure or a kill at any earlier
point leaves only unreferenced objects, which ``prune`` sweeps after a grace period.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from drtool.errors import IntegrityError
from drtool.pipeline.header import InnerHeader
from drtool.pipeline.seal import seal
from drtool.repository import layout
from drtool.repository.manifest import Manifest, ObjectEntry, sign_manifest
from drtool.repository.object_lock import RetentionCache, protect
from drtool.storage.base import ObjectInfo, Storage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Written:
    """An object as stored, and the plaintext that went into it."""

    entry: ObjectEntry
    plain_bytes: int
    plain_sha256: str


@dataclass
class SnapshotWriter:
    """Puts the objects of one snapshot and commits it with a signed manifest."""

    storage: Storage
    repo: layout.RepoInfo
    snapshot_id: str
    signing_key: Ed25519PrivateKey
    recipients: tuple[str, ...]
    compression_level: int = 3
    compression_threads: int = 0
    retain_until: datetime | None = None
    #: dates of reused objects, to extend their Object Lock to ``retain_until`` (None: no lock)
    retention_cache: RetentionCache | None = None
    retention_margin: timedelta = timedelta(days=1)
    confirmed: dict[str, ObjectInfo] = field(default_factory=dict)  # by commit, key -> stored
    written: set[str] = field(default_factory=set)  # keys this writer put (locked by the put)
    #: puts not confirmed by a HEAD: key -> (size sent, ETag answered), checked by ``commit``
    unconfirmed: dict[str, ObjectInfo] = field(default_factory=dict)

    def _put(
        self,
        key: str,
        chunks: Iterable[bytes],
        header: InnerHeader,
        *,
        probe: bool = False,
        confirm: bool = True,
    ) -> Written:
        """Seal ``chunks`` into the object ``key`` and confirm its stored size (now, or with
        ``confirm=False`` by the listing of ``commit``)."""
        sealed = seal(
            chunks,
            header=header,
            recipients=list(self.recipients),
            level=self.compression_level,
            threads=self.compression_threads,
            probe=probe,
        )
        info = self.storage.put(key, sealed.stream, retain_until=self.retain_until, confirm=confirm)
        if not confirm:
            self.unconfirmed[key] = info
        if info.size != sealed.stored.size:
            raise IntegrityError(f"{key}: stored {info.size} bytes, sent {sealed.stored.size}")
        entry = ObjectEntry(key, header.kind, info.size, sealed.stored.sha256, info.version_id)
        self.written.add(key)
        log.debug("stored %s (%d bytes)", key, info.size)
        return Written(entry, sealed.plain.size, sealed.plain.sha256)

    def put_sealed(self, key: str, chunks: Iterable[bytes], header: InnerHeader) -> Written:
        """Put an object outside the snapshot's own prefix (the capture journal), sealed and
        bound to ``header`` like every other; its stored size is confirmed."""
        return self._put(key, chunks, header)

    def put_snapshot_object(
        self, component: str, name: str, chunks: Iterable[bytes], *, kind: str
    ) -> Written:
        """Put an object that belongs to this snapshot only, bound to its slot by its header."""
        key = f"{layout.snapshot_prefix(self.snapshot_id)}{component}/{name}.zst.age"
        header = InnerHeader(self.repo.repo_id, self.snapshot_id, component, kind)
        return self._put(key, chunks, header)

    def put_blob(self, blob_id: str, chunks: Iterable[bytes], *, confirm: bool = True) -> Written:
        """Put a shared content blob; its header binds it to its blob id instead of a snapshot.

        Attachments are mostly JPEG, PNG, video: a blob whose start does not compress is stored
        in raw zstd blocks (the probe of :func:`drtool.pipeline.compress.compress`).
        ``confirm=False``: no HEAD after the put; only for a blob the snapshot's ``commit``
        names (its listing confirms size and ETag, one request per 1,000 blobs).
        """
        header = InnerHeader(self.repo.repo_id, blob_id, "minio", "blob")
        return self._put(layout.blob_key(blob_id), chunks, header, probe=True, confirm=confirm)

    def commit(self, manifest: Manifest) -> bytes:
        """Confirm every named object's stored size, then write the signed manifest (commit).

        What the confirming listing found stays in ``confirmed``.
        """
        stored_now = self.confirmed = stored_objects(self.storage, manifest)
        for obj in manifest.objects():
            info = stored_now[obj.key]
            if info.size != obj.size:
                raise IntegrityError(
                    f"{obj.key}: {info.size} bytes in storage, {obj.size} expected; not committed"
                )
            sent = self.unconfirmed.get(obj.key)
            if sent is not None and sent.etag and info.etag and sent.etag != info.etag:
                raise IntegrityError(
                    f"{obj.key}: stored object (ETag {info.etag}) differs from what was sent "
                    f"(ETag {sent.etag}); not committed"
                )
        self._protect_reused(manifest)
        stored = sign_manifest(manifest, self.signing_key)
        self.storage.put_bytes(
            layout.manifest_key(self.snapshot_id), stored, retain_until=self.retain_until
        )
        return stored

    def _protect_reused(self, manifest: Manifest) -> None:
        """Extend the Object Lock of objects this snapshot reuses to its own retain-until.

        Before the manifest: a committed snapshot never names an object that may be deleted
        before the snapshot's own retention ends (see drtool/repository/object_lock.py).
        """
        if self.retain_until is None or self.retention_cache is None:
            return
        keys = [o.key for o in manifest.objects()]
        for key in self.written:
            self.retention_cache.dates[key] = self.retain_until
        reused = [k for k in keys if k not in self.written]
        stats = protect(
            self.storage,
            reused,
            self.retain_until,
            margin=self.retention_margin,
            cache=self.retention_cache,
        )
        log.info(
            "object lock: %d reused objects retained until at least %s (%d extended, "
            "%d requests, %.2f s)",
            stats.objects,
            self.retain_until.isoformat(timespec="seconds"),
            stats.extended,
            stats.requests,
            stats.seconds,
        )


def stored_objects(storage: Storage, manifest: Manifest) -> dict[str, ObjectInfo]:
    """What storage holds for every object ``manifest`` names, by key.

    One listing of the snapshot's own prefix and, when it names blobs, one of ``blobs/``
    (a listing reports sizes like a HEAD, at one request per 1,000 keys: an incremental
    snapshot names thousands of shared blobs); a HEAD for any key a listing did not show.
    ``NotFound`` when an object is absent.
    """
    wanted = {obj.key for obj in manifest.objects()}
    prefixes = [layout.snapshot_prefix(manifest.snapshot_id)]
    if any(key.startswith(layout.BLOBS) for key in wanted):
        prefixes.append(layout.BLOBS)
    found: dict[str, ObjectInfo] = {}
    for prefix in prefixes:
        found.update((o.key, o) for o in storage.list(prefix) if o.key in wanted)
    for key in wanted - found.keys():
        found[key] = storage.head(key)
    return found
