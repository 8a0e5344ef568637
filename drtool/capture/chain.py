"""The capture journal in the repository: sealed journals, proved by a signed chain.

Each round that captured something writes two objects (and a round that captured nothing
writes them as a heartbeat, an empty journal, at most every few minutes, so a quiet period
still proves the capture was following):

* ``capture/journal/<seq:010d>.jsonl.zst.age``: the captured entries (capture time, bucket,
  key, ETag, size, sha256, content type, metadata, blob id, blob size and sha256), one JSON
  line each, sealed like every object (age to the repository's recipients; its inner header
  binds it to its slot), so keys and metadata are unreadable without an identity;
* ``capture/chain/<seq:010d>.json``: the plaintext record that commits it, signed with the
  backup host's Ed25519 key: the repository, its sequence number, the sha256 of the previous
  record's stored bytes, the journal's key, size and sha256, and every blob it names with
  size and sha256. A key-less reader proves with it that no journal or blob is missing or
  altered, and a removed record breaks the chain (a sequence gap, a previous_sha256
  mismatch). Prune keeps every blob a record names (:func:`referenced_blobs`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from drtool.errors import IntegrityError, NotFound
from drtool.pipeline.header import InnerHeader
from drtool.repository import layout, rotation
from drtool.repository.manifest import ObjectEntry
from drtool.repository.signed import open_body, sign_body
from drtool.storage.base import Storage

CHAIN_FORMAT = "drtool-capture-chain/1"
CAPTURE = "capture/"
CHAIN_PREFIX = "capture/chain/"
JOURNAL_PREFIX = "capture/journal/"
PRUNED_KEY = "capture/pruned.json"
PRUNED_FORMAT = "drtool-capture-pruned/1"
COMPONENT = "capture"
JOURNAL_KIND = "capture_journal"


def chain_key(seq: int) -> str:
    """The key of chain record ``seq``."""
    return f"{CHAIN_PREFIX}{seq:010d}.json"


def journal_key(seq: int) -> str:
    """The key of the journal record ``seq`` commits."""
    return f"{JOURNAL_PREFIX}{seq:010d}.jsonl.zst.age"


def journal_header(repo_id: str, seq: int) -> InnerHeader:
    """The inner header binding journal ``seq`` to its slot (a swapped journal fails)."""
    return InnerHeader(repo_id, f"capture-{seq:010d}", COMPONENT, JOURNAL_KIND)


@dataclass(frozen=True)
class Captured:
    """One captured object, as the (sealed) journal records it."""

    captured_at: str  # ISO 8601 UTC: when its bytes were read
    bucket: str
    key: str
    etag: str
    size: int
    sha256: str
    content_type: str
    metadata: dict[str, str]
    blob: str
    blob_size: int
    blob_sha256: str


def encode_journal(entries: Iterable[Captured]) -> Iterator[bytes]:
    """JSON lines, in capture order."""
    for e in entries:
        yield json.dumps(asdict(e), ensure_ascii=False, sort_keys=True).encode() + b"\n"


def decode_journal(data: bytes, *, name: str) -> list[Captured]:
    """Parse a decrypted journal; IntegrityError when malformed."""
    try:
        return [Captured(**json.loads(line)) for line in data.splitlines() if line.strip()]
    except (ValueError, TypeError) as exc:
        raise IntegrityError(f"{name}: capture journal is malformed ({exc})") from None


@dataclass(frozen=True)
class Stored:
    """An object as a chain record names it: key, stored size and sha256."""

    key: str
    size: int
    sha256: str

    def entry(self, kind: str) -> ObjectEntry:
        """As a manifest-style entry (for the readers that check stored bytes)."""
        return ObjectEntry(self.key, kind, self.size, self.sha256)


@dataclass(frozen=True)
class ChainRecord:
    """The signed body of one chain record."""

    repo_id: str
    seq: int
    previous_sha256: str | None
    created: str
    host: str
    bucket: str
    journal: Stored
    blobs: tuple[Stored, ...]
    first_captured: str
    last_captured: str
    #: the round had caught up: no full batch left rows unread, no id or object still owed;
    #: only such a round proves every row committed before ``created`` was read. None: a
    #: record written before this was recorded (proves nothing about coverage).
    caught_up: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (what is signed)."""
        body = {"format": CHAIN_FORMAT, **asdict(self)}
        if body["caught_up"] is None:  # as an older drtool wrote it
            del body["caught_up"]
        return body

    @property
    def proves_coverage(self) -> bool:
        """Every attachment row committed before ``created`` was read by this round."""
        return self.caught_up is True

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, name: str) -> ChainRecord:
        """Rebuild a record body; IntegrityError when malformed."""
        try:
            if data.get("format") != CHAIN_FORMAT:
                raise IntegrityError(f"{name}: capture chain format {data.get('format')!r} unknown")
            body = {k: v for k, v in data.items() if k not in ("format", "journal", "blobs")}
            return cls(
                **body,
                journal=Stored(**data["journal"]),
                blobs=tuple(Stored(**b) for b in data["blobs"]),
            )
        except (KeyError, TypeError) as exc:
            raise IntegrityError(f"{name}: capture chain record is malformed ({exc})") from None


