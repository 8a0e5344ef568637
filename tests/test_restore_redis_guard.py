"""Online Redis restore into a target that cannot take it: refused up front, or put back.

Real redis-servers: a target with ``maxmemory`` (noeviction and allkeys-lru) too small for the
snapshot, and a target whose restore user may write only some keys (so the copy fails
part-way, after writing some). Values are distinctive bytes that must never reach an error
message or a log line (they are user data).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from support.cli import run_drtool
from support.compare import redis_contents
from support.stacks import Repository, make_repository, source_stack

from drtool.endpoints import PostgresEndpoint, RedisEndpoint, S3Endpoint, StackEndpoints
from drtool.runtime.redisserver import RedisServer
from drtool.sources.redis_client import CopyFailed, copy_keys

VALUE = b"VALUE-NOT-FOR-LOGS-" * 520  # ~10 KB, recognisable in any excerpt
BIG_KEYS = 300  # ~3 MB beside the seed


@pytest.fixture(scope="module")
def repo(
    tmp_path_factory: pytest.TempPathFactory, pg_server: PostgresEndpoint, s3_server: S3Endpoint
) -> Iterator[Repository]:
    """A seeded source whose Redis also holds ~3 MB of distinctive values; one Redis snapshot."""
    directory = tmp_path_factory.mktemp("guard")
    with source_stack(directory, pg_server, s3_server) as source:
        with _client(source.redis) as client:
            for i in range(BIG_KEYS):
                client.set(f"big:{i:04d}", VALUE + str(i).encode())
        repository = make_repository(directory / "repo", source)
        repository.backup(components=("redis",))
        yield repository


@pytest.fixture
def target_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A target redis-server of its own (its limits and users are changed by the test)."""
    server = RedisServer(tmp_path / "target")
    server.start()
    try:
        with _client(server.endpoint) as client:
            client.set("live-key", "live")
            client.hset("live-hash", mapping={"a": "1", "b": "2"})
        yield server
    finally:
        server.stop()


def _client(endpoint: RedisEndpoint, db: int = 0) -> redis.Redis:
    return redis.Redis(
        host=endpoint.host,
        port=endpoint.port,
        username=endpoint.username,
        password=endpoint.password,
        db=db,
    )


def _restore(
    repo: Repository, tmp_path: Path, target: RedisEndpoint, pg: PostgresEndpoint, s3: S3Endpoint
) -> tuple[int, str]:
    stack = StackEndpoints(pg, target, s3, ("unused",))
    config = repo.operator_config(tmp_path / "op.toml", {"t": stack}, scratch=tmp_path / "scratch")
    (tmp_path / "scratch").mkdir(exist_ok=True)
    run = run_drtool(
        "restore", "latest", "--target", "t", "--component", "redis", "--force", "--yes",
        config=config,
    )  # fmt: skip
    return run.returncode, run.stderr


@pytest.mark.parametrize("policy", ["noeviction", "allkeys-lru"])
def test_a_snapshot_larger_than_maxmemory_is_refused_before_the_target_changes(
    repo: Repository,
    target_server: RedisServer,
    pg_database: PostgresEndpoint,
    s3_server: S3Endpoint,
    tmp_path: Path,
    policy: str,
) -> None:
    """19.4: the old code wrote until OOM (or evicted); now nothing is written, and it says so."""
    target = target_server.endpoint
    with _client(target) as client:
        used = int(client.info("memory")["used_memory"])
        client.config_set("maxmemory", used + 1024 * 1024)  # room for 1 MB of the ~3 MB
        client.config_set("maxmemory-policy", policy)
    before = redis_contents(target)
    code, stderr = _restore(repo, tmp_path, target, pg_database, s3_server)
    assert code == 2, stderr
    assert "does not fit" in stderr and "Nothing changed" in stderr
    assert ("evict" in stderr) == (policy != "noeviction")
    assert redis_contents(target) == before
    with _client(target) as client:
        assert int(client.info("stats")["evicted_keys"]) == 0
    assert not list((tmp_path / "scratch").iterdir())  # the pre-restore copy is not left behind
    assert "VALUE-NOT-FOR-LOGS" not in stderr


