"""Redis without the replication protocol: a key-level logical dump (SCAN + DUMP + PTTL).

Managed services (ElastiCache, Memorystore, Azure Cache) and ACLs that deny ``sync``/``psync``
refuse the RDB fetch of :mod:`drtool.sources.redis_rdb`. What a client may still do is read
every key: SCAN each db, and for each batch of keys one MULTI/EXEC of ``DUMP`` + ``PTTL`` per
key, so a key's value and its TTL are read at the same instant. The dump is therefore
**consistent per key, not per instant**: keys written or deleted while the scan runs may or
may not be in it, and two keys changed together by a client may be seen one before and one
after the change. The manifest and the restore report say so (ADR 0021).

The payloads are Redis's own DUMP format (RDB-encoded value, RDB version, CRC64), so a
restore is ``RESTORE key ttl payload REPLACE ABSTTL`` and the server checks each payload.
The dump streams to a scratch file (temp name, fsync, rename) one batch at a time: memory is
bounded by a batch of keys, never by the dataset. It is checked and fingerprinted the way an
RDB is: loaded into a private empty redis-server (:func:`logical_redis`), which RESTOREs every
payload (a damaged one is refused there, before any target is touched).

File format (docs/FORMAT.md, "Redis logical dump"), all integers big-endian::

    magic "DRTRLOGI" | version u16 (=1) | header_len u32 | header (JSON, UTF-8)
    per key:  "K" | db u16 | key_len u32 | key | expire_at i64 (Unix ms, -1 = none)
              | payload_len u64 | payload (the key's DUMP)
    end:      "E" | records u64

The end record guards against truncation; nothing may follow it. SCAN may return a key
twice: both records are kept and the later one wins on load (RESTORE ... REPLACE).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import tempfile
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import redis

from drtool.endpoints import RedisEndpoint
from drtool.errors import SourceError
from drtool.sources.redis_client import (
    client_for_db,
    connect,
    ephemeral_redis,
    keyspace_dbs,
    redis_error,
    save_as_rdb,
    scan_batches,
)

log = logging.getLogger(__name__)

MAGIC = b"DRTRLOGI"
VERSION = 1
FORMAT = f"drtool-redis-logical/{VERSION}"
BATCH = 500
"""Keys per SCAN reply and per MULTI/EXEC: the memory bound is one batch of DUMP payloads."""
LOAD_BYTES = 16 << 20
"""Payload bytes queued per RESTORE pipeline while loading."""
MAX_KEY = 512 << 20  # Redis's own limit on a key's length

PERMISSIONS = "the backup user needs +scan +dump +pttl +info +multi +exec (or +@read)"

_START = struct.Struct(">8sHI")
_KEY_HEAD = struct.Struct(">HI")
_EXPIRE_LEN = struct.Struct(">qQ")
_END = struct.Struct(">Q")


@dataclass(frozen=True)
class LogicalInfo:
    """What a written logical dump is: size and sha256 of the file, records, server version."""

    size: int
    sha256: str
    records: int
    redis_version: str


@dataclass(frozen=True)
class Record:
    """One key of a logical dump."""

    db: int
    key: bytes
    expire_at: int  # Unix ms, -1 = no TTL
    payload: bytes


class _Sink:
    """Writes, hashes and counts the file's bytes."""

    def __init__(self, fh: BinaryIO) -> None:
        self._fh = fh
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> None:
        self.sha.update(data)
        self.size += len(data)
        self._fh.write(data)


def _name(key: bytes) -> str:
    """A key for a message: its repr, cut at 100 characters (a key, never a value)."""
    text = repr(key)
    return text if len(text) <= 100 else text[:97] + "..."


