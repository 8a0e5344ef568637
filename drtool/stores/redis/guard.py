"""Guards of the online Redis restore: does the snapshot fit, and a way back when it fails.

A live Redis with ``maxmemory`` refuses writes past the limit (``noeviction``: the copy stops
at OOM half-written) or evicts keys to make room (the ``allkeys-*``/``volatile-*`` policies:
the copy "succeeds" with keys missing). Both are decided before the target is touched:

- :func:`measure_target` reads every key the target holds now (read-only): it writes each
  one's DUMP payload and absolute expiry to a pre-restore copy on local disk (streamed, so
  memory stays bounded), and sums ``MEMORY USAGE`` of those keys the snapshot replaces;
- :func:`check_fit` compares the peak the copy reaches — what the target uses now, minus the
  keys it replaces, plus the snapshot's dataset as the ephemeral server holding it reports
  (``used_memory - used_memory_startup``) — with ``maxmemory`` less a margin, and refuses
  with the figures and the ways out when it does not fit.

When the copy fails part-way anyway (a connection lost, a permission denied, the estimate
wrong), :func:`put_back` removes the snapshot's keys from the target and RESTOREs the copy's
keys (REPLACE, ABSTTL), so the target holds what it held before; keys the target alone had
and those other clients added meanwhile are left as they are. When that fails too, the copy
stays on disk and the error names it.

The copy's format (all integers big-endian): per key ``db:u16 key_len:u32 key pexpire_at:i64
(-1 = none) payload_len:u32 payload`` where payload is the key's DUMP; it can be replayed with
RESTORE ... ABSTTL by any client.
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import redis

from drtool.errors import SourceError, UsageError
from drtool.sources.redis_client import client_for_db, keyspace_dbs, redis_error, scan_batches

log = logging.getLogger(__name__)

BATCH = 500
MARGIN = 0.05
"""Part of ``maxmemory`` left free: allocator fragmentation, client and replication buffers."""

_HEAD = struct.Struct(">HI")
_TTL_LEN = struct.Struct(">qI")
MIB = 1 << 20


@dataclass(frozen=True)
class TargetMemory:
    """What the target uses and allows, from INFO memory and stats."""

    used: int
    maxmemory: int
    policy: str
    evicted: int


@dataclass(frozen=True)
class PreRestoreCopy:
    """The target's keys before the restore, on local disk, and what the snapshot replaces."""

    path: Path
    keys: int
    replaced_bytes: int


def target_memory(client: redis.Redis) -> TargetMemory:
    """The target's memory figures (INFO memory, INFO stats)."""
    mem = client.info("memory")
    stats = client.info("stats")
    return TargetMemory(
        int(mem["used_memory"]),
        int(mem.get("maxmemory", 0)),
        str(mem.get("maxmemory_policy", "noeviction")),
        int(stats.get("evicted_keys", 0)),
    )


def dataset_bytes(source: redis.Redis) -> int:
    """Memory the snapshot's keys take in the ephemeral server that holds it."""
    mem = source.info("memory")
    return max(0, int(mem["used_memory"]) - int(mem["used_memory_startup"]))


def measure_target(source: redis.Redis, target: redis.Redis, path: Path) -> PreRestoreCopy:
    """Write the target's keys to ``path`` and sum the memory of those the snapshot replaces.

    Read-only on the target. A key that vanishes between SCAN and DUMP is skipped.
    """
    keys = replaced = 0
    fd = path.open("xb")
    path.chmod(0o600)
    with fd as out:
        for db in keyspace_dbs(target):
            with client_for_db(source, db) as src, client_for_db(target, db) as dst:
                for batch in scan_batches(dst, BATCH):
                    read = dst.pipeline(transaction=False)
                    for key in batch:
                        read.dump(key)
                        read.pttl(key)
                        read.memory_usage(key)
                    replies = read.execute(raise_on_error=False)
                    exists = src.pipeline(transaction=False)
                    for key in batch:
                        exists.exists(key)
                    in_snapshot = exists.execute()
                    now_ms = int(time.time() * 1000)
                    for i, key in enumerate(batch):
                        payload, pttl, usage = replies[3 * i : 3 * i + 3]
                        if isinstance(payload, Exception) or payload is None:
                            if isinstance(payload, Exception):
                                raise SourceError(
                                    f"reading key {_name(key)} of db {db} for the pre-restore "
                                    f"copy failed: {redis_error(payload)}; nothing changed"
                                )
                            continue
                        expire_at = -1 if pttl == -1 else now_ms + max(int(pttl), 1)
                        out.write(_HEAD.pack(db, len(key)) + key)
                        out.write(_TTL_LEN.pack(expire_at, len(payload)) + payload)
                        keys += 1
                        if in_snapshot[i] and isinstance(usage, int):
                            replaced += usage
    return PreRestoreCopy(path, keys, replaced)


