"""The index of a MinIO bucket snapshot: one JSON line per object, sorted by key.

It is part of the repository format (written by backup, read by restore, verify and drills):
each line maps an object's key to its content blob, size, sha256, content type and metadata.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields

from drtool.repository import layout
from drtool.repository.manifest import ObjectEntry


@dataclass(frozen=True)
class IndexEntry:
    """One object of a bucket snapshot."""

    key: str
    size: int
    etag: str
    sha256: str
    content_type: str
    metadata: dict[str, str]
    blob: str
    blob_size: int
    blob_sha256: str
    listed_mtime: str = ""
    """The source listing's LastModified, when trusted for reuse. Not part of the repository
    format: only the backup host's cache of the last index keeps it (see ``encode_index``)."""

    def blob_entry(self) -> ObjectEntry:
        """The manifest entry of this object's blob."""
        return ObjectEntry(layout.blob_key(self.blob), "blob", self.blob_size, self.blob_sha256)


def encode_index(entries: list[IndexEntry], *, with_mtime: bool = False) -> Iterator[bytes]:
    """JSON lines, sorted by key (``listed_mtime`` only ``with_mtime``: the host's cache)."""
    for entry in sorted(entries, key=lambda e: e.key):
        doc = asdict(entry)
        if not with_mtime:
            del doc["listed_mtime"]
        yield json.dumps(doc, ensure_ascii=False, sort_keys=True).encode() + b"\n"


_FIELDS = {f.name for f in fields(IndexEntry)}


def decode_index(data: bytes) -> list[IndexEntry]:
    """Parse an index written by ``encode_index`` (fields a newer writer added are ignored)."""
    out = []
    for line in data.splitlines():
        if line.strip():
            doc = json.loads(line)
            out.append(IndexEntry(**{k: v for k, v in doc.items() if k in _FIELDS}))
    return out