def sign_record(record: ChainRecord, signing_key: Ed25519PrivateKey) -> bytes:
    """The stored form of a record (body and Ed25519 signature)."""
    return sign_body(record.to_dict(), signing_key)


def open_record(stored: bytes, verify_keys: list[str], *, name: str) -> ChainRecord:
    """Parse a stored record and verify its signature against any of ``verify_keys``."""
    body = open_body(stored, verify_keys, name=name, what="a capture chain record")
    return ChainRecord.from_dict(body, name=name)


@dataclass(frozen=True)
class Pruned:
    """The signed marker ``capture/pruned.json``: records up to ``upto_seq`` were removed.

    The chain then starts at ``upto_seq + 1``, whose ``previous_sha256`` must be
    ``upto_sha256``: a removed head is told from a deleted one by this signature alone.
    """

    repo_id: str
    upto_seq: int
    upto_sha256: str
    created: str
    host: str

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (what is signed)."""
        return {"format": PRUNED_FORMAT, **asdict(self)}


def read_pruned(storage: Storage, verify_keys: list[str], repo_id: str) -> Pruned | None:
    """The marker, checked; None when the chain was never pruned."""
    try:
        stored = storage.get_bytes(PRUNED_KEY)
    except NotFound:
        return None
    body = open_body(stored, verify_keys, name=PRUNED_KEY, what="a capture prune marker")
    try:
        if body.get("format") != PRUNED_FORMAT:
            raise IntegrityError(f"{PRUNED_KEY}: format {body.get('format')!r} unknown")
        marker = Pruned(**{k: v for k, v in body.items() if k != "format"})
    except TypeError as exc:
        raise IntegrityError(f"{PRUNED_KEY}: malformed ({exc})") from None
    if marker.repo_id != repo_id:
        raise IntegrityError(f"{PRUNED_KEY}: belongs to repository {marker.repo_id}")
    return marker


@dataclass
class Chain:
    """The chain as read: its records in order, its end, and what is wrong with it."""

    repo_id: str
    records: list[tuple[str, ChainRecord]] = field(default_factory=list)
    last_seq: int = 0
    last_sha256: str | None = None
    problems: list[str] = field(default_factory=list)
    rotated: rotation.RotationMap = field(default_factory=rotation.RotationMap)

    def current(self, entry: Captured) -> Captured:
        """A journal entry with its blob's stored size and sha256 after key rotations."""
        size, sha256 = self.rotated.current(
            layout.blob_key(entry.blob), entry.blob_size, entry.blob_sha256
        )
        if (size, sha256) == (entry.blob_size, entry.blob_sha256):
            return entry
        return replace(entry, blob_size=size, blob_sha256=sha256)


def _seq_of(key: str) -> int | None:
    stem = key[len(CHAIN_PREFIX) :].removesuffix(".json")
    return int(stem) if stem.isdigit() and key.endswith(".json") else None


