"""Redis Cluster as a source: masters discovered, each one's RDB, restored into any shape.

Two real 3-master clusters of ``redis-server --cluster-enabled yes`` on free loopback
ports (:class:`drtool.runtime.rediscluster.LocalCluster`), and a single redis-server: the
source cluster is backed up through ``drtool backup`` (``redis.cluster = true``) and restored
key-level into a single node and into the other cluster; the fingerprints must equal the
snapshot's, per shard and for the whole, and TTLs must be kept.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import tomli_w
from redis.cluster import ClusterNode as Node
from redis.cluster import RedisCluster
from support.backup_kit import backup_redis_while_writing
from support.cli import run_drtool
from support.stacks import Repository, make_repository

from drtool.config import load_config
from drtool.endpoints import PostgresEndpoint, RedisEndpoint, S3Endpoint, StackEndpoints
from drtool.runtime.procs import HOST
from drtool.runtime.rediscluster import ClusterNodeServer as ClusterNode
from drtool.runtime.rediscluster import LocalCluster
from drtool.runtime.redisserver import RedisServer
from drtool.services import repo as svc
from drtool.sources.redis_cluster import combine, discover, fingerprint_cluster
from drtool.sources.redis_fingerprint import RedisFingerprints, compare, fingerprint_redis

pytestmark = pytest.mark.slow  # two clusters of three servers, and drtool runs

PASSWORD = "cluster-Pw-canary-5d1"
TTL_MS = 3_600_000
TTL_TOLERANCE_MS = 120_000


THREE = [((0, 5460),), ((5461, 10922),), ((10923, 16383),)]


@pytest.fixture(scope="module")
def clusters(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[list[ClusterNode]]]:
    """Two 3-master clusters (the source and a target)."""
    base = tmp_path_factory.mktemp("clusters")
    made: list[LocalCluster] = []
    try:
        for c in range(2):
            made.append(LocalCluster.up(base / f"c{c}", THREE, password=PASSWORD))
        yield [cluster.nodes for cluster in made]
    finally:
        for cluster in made:
            cluster.stop()


def _cluster(node: ClusterNode) -> RedisCluster:
    return RedisCluster(startup_nodes=[Node(HOST, node.port)], password=PASSWORD)


def populate(client: RedisCluster) -> None:
    """Every type, spread over all slots, some with TTLs."""
    for i in range(600):
        client.set(f"s:{i}", f"value {i}")
    for i in range(30):
        client.set(f"ttl:{i}", "soon", px=TTL_MS)
        client.hset(f"h:{i}", mapping={f"f{j}": f"v{j}" for j in range(20)})
        client.rpush(f"l:{i}", *[f"e{j}" for j in range(15)])
        client.sadd(f"set:{i}", *[f"m{j}" for j in range(12)])
        client.zadd(f"z:{i}", {f"m{j}": j / 3 for j in range(10)})
        client.xadd(f"x:{i}", {"room": str(i), "text": "hello"})
    client.hset("h:big", mapping={f"f{j}": f"v{j}" for j in range(3000)})
    client.pexpire("h:big", TTL_MS)


def ttls(client: RedisCluster) -> dict[bytes, int]:
    """PTTL of every key with one (keys read from every master)."""
    out = {}
    for key in client.scan_iter(count=1000, target_nodes=RedisCluster.PRIMARIES):
        pttl = int(client.pttl(key))
        if pttl >= 0:
            out[key] = pttl
    return out


@pytest.fixture(scope="module")
def backed_up(
    clusters: list[list[ClusterNode]],
    tmp_path_factory: pytest.TempPathFactory,
    pg_server: PostgresEndpoint,
    s3_server: S3Endpoint,
) -> Iterator[tuple[Repository, str, dict[bytes, int]]]:
    """The source cluster populated and backed up by ``drtool backup`` (redis only)."""
    source = clusters[0]
    with _cluster(source[0]) as client:
        populate(client)
        before = ttls(client)
    directory = tmp_path_factory.mktemp("cluster-repo")
    stack = StackEndpoints(pg_server, source[1].endpoint, s3_server, ("unused",))
    repository = make_repository(directory, stack)
    doc: dict[str, Any] = tomllib.loads(repository.backup_config.read_text())
    doc["redis"]["cluster"] = True
    repository.backup_config.write_text(tomli_w.dumps(doc))
    done = run_drtool("backup", "--component", "redis", "--json", config=repository.backup_config)
    assert done.returncode == 0, done.stderr
    assert PASSWORD not in done.stderr + done.stdout
    yield repository, json.loads(done.stdout)["snapshot_id"], before


def test_discover_finds_every_master_and_its_slots(clusters: list[list[ClusterNode]]) -> None:
    nodes = clusters[0]
    shards = discover(nodes[2].endpoint)
    ids = set()
    for node in nodes:
        with redis.Redis(host=HOST, port=node.port, password=PASSWORD) as client:
            ids.add(client.execute_command("CLUSTER", "MYID").decode())
    assert {s.node_id for s in shards} == ids
    assert {s.port for s in shards} == {n.port for n in nodes}
    assert sum(end - start + 1 for s in shards for start, end in s.slots) == 16384


def test_the_manifest_records_each_shard_and_the_fingerprints_add_up(
    clusters: list[list[ClusterNode]],
    backed_up: tuple[Repository, str, dict[bytes, int]],
    tmp_path: Path,
) -> None:
    repository, snapshot_id, _ = backed_up
    shown = svc.show_snapshot(
        load_config(repository.operator_config(tmp_path / "op.toml"), {}), snapshot_id
    )
    assert shown.record.manifest is not None
    comp = shown.record.manifest.component("redis")
    assert comp is not None
    assert comp.details["topology"] == "cluster" and comp.details["consistency"] == "per-shard"
    live = discover(clusters[0][0].endpoint)
    assert [(s["node_id"], s["slots"]) for s in comp.details["shards"]] == [
        (s.node_id, [list(r) for r in s.slots]) for s in live
    ]
    kinds = [o.kind for o in comp.objects]
    assert kinds == ["redis_rdb_shard0", "redis_rdb_shard1", "redis_rdb_shard2", "fingerprints"]
    doc = shown.fingerprints["redis"]
    whole = RedisFingerprints.from_dict(doc["fingerprints"])
    shards = [RedisFingerprints.from_dict(s["fingerprints"]) for s in doc["shards"]]
    assert compare(whole, combine(shards)) == []
    assert all(s.dbs[0].keys > 0 for s in shards)
    assert compare(fingerprint_cluster(clusters[0][0].endpoint), whole) == []
    for shard, recorded in zip(live, shards, strict=True):
        node = RedisEndpoint(HOST, shard.port, password=PASSWORD)
        assert compare(fingerprint_redis(node), recorded) == []


def _restore_into(
    repository: Repository,
    snapshot_id: str,
    target: RedisEndpoint,
    tmp_path: Path,
    pg: PostgresEndpoint,
    s3: S3Endpoint,
) -> str:
    operator = repository.operator_config(
        tmp_path / "op.toml", {"t": StackEndpoints(pg, target, s3, ("unused",))}
    )
    run = run_drtool(
        "restore", snapshot_id, "--target", "t", "--component", "redis", "--yes", "--json",
        config=operator,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    return run.stdout


def test_a_cluster_snapshot_restores_into_a_single_node(
    backed_up: tuple[Repository, str, dict[bytes, int]],
    pg_server: PostgresEndpoint,
    s3_server: S3Endpoint,
    tmp_path: Path,
) -> None:
    repository, snapshot_id, before = backed_up
    recorded = RedisFingerprints.from_dict(
        svc.show_snapshot(
            load_config(repository.operator_config(tmp_path / "o.toml"), {}), snapshot_id
        ).fingerprints["redis"]["fingerprints"]
    )
    single = RedisServer(tmp_path / "single")
    single.start()
    try:
        out = _restore_into(
            repository, snapshot_id, single.endpoint, tmp_path, pg_server, s3_server
        )
        assert "each shard one instant" in out
        assert compare(recorded, fingerprint_redis(single.endpoint)) == []
        with redis.Redis(host=HOST, port=single.port, password=single.password) as client:
            after = {k: int(client.pttl(k)) for k in before}
    finally:
        single.stop()
    for key, pttl in before.items():
        assert pttl - TTL_TOLERANCE_MS < after[key] <= pttl, key


def test_a_cluster_snapshot_restores_into_another_cluster_each_key_on_its_slots_master(
    clusters: list[list[ClusterNode]],
    backed_up: tuple[Repository, str, dict[bytes, int]],
    pg_server: PostgresEndpoint,
    s3_server: S3Endpoint,
    tmp_path: Path,
) -> None:
    repository, snapshot_id, before = backed_up
    target = clusters[1]
    recorded = RedisFingerprints.from_dict(
        svc.show_snapshot(
            load_config(repository.operator_config(tmp_path / "o.toml"), {}), snapshot_id
        ).fingerprints["redis"]["fingerprints"]
    )
    _restore_into(repository, snapshot_id, target[0].endpoint, tmp_path, pg_server, s3_server)
    assert compare(recorded, fingerprint_cluster(target[0].endpoint)) == []
    with _cluster(target[0]) as client:
        after = ttls(client)
        assert client.get("s:17") == b"value 17"  # routed by slot, no MOVED left unanswered
    assert after.keys() == before.keys()
    for key, pttl in before.items():
        assert pttl - TTL_TOLERANCE_MS < after[key] <= pttl, key
    owned = {s.port: s.slots for s in discover(target[0].endpoint)}
    for node in target:  # every master holds only keys of the slots it owns
        with redis.Redis(host=HOST, port=node.port, password=PASSWORD) as client:
            for key in client.scan_iter(count=1000):
                slot = int(client.execute_command("CLUSTER", "KEYSLOT", key))
                assert any(a <= slot <= b for a, b in owned[node.port]), (key, node.port)


def test_a_backup_while_clients_write_restores_equal_to_its_snapshot(
    clusters: list[list[ClusterNode]],
    backed_up: tuple[Repository, str, dict[bytes, int]],
    pg_server: PostgresEndpoint,
    s3_server: S3Endpoint,
    tmp_path: Path,
) -> None:
    """Writes on every master during the backup: it completes, its shards add up to its
    whole, a restore equals it, and the keys nobody touched are all in it. (Last in the file:
    it changes the source cluster the other tests compare with.)"""
    repository, _, _ = backed_up
    snapshot_id = backup_redis_while_writing(
        repository.backup_config, lambda: _cluster(clusters[0][0])
    )
    cfg = load_config(repository.operator_config(tmp_path / "o.toml"), {})
    doc = svc.show_snapshot(cfg, snapshot_id).fingerprints["redis"]
    whole = RedisFingerprints.from_dict(doc["fingerprints"])
    shards = [RedisFingerprints.from_dict(s["fingerprints"]) for s in doc["shards"]]
    assert compare(whole, combine(shards)) == []
    single = RedisServer(tmp_path / "single")
    single.start()
    try:
        _restore_into(repository, snapshot_id, single.endpoint, tmp_path, pg_server, s3_server)
        assert compare(whole, fingerprint_redis(single.endpoint)) == []
        with redis.Redis(host=HOST, port=single.port, password=single.password) as client:
            assert client.mget([f"s:{i}" for i in range(600)]) == [
                f"value {i}".encode() for i in range(600)
            ]
    finally:
        single.stop()
