"""Incremental MinIO bucket snapshots: content blobs shared across snapshots, one index each.

Every object becomes an encrypted blob ``blobs/<xx>/<blob-id>.zst.age`` (a random id, so blob
names reveal nothing of the content). A snapshot's encrypted index maps each key to its blob,
size, sha256, content type and metadata. An object whose key, size and ETag equal the previous
snapshot's, and whose blob is still stored, reuses that blob. The backup host keeps the last
committed index in plaintext in its state dir (it holds the plaintext objects anyway), because
it has no identity to read the encrypted one.

Size and ETag say the bytes are the same, not the content type and metadata: a copy onto
itself with ``MetadataDirective=REPLACE`` changes those and keeps the ETag. The listing does
not show them, but it shows ``LastModified``, which such a copy moves. So the whole previous
entry is reused only when the listed LastModified equals the one the cache recorded; when it
differs (or none was recorded: a cache written before, or a LastModified too close to the
listing to trust at its one-second precision), one HEAD reads the content type and metadata
and the entry keeps its blob with what the HEAD says. An unchanged bucket costs no request
beyond the listing; each changed object one HEAD (measured in tests/test_minio_metadata.py).
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

from drtool.errors import SourceError
from drtool.repository import layout
from drtool.repository.manifest import ObjectEntry
from drtool.repository.minio_index import IndexEntry, decode_index, encode_index
from drtool.repository.writer import SnapshotWriter
from drtool.sources.minio import MinioStore, SourceObject

log = logging.getLogger(__name__)
_In = TypeVar("_In")
_Out = TypeVar("_Out")

# Upload buffers of all workers together. With ~80 MB of code and libraries this keeps a
# backup under 128 MB whatever the objects' sizes: many small objects run side by side, an
# object of more than a part (S3: 3 parts of 8 MiB in memory) runs alone.
BUFFER_BUDGET = 24 * 1024 * 1024
MTIME_SLACK = timedelta(seconds=2)


@dataclass
class BucketResult:
    """What one bucket snapshot stored."""

    bucket: str
    entries: list[IndexEntry]
    index: ObjectEntry
    uploaded: int = 0
    uploaded_bytes: int = 0
    reused: int = 0
    plain_bytes: int = 0
    headed: int = 0
    """Objects whose metadata a HEAD read (LastModified moved with the same bytes)."""
    healed: list[str] = field(default_factory=list)
    """Damaged blob keys whose objects were uploaded again from the source."""


def cache_path(state_dir: Path, repo_id: str, bucket: str) -> Path:
    """Where the backup host keeps the last committed index of ``bucket``."""
    return state_dir / "minio-index" / repo_id / f"{bucket}.jsonl"


def captured_path(state_dir: Path, repo_id: str, bucket: str) -> Path:
    """Where ``drtool capture`` keeps the objects it captured since (drtool/capture/cache.py).

    The next backup merges them into its previous index, so it reuses their blobs.
    """
    return state_dir / "minio-index" / repo_id / f"{bucket}.captured.jsonl"


def read_cache(path: Path) -> dict[str, IndexEntry]:
    """The cached index by key (empty when there is none or it is unreadable)."""
    try:
        return {e.key: e for e in decode_index(path.read_bytes())}
    except (OSError, ValueError, TypeError):
        return {}


def write_cache(path: Path, entries: list[IndexEntry]) -> None:
    """Replace the cached index atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(b"".join(encode_index(entries, with_mtime=True)))
    tmp.replace(path)


