"""A drill of a Redis Cluster snapshot: a scratch cluster of the snapshot's shape, and a
fingerprint check per shard (ADR 0021, cluster addendum).

On the local runtime, a snapshot whose Redis is a cluster is restored into a scratch cluster
whose masters own the snapshot's slot ranges (:class:`drtool.runtime.rediscluster.LocalCluster`)
instead of the stack's single Redis, so the drill restores it as production would restore
it — into a cluster, key-level, each key RESTOREd on its slot's master — and each scratch
master then holds exactly one shard: the report checks each one against that shard's recorded
fingerprints, besides the restore's check of the whole. The docker runtime keeps its single
Redis (a key-level restore takes any shape).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from drtool.config import Config
from drtool.drills.definition import DrillDefinition
from drtool.drills.runtime_local import SCRATCH_CLUSTER
from drtool.endpoints import StackEndpoints
from drtool.repository import catalog
from drtool.repository.access import identities_of, open_repo
from drtool.runtime.rediscluster import LocalCluster
from drtool.sources.redis_cluster import discover, node_endpoint
from drtool.sources.redis_fingerprint import compare, fingerprint_redis
from drtool.stores.checks import MAX_EXAMPLES, CheckResult
from drtool.stores.redis import restore as redis_restore

Shape = list[tuple[tuple[int, int], ...]]


def cluster_shape(record: catalog.SnapshotRecord, spec: DrillDefinition) -> Shape | None:
    """The slot ranges of each shard, when a local drill restores the snapshot's Redis and it
    is a cluster (else None: the scratch stack's single Redis)."""
    if spec.runtime != "local" or "redis" not in spec.components:
        return None
    comp = record.manifest.component("redis") if record.manifest else None
    if comp is None or comp.details.get("topology") != "cluster":
        return None
    return [tuple((int(a), int(b)) for a, b in s["slots"]) for s in comp.details["shards"]]


@contextmanager
def scratch_redis(
    directory: Path, endpoints: StackEndpoints, shape: Shape | None
) -> Iterator[StackEndpoints]:
    """The scratch stack, its Redis replaced by a scratch cluster of ``shape`` (when given),
    always stopped afterwards."""
    if shape is None:
        yield endpoints
        return
    cluster = LocalCluster.up(directory / SCRATCH_CLUSTER, shape)
    try:
        yield replace(endpoints, redis=cluster.endpoint)
    finally:
        cluster.stop()


def shard_checks(
    cfg: Config, record: catalog.SnapshotRecord, endpoints: StackEndpoints
) -> list[CheckResult]:
    """Each scratch master's fingerprints against the recorded ones of the shard whose slots
    it owns (keys with a TTL that ran out since the backup are counted, not failed)."""
    assert record.manifest is not None
    comp = record.manifest.component("redis")
    assert comp is not None
    repo = open_repo(cfg)
    snap = redis_restore.load(repo, record.manifest, comp, identities_of(cfg))
    masters = {tuple(sorted(s.slots)): s for s in discover(endpoints.redis)}
    results = []
    for i, (ranges, recorded) in enumerate(snap.shards):
        slots = ",".join(f"{a}-{b}" for a, b in ranges)
        name = f"redis shard {i} (slots {slots}) fingerprints equal the snapshot's"
        master = masters.get(tuple(sorted(ranges)))
        if master is None:
            results.append(CheckResult(name, False, "no scratch master owns exactly these slots"))
            continue
        live = fingerprint_redis(node_endpoint(endpoints.redis, master))
        problems = compare(recorded, live)
        keys = sum(d.keys for d in live.dbs.values())
        expired = sum(d.keys for d in recorded.dbs.values()) - keys
        if problems and redis_restore.only_expired(recorded, live):
            detail = f"{keys:,} keys; {expired:,} with a TTL expired since the backup"
            results.append(CheckResult(name, True, detail, {"keys": keys, "expired": expired}))
            continue
        results.append(
            CheckResult(
                name,
                not problems,
                f"{keys:,} keys on {master.host}:{master.port}"
                if not problems
                else "; ".join(problems[:3]),
                {"keys": keys},
                problems[:MAX_EXAMPLES],
            )
        )
    return results
