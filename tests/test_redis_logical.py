"""Redis without the replication protocol: the logical dump (SCAN + DUMP + PTTL) fallback.

Real redis-servers on loopback. The source's backup user is denied SYNC and PSYNC by an ACL
(what a managed service does): ``redis.method = auto`` falls back to the logical dump and
says so, ``rdb`` fails in one line; the dump round-trips every type with its TTLs; keys
written and deleted during the scan do not break it; a damaged dump is refused before the
target is touched.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import tomli_w
from support.cli import run_drtool
from support.compare import redis_contents
from support.stacks import Repository, make_repository, source_stack

from drtool.config import load_config
from drtool.endpoints import PostgresEndpoint, RedisEndpoint, S3Endpoint, StackEndpoints
from drtool.errors import SourceError
from drtool.runtime.redisserver import RedisServer
from drtool.services import repo as svc
from drtool.sources import redis_logical
from drtool.sources.redis_client import client_for_db, connect
from drtool.sources.redis_fingerprint import RedisFingerprints, compare, fingerprint_redis
from drtool.sources.redis_logical import (
    DumpDamaged,
    dump_logical,
    logical_redis,
    logical_to_rdb,
    read_records,
)
from drtool.sources.redis_rdb import ReplicationRefused, fetch_rdb
from drtool.stores.redis import restore as redis_restore

TTL_MS = 3_600_000
TTL_TOLERANCE_MS = 120_000  # a TTL read back may be lower by the time the test took
SECRET = "canary-logical-Pw-7e21"
RAW = os.urandom(64)  # incompressible: stored verbatim in its DUMP payload


def deny_sync(server: RedisServer) -> RedisEndpoint:
    """An ACL user that may do anything but replicate (``-sync -psync``); its endpoint."""
    with connect(server.endpoint) as client:
        client.acl_setuser(
            "backup",
            enabled=True,
            reset_passwords=True,
            passwords=[f"+{SECRET}"],
            keys=["*"],
            channels=["*"],
            commands=["+@all", "-sync", "-psync"],
        )
    return dataclasses.replace(server.endpoint, username="backup", password=SECRET)


def populate(client: redis.Redis) -> None:
    """Every type (collections larger than a fingerprint page too), TTLs, and a db 1."""
    client.set("s:plain", b"\x00bin\xffary")
    client.set("s:raw", RAW)
    client.set("s:ttl", "soon", px=TTL_MS)
    client.set("s:int", 42)
    client.rpush("l:small", "b", "a", "b")
    client.rpush("l:big", *[f"e{i}" for i in range(2500)])
    client.sadd("set:small", "x", "y", "z")
    client.sadd("set:big", *[f"m{i}" for i in range(3000)])
    client.zadd("z:small", {"a": 1.5, "b": -2.0, "c": 1 / 3})
    client.zadd("z:big", {f"m{i}": i / 7 for i in range(2100)})
    client.hset("h:small", mapping={"f": "v", "g": "w"})
    client.hset("h:big", mapping={f"f{i}": f"v{i}" for i in range(5000)})
    for i in range(1500):
        client.xadd("x:events", {"room": str(i % 7), "text": f"message {i}"})
    client.expire("h:small", 7200)
    client.pexpire("x:events", TTL_MS)
    with client_for_db(client, 1) as other:
        other.set("counter:rooms", 7)
        other.sadd("online", "alice", "bob")
        other.set("presence:alice", "1", px=TTL_MS)


def ttls(endpoint: RedisEndpoint) -> dict[tuple[int, bytes], int]:
    """PTTL of every key that has one, by (db, key)."""
    return {k: v[2] for k, v in redis_contents(endpoint).items() if v[2] >= 0}


@pytest.fixture
def source(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of its own, populated, whose ``backup`` user may not replicate."""
    server = RedisServer(tmp_path / "source")
    server.start()
    try:
        with connect(server.endpoint) as client:
            populate(client)
        yield server
    finally:
        server.stop()


@pytest.fixture
def target(tmp_path: Path) -> Iterator[RedisServer]:
    """An empty redis-server to restore into."""
    server = RedisServer(tmp_path / "target")
    server.start()
    yield server
    server.stop()


def test_sync_denied_by_acl_is_a_replication_refusal(source: RedisServer, tmp_path: Path) -> None:
    """The one error ``redis.method = auto`` falls back on: its own type, and no password."""
    with pytest.raises(ReplicationRefused, match=r"refused replication \(SYNC\)") as err:
        fetch_rdb(deny_sync(source), tmp_path / "dump.rdb", timeout=30)
    assert SECRET not in str(err.value)
    assert list(tmp_path.glob("dump.rdb*")) == []


