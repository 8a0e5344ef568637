"""Restore-side Redis primitives: an ephemeral server holding an RDB, and a key copier.

``ephemeral_redis`` loads an RDB into a private ``redis-server`` (loopback, random password,
temp dir, no persistence) and always stops it. ``copy_keys`` moves every key of every db to
any reachable Redis with pipelined DUMP/RESTORE, keeping TTLs. The ephemeral server's
version must not be newer than the target's: RESTORE rejects a newer DUMP format.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import cast

import redis

from drtool.endpoints import RedisEndpoint
from drtool.errors import SourceError
from drtool.runtime.redisserver import RedisServer

POLL_SECONDS = 0.05


def connect(
    endpoint: RedisEndpoint, *, timeout: float | None = None, decode: bool = False
) -> redis.Redis:
    """A client for ``endpoint`` (bytes replies unless ``decode``; socket ``timeout`` in s)."""
    return redis.Redis(
        host=endpoint.host,
        port=endpoint.port,
        db=endpoint.db,
        username=endpoint.username,
        password=endpoint.password,
        ssl=endpoint.tls,
        decode_responses=decode,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
    )


def keyspace_dbs(client: redis.Redis) -> dict[int, int]:
    """Keys per db index, for every db that has keys (from INFO keyspace)."""
    info = client.info("keyspace")
    return {int(name[2:]): int(stats["keys"]) for name, stats in info.items() if stats["keys"]}


@contextmanager
def client_for_db(client: redis.Redis, db: int) -> Iterator[redis.Redis]:
    """A client on the same server and credentials as ``client``, bound to ``db``, bytes replies."""
    pool = client.connection_pool
    kwargs = {**pool.connection_kwargs, "db": db, "decode_responses": False}
    own = redis.ConnectionPool(connection_class=pool.connection_class, **kwargs)
    try:
        yield redis.Redis(connection_pool=own)
    finally:
        own.disconnect()


def target_is_empty(client: redis.Redis) -> bool:
    """True when no db of the server holds a key."""
    return not keyspace_dbs(client)


def _wait_loaded(client: redis.Redis, timeout: float) -> None:
    """Wait until INFO persistence says ``loading:0`` (the exact field, not async_loading)."""
    deadline = time.monotonic() + timeout
    while client.info("persistence")["loading"] != 0:
        if time.monotonic() > deadline:
            raise SourceError(f"ephemeral redis-server still loading after {timeout:g}s")
        time.sleep(POLL_SECONDS)


@contextmanager
def ephemeral_redis(
    rdb_path: Path | None, *, binary: Path | None = None, start_timeout: float = 600.0
) -> Iterator[redis.Redis]:
    """Load ``rdb_path`` (None: nothing) into a private redis-server, yield a client; stop it.

    The server (:class:`RedisServer`: a free 127.0.0.1 port, a random password in its config
    file, no persistence, the current user) lives in a temp dir removed afterwards. A server
    that cannot load the RDB exits: that raises SourceError with its log tail. Started empty,
    it is where a logical dump is loaded (:mod:`drtool.sources.redis_logical`).
    """
    rdb = Path(rdb_path).resolve() if rdb_path is not None else None
    if rdb is not None and not rdb.is_file():
        raise SourceError(f"RDB file {rdb_path} not found")
    workdir = Path(tempfile.mkdtemp(prefix="drtool-redis-"))
    try:
        server = RedisServer(workdir / "server", binary=binary)
        server.rdb_path.parent.mkdir(mode=0o700, parents=True)
        if rdb is not None:
            server.rdb_path.symlink_to(rdb)
        server.start(timeout=start_timeout)  # stops the server again if it fails
        try:
            with contextlib.closing(connect(server.endpoint)) as client:
                _wait_loaded(client, start_timeout)
                yield client
        finally:
            server.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def scan_batches(client: redis.Redis, count: int, kind: str | None = None) -> Iterator[list[bytes]]:
    """The keys (of type ``kind``, if given) of the client's db, a SCAN reply at a time.

    SCAN may repeat a key.
    """
    cursor = 0
    while True:
        cursor, keys = client.scan(cursor, count=count, _type=kind)
        if keys:
            yield cast(list[bytes], keys)
        if cursor == 0:
            return


class CopyFailed(SourceError):
    """Copying keys stopped part-way: the keys written so far stay written."""

    def __init__(self, message: str, copied: int) -> None:
        super().__init__(message)
        self.copied = copied


def redis_error(exc: BaseException) -> str:
    """The server's (or client's) message of ``exc`` without the command that caused it.

    redis-py annotates a failed pipeline command with its arguments ("Command # 3 (RESTORE
    key 0 <payload> ...) of pipeline caused error: ..."), and a payload is user data: errors
    name keys, objects and offsets, never values.
    """
    text = _ANNOTATION.sub("", " ".join(str(exc).split()))[:300]
    # redis-py strips the error code of the replies it maps to a class (OOM, NOPERM, ...)
    kind = type(exc).__name__
    if kind in ("ResponseError", "RedisError"):
        return text or kind
    return f"{kind}: {text}" if text else kind


_ANNOTATION = re.compile(r"^Command # \d+ \(.*\) of pipeline caused error: ", re.DOTALL)


def _name(key: bytes) -> str:
    text = repr(key)
    return text if len(text) <= 100 else text[:97] + "..."


def _copy_db(source: redis.Redis, target: redis.Redis, replace: bool, batch: int) -> int:
    """DUMP + PTTL from the source, RESTORE into the target, one pipelined batch at a time.

    Keys that vanished or are expiring at this instant are skipped (their absence is what a
    client would see); the TTL carries over.
    """
    copied = 0
    for keys in scan_batches(source, batch):
        read = source.pipeline(transaction=False)
        for key in keys:
            read.dump(key)
            read.pttl(key)
        replies = read.execute()
        write = target.pipeline(transaction=False)
        sent: list[bytes] = []
        for key, payload, pttl in zip(keys, replies[::2], replies[1::2], strict=True):
            if payload is None or pttl in (0, -2):  # gone or expiring right now
                continue
            write.restore(key, 0 if pttl == -1 else pttl, payload, replace=replace)
            sent.append(key)
        results = write.execute(raise_on_error=False)
        failed = [(k, r) for k, r in zip(sent, results, strict=True) if isinstance(r, Exception)]
        copied += len(sent) - len(failed)
        if failed:
            key, exc = failed[0]
            more = f" (and {len(failed) - 1} more keys of the batch)" if len(failed) > 1 else ""
            raise CopyFailed(f"RESTORE of key {_name(key)}{more}: {redis_error(exc)}", copied)
    return copied


def copy_keys(src: redis.Redis, dst: redis.Redis, *, replace: bool, batch: int = 500) -> int:
    """Copy every key of every db from ``src`` to ``dst`` keeping TTLs; return keys copied.

    Pipelined DUMP + PTTL on the source, RESTORE [REPLACE] on the target. Keys that expire
    meanwhile are skipped. Without ``replace`` an existing target key fails the copy. A
    failure raises :class:`CopyFailed` naming the key (never its value) and how many keys
    were written before it.
    """
    copied = 0
    for db in keyspace_dbs(src):
        with client_for_db(src, db) as source, client_for_db(dst, db) as target:
            try:
                copied += _copy_db(source, target, replace, batch)
            except CopyFailed as exc:
                raise CopyFailed(
                    f"copying Redis keys of db {db} failed: {exc.message}", copied + exc.copied
                ) from None
            except redis.RedisError as exc:
                raise CopyFailed(
                    f"copying Redis keys of db {db} failed: {redis_error(exc)}", copied
                ) from None
    return copied


def save_as_rdb(client: redis.Redis, dest: Path) -> Path:
    """SAVE a private server's keys (an ephemeral one, same host) and copy its RDB to ``dest``.

    How a logical dump or merged cluster shards become the RDB an offline restore places.
    """
    try:
        config = client.config_get("dir")
        config.update(client.config_get("dbfilename"))
        client.save()
    except redis.RedisError as exc:
        raise SourceError(
            f"saving the loaded snapshot as an RDB failed: {redis_error(exc)}"
        ) from None
    saved = Path(_text(config["dir"])) / _text(config["dbfilename"])
    tmp = dest.with_name(f".{dest.name}.part")
    shutil.copyfile(saved, tmp)
    tmp.replace(dest)
    return dest


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
