"""Integrity fingerprints of a Redis dataset: keys per db and type, and a content digest.

The digest of a db is order-independent: the sum (mod 2**256) of one sha256 per key over
(db, key, type, canonical value). Canonical values: string bytes; list elements in order;
set members, hash field/value pairs and zset member/score pairs (score as ``repr(float)``) as
an order-independent sum; stream entries in id order. Raw DUMP bytes are not canonical (set
member order changes after a reload), so they are used only for types this module does not
know. TTLs change by the second: only the number of keys with a TTL is recorded, counted like
the keys (PTTL of each key read; INFO keyspace's ``expires`` also counts expired keys a server
has not reclaimed yet, and two servers reclaim at their own pace).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import redis

from drtool.endpoints import RedisEndpoint
from drtool.errors import SourceError
from drtool.sources.redis_client import (
    client_for_db,
    connect,
    ephemeral_redis,
    keyspace_dbs,
    redis_error,
    scan_batches,
)

SCAN_COUNT = 1000
PAGE = 1000
"""Elements read per command from one collection: memory stays bounded by the page."""

MOD = 1 << 256


@dataclass(frozen=True)
class DbFingerprint:
    """The fingerprint of one Redis db."""

    keys: int
    types: dict[str, int]
    with_ttl: int
    digest: str


@dataclass(frozen=True)
class RedisFingerprints:
    """Fingerprints of every db that holds keys, by db index."""

    dbs: dict[int, DbFingerprint]

    def to_dict(self) -> dict[str, Any]:
        """A plain, JSON-ready dict."""
        return {
            "dbs": {
                str(db): {
                    "keys": f.keys,
                    "types": dict(f.types),
                    "with_ttl": f.with_ttl,
                    "digest": f.digest,
                }
                for db, f in sorted(self.dbs.items())
            }
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RedisFingerprints:
        """The inverse of ``to_dict``."""
        return cls(
            {
                int(db): DbFingerprint(
                    int(f["keys"]),
                    {str(k): int(v) for k, v in f["types"].items()},
                    int(f["with_ttl"]),
                    str(f["digest"]),
                )
                for db, f in data["dbs"].items()
            }
        )


def compare(expected: RedisFingerprints, actual: RedisFingerprints) -> list[str]:
    """Differences between two fingerprints, one line each; empty when they match."""
    problems: list[str] = []
    for db in sorted(expected.dbs.keys() | actual.dbs.keys()):
        want, got = expected.dbs.get(db), actual.dbs.get(db)
        if want is None or got is None:
            problems.append(
                f"db {db}: {got.keys if got else 0} keys, expected {want.keys if want else 0}"
            )
            continue
        if got.keys != want.keys:
            problems.append(f"db {db}: {got.keys} keys, expected {want.keys}")
        for kind in sorted(want.types.keys() | got.types.keys()):
            have, need = got.types.get(kind, 0), want.types.get(kind, 0)
            if have != need:
                problems.append(f"db {db}: {have} {kind} keys, expected {need}")
        if got.with_ttl != want.with_ttl:
            problems.append(f"db {db}: {got.with_ttl} keys with a TTL, expected {want.with_ttl}")
        if got.digest != want.digest:
            problems.append(f"db {db}: content digest differs")
    return problems


def _frame(part: bytes) -> bytes:
    return len(part).to_bytes(8, "big") + part


def _hash(*parts: bytes) -> bytes:
    return hashlib.sha256(b"".join(_frame(p) for p in parts)).digest()


class _Unordered:
    """Order-independent digest of distinct elements (SCAN may repeat one: counted once)."""

    def __init__(self) -> None:
        self._seen: set[bytes] = set()
        self._sum = 0

    def add(self, *parts: bytes) -> None:
        digest = _hash(*parts)
        if digest not in self._seen:
            self._seen.add(digest)
            self._sum = (self._sum + int.from_bytes(digest, "big")) % MOD

    def digest(self) -> bytes:
        return self._sum.to_bytes(32, "big")


def _queue_first_read(pipe: Any, kind: str, key: bytes) -> None:
    """Queue the first page of a collection (or the DUMP of an unknown type)."""
    if kind == "list":
        pipe.lrange(key, 0, PAGE - 1)
    elif kind == "set":
        pipe.sscan(key, 0, count=PAGE)
    elif kind == "zset":
        pipe.zscan(key, 0, count=PAGE)
    elif kind == "hash":
        pipe.hscan(key, 0, count=PAGE)
    elif kind == "stream":
        pipe.xrange(key, "-", "+", count=PAGE)
    else:
        pipe.dump(key)


def _list_digest(client: redis.Redis, key: bytes, items: list[bytes]) -> bytes:
    digest, start = hashlib.sha256(), 0
    while True:
        digest.update(b"".join(_frame(item) for item in items))
        if len(items) < PAGE:
            return digest.digest()
        start += PAGE
        items = cast(list[bytes], client.lrange(key, start, start + PAGE - 1))


def _stream_digest(client: redis.Redis, key: bytes, entries: list[Any]) -> bytes:
    digest = hashlib.sha256()
    while True:
        for entry_id, fields in entries:
            flat = [part for pair in fields.items() for part in pair]
            digest.update(_hash(entry_id, *flat))
        if len(entries) < PAGE:
            return digest.digest()
        entries = cast(list[Any], client.xrange(key, b"(" + entries[-1][0], "+", count=PAGE))


def _scanned_digest(client: redis.Redis, kind: str, key: bytes, reply: Any) -> bytes:
    """An order-independent digest of a big set, sorted set or hash, read page by page.

    SCAN returns members in no fixed order (and may repeat one), so the digest combines
    per-member hashes instead of hashing a sorted list that would have to fit in memory.
    """
    acc = _Unordered()
    scans: dict[str, Callable[..., Any]] = {
        "set": client.sscan,
        "zset": client.zscan,
        "hash": client.hscan,
    }
    scan = scans[kind]
    while True:
        cursor, items = reply
        if kind == "set":
            for member in items:
                acc.add(member)
        elif kind == "zset":
            for member, score in items:
                acc.add(member, repr(float(score)).encode())
        else:
            for field, value in items.items():
                acc.add(field, value)
        if cursor == 0:
            return acc.digest()
        reply = scan(key, cursor, count=PAGE)


def _value_digest(client: redis.Redis, kind: str, key: bytes, reply: Any) -> bytes | None:
    """The canonical value digest of one key, reading further pages; None when it vanished."""
    if reply is None:
        return None
    if kind == "list":
        return _list_digest(client, key, reply)
    if kind == "stream":
        return _stream_digest(client, key, reply)
    if kind in ("set", "zset", "hash"):
        return _scanned_digest(client, kind, key, reply)
    return _hash(reply)  # a string's bytes, or the DUMP of an unknown type


def _first_reads(
    client: redis.Redis, keys: list[bytes], kinds: list[str], cluster: bool = False
) -> list[Any]:
    """The first read of every key: one MGET for the strings, a pipeline for the rest.

    A cluster node refuses an MGET across slots (CROSSSLOT): there each string is a GET in
    the pipeline.
    """
    batched = not cluster
    strings = [key for key, kind in zip(keys, kinds, strict=True) if kind == "string"]
    values = iter(client.mget(strings) if strings and batched else [])
    pipe = client.pipeline(transaction=False)
    for key, kind in zip(keys, kinds, strict=True):
        if kind == "string" and not batched:
            pipe.get(key)
        elif kind not in ("string", "none"):
            _queue_first_read(pipe, kind, key)
    others = iter(pipe.execute())
    return [
        None if kind == "none" else next(values) if kind == "string" and batched else next(others)
        for kind in kinds
    ]


KINDS = ("string", "list", "set", "zset", "hash", "stream")


def _fingerprint_db(
    client: redis.Redis, db: int, modules: bool, cluster: bool = False
) -> DbFingerprint:
    """One SCAN per type (SCAN's TYPE filter), so no per-key TYPE round trip is needed.

    Keys of module types (only when modules are loaded) are found by a last untyped pass.
    """
    types: dict[str, int] = {}
    total = count = with_ttl = 0
    tag = str(db).encode()

    def add(keys: list[bytes], kinds: list[str]) -> None:
        nonlocal total, count, with_ttl
        replies = _first_reads(client, keys, kinds, cluster)
        pipe = client.pipeline(transaction=False)
        for key in keys:
            pipe.pttl(key)
        ttls = pipe.execute()
        for key, kind, reply, ttl in zip(keys, kinds, replies, ttls, strict=True):
            value = _value_digest(client, kind, key, reply)
            if value is None:
                continue
            count += 1
            with_ttl += int(ttl) >= 0
            types[kind] = types.get(kind, 0) + 1
            total = (total + int.from_bytes(_hash(tag, key, kind.encode(), value), "big")) % MOD

    for kind in KINDS:
        for keys in scan_batches(client, SCAN_COUNT, kind):
            add(keys, [kind] * len(keys))
    if modules:
        for keys in scan_batches(client, SCAN_COUNT):
            pipe = client.pipeline(transaction=False)
            for key in keys:
                pipe.type(key)
            found = [k.decode() for k in pipe.execute()]
            other = [
                (key, kind) for key, kind in zip(keys, found, strict=True) if kind not in KINDS
            ]
            if other:
                add([key for key, _ in other], [kind for _, kind in other])
    return DbFingerprint(count, dict(sorted(types.items())), with_ttl, f"{total:064x}")


def fingerprint_redis(target: redis.Redis | RedisEndpoint) -> RedisFingerprints:
    """Fingerprint every db with keys of a live server (a client or an endpoint)."""
    client = target if isinstance(target, redis.Redis) else connect(target)
    try:
        dbs: dict[int, DbFingerprint] = {}
        modules = bool(client.execute_command("MODULE", "LIST"))
        cluster = bool(int(client.info("cluster").get("cluster_enabled", 0)))
        for db in keyspace_dbs(client):
            with client_for_db(client, db) as bound:
                dbs[db] = _fingerprint_db(bound, db, modules, cluster)
        return RedisFingerprints(dbs)
    except (redis.ResponseError, redis.ConnectionError) as exc:
        raise SourceError(f"fingerprinting Redis failed: {redis_error(exc)}") from None
    finally:
        if client is not target:
            client.close()


def fingerprint_rdb(path: Path, *, redis_server_binary: Path | None = None) -> RedisFingerprints:
    """Load ``path`` into an ephemeral redis-server and fingerprint it (loading validates it)."""
    with ephemeral_redis(path, binary=redis_server_binary) as client:
        return fingerprint_redis(client)