def test_a_logical_dump_round_trips_every_type_with_its_ttls(
    source: RedisServer, target: RedisServer, tmp_path: Path
) -> None:
    endpoint = deny_sync(source)
    live = fingerprint_redis(source.endpoint)
    before = ttls(source.endpoint)
    dump = tmp_path / "dump.redislogical"
    info = dump_logical(endpoint, dump, timeout=60, batch=100)
    assert info.size == dump.stat().st_size and info.records == sum(1 for _ in read_records(dump))
    assert info.records == 16
    with logical_redis(dump) as loaded:
        assert compare(live, fingerprint_redis(loaded)) == []
    out = redis_restore.restore(
        [dump], target.endpoint, force=False, keep_dir=tmp_path, stamp="t", method="logical"
    )
    assert out.problems == [] and out.copied == 16
    restored = fingerprint_redis(target.endpoint)
    assert compare(live, restored) == []
    types = {"hash": 2, "list": 2, "set": 2, "stream": 1, "string": 4, "zset": 2}
    assert restored.dbs[0].types == types and restored.dbs[1].keys == 3
    after = ttls(target.endpoint)
    assert after.keys() == before.keys() and len(after) == 4
    for key, pttl in before.items():
        assert pttl - TTL_TOLERANCE_MS < after[key] <= pttl, key