def dump_logical(
    endpoint: RedisEndpoint, dest: Path, *, timeout: float, batch: int = BATCH
) -> LogicalInfo:
    """Write a logical dump of every db of ``endpoint`` to ``dest``; never a partial file.

    ``timeout`` bounds the whole dump (checked between batches) and each command.
    """
    where = f"{endpoint.host}:{endpoint.port}"
    dest = Path(dest)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    except OSError as exc:
        raise SourceError(
            f"cannot write the logical dump to {dest.parent}: {exc.strerror}"
        ) from None
    tmp = Path(tmp_name)
    deadline = time.monotonic() + timeout
    try:
        with os.fdopen(fd, "wb") as fh, closing(connect(endpoint, timeout=timeout)) as client:
            sink = _Sink(fh)
            version = _server_version(client)
            header = json.dumps(
                {"redis_version": version, "started_ms": int(time.time() * 1000)},
                sort_keys=True,
            ).encode()
            sink.write(_START.pack(MAGIC, VERSION, len(header)) + header)
            records = 0
            for db in sorted(keyspace_dbs(client)):
                with client_for_db(client, db) as bound:
                    for keys in scan_batches(bound, batch):
                        if time.monotonic() > deadline:
                            raise SourceError(
                                f"Redis logical dump of {where} timed out after {timeout:g}s"
                            )
                        records += _dump_batch(bound, db, keys, sink)
            sink.write(b"E" + _END.pack(records))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
    except redis.RedisError as exc:
        tmp.unlink(missing_ok=True)
        raise SourceError(
            f"Redis logical dump of {where} failed: {redis_error(exc)}"
            + (f"; {PERMISSIONS}" if "NoPermission" in type(exc).__name__ else "")
        ) from None
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise SourceError(
            f"cannot write the logical dump to {dest.parent}: {exc.strerror}"
        ) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return LogicalInfo(sink.size, sink.sha.hexdigest(), records, version or "unknown")


def probe_logical(endpoint: RedisEndpoint, *, timeout: float = 30.0) -> str:
    """Check that a logical dump's commands are permitted, reading at most one key; the version.

    INFO, SCAN, and DUMP + PTTL of one key in MULTI/EXEC when the server holds any.
    """
    where = f"{endpoint.host}:{endpoint.port}"
    try:
        with closing(connect(endpoint, timeout=timeout)) as client:
            version = _server_version(client)
            for db in sorted(keyspace_dbs(client))[:1]:
                with client_for_db(client, db) as bound:
                    _, keys = bound.scan(0, count=10)
                    if keys:
                        pipe = bound.pipeline(transaction=True)
                        pipe.dump(keys[0])
                        pipe.pttl(keys[0])
                        pipe.execute()
            return version
    except redis.RedisError as exc:
        raise SourceError(
            f"Redis logical dump of {where} not permitted: {redis_error(exc)}; {PERMISSIONS}"
        ) from None


def _server_version(client: redis.Redis) -> str:
    """``redis_version`` from INFO server (INFO keyspace is needed anyway)."""
    return str(client.info("server").get("redis_version", ""))


def _dump_batch(client: redis.Redis, db: int, keys: list[bytes], sink: _Sink) -> int:
    """DUMP + PTTL of ``keys`` in one MULTI/EXEC; write a record per key that still exists.

    A key deleted since SCAN returned it (DUMP nil, PTTL -2) or expiring at this instant
    (PTTL 0) is left out: its absence is what a client would see.
    """
    read = client.pipeline(transaction=True)
    for key in keys:
        read.dump(key)
        read.pttl(key)
    replies = read.execute()
    now_ms = int(time.time() * 1000)
    written = 0
    for key, payload, pttl in zip(keys, replies[::2], replies[1::2], strict=True):
        if payload is None or pttl in (0, -2):
            continue
        expire_at = -1 if pttl == -1 else now_ms + int(pttl)
        sink.write(b"K" + _KEY_HEAD.pack(db, len(key)) + key)
        sink.write(_EXPIRE_LEN.pack(expire_at, len(payload)) + payload)
        written += 1
    return written


class DumpDamaged(SourceError):
    """A logical dump file is not one: wrong magic or version, truncated, or trailing bytes."""


def read_records(path: Path) -> Iterator[Record]:
    """Every record of the logical dump at ``path``, checked structurally as it is read.

    Raises :class:`DumpDamaged` naming the offset (never a value) on a bad magic, an unknown
    version or record tag, a length past the end of the file, a missing end record, a record
    count that differs from the end record's, or bytes after it.
    """
    size = path.stat().st_size
    with path.open("rb") as fh:
        start = fh.read(_START.size)
        if len(start) < _START.size:
            raise DumpDamaged(f"{path}: not a drtool Redis logical dump (too short)")
        magic, version, header_len = _START.unpack(start)
        if magic != MAGIC:
            raise DumpDamaged(
                f"{path}: not a drtool Redis logical dump (no {MAGIC.decode()} magic)"
            )
        if version != VERSION:
            raise DumpDamaged(
                f"{path}: Redis logical dump format version {version}; this drtool reads {VERSION}"
            )
        _exact(fh, header_len, size, path, "header")
        records = 0
        while True:
            offset = fh.tell()
            tag = fh.read(1)
            if tag == b"E":
                (count,) = _END.unpack(_exact(fh, _END.size, size, path, "end record"))
                if count != records:
                    raise DumpDamaged(
                        f"{path}: the end record counts {count} keys, the file holds {records}"
                    )
                if fh.read(1):
                    raise DumpDamaged(f"{path}: bytes after the end record at {fh.tell() - 1}")
                return
            if tag != b"K":
                what = "no end record (truncated)" if not tag else f"unknown record {tag!r}"
                raise DumpDamaged(f"{path}: {what} at offset {offset}")
            db, key_len = _KEY_HEAD.unpack(_exact(fh, _KEY_HEAD.size, size, path, "record"))
            if key_len > MAX_KEY:
                raise DumpDamaged(f"{path}: impossible key length at offset {offset}")
            key = _exact(fh, key_len, size, path, "key")
            expire_at, payload_len = _EXPIRE_LEN.unpack(
                _exact(fh, _EXPIRE_LEN.size, size, path, "record")
            )
            payload = _exact(fh, payload_len, size, path, f"value of key {_name(key)}")
            records += 1
            yield Record(db, key, expire_at, payload)


