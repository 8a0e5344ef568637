"""`restore --redis-mode offline`: stop the target Redis, place the snapshot's RDB, start it.

Against a local stack (a real redis-server drtool restarts) and, where the Docker engine runs,
a Redis container (the test image; stopped and started through the Docker SDK).
"""

from __future__ import annotations

import json
import re
import secrets
import socket
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import docker
import pytest
import redis
import tomli_w
from support.cli import run_drtool
from support.compare import assert_same_redis, redis_contents
from support.docker_tier import LABELS, REDIS_IMAGE, require_image
from support.stacks import Repository, make_repository, source_stack

from drtool.config import load_config
from drtool.endpoints import PostgresEndpoint, RedisEndpoint, S3Endpoint, StackEndpoints
from drtool.errors import SourceError, UsageError
from drtool.runtime.local import LocalStack
from drtool.services.restore.run import RestoreOptions, run_restore
from drtool.services.stack import stack_load, stack_up
from drtool.stores.redis import offline as restore_redis_offline
from drtool.stores.redis.offline import LocalPlacer

pytestmark = pytest.mark.slow  # every test stops and restarts redis-servers around a restore


@pytest.fixture(scope="module")
def repo(
    tmp_path_factory: pytest.TempPathFactory, pg_server: PostgresEndpoint, s3_server: S3Endpoint
) -> Iterator[Repository]:
    """A seeded source stack with one Redis snapshot."""
    directory = tmp_path_factory.mktemp("offline")
    with source_stack(directory, pg_server, s3_server) as source:
        repository = make_repository(directory / "repo", source)
        repository.backup(components=("redis",))
        yield repository


@dataclass
class Target:
    """A local stack whose Redis holds one live key; the home it lives under."""

    home: Path
    stack: LocalStack

    @property
    def redis(self) -> RedisEndpoint:
        """The stack's Redis."""
        return self.stack.endpoints.redis


@pytest.fixture
def target(runtime_root: Path) -> Iterator[Target]:
    """A local stack under a short home (socket paths), its Redis holding one live key."""
    stack = stack_up(runtime_root, "offline").stack
    try:
        with _client(stack.endpoints.redis) as client:
            client.set("live-key", "1")
        yield Target(runtime_root, stack)
    finally:
        stack_load(runtime_root, "offline").down()


def _client(endpoint: RedisEndpoint) -> redis.Redis:
    return redis.Redis(host=endpoint.host, port=endpoint.port, password=endpoint.password)


def _restore(repo: Repository, home: Path, target: str, *, force: bool = False) -> object:
    config = repo.operator_config(home / "op.toml")
    opts = RestoreOptions(
        target=target, components=("redis",), redis_mode="offline", yes=True, force=force
    )
    return run_restore(load_config(config, {}), home=home, options=opts, confirm=lambda r: False)


def test_offline_restore_replaces_a_local_stacks_data(repo: Repository, target: Target) -> None:
    result = _restore(repo, target.home, "offline", force=True)
    assert result.ok, result.components  # type: ignore[attr-defined]
    (comp,) = result.components  # type: ignore[attr-defined]
    assert comp.detail.startswith("RDB of ") and "1 keys replaced" in comp.detail
    assert_same_redis(repo.source.redis, target.redis)  # the live key is gone
    reloaded = stack_load(target.home, "offline")
    before, after = target.stack.redis.daemon, reloaded.redis.daemon
    assert before is not None and after is not None
    assert reloaded.redis.running and after.pid != before.pid
    kept = list(reloaded.redis.rdb_path.parent.glob("dump.rdb.pre_restore_*"))
    assert len(kept) == 1  # the replaced data, saved before the stop


def test_offline_restore_needs_force_for_a_non_empty_target(
    repo: Repository, target: Target
) -> None:
    with pytest.raises(UsageError, match=r"holds 1 keys\); nothing changed, use --force"):
        _restore(repo, target.home, "offline")
    assert redis_contents(target.redis).keys() == {(0, b"live-key")}


def test_offline_restore_refuses_an_aof_server(repo: Repository, target: Target) -> None:
    with _client(target.redis) as client:
        client.config_set("appendonly", "yes")
    with pytest.raises(UsageError, match=r"appendonly is on, so it would load its AOF"):
        _restore(repo, target.home, "offline", force=True)
    assert redis_contents(target.redis).keys() == {(0, b"live-key")}
    assert target.stack.redis.running