def test_keys_written_and_deleted_during_the_scan_do_not_break_it(
    source: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between every two batches of the scan another client deletes, rewrites and adds keys.

    The dump completes; keys nobody touched are all in it, unchanged; every key in it holds a
    value that key really had (consistent per key); nothing in it never existed.
    """
    with connect(source.endpoint) as client:
        client.flushall()
        pipe = client.pipeline(transaction=False)
        for i in range(3000):
            pipe.set(f"stable:{i}", f"s{i}")
            pipe.set(f"churn:{i}", "v0")
        pipe.execute()
    scan = redis_logical.scan_batches
    writer = connect(source.endpoint)
    rounds = 0

    def interleaved(client: redis.Redis, count: int) -> Iterator[list[bytes]]:
        nonlocal rounds
        for keys in scan(client, count):
            yield keys
            rounds += 1
            pipe = writer.pipeline(transaction=False)
            for i in range(rounds * 40, rounds * 40 + 40):
                pipe.delete(f"churn:{i % 3000}")
                pipe.set(f"churn:{(i + 1500) % 3000}", "v1")
                pipe.set(f"new:{rounds}:{i}", "n")
            pipe.execute()

    monkeypatch.setattr(redis_logical, "scan_batches", interleaved)
    dump = tmp_path / "dump.redislogical"
    try:
        info = dump_logical(deny_sync(source), dump, timeout=120, batch=50)
    finally:
        writer.close()
    assert rounds > 10  # the writes really happened during the scan
    seen = {r.key: r for r in read_records(dump)}
    assert info.records >= len(seen)
    with logical_redis(dump) as loaded:
        stable = loaded.mget([f"stable:{i}" for i in range(3000)])
        assert stable == [f"s{i}".encode() for i in range(3000)]
        for key in seen:
            value = loaded.get(key)
            if key.startswith(b"churn:"):
                assert value in (b"v0", b"v1"), key
            else:
                assert key.startswith((b"stable:", b"new:")) and value in (b"n", b"s" + key[7:])


def test_a_damaged_logical_dump_is_refused_before_the_target_is_touched(
    source: RedisServer, target: RedisServer, tmp_path: Path
) -> None:
    dump = tmp_path / "dump.redislogical"
    dump_logical(deny_sync(source), dump, timeout=60)
    with connect(target.endpoint) as client:
        client.set("live-key", "live")
    before = redis_contents(target.endpoint)
    data = dump.read_bytes()
    flipped = tmp_path / "flipped.redislogical"
    at = data.index(RAW) + 10
    flipped.write_bytes(data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :])
    truncated = tmp_path / "truncated.redislogical"
    truncated.write_bytes(data[: len(data) - 200])
    for bad, why in ((flipped, r"key b's:raw' of db 0 was refused"), (truncated, "truncated")):
        with pytest.raises(DumpDamaged, match=why) as err:
            redis_restore.restore(
                [bad], target.endpoint, force=True, keep_dir=tmp_path, stamp="t", method="logical"
            )
        assert RAW.hex() not in str(err.value) and repr(RAW) not in str(err.value)
        assert redis_contents(target.endpoint) == before
    assert not list(tmp_path.glob("redis-pre_restore_*"))


def test_a_logical_dump_becomes_an_rdb_for_the_offline_restore(
    source: RedisServer, tmp_path: Path
) -> None:
    """The offline path places an RDB: the dump saved as one holds the same keys."""
    dump = tmp_path / "dump.redislogical"
    dump_logical(deny_sync(source), dump, timeout=60)
    rdb = logical_to_rdb(dump, tmp_path / "dump.rdb")
    from drtool.sources.redis_fingerprint import fingerprint_rdb

    assert compare(fingerprint_redis(source.endpoint), fingerprint_rdb(rdb)) == []


def test_a_file_that_is_not_a_logical_dump_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "x"
    bad.write_bytes(b"REDIS0011" + b"\x00" * 40)
    with pytest.raises(SourceError, match="not a drtool Redis logical dump"):
        list(read_records(bad))


# -- through the real command: backup, manifest, restore, drill-style report ----------------


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, pg_server: PostgresEndpoint, s3_server: S3Endpoint
) -> Iterator[tuple[Repository, StackEndpoints, Path]]:
    """A seeded source stack whose Redis also holds every type; a repository; a backup config
    whose Redis user may not replicate (like a managed service)."""
    directory = tmp_path_factory.mktemp("logical")
    with source_stack(directory, pg_server, s3_server) as source:
        with connect(source.redis) as client:
            populate(client)
            client.acl_setuser(
                "backup",
                enabled=True,
                reset_passwords=True,
                passwords=[f"+{SECRET}"],
                keys=["*"],
                channels=["*"],
                commands=["+@all", "-sync", "-psync"],
            )
        repository = make_repository(directory / "repo", source)
        secret = directory / "backup-redis-pw"
        secret.write_text(SECRET)
        secret.chmod(0o600)
        doc = tomllib.loads(repository.backup_config.read_text())
        doc["redis"].update({"username": "backup", "password_file": str(secret)})
        repository.backup_config.write_text(tomli_w.dumps(doc))
        yield repository, source, directory


def _with_method(repository: Repository, method: str) -> Path:
    doc: dict[str, Any] = tomllib.loads(repository.backup_config.read_text())
    doc["redis"]["method"] = method
    path = repository.backup_config.with_name(f"backup-{method}.toml")
    path.write_text(tomli_w.dumps(doc))
    path.chmod(0o600)
    return path


@pytest.mark.slow
def test_sync_denied_falls_back_to_a_logical_dump_that_restores_equal(
    stack: tuple[Repository, StackEndpoints, Path],
    target: RedisServer,
    pg_database: PostgresEndpoint,
    s3_server: S3Endpoint,
    tmp_path: Path,
) -> None:
    repository, source, _ = stack
    config = _with_method(repository, "auto")
    done = run_drtool("backup", "--component", "redis", "--json", config=config)
    assert done.returncode == 0, done.stderr
    said = [line for line in done.stderr.splitlines() if "taking a logical dump instead" in line]
    assert len(said) == 1 and "consistent per key" in said[0], done.stderr
    assert SECRET not in done.stderr + done.stdout
    snapshot_id = json.loads(done.stdout)["snapshot_id"]
    operator = repository.operator_config(
        tmp_path / "op.toml",
        {"t": StackEndpoints(pg_database, target.endpoint, s3_server, ("unused",))},
    )
    shown = svc.show_snapshot(load_config(operator, {}), snapshot_id)
    assert shown.record.manifest is not None
    comp = shown.record.manifest.component("redis")
    assert comp is not None and [o.kind for o in comp.objects] == [
        "redis_logical",
        "fingerprints",
    ]
    assert comp.details["method"] == "logical" and comp.details["consistency"] == "per-key"
    assert comp.details["format"] == "drtool-redis-logical/1"
    recorded = RedisFingerprints.from_dict(shown.fingerprints["redis"]["fingerprints"])
    assert compare(fingerprint_redis(source.redis), recorded) == []

    before = ttls(source.redis)
    run = run_drtool(
        "restore", snapshot_id, "--target", "t", "--component", "redis", "--yes", "--json",
        config=operator,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "consistent per key, not per instant" in run.stdout + run.stderr
    assert compare(recorded, fingerprint_redis(target.endpoint)) == []
    after = ttls(target.endpoint)
    assert after.keys() == before.keys()
    for key, pttl in before.items():
        assert pttl - TTL_TOLERANCE_MS < after[key] <= pttl, key


@pytest.mark.slow
def test_method_rdb_with_sync_denied_fails_in_one_line(
    stack: tuple[Repository, StackEndpoints, Path],
) -> None:
    repository, _, _ = stack
    done = run_drtool(
        "backup", "--component", "redis", config=_with_method(repository, "rdb")
    )  # fmt: skip
    assert done.returncode == 3, done.stderr
    assert "Traceback" not in done.stderr and SECRET not in done.stderr
    errors = [line for line in done.stderr.splitlines() if "redis.method = rdb" in line]
    assert len(errors) == 1 and "refused replication (SYNC)" in errors[0], done.stderr


@pytest.mark.slow
def test_a_damaged_logical_object_in_the_repository_is_refused_before_the_target_changes(
    stack: tuple[Repository, StackEndpoints, Path],
    target: RedisServer,
    pg_database: PostgresEndpoint,
    s3_server: S3Endpoint,
    tmp_path: Path,
) -> None:
    repository, _, _ = stack
    done = run_drtool(
        "backup", "--component", "redis", "--json", config=_with_method(repository, "logical")
    )
    assert done.returncode == 0, done.stderr
    snapshot_id = json.loads(done.stdout)["snapshot_id"]
    stored = next(
        (repository.directory / "repository").rglob(f"*{snapshot_id}*/redis/dump.redislogical*")
    )
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0x01
    stored.write_bytes(bytes(data))
    with connect(target.endpoint) as client:
        client.set("live-key", "live")
    before = redis_contents(target.endpoint)
    operator = repository.operator_config(
        tmp_path / "op.toml",
        {"t": StackEndpoints(pg_database, target.endpoint, s3_server, ("unused",))},
    )
    run = run_drtool(
        "restore", snapshot_id, "--target", "t", "--component", "redis", "--force", "--yes",
        config=operator,
    )  # fmt: skip
    assert run.returncode == 5 and "dump.redislogical" in run.stderr, run.stderr
    assert "Traceback" not in run.stderr
    assert redis_contents(target.endpoint) == before


def test_the_format_pages_stock_recovery_replays_a_logical_dump(
    source: RedisServer, target: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/FORMAT.md's snippet, run as written (host and port pointed at the target)."""
    dump = tmp_path / "dump.redislogical"
    dump_logical(deny_sync(source), dump, timeout=60)
    text = (Path(__file__).parents[1] / "docs" / "FORMAT.md").read_text()
    start = text.index("```python\n   import struct, redis")
    block = text[start + len("```python\n") : text.index("```", start + 10)]
    code = "\n".join(line.removeprefix("   ") for line in block.splitlines())
    t = target.endpoint
    code = code.replace(
        'host="NEWHOST", port=6379', f'host="{t.host}", port={t.port}, password="{t.password}"'
    )
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "FORMAT.md", "exec"), {})  # the documented procedure, as written
    assert compare(fingerprint_redis(source.endpoint), fingerprint_redis(target.endpoint)) == []


