"""Signed records of WAL removed by ``prune``: the other half of the append-only WAL index.

The index (drtool/wal/index.py) has one writer, the streamer, and is never rewritten. Retention
(``drtool prune``, docs/decisions/0017-pitr-restore-and-wal-retention.md) removes WAL older
than the oldest kept base backup; it records what it removes in its own chain,
``wal/pruned/<seq>.json``, each record signed with the backup host's key like a manifest, and
written BEFORE the objects are deleted. A reader applies the records to the index: a removed
name is no longer expected to exist, so a key-less ``wal verify`` still proves every other
file. Someone who can delete objects but lacks the signing key cannot make a removal look
planned (the segment shows up as missing), and deleting a record makes its segments show up
as missing: loud, never silent. A separate chain (not chunks in the index) means prune never
races the streamer for the index's next sequence number.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from drtool.errors import IntegrityError, NotFound
from drtool.repository.signed import open_body, sign_body
from drtool.storage.base import Storage

PRUNED_FORMAT = "drtool-wal-pruned/1"
PRUNED_PREFIX = "wal/pruned/"


def record_key(seq: int) -> str:
    """The key of removal record ``seq``."""
    return f"{PRUNED_PREFIX}{seq:010d}.json"


@dataclass(frozen=True)
class PrunedRecord:
    """One prune's WAL removal: which files, and the base backup whose start kept the rest."""

    repo_id: str
    seq: int
    previous_sha256: str | None
    created: str
    host: str
    floor_segment: str  # the oldest kept base backup's start segment: everything from it stays
    base_snapshot: str
    removed: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (what is signed)."""
        return {"format": PRUNED_FORMAT, **asdict(self)}


def _open(stored: bytes, verify_keys: list[str], *, name: str) -> PrunedRecord:
    body = open_body(stored, verify_keys, name=name, what="a WAL removal record")
    try:
        if body.get("format") != PRUNED_FORMAT:
            raise IntegrityError(f"{name}: WAL removal format {body.get('format')!r} unknown")
        fields = {k: v for k, v in body.items() if k not in ("format", "removed")}
        return PrunedRecord(**fields, removed=tuple(str(n) for n in body["removed"]))
    except (KeyError, TypeError) as exc:
        raise IntegrityError(f"{name}: WAL removal record is malformed ({exc})") from None


@dataclass
class PrunedChain:
    """Every removal record as read: the names removed, the chain's end, its problems."""

    removed: dict[str, str]  # WAL file name -> the record key that removed it
    last_seq: int = 0
    last_sha256: str | None = None
    problems: tuple[str, ...] = ()


def load_pruned(storage: Storage, verify_keys: list[str], repo_id: str) -> PrunedChain:
    """Read and check the removal records (signature, repository, unbroken chain)."""
    chain = PrunedChain({})
    problems: list[str] = []
    found = sorted(
        obj.key
        for obj in storage.list(PRUNED_PREFIX)
        if obj.key.endswith(".json") and obj.key[len(PRUNED_PREFIX) : -5].isdigit()
    )
    for position, key in enumerate(found, start=1):
        seq = int(key[len(PRUNED_PREFIX) : -5])
        if seq != position:
            problems.append(f"{key}: WAL removal record {seq} found where {position} was expected")
        try:
            stored = storage.get_bytes(key)
        except NotFound:
            problems.append(f"{key}: listed but gone")
            continue
        digest = hashlib.sha256(stored).hexdigest()
        try:
            record = _open(stored, verify_keys, name=key)
        except IntegrityError as exc:
            problems.append(str(exc))
            chain.last_sha256 = digest
            continue
        if record.repo_id != repo_id:
            problems.append(f"{key}: belongs to repository {record.repo_id}, not {repo_id}")
            continue
        if record.previous_sha256 != chain.last_sha256:
            problems.append(f"{key}: does not follow the previous removal record")
        for name in record.removed:
            chain.removed[name] = key
        chain.last_seq, chain.last_sha256 = seq, digest
    chain.problems = tuple(problems)
    return chain


def append_pruned(
    storage: Storage,
    chain: PrunedChain,
    *,
    repo_id: str,
    signing_key: Ed25519PrivateKey,
    host: str,
    created: str,
    floor_segment: str,
    base_snapshot: str,
    removed: list[str],
) -> str:
    """Commit one removal record (before the objects are deleted). Returns its key."""
    seq = chain.last_seq + 1
    record = PrunedRecord(
        repo_id, seq, chain.last_sha256, created, host, floor_segment, base_snapshot, tuple(removed)
    )
    key = record_key(seq)
    if storage.exists(key):
        raise IntegrityError(f"{key}: WAL removal record {seq} already exists (a second prune?)")
    stored = sign_body(record.to_dict(), signing_key)
    storage.put_bytes(key, stored)
    for name in removed:
        chain.removed[name] = key
    chain.last_seq, chain.last_sha256 = seq, hashlib.sha256(stored).hexdigest()
    return key
