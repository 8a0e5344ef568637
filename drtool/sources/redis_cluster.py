"""Redis Cluster as a source: its masters, each one's RDB, and fingerprints per shard and whole.

A cluster spreads its keys over 16384 slots, each owned by one master. The backup asks any
node for the topology (``CLUSTER SHARDS``, or ``CLUSTER SLOTS`` before Redis 7), fetches each
master's RDB over the replication protocol (:func:`drtool.sources.redis_rdb.fetch_rdb`, to a
file each, a bounded number at a time), and records the slot ranges and node ids. Each RDB is
one instant of its shard; the shards are fetched at slightly different instants, so the
snapshot is consistent per shard, not across shards.

A restore is key-level, so the target may have any shape: the shards' RDBs are merged into
one private redis-server (:func:`merged_redis`), whose keys are then copied to a single node
(the online restore) or to a cluster (:func:`copy_to_cluster`: each key RESTOREd on the master
that owns its slot now). The whole-cluster fingerprint is the sum of the shards' (the digest is
a sum over keys), so it equals the fingerprint of the merged server and of any target.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import redis
from redis.cluster import ClusterNode, RedisCluster

from drtool.endpoints import RedisEndpoint
from drtool.errors import SourceError, UsageError
from drtool.sources.redis_client import (
    CopyFailed,
    connect,
    copy_keys,
    ephemeral_redis,
    keyspace_dbs,
    redis_error,
    scan_batches,
)
from drtool.sources.redis_fingerprint import (
    MOD,
    DbFingerprint,
    RedisFingerprints,
    fingerprint_redis,
)
from drtool.sources.redis_rdb import RdbInfo, fetch_rdb

log = logging.getLogger(__name__)

PARALLEL = 2
"""RDBs fetched at once: each holds a socket and a 1 MiB buffer, and forks its master."""
BATCH = 500


@dataclass(frozen=True)
class Shard:
    """One master of the cluster and the slot ranges it owns."""

    node_id: str
    host: str
    port: int
    slots: tuple[tuple[int, int], ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "node_id": self.node_id,
            "host": self.host,
            "port": self.port,
            "slots": [list(r) for r in self.slots],
        }


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def discover(endpoint: RedisEndpoint, *, timeout: float = 30.0) -> list[Shard]:
    """The cluster's masters with their slots, from any node (sorted by first slot).

    Refuses a cluster whose slots are not all assigned (a backup would miss keys).
    """
    where = f"{endpoint.host}:{endpoint.port}"
    try:
        with closing(connect(endpoint, timeout=timeout)) as client:
            try:
                shards = _from_shards(client.execute_command("CLUSTER", "SHARDS"))
            except redis.ResponseError as exc:
                if "unknown subcommand" not in str(exc).lower():
                    raise
                shards = _from_slots(client.execute_command("CLUSTER", "SLOTS"))
    except redis.RedisError as exc:
        raise SourceError(f"Redis Cluster at {where}: {redis_error(exc)}") from None
    covered = sum(end - start + 1 for s in shards for start, end in s.slots)
    if covered != 16384:
        raise SourceError(
            f"Redis Cluster at {where}: its masters own {covered} of the 16384 slots; a backup "
            "would miss keys (fix the cluster: redis-cli --cluster check)"
        )
    return sorted(shards, key=lambda s: s.slots[0])


def _from_shards(reply: Any) -> list[Shard]:
    shards = []
    for shard in reply:
        entry = {_text(k): v for k, v in dict(shard).items()}
        flat = [int(x) for x in entry.get("slots", [])]
        ranges = tuple(zip(flat[::2], flat[1::2], strict=True))
        for node in entry.get("nodes", []):
            fields = {_text(k): v for k, v in dict(node).items()}
            if _text(fields.get("role")) == "master" and ranges:
                host = _text(fields.get("endpoint") or fields.get("ip"))
                shards.append(Shard(_text(fields["id"]), host, int(fields["port"]), ranges))
    return shards


def _from_slots(reply: Any) -> list[Shard]:
    by_node: dict[str, tuple[str, int, list[tuple[int, int]]]] = {}
    for start, end, master, *_ in reply:
        host, port, node_id = _text(master[0]), int(master[1]), _text(master[2])
        by_node.setdefault(node_id, (host, port, []))[2].append((int(start), int(end)))
    return [Shard(n, h, p, tuple(sorted(r))) for n, (h, p, r) in by_node.items()]


def node_endpoint(endpoint: RedisEndpoint, shard: Shard) -> RedisEndpoint:
    """The configured endpoint's credentials and TLS, at the shard's address."""
    return dataclasses.replace(endpoint, host=shard.host, port=shard.port, db=0)


def fetch_shards(
    endpoint: RedisEndpoint,
    shards: Sequence[Shard],
    directory: Path,
    *,
    timeout: float,
    parallel: int = PARALLEL,
) -> list[tuple[Path, RdbInfo]]:
    """Each master's RDB to ``directory/shard-<i>.rdb``, at most ``parallel`` at a time.

    The first failure is raised (naming the node) once the fetches running have ended.
    """

    def one(i: int, shard: Shard) -> tuple[Path, RdbInfo]:
        dest = directory / f"shard-{i}.rdb"
        try:
            return dest, fetch_rdb(node_endpoint(endpoint, shard), dest, timeout=timeout)
        except SourceError as exc:
            raise SourceError(
                f"shard {i} (node {shard.node_id[:12]}, {shard.host}:{shard.port}): {exc.message}"
            ) from None

    with ThreadPoolExecutor(max_workers=max(1, parallel), thread_name_prefix="rdb") as pool:
        futures = [pool.submit(one, i, s) for i, s in enumerate(shards)]
        return [f.result() for f in futures]


def combine(parts: Sequence[RedisFingerprints]) -> RedisFingerprints:
    """The fingerprint of the union of disjoint datasets (keys, types, TTLs and digests add)."""
    dbs: dict[int, DbFingerprint] = {}
    for part in parts:
        for db, f in part.dbs.items():
            have = dbs.get(db)
            if have is None:
                dbs[db] = f
                continue
            types = dict(have.types)
            for kind, n in f.types.items():
                types[kind] = types.get(kind, 0) + n
            digest = (int(have.digest, 16) + int(f.digest, 16)) % MOD
            dbs[db] = DbFingerprint(
                have.keys + f.keys,
                dict(sorted(types.items())),
                have.with_ttl + f.with_ttl,
                f"{digest:064x}",
            )
    return RedisFingerprints(dbs)


@contextmanager
def merged_redis(rdbs: Sequence[Path]) -> Iterator[redis.Redis]:
    """One private redis-server holding the keys of every shard's RDB (loaded one at a time)."""
    with ephemeral_redis(None) as merged:
        for rdb in rdbs:
            with ephemeral_redis(rdb) as shard:
                try:
                    copy_keys(shard, merged, replace=False)
                except CopyFailed as exc:
                    raise SourceError(f"merging shard {rdb.name}: {exc.message}") from None
        yield merged


