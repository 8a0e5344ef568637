"""The index of a MinIO bucket snapshot: one JSON line per object, sorted by key.

It is part of the repository format (written by backup, read by restore, verify and drills):
each line maps an object's key to its content blob, size, sha256, content type and metadata.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass

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

    def blob_entry(self) -> ObjectEntry:
        """The manifest entry of this object's blob."""
        return ObjectEntry(layout.blob_key(self.blob), "blob", self.blob_size, self.blob_sha256)


def encode_index(entries: list[IndexEntry]) -> Iterator[bytes]:
    """JSON lines, sorted by key."""
    for entry in sorted(entries, key=lambda e: e.key):
        yield json.dumps(asdict(entry), ensure_ascii=False, sort_keys=True).encode() + b"\n"


def decode_index(data: bytes) -> list[IndexEntry]:
    """Parse an index written by ``encode_index``."""
    return [IndexEntry(**json.loads(line)) for line in data.splitlines() if line.strip()]