def _exact(fh: BinaryIO, n: int, size: int, path: Path, what: str) -> bytes:
    """``n`` bytes, or DumpDamaged when the file ends first (checked before reading)."""
    at = fh.tell()
    if at + n > size:
        raise DumpDamaged(f"{path}: truncated: the {what} at offset {at} runs past the end")
    return fh.read(n)


def load_into(client: redis.Redis, path: Path) -> int:
    """RESTORE every live record of ``path`` into ``client``'s server (REPLACE, ABSTTL).

    Records whose TTL has passed are skipped, as a server loading an RDB does. A payload the
    server refuses (checksum, RDB version) raises :class:`DumpDamaged` naming the key. Returns
    the records restored.
    """
    restored = 0
    with _Loader(client, path) as loader:
        for record in read_records(path):
            restored += loader.add(record)
    return restored


class _Loader:
    """Pipelines RESTOREs per db, bounded by :data:`LOAD_BYTES` of queued payloads."""

    def __init__(self, client: redis.Redis, path: Path) -> None:
        self._client = client
        self._path = path
        self._clients: dict[int, redis.Redis] = {}
        self._pending: list[Record] = []
        self._bytes = 0

    def __enter__(self) -> _Loader:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if exc[0] is None:
                self._flush()
        finally:
            for bound in self._clients.values():
                bound.connection_pool.disconnect()

    def add(self, record: Record) -> int:
        if record.expire_at != -1 and record.expire_at <= int(time.time() * 1000):
            return 0
        if self._pending and record.db != self._pending[0].db:
            self._flush()
        self._pending.append(record)
        self._bytes += len(record.payload)
        if self._bytes >= LOAD_BYTES or len(self._pending) >= BATCH:
            self._flush()
        return 1

    def _bound(self, db: int) -> redis.Redis:
        if db not in self._clients:
            kwargs = {**self._client.connection_pool.connection_kwargs, "db": db}
            kwargs["decode_responses"] = False
            pool = redis.ConnectionPool(
                connection_class=self._client.connection_pool.connection_class, **kwargs
            )
            self._clients[db] = redis.Redis(connection_pool=pool)
        return self._clients[db]

    def _flush(self) -> None:
        if not self._pending:
            return
        batch, self._pending, self._bytes = self._pending, [], 0
        db = batch[0].db
        write = self._bound(db).pipeline(transaction=False)
        for r in batch:
            write.restore(r.key, max(r.expire_at, 0), r.payload, replace=True, absttl=True)
        for r, reply in zip(batch, write.execute(raise_on_error=False), strict=True):
            if isinstance(reply, Exception):
                raise DumpDamaged(
                    f"{self._path}: the value of key {_name(r.key)} of db {db} was refused: "
                    f"{redis_error(reply)}"
                )


@contextmanager
def logical_redis(
    path: Path, *, binary: Path | None = None, start_timeout: float = 600.0
) -> Iterator[redis.Redis]:
    """A private redis-server holding the logical dump at ``path`` (like ``ephemeral_redis``).

    Loading checks the whole dump: its structure here, each payload's CRC in the server.
    """
    if not Path(path).is_file():
        raise SourceError(f"logical dump {path} not found")
    with ephemeral_redis(None, binary=binary, start_timeout=start_timeout) as client:
        try:
            load_into(client, Path(path))
        except redis.RedisError as exc:
            raise SourceError(
                f"loading the logical dump {path} into a private redis-server failed: "
                f"{redis_error(exc)}"
            ) from None
        yield client


def logical_to_rdb(path: Path, dest: Path) -> Path:
    """Load the logical dump at ``path`` and SAVE it as the RDB ``dest`` (for an offline
    restore, which places an RDB as the server's data file)."""
    with logical_redis(path) as client:
        return save_as_rdb(client, dest)
