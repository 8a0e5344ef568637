"""The signed, append-only WAL index: which WAL files the repository holds, and proof of it.

The index is a chain of chunks ``wal/index/<seq>-<first name>.json``, one per batch of
sealed files. Each chunk's body lists its entries (name, timeline, stored key, stored size and
sha256, plaintext size and sha256, sealed time), records the sha256 of the previous chunk's
stored bytes and is signed with the backup host's Ed25519 key like a manifest. A key-less
reader therefore proves which files exist and that none was altered, and a chunk removed from
the middle of the chain breaks it (``seq`` gap, ``previous_sha256`` mismatch). An entry, once
committed, is never rewritten: a second file of the same name with different bytes is an
integrity error, not a replacement.

The plaintext sha256 is in the clear: it lets a restarted streamer recognise a segment it
already stored (the ciphertext differs at every sealing) without the identity the backup host
must not hold. It confirms a guess of a whole 16 MiB segment, nothing more.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from drtool.errors import IntegrityError, NotFound
from drtool.repository import rotation
from drtool.repository.signed import open_body, sign_body
from drtool.storage.base import Storage
from drtool.wal.pruned import PrunedChain, load_pruned

INDEX_FORMAT = "drtool-wal-index/1"
WAL = "wal/"
INDEX_PREFIX = "wal/index/"


def object_key(name: str) -> str:
    """Where the sealed WAL file ``name`` is stored: ``wal/<timeline>/<name>.zst.age``."""
    return f"{WAL}{name[:8]}/{name}.zst.age"


def chunk_key(seq: int, first: str) -> str:
    """The key of index chunk ``seq`` whose first entry is ``first``."""
    return f"{INDEX_PREFIX}{seq:010d}-{first}.json"


@dataclass(frozen=True)
class WalEntry:
    """One sealed WAL file (a segment or a timeline history file)."""

    name: str
    kind: str  # "segment" | "history"
    timeline: int
    key: str
    size: int
    sha256: str
    plain_size: int
    plain_sha256: str
    sealed: str  # ISO 8601 UTC

    def mismatch(self, size: int, sha256: str) -> str | None:
        """Why stored bytes of ``size``/``sha256`` are not this object, or None."""
        if size != self.size:
            return f"{self.key}: stored size {size} differs from the WAL index ({self.size})"
        if sha256 != self.sha256:
            return f"{self.key}: stored sha256 differs from the WAL index"
        return None


@dataclass(frozen=True)
class IndexChunk:
    """The signed body of one index chunk."""

    repo_id: str
    seq: int
    previous_sha256: str | None
    created: str
    host: str
    segment_size: int
    entries: tuple[WalEntry, ...]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (what is signed)."""
        return {"format": INDEX_FORMAT, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, name: str) -> IndexChunk:
        """Rebuild a chunk body; IntegrityError when malformed."""
        try:
            if data.get("format") != INDEX_FORMAT:
                raise IntegrityError(f"{name}: WAL index format {data.get('format')!r} unknown")
            body = {k: v for k, v in data.items() if k not in ("format", "entries")}
            entries = tuple(WalEntry(**e) for e in data["entries"])
            return cls(**body, entries=entries)
        except (KeyError, TypeError) as exc:
            raise IntegrityError(f"{name}: WAL index chunk is malformed ({exc})") from None


def sign_chunk(chunk: IndexChunk, signing_key: Ed25519PrivateKey) -> bytes:
    """The stored form: the body and an Ed25519 signature over its canonical JSON."""
    return sign_body(chunk.to_dict(), signing_key)


def open_chunk(stored: bytes, verify_keys: list[str], *, name: str) -> IndexChunk:
    """Parse a stored chunk and verify its signature against any of ``verify_keys``."""
    body = open_body(stored, verify_keys, name=name, what="a WAL index chunk")
    return IndexChunk.from_dict(body, name=name)


@dataclass
class WalIndex:
    """The whole index as read: entries by name, the chain's end, and what is wrong with it."""

    repo_id: str
    entries: dict[str, WalEntry] = field(default_factory=dict)
    segment_size: int | None = None
    last_seq: int = 0
    last_sha256: str | None = None
    chunks: int = 0
    problems: list[str] = field(default_factory=list)
    #: names a signed removal record (drtool/wal/pruned.py) says prune removed: not expected
    removed: dict[str, str] = field(default_factory=dict)

    def add(self, chunk: IndexChunk, *, key: str) -> None:
        """Take a chunk's entries; a name seen before with other bytes is a problem."""
        if self.segment_size is None:
            self.segment_size = chunk.segment_size
        elif chunk.segment_size != self.segment_size:
            self.problems.append(
                f"{key}: segment size {chunk.segment_size} differs from the index's "
                f"{self.segment_size}"
            )
        for entry in chunk.entries:
            seen = self.entries.get(entry.name)
            if seen is None:
                self.entries[entry.name] = entry
            elif seen.plain_sha256 != entry.plain_sha256:
                self.problems.append(f"{key}: {entry.name} recorded twice with different content")

    def segments(self) -> list[WalEntry]:
        """Segment entries (history files excluded)."""
        return [e for e in self.entries.values() if e.kind == "segment"]