def check_fit(
    where: str, mem: TargetMemory, snapshot_bytes: int, copy: PreRestoreCopy | None
) -> None:
    """Refuse (nothing changed) when the copy's peak would pass ``maxmemory`` less the margin."""
    if mem.maxmemory <= 0:
        return
    replaced = copy.replaced_bytes if copy else 0
    peak = mem.used - replaced + snapshot_bytes
    room = int(mem.maxmemory * (1 - MARGIN))
    if peak <= room:
        return
    effect = (
        "the restore would stop half-way with OOM errors"
        if mem.policy == "noeviction"
        else f"it would evict keys while restoring (maxmemory-policy {mem.policy})"
    )
    raise UsageError(
        f"{where}: the snapshot does not fit: its keys take {_mib(snapshot_bytes)}, the target "
        f"uses {_mib(mem.used)} (of which the snapshot replaces {_mib(replaced)}), so it would "
        f"reach {_mib(peak)} against maxmemory {_mib(mem.maxmemory)} less a "
        f"{MARGIN:.0%} margin; {effect}. Nothing changed: raise maxmemory "
        f"(CONFIG SET maxmemory, at least {_mib(int(peak / (1 - MARGIN)) + 1)}), "
        "or empty the target first"
    )


def put_back(source: redis.Redis, target: redis.Redis, copy: PreRestoreCopy | None) -> int:
    """Undo a part-way copy: unlink the snapshot's keys, RESTORE the copy's; return keys back."""
    for db in keyspace_dbs(target):
        with client_for_db(source, db) as src, client_for_db(target, db) as dst:
            for batch in scan_batches(dst, BATCH):
                check = src.pipeline(transaction=False)
                for key in batch:
                    check.exists(key)
                ours = [k for k, found in zip(batch, check.execute(), strict=True) if found]
                if ours:
                    dst.unlink(*ours)
    if copy is None:
        return 0
    back = 0
    with copy.path.open("rb") as fh, ExitStack() as stack:
        clients: dict[int, redis.Redis] = {}
        pending: list[tuple[int, bytes, int, bytes]] = []
        for record in _records(fh):
            if pending and (len(pending) >= BATCH or record[0] != pending[0][0]):
                back += _restore_batch(clients, stack, target, pending)
                pending = []
            pending.append(record)
        if pending:
            back += _restore_batch(clients, stack, target, pending)
    return back


def _restore_batch(
    clients: dict[int, redis.Redis],
    stack: ExitStack,
    target: redis.Redis,
    batch: list[tuple[int, bytes, int, bytes]],
) -> int:
    """RESTORE one db's records (REPLACE, ABSTTL); skip those that would have expired."""
    db = batch[0][0]
    if db not in clients:
        clients[db] = stack.enter_context(client_for_db(target, db))
    now_ms = int(time.time() * 1000)
    live = [r for r in batch if r[2] == -1 or r[2] > now_ms]
    write = clients[db].pipeline(transaction=False)
    for _, key, expire_at, payload in live:
        write.restore(key, max(expire_at, 0), payload, replace=True, absttl=True)
    for (_, key, _, _), reply in zip(live, write.execute(raise_on_error=False), strict=True):
        if isinstance(reply, Exception):
            raise SourceError(f"key {_name(key)} of db {db}: {redis_error(reply)}")
    return len(live)


def _records(fh: BinaryIO) -> Iterator[tuple[int, bytes, int, bytes]]:
    while head := fh.read(_HEAD.size):
        db, key_len = _HEAD.unpack(head)
        key = fh.read(key_len)
        expire_at, payload_len = _TTL_LEN.unpack(fh.read(_TTL_LEN.size))
        yield db, key, expire_at, fh.read(payload_len)


def _name(key: bytes) -> str:
    """A key for a message: its repr, cut at 100 characters (a key, never a value)."""
    text = repr(key)
    return text if len(text) <= 100 else text[:97] + "..."


def _mib(n: int) -> str:
    return f"{n / MIB:.1f} MiB"
