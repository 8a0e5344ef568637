"""The bucket as it was at a moment: the newest snapshot index before it plus the journal.

``bucket_at`` takes the newest valid MinIO snapshot whose listing had ended by the moment and lays
over it every object the capture journaled after that snapshot started and up to the moment
(the newest capture per key wins). A deletion is not journaled (rows are followed, not the
bucket), so an object deleted after the moment is still there: the state at the moment, as
far as the snapshot and the captures saw it. Objects written at the moment by other writers
than the attachment rows are only in the next snapshot (see ADR 0025).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from drtool.capture import chain
from drtool.errors import IntegrityError, NotFound
from drtool.repository import catalog
from drtool.repository.access import Repo, read_object, snapshot_header
from drtool.repository.manifest import ObjectEntry
from drtool.repository.minio_index import IndexEntry, decode_index
from drtool.repository.part_times import part_window
from drtool.sources.minio import MinioStore
from drtool.stores.minio import restore as bucket_restore
from drtool.stores.minio.restore import index_bucket


@dataclass(frozen=True)
class BucketAt:
    """The entries of ``bucket`` at ``moment`` and where they came from."""

    bucket: str
    moment: datetime
    snapshot_id: str
    entries: list[IndexEntry]
    from_journal: int  # entries the journal added or replaced


def _time(text: str) -> datetime:
    return datetime.fromisoformat(text)


def bucket_bases(
    records: list[catalog.SnapshotRecord], moment: datetime
) -> dict[str, tuple[catalog.SnapshotRecord, ObjectEntry]]:
    """Each bucket's base for ``moment``: the newest valid snapshot whose MinIO part had
    ENDED at or before it, and that snapshot's index of the bucket.

    The listing runs after PostgreSQL and Redis, so a snapshot started before the moment
    may list the bucket after it (objects written after the moment). Buckets come in the
    newest base's manifest order (the config's): the order they map onto a target's.
    One way for :func:`bucket_at` and the plan (services/restore/moment.py).
    """
    bases: dict[str, tuple[catalog.SnapshotRecord, ObjectEntry]] = {}
    for record in sorted(records, key=lambda r: r.time, reverse=True):
        if not record.valid or record.manifest is None:
            continue
        window = part_window(record.manifest, "minio")
        if window is None or window[1] > moment:
            continue
        comp = record.manifest.component("minio")
        for obj in comp.objects if comp else ():
            if obj.kind == "minio_index":
                bases.setdefault(index_bucket(obj.key), (record, obj))
    return bases


def bucket_at(repo: Repo, identities: list[str], bucket: str, moment: datetime) -> BucketAt:
    """``bucket`` at ``moment``; NotFound when no valid snapshot of it is that old."""
    records = catalog.list_snapshots(repo.storage, repo.verify_keys, repo.info.repo_id)
    base = bucket_bases(records, moment).get(bucket)
    if base is None:
        raise NotFound(
            f"minio bucket {bucket}: no valid snapshot listed it before "
            f"{moment.isoformat()} (captured objects alone are not the bucket)"
        )
    record, obj = base
    assert record.manifest is not None
    header = snapshot_header(record.manifest, "minio", obj.kind)
    entries = {e.key: e for e in decode_index(read_object(repo, obj, header, identities))}
    captured = journal_since(repo, identities, bucket, record.time, moment)
    for e in captured.values():
        entries[e.key] = e
    return BucketAt(
        bucket, moment, record.snapshot_id, [entries[k] for k in sorted(entries)], len(captured)
    )


def journal_since(
    repo: Repo, identities: list[str], bucket: str, after: datetime, until: datetime
) -> dict[str, IndexEntry]:
    """The newest capture per key of ``bucket`` in (``after``, ``until``], as index entries.

    The chain must be whole: a moment cannot be trusted past a broken or forged record.
    Each entry's blob must be one its signed record names with the same size and sha256.
    """
    found = chain.load_chain(repo.storage, repo.verify_keys, repo.info.repo_id)
    if found.problems:
        raise IntegrityError(f"capture chain: {found.problems[0]} (run `drtool capture verify`)")
    newest: dict[str, tuple[datetime, IndexEntry]] = {}
    for key, record in found.records:
        if record.bucket != bucket or _time(record.last_captured) <= after:
            continue
        if _time(record.first_captured) > until:
            continue
        header = chain.journal_header(repo.info.repo_id, record.seq)
        data = read_object(repo, record.journal.entry(chain.JOURNAL_KIND), header, identities)
        blobs = {b.key: b for b in record.blobs}
        for c in map(found.current, chain.decode_journal(data, name=record.journal.key)):
            at = _time(c.captured_at)
            if not after < at <= until:
                continue
            entry = IndexEntry(
                c.key,
                c.size,
                c.etag,
                c.sha256,
                c.content_type,
                c.metadata,
                c.blob,
                c.blob_size,
                c.blob_sha256,
            )
            stored = blobs.get(entry.blob_entry().key)
            if stored is None or (stored.size, stored.sha256) != (c.blob_size, c.blob_sha256):
                raise IntegrityError(f"{key}: its journal names a blob the record does not list")
            if c.key not in newest or newest[c.key][0] <= at:
                newest[c.key] = (at, entry)
    return {k: e for k, (_, e) in newest.items()}


def restore_bucket_at(
    repo: Repo,
    identities: list[str],
    state: BucketAt,
    store: MinioStore,
    target_bucket: str,
    workdir: Path,
    *,
    force: bool = False,
    workers: int = 4,
    mirror: bool = False,
) -> tuple[bucket_restore.BucketOutcome, list[str]]:
    """Put ``state`` into ``target_bucket`` like a snapshot restore: every blob authenticated
    first, then each object put and read back. Returns the outcome and the problems the read
    back found. The whole-stack ``restore --at`` calls this for the bucket.
    """
    snap = bucket_restore.BucketSnapshot(state.bucket, target_bucket, state.entries)
    bucket_restore.check_blobs(repo, [snap], identities, workers)
    outcome = bucket_restore.restore(
        repo, store, snap, identities, workdir, force=force, workers=workers, mirror=mirror
    )
    return outcome, bucket_restore.verify(store, snap, workers)