def test_a_copy_failing_part_way_is_put_back_and_says_so(
    repo: Repository,
    target_server: RedisServer,
    pg_database: PostgresEndpoint,
    s3_server: S3Endpoint,
    tmp_path: Path,
) -> None:
    """19.4/19.5: a restore user that may write only `big:*` and `live*` keys fails part-way.

    The old code left the target half-written with a message that quoted a key's value; now
    the snapshot's keys are removed, the previous keys are back, and no value is in stderr
    (which carries the JSON log lines too).
    """
    with _client(target_server.endpoint) as client:
        client.acl_setuser(
            "restorer",
            enabled=True,
            passwords=["+restorer-pw"],
            keys=["big:*", "live*"],
            commands=["+@all"],
        )
    target = RedisEndpoint(target_server.endpoint.host, target_server.endpoint.port,
                           username="restorer", password="restorer-pw")  # fmt: skip
    before = redis_contents(target_server.endpoint)
    code, stderr = _restore(repo, tmp_path, target, pg_database, s3_server)
    assert code == 3, stderr
    assert "failed part-way" in stderr and "the target was put back" in stderr
    assert "previous 2 keys restored" in stderr
    assert redis_contents(target_server.endpoint) == before
    assert "VALUE-NOT-FOR-LOGS" not in stderr
    lines = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    assert lines and not any("VALUE-NOT-FOR-LOGS" in json.dumps(line) for line in lines)
    assert not list((tmp_path / "scratch").iterdir())


def test_copy_errors_name_the_key_never_the_value(
    redis_db: RedisEndpoint, target_server: RedisServer
) -> None:
    """19.5: an OOM while copying names the key and how many were written; no value bytes."""
    with _client(redis_db) as client:
        for i in range(50):
            client.set(f"k{i}", VALUE)
    with _client(target_server.endpoint) as client:
        client.config_set("maxmemory", int(client.info("memory")["used_memory"]) + 100_000)
    with (
        _client(redis_db) as src,
        _client(target_server.endpoint) as dst,
        pytest.raises(CopyFailed) as caught,
    ):
        copy_keys(src, dst, replace=True, batch=10)
    message = caught.value.message
    assert "maxmemory" in message and "RESTORE of key b'k" in message
    assert 0 < caught.value.copied < 50
    assert "VALUE-NOT" not in message and "\\x00" not in message


def test_when_putting_back_fails_too_the_message_says_the_target_changed_and_where_its_keys_are(
    repo: Repository,
    target_server: RedisServer,
    pg_database: PostgresEndpoint,
    s3_server: S3Endpoint,
    tmp_path: Path,
) -> None:
    """A restore user denied some keys and UNLINK: the copy fails part-way, the undo too."""
    with _client(target_server.endpoint) as client:
        client.acl_setuser(
            "restorer",
            enabled=True,
            passwords=["+restorer-pw"],
            keys=["big:*", "live*"],
            commands=["+@all", "-unlink"],
        )
    target = RedisEndpoint(target_server.endpoint.host, target_server.endpoint.port,
                           username="restorer", password="restorer-pw")  # fmt: skip
    code, stderr = _restore(repo, tmp_path, target, pg_database, s3_server)
    assert code == 3, stderr
    assert "putting the previous keys back failed too" in stderr
    assert "The target is CHANGED" in stderr
    kept = list((tmp_path / "scratch").glob("redis-pre_restore_*.keys"))
    assert len(kept) == 1 and f"its previous 2 keys are saved in {kept[0]}" in stderr
    assert kept[0].stat().st_mode & 0o777 == 0o600
    assert "VALUE-NOT-FOR-LOGS" not in stderr
