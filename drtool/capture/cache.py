"""The capture's plaintext cache of captured objects on the backup host, per bucket.

It serves two readers: the capture itself (an object already captured with the same key,
ETag and size, whose blob is still stored, is not uploaded again: a round redone after a
kill re-journals it without a second upload) and the next MinIO backup, which merges these
entries into its previous index (drtool/stores/minio/store.py) so the nightly snapshot
reuses the captured blobs. It holds what the backup host holds anyway (keys and metadata of
the objects it reads); the repository only ever sees the sealed journal. Entries the MinIO
backup's own cache has taken over (same key, ETag and blob) are dropped from it, so it holds
about one day of captures.
"""

from __future__ import annotations

from pathlib import Path

from drtool.repository.minio_index import IndexEntry
from drtool.stores.minio.backup import captured_path, read_cache, write_cache

__all__ = ["captured_path", "read_captured", "taken_over", "write_captured"]


def read_captured(path: Path) -> dict[str, IndexEntry]:
    """The captured entries by key (empty when there is none or it is unreadable)."""
    return read_cache(path)


def write_captured(path: Path, entries: dict[str, IndexEntry]) -> None:
    """Replace the cache atomically."""
    write_cache(path, list(entries.values()))


def taken_over(captured: dict[str, IndexEntry], snapshot: dict[str, IndexEntry]) -> list[str]:
    """Keys whose captured entry the MinIO backup's cache now holds (same ETag and blob)."""
    return [
        key
        for key, e in captured.items()
        if (s := snapshot.get(key)) is not None and (s.etag, s.blob) == (e.etag, e.blob)
    ]