@pytest.mark.slow
def test_doctor_says_what_the_backup_will_do_when_sync_is_denied(
    stack: tuple[Repository, StackEndpoints, Path],
) -> None:
    """auto: a warning that backups fall back to the logical dump; rdb: the refusal fails."""
    repository, _, _ = stack
    rows = {}
    for method in ("auto", "rdb", "logical"):
        done = run_drtool("doctor", "--json", config=_with_method(repository, method))
        rows[method] = {r["name"]: r for r in json.loads(done.stdout)}["redis reachable"]
    assert rows["auto"]["status"] == "warn", rows
    assert "logical dump" in rows["auto"]["detail"] and "fall back" in rows["auto"]["detail"]
    assert rows["rdb"]["status"] == "fail" and "refused replication" in rows["rdb"]["detail"]
    assert rows["logical"]["status"] == "pass", rows
    assert "consistent per key" in rows["logical"]["detail"]


@pytest.mark.slow
def test_a_drill_of_a_logical_snapshot_says_it_is_consistent_per_key(
    stack: tuple[Repository, StackEndpoints, Path], tmp_path: Path
) -> None:
    """The drill report's redis check carries the consistency of what it restored."""
    repository, _, _ = stack
    done = run_drtool(
        "backup", "--component", "redis", "--json", config=_with_method(repository, "logical")
    )
    assert done.returncode == 0, done.stderr
    snapshot_id = json.loads(done.stdout)["snapshot_id"]
    home = Path(tempfile.mkdtemp(prefix="drill-"))  # short: socket paths have a length limit
    home.chmod(0o711)
    try:
        definition = tmp_path / "drill.toml"
        definition.write_text(
            f'name = "logical"\ncomponents = ["redis"]\nsnapshot = "{snapshot_id}"\n'
            f'[report]\ndir = "{tmp_path / "reports"}"\n'
        )
        run = run_drtool(
            "drill", "run", "--definition", str(definition), "--json",
            config=repository.operator_config(tmp_path / "op.toml"), home=home,
        )  # fmt: skip
    finally:
        shutil.rmtree(home, ignore_errors=True)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    redis_check = next(c for c in report["checks"] if c["name"].startswith("redis fingerprints"))
    assert redis_check["passed"], redis_check
    assert "consistent per key, not per instant" in redis_check["detail"]