def load_chain(storage: Storage, verify_keys: list[str], repo_id: str) -> Chain:
    """Read and check every record: signatures, the repository, an unbroken chain.

    Problems are collected so ``capture verify`` names them all; the capture refuses to
    append to a chain with any. Storage errors raise.
    """
    chain = Chain(repo_id)
    try:
        pruned = read_pruned(storage, verify_keys, repo_id)
    except IntegrityError as exc:
        chain.problems.append(str(exc))
        pruned = None
    start = pruned.upto_seq if pruned else 0
    found = sorted(
        (seq, o.key)
        for o in storage.list(CHAIN_PREFIX)
        if (seq := _seq_of(o.key)) is not None and seq > start  # older: a prune's leftovers
    )
    expected_previous: str | None = pruned.upto_sha256 if pruned else None
    chain.last_seq, chain.last_sha256 = start, expected_previous
    for position, (seq, key) in enumerate(found, start=start + 1):
        if seq != position:
            chain.problems.append(
                f"{key}: capture chain record {seq} found where {position} was expected "
                "(a record is missing or duplicated)"
            )
        try:
            stored = storage.get_bytes(key)
        except NotFound:
            chain.problems.append(f"{key}: listed but gone")
            continue
        digest = hashlib.sha256(stored).hexdigest()
        try:
            record = open_record(stored, verify_keys, name=key)
        except IntegrityError as exc:
            chain.problems.append(str(exc))
            expected_previous = digest
            continue
        if record.repo_id != repo_id:
            chain.problems.append(f"{key}: belongs to repository {record.repo_id}, not {repo_id}")
        if record.seq != seq:
            chain.problems.append(f"{key}: records sequence {record.seq}, stored as {seq}")
        if record.previous_sha256 != expected_previous:
            chain.problems.append(
                f"{key}: does not follow the previous record (previous_sha256 mismatch)"
            )
        if record.journal.key != journal_key(seq):
            chain.problems.append(f"{key}: names journal {record.journal.key}, not its own")
        chain.records.append((key, record))
        expected_previous = digest
        chain.last_seq, chain.last_sha256 = seq, digest
    chain.rotated = rotation.load_map(storage, verify_keys, repo_id)  # ADR 0023
    chain.records = [(key, _current(record, chain.rotated)) for key, record in chain.records]
    return chain


def _current(record: ChainRecord, rotated: rotation.RotationMap) -> ChainRecord:
    """The record with the stored size and sha256 its objects have after key rotations.

    A rotation rewrites only the age header of the journal and the blobs; the signed record
    keeps naming the bytes it was written with, and the rotation's signed records say what
    they became (as for manifests and the WAL index).
    """

    def now(s: Stored) -> Stored:
        size, sha256 = rotated.current(s.key, s.size, s.sha256)
        return s if (size, sha256) == (s.size, s.sha256) else replace(s, size=size, sha256=sha256)

    return replace(record, journal=now(record.journal), blobs=tuple(now(b) for b in record.blobs))


def append_record(
    storage: Storage,
    chain: Chain,
    record: ChainRecord,
    stored: bytes,
    *,
    retain_until: datetime | None = None,
) -> None:
    """Write the next record (never over an existing one); the chain's end follows."""
    key = chain_key(record.seq)
    if storage.exists(key):
        raise IntegrityError(
            f"{key}: already exists; another `drtool capture run` is writing to this "
            "repository (run one per repository)"
        )
    storage.put_bytes(key, stored, retain_until=retain_until)
    chain.last_seq, chain.last_sha256 = record.seq, hashlib.sha256(stored).hexdigest()


def referenced_blobs(storage: Storage) -> set[str]:
    """Every blob key an authentic chain record names: prune keeps them.

    A record that does not verify names nothing trusted, but its blobs are kept too (as
    prune keeps an invalid snapshot's data): it is evidence, not garbage.
    """
    keys: set[str] = set()
    for o in storage.list(CHAIN_PREFIX):
        try:
            stored = storage.get_bytes(o.key)
            data = json.loads(stored)["body"]
            keys.update(b["key"] for b in data["blobs"])
        except (NotFound, ValueError, KeyError, TypeError):
            continue
    return keys
