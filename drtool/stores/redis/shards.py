"""Each master of a running Redis Cluster against the fingerprints of the shard whose slot
ranges it owns.

One rule for every place that checks a cluster per shard — the nodes started after an offline
restore (:func:`drtool.stores.redis.cluster_offline.compare_started`) and a drill's scratch
cluster (:mod:`drtool.drills.cluster`): a master that lacks exactly as many keys as lacked a
TTL has had them expire since the fingerprints were taken (:func:`only_expired`); that is
counted, not failed, as the single-server restores and the staged-shard check do.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from drtool.endpoints import RedisEndpoint
from drtool.sources.redis_client import connect
from drtool.sources.redis_cluster import discover, node_endpoint
from drtool.sources.redis_fingerprint import RedisFingerprints, compare, fingerprint_redis
from drtool.stores.redis.restore import only_expired

Ranges = tuple[tuple[int, int], ...]


def format_ranges(ranges: Ranges) -> str:
    """``0-5460,5461-10922``."""
    return ",".join(f"{a}-{b}" for a, b in ranges)


@dataclass(frozen=True)
class ShardCheck:
    """One shard's master compared with the shard's fingerprints."""

    index: int
    ranges: Ranges
    master: RedisEndpoint | None  # None: no master owns exactly these ranges
    keys: int = 0  # the master's keys
    expired: int = 0  # keys with a TTL gone since the fingerprints (counted, not failed)
    problems: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        """``shard 1 (slots 5461-10922)``."""
        return f"shard {self.index} (slots {format_ranges(self.ranges)})"


def masters_by_slots(
    endpoint: RedisEndpoint, *, ready: bool, timeout: float = 5.0
) -> dict[Ranges, RedisEndpoint] | None:
    """Each master's endpoint by its slot ranges; with ``ready``, None while a master says
    ``cluster_state`` is not ok or is still loading its RDB (nodes being started)."""
    masters = {}
    for shard in discover(endpoint, timeout=timeout):
        node = node_endpoint(endpoint, shard)
        if ready:
            with connect(node, timeout=timeout, decode=True) as client:
                if client.cluster("info")["cluster_state"] != "ok":
                    return None
                if int(client.info("persistence")["loading"]):
                    return None
        masters[tuple(sorted(shard.slots))] = node
    return masters


def check_shards(
    masters: dict[Ranges, RedisEndpoint],
    expected: Sequence[tuple[Ranges, RedisFingerprints]],
    where: str,
) -> list[ShardCheck]:
    """Each expected shard against the master of ``where`` owning exactly its ranges."""
    checks = []
    for i, (ranges, prints) in enumerate(expected):
        master = masters.get(tuple(sorted(ranges)))
        if master is None:
            problem = f"no master of {where} owns exactly these slots now"
            checks.append(ShardCheck(i, ranges, None, problems=[problem]))
            continue
        live = fingerprint_redis(master)
        keys = sum(d.keys for d in live.dbs.values())
        problems = compare(prints, live)
        if problems and only_expired(prints, live):
            expired = sum(d.keys for d in prints.dbs.values()) - keys
            checks.append(ShardCheck(i, ranges, master, keys, expired))
            continue
        checks.append(ShardCheck(i, ranges, master, keys, 0, problems))
    return checks
