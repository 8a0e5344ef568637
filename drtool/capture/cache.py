"""The capture's plaintext cache of captured objects on the backup host, per bucket.

It serves two readers: the capture itself (an object already captured with the same key,
ETag and size, whose blob is still stored, is not uploaded again: a round redone after a
kill re-journals it without a second upload) and the next MinIO backup, which merges these
entries into its previous index (drtool/stores/minio/store.py) so the nightly snapshot
reuses the captured blobs. It holds what the backup host holds anyway (keys and metadata of
the objects it reads); the repository only ever sees the sealed journal. Entries the MinIO
backup's own cache has taken over (same key, ETag and blob) are dropped from it, so it holds
about one day of captures.

Each round appends its entries (one fsync), so a round costs what it captured, not what the
file holds: the capture reads back only the lines after the offset its last saved state
recorded (the entries of rounds that never committed: the ones a redone round may find),
and the whole file, with the MinIO backup's cache, only when that cache changed (once per
backup) to drop what the snapshot took over.
"""

from __future__ import annotations

import os
from pathlib import Path

from drtool.repository.minio_index import IndexEntry, decode_index, encode_index
from drtool.stores.minio.backup import captured_path, read_cache, write_cache

__all__ = [
    "append_captured",
    "captured_path",
    "read_captured",
    "read_tail",
    "taken_over",
    "write_captured",
]


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


def append_captured(path: Path, entries: list[IndexEntry]) -> int:
    """Append ``entries`` (flushed to disk); the file's size after.

    A line torn by a kill mid-append is cut off first: every reader parses the file whole.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab+") as f:
        end = f.seek(0, os.SEEK_END)
        start = max(0, end - 65536)  # a line is a few KiB at most (key, metadata)
        f.seek(start)
        tail = f.read()
        if tail and not tail.endswith(b"\n"):
            f.truncate(start + tail.rfind(b"\n") + 1)
        f.write(b"".join(encode_index(entries)))
        f.flush()
        os.fsync(f.fileno())
        return f.tell()


def size_of(path: Path) -> int:
    """The file's size (0 when absent)."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def read_tail(path: Path, offset: int) -> dict[str, IndexEntry]:
    """The entries after byte ``offset`` (all of them when the file is shorter: rewritten)."""
    try:
        with open(path, "rb") as f:
            if offset > os.fstat(f.fileno()).st_size:
                offset = 0
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return {}
    data = data[: data.rfind(b"\n") + 1]  # a line torn by a kill is not an entry
    try:
        return {e.key: e for e in decode_index(data)}
    except (ValueError, TypeError):
        return {}  # damaged: those objects are read again, nothing is lost