class _Corrupting(LocalPlacer):
    """Places a damaged file instead of the RDB: the server cannot load it and exits."""

    def place(self, rdb: Path) -> None:
        damaged = rdb.with_name("damaged.rdb")
        damaged.write_bytes(b"REDIS0011" + secrets.token_bytes(500))
        super().place(damaged)


def test_a_server_that_does_not_come_up_gets_its_data_back(
    repo: Repository, target: Target, tmp_path: Path
) -> None:
    staged = tmp_path / "snapshot.rdb"  # a good RDB passes the pre-check load: the source's
    with _client(repo.source.redis) as client:
        client.save()
        rdb_dir = client.config_get("dir")["dir"]
    staged.write_bytes((Path(rdb_dir) / "dump.rdb").read_bytes())
    with pytest.raises(SourceError, match=r"did not come up with the snapshot .* previous data"):
        restore_redis_offline.restore(
            staged,
            target.redis,
            _Corrupting(target.stack),
            force=True,
            stamp="20260101_000000",
            keep_dir=tmp_path,
        )
    assert redis_contents(target.redis).keys() == {(0, b"live-key")}


def test_offline_needs_a_server_drtool_can_restart(
    repo: Repository, tmp_path: Path, redis_db: RedisEndpoint
) -> None:
    """A [targets.NAME] without redis.container: exit 2 before anything changes."""
    source = repo.source
    elsewhere = StackEndpoints(source.postgres, redis_db, source.minio, source.buckets)
    config = repo.operator_config(tmp_path / "op.toml", {"t": elsewhere})
    run = run_drtool(
        "restore", "--target", "t", "--component", "redis", "--redis-mode", "offline",
        "--yes", "--force", config=config,
    )  # fmt: skip
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip().endswith("set targets.t.redis.container (nothing changed)")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_offline_restore_into_a_docker_container(
    repo: Repository, tmp_path: Path, docker_client: docker.DockerClient
) -> None:
    """Stopped, its /data/dump.rdb replaced through the SDK, started: it holds the snapshot."""
    require_image(docker_client, REDIS_IMAGE)
    password, port = secrets.token_urlsafe(12), _free_port()
    container = docker_client.containers.run(
        REDIS_IMAGE,
        detach=True,
        labels=dict(LABELS),
        environment={"REDIS_PASSWORD": password},
        ports={"6379/tcp": ("127.0.0.1", port)},  # fixed: a restart keeps it
    )
    try:
        endpoint = RedisEndpoint("127.0.0.1", port, password=password)
        # _wait_ready asks its placer only whether the server still runs
        running = cast(restore_redis_offline.Placer, _Running(container))
        restore_redis_offline._wait_ready(endpoint, "test container", running)
        with _client(endpoint) as client:
            client.set("live-key", "1")
        source = repo.source
        there = StackEndpoints(source.postgres, endpoint, source.minio, source.buckets)
        config = repo.operator_config(tmp_path / "op.toml", {"c": there})
        doc = tomllib.loads(config.read_text())
        doc["targets"]["c"]["redis"]["container"] = container.name
        config.write_text(tomli_w.dumps(doc))
        run = run_drtool(
            "restore", "--target", "c", "--component", "redis", "--redis-mode", "offline",
            "--yes", "--force", "--json", config=config,
        )  # fmt: skip
        assert run.returncode == 0, run.stderr
        assert_same_redis(source.redis, endpoint)
        # the previous data file is kept where nothing sweeps it (not a drtool-restore-* dir)
        detail = json.loads(run.stdout)["components"][0]["detail"]
        found = re.search(r"the previous data kept as (\S+\.tar)\)", detail)
        assert found, detail
        kept = Path(found[1])
        assert kept.is_file() and not kept.parent.name.startswith("drtool-restore-")
        kept.unlink()
        container.reload()
        assert container.status == "running"
    finally:
        container.remove(force=True, v=True)


@dataclass
class _Running:
    container: object

    def alive(self) -> bool:
        self.container.reload()  # type: ignore[attr-defined]
        return self.container.status == "running"  # type: ignore[attr-defined]