def _seq_of(key: str) -> int | None:
    stem = key[len(INDEX_PREFIX) :].split("-", 1)[0]
    return int(stem) if stem.isdigit() and key.endswith(".json") else None


def load_index(storage: Storage, verify_keys: list[str], repo_id: str) -> WalIndex:
    """Read and check every chunk: signatures, the repository, and an unbroken chain.

    Problems are collected (``WalIndex.problems``) so verify can name them all; the streamer
    refuses to append to an index with any. Storage errors raise.
    """
    index = WalIndex(repo_id)
    found = sorted(
        (seq, obj.key) for obj in storage.list(INDEX_PREFIX) if (seq := _seq_of(obj.key))
    )
    expected_previous: str | None = None
    for position, (seq, key) in enumerate(found, start=1):
        if seq != position:
            index.problems.append(
                f"{key}: WAL index chunk {seq} found where {position} was expected "
                "(a chunk is missing or duplicated)"
            )
        try:
            stored = storage.get_bytes(key)
        except NotFound:
            index.problems.append(f"{key}: listed but gone")
            continue
        try:
            chunk = open_chunk(stored, verify_keys, name=key)
        except IntegrityError as exc:
            index.problems.append(str(exc))
            expected_previous = hashlib.sha256(stored).hexdigest()
            continue
        if chunk.repo_id != repo_id:
            index.problems.append(f"{key}: belongs to repository {chunk.repo_id}, not {repo_id}")
        if chunk.seq != seq:
            index.problems.append(f"{key}: records sequence {chunk.seq}, stored as {seq}")
        if chunk.previous_sha256 != expected_previous:
            index.problems.append(
                f"{key}: does not follow the previous chunk (previous_sha256 mismatch)"
            )
        index.add(chunk, key=key)
        expected_previous = hashlib.sha256(stored).hexdigest()
        index.last_seq, index.last_sha256 = seq, expected_previous
        index.chunks += 1
    rotated = rotation.load_map(storage, verify_keys, repo_id)  # ADR 0023: headers rewritten
    for name, entry in index.entries.items():
        size, sha256 = rotated.current(entry.key, entry.size, entry.sha256)
        if (size, sha256) != (entry.size, entry.sha256):
            index.entries[name] = replace(entry, size=size, sha256=sha256)
    _apply_removals(index, load_pruned(storage, verify_keys, repo_id))
    return index


def _apply_removals(index: WalIndex, pruned: PrunedChain) -> None:
    """Drop what signed removal records name; their problems become the index's."""
    index.problems += pruned.problems
    for name, record in pruned.removed.items():
        if index.entries.pop(name, None) is not None:
            index.removed[name] = record


def append_chunk(
    storage: Storage,
    index: WalIndex,
    entries: list[WalEntry],
    *,
    signing_key: Ed25519PrivateKey,
    host: str,
    created: str,
    segment_size: int,
    retain_until: datetime | None = None,
) -> str:
    """Commit ``entries`` as the next chunk; the in-memory index follows. Returns its key.

    ``retain_until``: the chunk's Object Lock retention (as long as the files it names).

    Refuses to overwrite: an existing chunk with the next sequence number means another
    writer appended (two streamers on one repository), which this one must not hide.
    """
    seq = index.last_seq + 1
    chunk = IndexChunk(
        repo_id=index.repo_id,
        seq=seq,
        previous_sha256=index.last_sha256,
        created=created,
        host=host,
        segment_size=segment_size,
        entries=tuple(entries),
    )
    key = chunk_key(seq, entries[0].name)
    if any(True for _ in storage.list(f"{INDEX_PREFIX}{seq:010d}-")):
        raise IntegrityError(
            f"{key}: WAL index chunk {seq} already exists; another streamer writes to this "
            "repository (run only one `drtool wal stream` per repository)"
        )
    stored = sign_chunk(chunk, signing_key)
    storage.put_bytes(key, stored, retain_until=retain_until)
    index.add(chunk, key=key)
    index.last_seq, index.last_sha256 = seq, hashlib.sha256(stored).hexdigest()
    index.chunks += 1
    return key