def snapshot_bucket(
    store: MinioStore,
    bucket: str,
    writer: SnapshotWriter,
    *,
    previous: dict[str, IndexEntry],
    stored_blobs: dict[str, int],
    damaged: frozenset[str] = frozenset(),
    workers: int = 8,
    on_object: Callable[[int], None] = lambda n: None,
) -> BucketResult:
    """Snapshot one bucket: upload new or changed objects as blobs, reuse the rest, store the index.

    A blob in ``damaged`` (a signed verification found it bad) is never reused: its object
    is read from the source again into a new blob (healing). A listing or read error raises;
    no index is written for a partial bucket.
    """
    entries: list[IndexEntry] = []
    todo: list[tuple[SourceObject, IndexEntry | None]] = []
    healed: list[str] = []
    listed_at = datetime.now(UTC)
    for obj in store.list_objects(bucket):
        old = previous.get(obj.key)
        if old is not None and layout.blob_key(old.blob) in damaged:
            healed.append(layout.blob_key(old.blob))
            todo.append((obj, None))
        elif (
            old is not None
            and old.size == obj.size
            and old.etag == obj.etag
            and stored_blobs.get(layout.blob_key(old.blob)) == old.blob_size
        ):
            if old.listed_mtime and old.listed_mtime == obj.last_modified:
                entries.append(replace(old, listed_mtime=_trusted(obj, listed_at)))
                on_object(obj.size)
            else:
                todo.append((obj, old))  # same bytes; content type and metadata: one HEAD
        else:
            todo.append((obj, None))

    budget = _Budget(BUFFER_BUDGET)

    def upload(item: tuple[SourceObject, IndexEntry | None]) -> tuple[IndexEntry, bool]:
        obj, old = item
        if old is not None:
            found = store.stat(bucket, obj.key)
            if found is not None and (found[0].size, found[0].etag) == (old.size, old.etag):
                on_object(obj.size)
                meta = found[1]
                entry = replace(
                    old,
                    content_type=meta.content_type,
                    metadata=meta.metadata,
                    # the listing's, not the HEAD's: HTTP dates have whole seconds, MinIO's
                    # listing milliseconds; the next listing is compared with this
                    listed_mtime=_trusted(obj, listed_at),
                )
                return entry, False
            # changed since the listing: read it like a new object
        with budget.hold(writer.storage.put_buffer(obj.size)):
            return upload_one(obj), True

    def upload_one(obj: SourceObject) -> IndexEntry:
        meta, stream = store.read(bucket, obj.key)
        blob_id = secrets.token_hex(16)
        written = writer.put_blob(blob_id, stream, confirm=False)
        if written.plain_bytes != obj.size:
            raise_changed(bucket, obj, written.plain_bytes)
        on_object(obj.size)
        return IndexEntry(
            key=obj.key,
            size=obj.size,
            etag=obj.etag,
            sha256=written.plain_sha256,
            content_type=meta.content_type,
            metadata=meta.metadata,
            blob=blob_id,
            blob_size=written.entry.size,
            blob_sha256=written.entry.sha256,
            listed_mtime=_trusted(obj, listed_at),
        )

    done = _run_parallel(upload, todo, workers)
    uploaded = [e for e, new in done if new]
    entries.extend(e for e, new in done if not new)
    entries.extend(uploaded)
    index = writer.put_snapshot_object(
        "minio", f"{bucket}.index", encode_index(entries), kind="minio_index"
    )
    return BucketResult(
        bucket=bucket,
        entries=entries,
        index=index.entry,
        uploaded=len(uploaded),
        uploaded_bytes=sum(e.size for e in uploaded),
        reused=len(entries) - len(uploaded),
        plain_bytes=sum(e.size for e in entries),
        headed=len(done) - len(uploaded),
        healed=healed,
    )


def _trusted(obj: SourceObject, listed_at: datetime) -> str:
    """``obj.last_modified`` if it may stand for "unchanged" next time, else "" (HEAD then).

    At the listing's one-second precision a change in the same second as the previous write
    would keep it: a LastModified within ``MTIME_SLACK`` of the listing is not trusted.
    """
    try:
        modified = datetime.fromisoformat(obj.last_modified)
    except ValueError:
        return ""
    if modified.tzinfo is None or listed_at - modified < MTIME_SLACK:
        return ""
    return obj.last_modified


def raise_changed(bucket: str, obj: SourceObject, got: int) -> None:
    """An object changed between listing and reading: fail rather than record a mismatch."""
    raise SourceError(
        f"minio {bucket}/{obj.key}: listed as {obj.size} bytes but read {got}; "
        "it changed during the backup, run it again"
    )


class _Budget:
    """Bytes that may be held at once; a request of more than all of it waits for all of it."""

    def __init__(self, limit: int) -> None:
        self._limit = self._free = limit
        self._turn = threading.Lock()  # one waiter at a time: small requests do not overtake
        self._changed = threading.Condition()

    @contextmanager
    def hold(self, size: int) -> Iterator[None]:
        """Hold ``size`` bytes (at most the whole budget) for the block."""
        size = min(size, self._limit)
        with self._turn, self._changed:
            self._changed.wait_for(lambda: self._free >= size)
            self._free -= size
        try:
            yield
        finally:
            with self._changed:
                self._free += size
                self._changed.notify_all()


def _run_parallel(fn: Callable[[_In], _Out], items: list[_In], workers: int) -> list[_Out]:
    """Apply ``fn`` with at most ``workers`` in flight; the first failure cancels the rest."""
    results: list[_Out] = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        pending: set[Future[_Out]] = set()
        for item in items:
            if len(pending) >= workers * 2:
                done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                _collect(done, results, pending)
            pending.add(pool.submit(fn, item))
        done, _ = wait(pending)
        _collect(done, results, set())
    return results


def _collect(done: set[Future[_Out]], results: list[_Out], pending: set[Future[_Out]]) -> None:
    for future in done:
        exc = future.exception()
        if exc is not None:
            for other in pending:
                other.cancel()
            raise exc
        results.append(future.result())
