"""Redis Cluster restored offline into a cluster of the same shape: an RDB per stopped node.

Real 3-master clusters of ``redis-server --cluster-enabled yes`` on loopback
(:class:`drtool.runtime.rediscluster.LocalCluster`): the source is backed up by ``drtool
backup`` while a client writes; a second cluster with the same slot ranges (other node ids)
is stopped, restored with ``--redis-mode offline --redis-node-dir ... --redis-wait-started``,
started when the restore says so (it then compares each master with its shard), and must
then hold exactly the snapshot, per shard and whole (its replica gets its master's shard). A
running node, a cluster of another shape and a missing master are refused in one line with
nothing changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import threading
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import tomli_w
from redis.cluster import ClusterNode, RedisCluster
from support.backup_kit import backup_redis_while_writing
from support.cli import run_drtool, start_drtool
from support.servers import free_port
from support.stacks import Repository, make_repository

from drtool.config import load_config
from drtool.endpoints import PostgresEndpoint, S3Endpoint, StackEndpoints
from drtool.errors import SourceError
from drtool.runtime.procs import HOST
from drtool.runtime.rediscluster import LocalCluster
from drtool.services import repo as svc
from drtool.sources.redis_cluster import discover, fingerprint_cluster
from drtool.sources.redis_fingerprint import RedisFingerprints, compare, fingerprint_redis
from drtool.stores.redis.cluster_offline import NodeDir, _put_back, holding_locks, read_node_dir
from drtool.stores.redis.offline import place_file
from drtool.stores.redis.shards import check_shards, masters_by_slots

pytestmark = pytest.mark.slow  # three clusters of servers, drtool runs

THREE = [((0, 5460),), ((5461, 10922),), ((10923, 16383),)]
PASSWORD = "offline-Cluster-pw-7c2"


def _client(cluster: LocalCluster) -> RedisCluster:
    return RedisCluster(startup_nodes=[ClusterNode(HOST, cluster.nodes[0].port)], password=PASSWORD)


@pytest.fixture(scope="module")
def clusters(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, LocalCluster]]:
    """The source, a target of the same ranges (with a replica), a twin of the target (same
    ranges, other node ids), and one of another shape."""
    base = tmp_path_factory.mktemp("offline-clusters")
    made: dict[str, LocalCluster] = {}
    try:
        made["source"] = LocalCluster.up(base / "source", THREE, password=PASSWORD)
        made["target"] = LocalCluster.up(base / "target", THREE, password=PASSWORD)
        made["target"].add_replica(0)  # nodes[3] replicates nodes[0]
        made["twin"] = LocalCluster.up(base / "twin", THREE, password=PASSWORD)  # same shape
        made["other"] = LocalCluster.up(
            base / "other", [((0, 8191),), ((8192, 16383),)], password=PASSWORD
        )
        yield made
    finally:
        for cluster in made.values():
            cluster.stop()


@pytest.fixture(scope="module")
def snapshot(
    clusters: dict[str, LocalCluster],
    tmp_path_factory: pytest.TempPathFactory,
    pg_server: PostgresEndpoint,
    s3_server: S3Endpoint,
) -> tuple[Repository, str, dict[str, Any]]:
    """The source populated, then backed up while a client keeps writing to every master."""
    with _client(clusters["source"]) as client:
        for i in range(2000):
            client.set(f"s:{i}", f"value {i}")
        for i in range(50):
            client.hset(f"h:{i}", mapping={f"f{j}": f"v{j}" for j in range(20)})
            client.set(f"ttl:{i}", "later", px=3_600_000)
            client.xadd(f"x:{i}", {"text": "hello"})
    directory = tmp_path_factory.mktemp("offline-repo")
    stack = StackEndpoints(pg_server, clusters["source"].endpoint, s3_server, ("unused",))
    repository = make_repository(directory, stack)
    doc: dict[str, Any] = tomllib.loads(repository.backup_config.read_text())
    doc["redis"]["cluster"] = True
    repository.backup_config.write_text(tomli_w.dumps(doc))
    snapshot_id = backup_redis_while_writing(
        repository.backup_config, lambda: _client(clusters["source"])
    )
    cfg = load_config(repository.operator_config(directory / "o.toml"), {})
    return repository, snapshot_id, svc.show_snapshot(cfg, snapshot_id).fingerprints["redis"]


def _restore(
    repository: Repository,
    snapshot_id: str,
    dirs: list[Path],
    tmp_path: Path,
    pg: PostgresEndpoint,
    s3: S3Endpoint,
    target: LocalCluster,
    *,
    wait_started: float = 0,
) -> Any:
    """``drtool restore --redis-mode offline --redis-node-dir ...``; with ``wait_started``
    started in the background (the caller starts the nodes when told, then waits)."""
    operator = repository.operator_config(
        tmp_path / "op.toml", {"t": StackEndpoints(pg, target.endpoint, s3, ("unused",))}
    )
    args = [a for d in dirs for a in ("--redis-node-dir", str(d))]
    argv = [
        "restore", snapshot_id, "--target", "t", "--component", "redis", "--redis-mode",
        "offline", *args, "--force", "--yes", "--json",
    ]  # fmt: skip
    if wait_started:
        return start_drtool(*argv, "--redis-wait-started", str(wait_started), config=operator)
    return run_drtool(*argv, config=operator)


def _dirs(cluster: LocalCluster) -> list[Path]:
    return [node.rdb_path.parent for node in cluster.nodes]


def test_a_running_node_is_refused_and_nothing_changes(
    clusters: dict[str, LocalCluster],
    snapshot: tuple[Repository, str, dict[str, Any]],
    pg_server: PostgresEndpoint,
    s3_server: S3Endpoint,
    tmp_path: Path,
) -> None:
    repository, snapshot_id, _ = snapshot
    target = clusters["target"]
    before = [_files(node.rdb_path.parent) for node in target.nodes]
    run = _restore(repository, snapshot_id, _dirs(target), tmp_path, pg_server, s3_server, target)
    assert run.returncode == 2, run.stderr
    assert "is running" in run.stderr and "stop every node" in run.stderr
    assert "Traceback" not in run.stderr
    assert [_files(node.rdb_path.parent) for node in target.nodes] == before


def test_a_running_node_is_found_by_its_data_dir_when_its_lock_is_free(
    clusters: dict[str, LocalCluster],
    snapshot: tuple[Repository, str, dict[str, Any]],
    pg_server: PostgresEndpoint,
    s3_server: S3Endpoint,
    tmp_path: Path,
) -> None:
    """Redis >= 7.2 renames a new nodes.conf over the one it locked, so a running node's
    lock is not on the current file and its port may be elsewhere: a redis-server working
    in the data dir (cwd) is found all the same (the local redis-server here is 7.0)."""
    repository, snapshot_id, _ = snapshot
    target = clusters["target"]
    target.stop()
    data = target.nodes[1].rdb_path.parent
    before = [_files(node.rdb_path.parent) for node in target.nodes]
    server = subprocess.Popen(
        ["redis-server", "--port", str(free_port()), "--bind", HOST, "--dir", str(data),
         "--dbfilename", "elsewhere.rdb", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        _wait_cwd(server.pid, data)
        run = _restore(
            repository, snapshot_id, _dirs(target), tmp_path, pg_server, s3_server, target
        )
        assert run.returncode == 2, run.stderr
        lines = [line for line in run.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "is running" in lines[0], run.stderr
        assert f"pid {server.pid}" in lines[0]
        assert [_files(node.rdb_path.parent) for node in target.nodes] == before
    finally:
        server.terminate()
        server.wait(timeout=30)
        target.start()


def _wait_cwd(pid: int, directory: Path) -> None:
    """Until the process has changed into ``directory`` (redis-server does at start)."""
    for _ in range(200):
        try:
            if os.readlink(f"/proc/{pid}/cwd") == str(directory.resolve()):
                return
        except OSError:
            pass
        threading.Event().wait(0.05)
    pytest.fail(f"pid {pid} never worked in {directory}")


def test_a_node_cannot_start_while_the_restore_holds_the_locks(
    clusters: dict[str, LocalCluster],
) -> None:
    """The swap runs with every nodes.conf locked: a node started meanwhile refuses to run
    (Redis: the cluster config file is already used by another node)."""
    target = clusters["target"]
    target.stop()
    try:
        nodes = [read_node_dir(d) for d in _dirs(target)]
        with holding_locks(nodes):
            with pytest.raises(SourceError):
                target.nodes[0].start(timeout=30)
            assert not target.nodes[0].running
    finally:
        target.start()


def test_a_node_dir_of_another_cluster_of_the_same_shape_is_refused(
    clusters: dict[str, LocalCluster],
    snapshot: tuple[Repository, str, dict[str, Any]],
    pg_server: PostgresEndpoint,
    s3_server: S3Endpoint,
    tmp_path: Path,
) -> None:
    """A mistyped dir (the twin's node, same slot ranges, other ids) must not be overwritten."""
    repository, snapshot_id, _ = snapshot
    target, twin = clusters["target"], clusters["twin"]
    target.stop()
    twin.stop()
    dirs = _dirs(target)
    dirs[1] = twin.nodes[1].rdb_path.parent
    before = [_files(d) for d in [*_dirs(target), *_dirs(twin)]]
    try:
        run = _restore(repository, snapshot_id, dirs, tmp_path, pg_server, s3_server, target)
        assert run.returncode == 2, run.stderr
        lines = [line for line in run.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "not of the same cluster" in lines[0], run.stderr
        assert [_files(d) for d in [*_dirs(target), *_dirs(twin)]] == before
        # a replica the nodes know but whose dir is not given: named, refused
        run = _restore(
            repository, snapshot_id, _dirs(target)[:3], tmp_path, pg_server, s3_server, target
        )
        assert run.returncode == 2 and "no data dir given for the replicas" in run.stderr
        assert str(target.nodes[3].port) in run.stderr
        assert [_files(d) for d in [*_dirs(target), *_dirs(twin)]] == before
    finally:
        twin.start()
        target.start()


def _files(directory: Path) -> dict[str, bytes]:
    """The RDB files of a data dir (the replica's full sync wrote one)."""
    return {f.name: f.read_bytes() for f in directory.glob("*.rdb*") if f.is_file()}


def test_a_cluster_of_another_shape_is_refused_pointing_at_the_key_level_restore(
    clusters: dict[str, LocalCluster],
    snapshot: tuple[Repository, str, dict[str, Any]],
    pg_server: PostgresEndpoint,
    s3_server: S3Endpoint,
    tmp_path: Path,
) -> None:
    repository, snapshot_id, _ = snapshot
    other = clusters["other"]
    with _client(other) as client:
        client.set("mine", "kept")
    for node in other.nodes:
        with redis.Redis(host=HOST, port=node.port, password=PASSWORD) as one:
            one.save()
    before = [node.rdb_path.read_bytes() for node in other.nodes]
    other.stop()
    try:
        run = _restore(repository, snapshot_id, _dirs(other), tmp_path, pg_server, s3_server, other)
        assert run.returncode == 2, run.stderr
        lines = [line for line in run.stderr.splitlines() if line.strip()]
        assert len(lines) == 1, run.stderr
        assert "shape differs" in lines[0] and "--redis-mode online" in lines[0]
        assert [node.rdb_path.read_bytes() for node in other.nodes] == before
    finally:
        other.start()
    with _client(other) as client:
        assert client.get("mine") == b"kept"


def test_the_shards_rdbs_are_written_to_a_directory_for_nodes_on_other_hosts(
    clusters: dict[str, LocalCluster],
    snapshot: tuple[Repository, str, dict[str, Any]],
    pg_server: PostgresEndpoint,
    s3_server: S3Endpoint,
    tmp_path: Path,
) -> None:
    repository, snapshot_id, recorded = snapshot
    operator = repository.operator_config(
        tmp_path / "op.toml",
        {"t": StackEndpoints(pg_server, clusters["target"].endpoint, s3_server, ("unused",))},
    )
    out = tmp_path / "rdbs"
    out.mkdir()

    def write(*extra: str) -> Any:
        return run_drtool(
            "restore", snapshot_id, "--target", "t", "--component", "redis", "--redis-mode",
            "offline", "--redis-rdb-dir", str(out), "--yes", "--json", *extra, config=operator,
        )  # fmt: skip

    run = write()
    assert run.returncode == 0, run.stderr
    names = ["shard-0-slots-0-5460.rdb", "shard-1-slots-5461-10922.rdb",
             "shard-2-slots-10923-16383.rdb"]  # fmt: skip
    assert sorted(f.name for f in out.iterdir()) == sorted(names)
    for name, shard in zip(names, recorded["shards"], strict=True):
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == shard["rdb"]["sha256"]
    again = write()  # the files are there now: a non-empty target
    assert again.returncode == 2 and "--force" in again.stderr, again.stderr
    online = run_drtool(
        "restore", snapshot_id, "--target", "t", "--component", "redis",
        "--redis-rdb-dir", str(out), "--yes", config=operator,
    )  # fmt: skip
    assert online.returncode == 2 and "--redis-mode offline" in online.stderr


def test_a_bad_rdb_dir_or_one_without_redis_is_refused_at_plan_time(
    clusters: dict[str, LocalCluster],
    snapshot: tuple[Repository, str, dict[str, Any]],
    pg_server: PostgresEndpoint,
    s3_server: S3Endpoint,
    tmp_path: Path,
) -> None:
    """A missing --redis-rdb-dir is refused by the plan (a dry run already), not after the
    other stores were restored; --redis-rdb-dir without redis among the components too."""
    repository, snapshot_id, _ = snapshot
    operator = repository.operator_config(
        tmp_path / "op.toml",
        {"t": StackEndpoints(pg_server, clusters["target"].endpoint, s3_server, ("unused",))},
    )
    missing = tmp_path / "no-such-dir"
    for extra in (("--component", "redis", "--dry-run"), ("--component", "postgres")):
        run = run_drtool(
            "restore", snapshot_id, "--target", "t", "--redis-mode", "offline",
            "--redis-rdb-dir", str(missing), "--yes", *extra, config=operator,
        )  # fmt: skip
        lines = [line for line in run.stderr.splitlines() if line.strip()]
        assert run.returncode == 2 and len(lines) == 1, run.stderr
        assert "--redis-rdb-dir" in lines[0]
    assert not missing.exists()


def test_a_node_dir_with_an_aof_or_another_rdb_is_refused(
    clusters: dict[str, LocalCluster],
    snapshot: tuple[Repository, str, dict[str, Any]],
    pg_server: PostgresEndpoint,
    s3_server: S3Endpoint,
    tmp_path: Path,
) -> None:
    """The node would load its AOF (appendonly) or another dbfilename, not the placed
    dump.rdb: refused in one line, nothing changed."""
    repository, snapshot_id, _ = snapshot
    target = clusters["target"]
    target.stop()
    data = target.nodes[2].rdb_path.parent
    try:
        for extra in (data / "appendonlydir", data / "mine.rdb"):
            if extra.suffix:
                extra.write_bytes(b"REDIS0009")
            else:
                extra.mkdir()
            before = [_files(node.rdb_path.parent) for node in target.nodes]
            try:
                run = _restore(
                    repository, snapshot_id, _dirs(target), tmp_path, pg_server, s3_server, target
                )
                lines = [line for line in run.stderr.splitlines() if line.strip()]
                assert run.returncode == 2 and len(lines) == 1, run.stderr
                assert extra.name in lines[0] and "appendonly no" in lines[0]
                assert [_files(node.rdb_path.parent) for node in target.nodes] == before
            finally:
                extra.rmdir() if extra.is_dir() else extra.unlink()
    finally:
        target.start()


def test_same_shape_restore_places_each_shards_rdb_and_the_started_cluster_equals_the_snapshot(
    clusters: dict[str, LocalCluster],
    snapshot: tuple[Repository, str, dict[str, Any]],
    pg_server: PostgresEndpoint,
    s3_server: S3Endpoint,
    tmp_path: Path,
) -> None:
    repository, snapshot_id, recorded = snapshot
    target = clusters["target"]
    with _client(target) as client:
        for i in range(100):
            client.set(f"old:{i}", "before the restore")
    for node in target.nodes:
        with redis.Redis(host=HOST, port=node.port, password=PASSWORD) as one:
            one.save()
    source_ids = {s.node_id for s in discover(clusters["source"].endpoint)}
    assert source_ids.isdisjoint(s.node_id for s in discover(target.endpoint))
    target.stop()
    # one master missing: refused, nothing placed
    partial = _restore(
        repository, snapshot_id, _dirs(target)[:2], tmp_path, pg_server, s3_server, target
    )
    assert partial.returncode == 2 and "no master's data dir" in partial.stderr, partial.stderr
    assert not list(target.nodes[0].rdb_path.parent.glob("*.pre_restore_*"))
    proc = _restore(
        repository, snapshot_id, _dirs(target), tmp_path, pg_server, s3_server, target,
        wait_started=300,
    )  # fmt: skip
    told = []
    for line in proc.stderr:  # the restore says when the nodes are to be started
        told.append(line)
        if "start the nodes now" in line:
            break
    else:
        pytest.fail(f"the restore never said to start the nodes: {''.join(told)}")
    # the replica got its master's shard, byte for byte
    assert target.nodes[3].rdb_path.read_bytes() == target.nodes[0].rdb_path.read_bytes()
    for node in target.nodes:
        assert len(list(node.rdb_path.parent.glob("dump.rdb.pre_restore_*"))) == 1
    target.start()
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, "".join(told) + err
    result = json.loads(out)["components"][0]
    assert result["problems"] == []
    detail = result["detail"]
    assert "placed into 4 stopped nodes" in detail and "4 previous RDBs kept" in detail
    assert "started, each master's fingerprints compared" in detail
    whole = RedisFingerprints.from_dict(recorded["fingerprints"])
    assert compare(whole, fingerprint_cluster(target.endpoint)) == []
    by_slots = {
        tuple(tuple(r) for r in s["slots"]): RedisFingerprints.from_dict(s["fingerprints"])
        for s in recorded["shards"]
    }
    for shard in discover(target.endpoint):  # each master holds exactly its shard
        node = next(n for n in target.nodes if n.port == shard.port)
        assert compare(by_slots[shard.slots], fingerprint_redis(node.endpoint)) == [], shard
    with _client(target) as client:
        assert client.get("old:1") is None
        assert client.get("s:1999") == b"value 1999"
    replica, master = target.nodes[3], target.nodes[0]
    with (
        redis.Redis(host=HOST, port=replica.port, password=PASSWORD) as r,
        redis.Redis(host=HOST, port=master.port, password=PASSWORD) as m,
    ):
        assert r.info("replication")["role"] == "slave"
        assert r.dbsize() == m.dbsize() > 0


def test_a_node_that_starts_without_its_shard_fails_the_comparison(
    clusters: dict[str, LocalCluster],
    snapshot: tuple[Repository, str, dict[str, Any]],
    pg_server: PostgresEndpoint,
    s3_server: S3Endpoint,
    tmp_path: Path,
) -> None:
    """The placed RDB of one master is gone before it starts (a wrong volume, a cleanup):
    the restore that waits for the nodes must exit 5 naming that shard, not pass."""
    repository, snapshot_id, _ = snapshot
    target = clusters["target"]
    target.stop()
    proc = _restore(
        repository, snapshot_id, _dirs(target), tmp_path, pg_server, s3_server, target,
        wait_started=300,
    )  # fmt: skip
    told = []
    for line in proc.stderr:
        told.append(line)
        if "start the nodes now" in line:
            break
    target.nodes[1].rdb_path.unlink()
    target.start()
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 5, "".join(told) + err
    assert "shard 1 (slots 5461-10922)" in err and "Traceback" not in err


def test_a_placement_failing_on_the_last_node_puts_every_node_back(
    clusters: dict[str, LocalCluster],
    snapshot: tuple[Repository, str, dict[str, Any]],
    pg_server: PostgresEndpoint,
    s3_server: S3Endpoint,
    tmp_path: Path,
) -> None:
    """The last node's RDB cannot be written (its temp name is taken by a directory: a
    write error even as root): the nodes already given their shard get their previous RDB
    back, and the run fails in one line saying so."""
    repository, snapshot_id, _ = snapshot
    target = clusters["target"]
    target.stop()
    blocker = target.nodes[-1].rdb_path.with_name(".dump.rdb.restoring")
    blocker.mkdir()
    before = [_files(node.rdb_path.parent) for node in target.nodes]
    try:
        run = _restore(
            repository, snapshot_id, _dirs(target), tmp_path, pg_server, s3_server, target
        )
        assert run.returncode == 3, run.stderr
        assert "every node's previous RDB is back" in run.stderr and "Traceback" not in run.stderr
        assert [_files(node.rdb_path.parent) for node in target.nodes] == before
    finally:
        blocker.rmdir()
        target.start()


def test_a_kill_mid_swap_leaves_every_dump_rdb_whole(
    clusters: dict[str, LocalCluster],
    snapshot: tuple[Repository, str, dict[str, Any]],
    pg_server: PostgresEndpoint,
    s3_server: S3Endpoint,
    tmp_path: Path,
) -> None:
    """kill -9 (the test-only crash point) once the first node's new RDB is written beside and
    its old one kept, before the rename: that node's dump.rdb is still its whole previous file
    (it used to be renamed away first: a node started then had no RDB), kept beside too."""
    repository, snapshot_id, _ = snapshot
    target = clusters["target"]
    for node in target.nodes:
        with redis.Redis(host=HOST, port=node.port, password=PASSWORD) as one:
            one.save()
    target.stop()
    before = [node.rdb_path.read_bytes() for node in target.nodes]
    earlier = set(target.nodes[0].rdb_path.parent.glob("dump.rdb.pre_restore_*"))
    operator = repository.operator_config(
        tmp_path / "op.toml",
        {"t": StackEndpoints(pg_server, target.endpoint, s3_server, ("unused",))},
    )
    args = [a for d in _dirs(target) for a in ("--redis-node-dir", str(d))]
    try:
        run = run_drtool(
            "restore", snapshot_id, "--target", "t", "--component", "redis", "--redis-mode",
            "offline", *args, "--force", "--yes", config=operator,
            extra_env={"DRTOOL_CRASH_AT": "redis-rdb-swap"},
        )  # fmt: skip
        assert run.returncode == 137, run.stderr
        assert [node.rdb_path.read_bytes() for node in target.nodes] == before
        kept = list(set(target.nodes[0].rdb_path.parent.glob("dump.rdb.pre_restore_*")) - earlier)
        assert len(kept) == 1 and kept[0].read_bytes() == before[0]
    finally:
        for left in set(target.nodes[0].rdb_path.parent.glob("*.pre_restore_*")) - earlier:
            left.unlink()
        for node in target.nodes:
            node.rdb_path.with_name(".dump.rdb.restoring").unlink(missing_ok=True)
        target.start()


def test_the_per_shard_check_counts_keys_expired_since_and_fails_others(
    clusters: dict[str, LocalCluster],
) -> None:
    """The check run on the started nodes (and by a drill's scratch cluster): keys whose TTL
    ran out since the fingerprints were taken are counted, not failed (as the single-server
    restore and the staged-shard check treat them); a key lost without a TTL still fails."""
    twin = clusters["twin"]
    with _client(twin) as client:
        for i in range(30):
            client.set(f"stay:{i}", "v")
            client.set(f"brief:{i}", "v", px=300)
    masters = masters_by_slots(twin.endpoint, ready=True)
    assert masters is not None
    expected = [(ranges, fingerprint_redis(node)) for ranges, node in sorted(masters.items())]
    with _client(twin) as client:
        for _ in range(400):  # until every brief key is gone (expiry, not a timing assertion)
            if not any(client.exists(f"brief:{i}") for i in range(30)):
                break
            threading.Event().wait(0.05)
    checks = check_shards(masters, expected, "the twin")
    assert [c.problems for c in checks] == [[], [], []]
    assert sum(c.expired for c in checks) == 30
    with _client(twin) as client:
        client.delete("stay:0")
    checks = check_shards(masters, expected, "the twin")
    assert sum(1 for c in checks if c.problems) == 1


def _node(directory: Path, node_id: str) -> NodeDir:
    directory.mkdir()
    return NodeDir(directory, node_id, HOST, 1, True, ((0, 16383),), {}, "", {})


def test_a_failing_put_back_tries_every_node_and_names_how_each_is_left(tmp_path: Path) -> None:
    """One node's kept RDB vanished (an operator's cleanup): its put-back fails, the other
    node's is still done, and the failure names the node left with the restored RDB."""
    a, b = _node(tmp_path / "a", "a" * 40), _node(tmp_path / "b", "b" * 40)
    for node in (a, b):
        node.rdb.write_bytes(b"old " + node.node_id.encode())
    kept = [place_file_from_bytes(tmp_path, node.rdb, b"new") for node in (a, b)]
    assert kept[0] is not None and kept[1] is not None
    kept[1].unlink()
    left = _put_back([(a, kept[0]), (b, kept[1])])
    assert a.rdb.read_bytes() == b"old " + a.node_id.encode()  # attempted after b failed
    assert len(left) == 1 and left[0].startswith(b.name)
    assert "the restored RDB still placed" in left[0]


def place_file_from_bytes(tmp_path: Path, data_file: Path, data: bytes) -> Path | None:
    source = tmp_path / "new.rdb"
    source.write_bytes(data)
    return place_file(source, data_file, "20260101_000000")


def test_the_placed_rdb_gets_the_old_files_mode_and_owner(tmp_path: Path) -> None:
    """drtool as root with umask 077 must not leave an RDB the redis user cannot read."""
    data = tmp_path / "dump.rdb"
    data.write_bytes(b"old")
    data.chmod(0o640)
    owner = (os.getuid(), os.getgid())
    if os.geteuid() == 0:
        os.chown(data, 4242, 4343)
        owner = (4242, 4343)
    old_mask = os.umask(0o077)
    try:
        place_file_from_bytes(tmp_path, data, b"new")
    finally:
        os.umask(old_mask)
    st = data.stat()
    assert data.read_bytes() == b"new"
    assert (st.st_mode & 0o777, st.st_uid, st.st_gid) == (0o640, *owner)
    assert not list(tmp_path.glob(".dump.rdb.restoring"))
    assert (tmp_path / "dump.rdb.pre_restore_20260101_000000").read_bytes() == b"old"
