"""A drill of a Redis Cluster snapshot on the local runtime: a scratch cluster of its shape.

A seeded co-talk stack whose Redis is a real 3-master cluster (``redis-server
--cluster-enabled yes``, the seed's keys copied into it) is backed up (PostgreSQL + the
cluster); ``drtool drill run`` must restore it into a scratch cluster with the snapshot's slot
ranges, pass the restore's whole-cluster fingerprints, one fingerprint check per shard and the
Redis-to-PostgreSQL check over every master, and leave no process behind — also when the
drill is killed (``drtool drill cleanup`` stops its scratch cluster).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
import time
import tomllib
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from support.cli import run_drtool, start_drtool
from support.processes import processes_in
from support.stacks import Repository, make_repository, source_stack

from drtool.endpoints import PostgresEndpoint, S3Endpoint
from drtool.runtime.rediscluster import LocalCluster
from drtool.sources.redis_client import connect
from drtool.sources.redis_cluster import cluster_client, copy_to_cluster

pytestmark = pytest.mark.slow  # a seeded stack, a cluster, a drill with its scratch cluster

THREE = [((0, 5460),), ((5461, 10922),), ((10923, 16383),)]


@pytest.fixture
def home() -> Iterator[Path]:
    """A short drtool home (PostgreSQL's socket path limit), enterable by the postgres user."""
    directory = Path(tempfile.mkdtemp(prefix="drill-"))
    directory.chmod(0o711)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster_repo(
    tmp_path_factory: pytest.TempPathFactory, pg_server: PostgresEndpoint, s3_server: S3Endpoint
) -> Iterator[tuple[Repository, tuple[int, int]]]:
    """A seeded stack whose Redis is a 3-master cluster, backed up (PostgreSQL + the cluster);
    and the unread counters and recent-list ids its Redis holds."""
    tmp = tmp_path_factory.mktemp("cluster-drill")
    with source_stack(tmp / "src", pg_server, s3_server) as single:
        cluster = LocalCluster.up(tmp / "cluster", THREE)
        try:
            with (
                closing(connect(single.redis)) as source,
                closing(cluster_client(cluster.endpoint)) as target,
            ):
                assert copy_to_cluster(source, target, replace=False) > 0
                counters = sum(int(source.hlen(k)) for k in source.scan_iter("unread:*"))
                recent = sum(int(source.llen(k)) for k in source.scan_iter("room:*:recent"))
            stack = dataclasses.replace(single, redis=cluster.endpoint)
            repository = make_repository(tmp / "repo", stack)
            doc: dict[str, Any] = tomllib.loads(repository.backup_config.read_text())
            doc["redis"]["cluster"] = True
            repository.backup_config.write_text(tomli_w.dumps(doc))
            done = run_drtool(
                "backup", "--component", "postgres,redis", "--json",
                config=repository.backup_config,
            )  # fmt: skip
            assert done.returncode == 0, done.stderr
        finally:
            cluster.stop()
        yield repository, (counters, recent)


def _definition(tmp_path: Path) -> Path:
    definition = tmp_path / "drill.toml"
    definition.write_text(
        'name = "cluster"\ncomponents = ["postgres", "redis"]\n'
        f'[report]\ndir = "{tmp_path / "reports"}"\n'
    )
    return definition


def test_a_cluster_snapshot_is_drilled_in_a_scratch_cluster_of_its_shape_shard_by_shard(
    cluster_repo: tuple[Repository, tuple[int, int]], tmp_path: Path, home: Path
) -> None:
    repository, (counters, recent) = cluster_repo
    run = run_drtool(
        "drill", "run", "--definition", str(_definition(tmp_path)), "--json",
        config=repository.operator_config(tmp_path / "op.toml"), home=home,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["passed"] is True, report
    checks = {c["name"]: c for c in report["checks"]}
    shards = [n for n in checks if n.startswith("redis shard ")]
    assert shards == [
        "redis shard 0 (slots 0-5460) fingerprints equal the snapshot's",
        "redis shard 1 (slots 5461-10922) fingerprints equal the snapshot's",
        "redis shard 2 (slots 10923-16383) fingerprints equal the snapshot's",
    ]
    assert all(checks[n]["passed"] and checks[n]["figures"]["keys"] > 0 for n in shards)
    assert checks["redis fingerprints equal the snapshot's"]["passed"]
    assert "each shard one instant" in checks["redis fingerprints equal the snapshot's"]["detail"]
    rows = checks["redis points to existing rows"]
    assert rows["passed"], rows  # over every master, not one node's third of the keys
    assert (rows["figures"]["counters"], rows["figures"]["recent_ids"]) == (counters, recent)
    assert counters > 0 and recent > 0
    assert processes_in(home) == []


def test_a_killed_cluster_drill_leaves_a_scratch_cluster_that_cleanup_stops(
    cluster_repo: tuple[Repository, tuple[int, int]], tmp_path: Path, home: Path
) -> None:
    repository, _ = cluster_repo
    config = repository.operator_config(tmp_path / "op.toml")
    proc = start_drtool(
        "drill", "run", "--definition", str(_definition(tmp_path)), config=config, home=home
    )
    deadline = time.monotonic() + 300
    recorded = home / "drills"
    while not any(
        len(json.loads(f.read_text() or "[]")) == 3
        for f in recorded.glob("*/redis-cluster/cluster.json")
    ):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.kill()
    proc.communicate(timeout=60)
    (stack,) = (p for p in recorded.iterdir() if p.is_dir())
    assert processes_in(stack / "redis-cluster") != []
    run = run_drtool("drill", "cleanup", config=config, home=home)
    assert run.returncode == 0, run.stderr
    assert f"removed local stack {stack.name}" in run.stdout.splitlines()
    assert processes_in(stack) == []
