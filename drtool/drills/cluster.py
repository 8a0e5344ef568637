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
from drtool.stores.checks import MAX_EXAMPLES, CheckResult
from drtool.stores.redis import restore as redis_restore
from drtool.stores.redis.shards import check_shards, masters_by_slots

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
    masters = masters_by_slots(endpoints.redis, ready=False)
    assert masters is not None  # not asked to wait for readiness
    results = []
    for check in check_shards(masters, snap.shards, "the scratch cluster"):
        name = f"redis {check.name} fingerprints equal the snapshot's"
        if check.master is None or check.problems:
            detail = "; ".join(check.problems[:3])
            examples = check.problems[:MAX_EXAMPLES]
            results.append(CheckResult(name, False, detail, {"keys": check.keys}, examples))
        elif check.expired:
            detail = f"{check.keys:,} keys; {check.expired:,} with a TTL expired since the backup"
            results.append(
                CheckResult(name, True, detail, {"keys": check.keys, "expired": check.expired})
            )
        else:
            where = f"{check.master.host}:{check.master.port}"
            results.append(
                CheckResult(name, True, f"{check.keys:,} keys on {where}", {"keys": check.keys})
            )
    return results