def is_cluster(client: redis.Redis) -> bool:
    """Whether the server runs in cluster mode (INFO cluster)."""
    return bool(int(client.info("cluster").get("cluster_enabled", 0)))


def cluster_client(endpoint: RedisEndpoint, *, timeout: float = 60.0) -> RedisCluster:
    """A cluster client (it follows MOVED) from one node's address and the credentials."""
    return RedisCluster(
        startup_nodes=[ClusterNode(endpoint.host, endpoint.port)],
        username=endpoint.username,
        password=endpoint.password,
        ssl=endpoint.tls,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        decode_responses=False,
    )


def fingerprint_cluster(endpoint: RedisEndpoint) -> RedisFingerprints:
    """The whole cluster's fingerprint: the sum of its masters' (any node as the entry)."""
    return combine([fingerprint_redis(node_endpoint(endpoint, s)) for s in discover(endpoint)])


def cluster_keys(endpoint: RedisEndpoint) -> int:
    """Keys held by the cluster's masters."""
    total = 0
    for shard in discover(endpoint):
        with closing(connect(node_endpoint(endpoint, shard))) as client:
            total += sum(keyspace_dbs(client).values())
    return total


def copy_to_cluster(source: redis.Redis, target: RedisCluster, *, replace: bool) -> int:
    """Copy every key of ``source`` (db 0 only: a cluster has no other) to the cluster.

    The cluster pipeline sends each RESTORE to the master owning the key's slot; TTLs carry
    over; keys expiring meanwhile are skipped. A failure raises :class:`CopyFailed` naming
    the key, never its value.
    """
    dbs = keyspace_dbs(source)
    if set(dbs) - {0}:
        raise UsageError(
            f"the snapshot holds keys in db {sorted(set(dbs) - {0})}: a Redis Cluster has db 0 "
            "only; restore into a single node instead"
        )
    copied = 0
    for keys in scan_batches(source, BATCH):
        read = source.pipeline(transaction=False)
        for key in keys:
            read.dump(key)
            read.pttl(key)
        replies = read.execute()
        write = target.pipeline()
        sent: list[bytes] = []
        for key, payload, pttl in zip(keys, replies[::2], replies[1::2], strict=True):
            if payload is None or pttl in (0, -2):
                continue
            write.restore(key, 0 if pttl == -1 else pttl, payload, replace=replace)
            sent.append(key)
        try:
            results = write.execute(raise_on_error=False)
        except redis.RedisError as exc:
            raise CopyFailed(
                f"copying Redis keys into the cluster: {redis_error(exc)}", copied
            ) from None
        failed = [(k, r) for k, r in zip(sent, results, strict=True) if isinstance(r, Exception)]
        copied += len(sent) - len(failed)
        if failed:
            key, error = failed[0]
            name = repr(key)[:100]
            raise CopyFailed(
                f"RESTORE of key {name} into the cluster: {redis_error(error)}", copied
            )
    return copied


def remove_extra_in_cluster(source: redis.Redis, endpoint: RedisEndpoint) -> int:
    """Unlink, on each master, the keys the snapshot (``source``) does not have."""
    removed = 0
    for shard in discover(endpoint):
        with closing(connect(node_endpoint(endpoint, shard))) as node:
            for keys in scan_batches(node, BATCH):
                check = source.pipeline(transaction=False)
                for key in keys:
                    check.exists(key)
                extra = [k for k, f in zip(keys, check.execute(), strict=True) if not f]
                for key in extra:  # one by one: UNLINK of several keys must share a slot
                    removed += int(cast(int, node.unlink(key)))
    return removed
