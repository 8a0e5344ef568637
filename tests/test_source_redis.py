"""The Redis source against real redis-server processes: fetch, check, fingerprint, copy."""

from __future__ import annotations

import dataclasses
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from drtool.endpoints import RedisEndpoint
from drtool.errors import SourceError
from drtool.runtime.redisserver import RedisServer
from drtool.sources.redis_client import (
    client_for_db,
    connect,
    copy_keys,
    ephemeral_redis,
    target_is_empty,
)
from drtool.sources.redis_fingerprint import (
    RedisFingerprints,
    compare,
    fingerprint_rdb,
    fingerprint_redis,
)
from drtool.sources.redis_rdb import fetch_rdb, validate_rdb

TTL_MS = 3_600_000


@pytest.fixture(scope="module")
def own_server(
    redis_server: RedisEndpoint, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RedisServer]:
    """A redis-server of this module's own, free to change replication settings and ACLs."""
    server = RedisServer(tmp_path_factory.mktemp("redis-own"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def source(own_server: RedisServer) -> Iterator[redis.Redis]:
    """A client of the own server: every db flushed, diskless sync without its delay."""
    with connect(own_server.endpoint) as client:
        client.flushall()
        client.config_set("repl-diskless-sync", "yes")
        client.config_set("repl-diskless-sync-delay", "0")
        yield client


def populate(client: redis.Redis) -> None:
    """Every type in db 0 (collections larger than a page too), a TTL key, and a db 1."""
    client.set("s:plain", b"\x00bin\xffary")
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
    with client_for_db(client, 1) as other:
        other.set("counter:rooms", 7)
        other.sadd("online", "alice", "bob")


def test_fetch_validate_and_fingerprint_match_the_live_server(
    own_server: RedisServer, source: redis.Redis, tmp_path: Path
) -> None:
    populate(source)
    dest = tmp_path / "dump.rdb"
    info = fetch_rdb(own_server.endpoint, dest, timeout=60)
    validate_rdb(dest)
    assert [p.name for p in tmp_path.iterdir()] == ["dump.rdb"]
    assert info.size == dest.stat().st_size
    assert info.redis_version == source.info("server")["redis_version"]
    assert info.rdb_version >= 9
    live = fingerprint_redis(own_server.endpoint)
    assert compare(live, fingerprint_rdb(dest)) == []
    types = {"hash": 2, "list": 2, "set": 2, "stream": 1, "string": 3, "zset": 2}
    assert live.dbs[0].types == types
    assert live.dbs[0].with_ttl == 2
    assert live.dbs[1].keys == 2
    assert RedisFingerprints.from_dict(live.to_dict()) == live


def test_keys_expired_but_not_yet_reclaimed_are_not_counted(
    own_server: RedisServer, source: redis.Redis
) -> None:
    """A restore compares two servers that reclaim expired keys at their own pace: the counts
    (keys and keys with a TTL) must see what a client sees, not INFO's not-yet-reclaimed keys."""
    source.config_set("hz", 1)  # the active expiry cycle now runs about once a second
    try:
        source.set("stays", "1", ex=3600)
        source.set("plain", "1")
        pipe = source.pipeline(transaction=False)
        for i in range(2000):
            pipe.set(f"gone:{i}", "x", px=5)
        pipe.execute()
        time.sleep(0.05)
        fp = fingerprint_redis(own_server.endpoint).dbs[0]
        assert (fp.keys, fp.with_ttl) == (2, 1)
    finally:
        source.config_set("hz", 10)


@pytest.mark.parametrize(
    ("diskless", "delay", "form"),
    [
        ("yes", "0", "replicas sockets"),  # the $EOF:<mark> form
        ("no", "0", "disk"),  # the $<len> form
        ("yes", "1", "replicas sockets"),  # keep-alive newlines arrive before the payload
    ],
)
def test_both_transfer_forms_give_a_valid_rdb(
    own_server: RedisServer,
    source: redis.Redis,
    tmp_path: Path,
    diskless: str,
    delay: str,
    form: str,
) -> None:
    populate(source)
    source.config_set("repl-diskless-sync", diskless)
    source.config_set("repl-diskless-sync-delay", delay)
    before = own_server.log_path.read_text().count(f"with target: {form}")
    fetch_rdb(own_server.endpoint, tmp_path / "dump.rdb", timeout=60)
    validate_rdb(tmp_path / "dump.rdb")
    assert own_server.log_path.read_text().count(f"with target: {form}") == before + 1
    assert compare(fingerprint_redis(source), fingerprint_rdb(tmp_path / "dump.rdb")) == []


def test_a_user_without_sync_permission_gets_a_clear_error(
    own_server: RedisServer, source: redis.Redis, tmp_path: Path
) -> None:
    secret = "canary-acl-Pw-61f0"
    source.acl_setuser(
        "backup",
        enabled=True,
        passwords=[f"+{secret}"],
        keys=["*"],
        channels=["*"],
        commands=["+@all", "-sync", "-psync"],
    )
    endpoint = dataclasses.replace(own_server.endpoint, username="backup", password=secret)
    with pytest.raises(SourceError, match=r"refused replication \(SYNC\).*\+sync") as err:
        fetch_rdb(endpoint, tmp_path / "dump.rdb", timeout=30)
    assert secret not in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_a_wrong_password_fails_without_showing_it(own_server: RedisServer, tmp_path: Path) -> None:
    endpoint = dataclasses.replace(own_server.endpoint, password="canary-wrong-Pw-9d2c")
    with pytest.raises(SourceError, match="authentication") as err:
        fetch_rdb(endpoint, tmp_path / "dump.rdb", timeout=30)
    assert "canary-wrong-Pw-9d2c" not in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_a_refused_connection_is_a_source_error(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(SourceError, match="cannot connect to Redis"):
        fetch_rdb(RedisEndpoint("127.0.0.1", port), tmp_path / "dump.rdb", timeout=10)
    assert list(tmp_path.iterdir()) == []


def test_a_transfer_cut_short_leaves_no_file(tmp_path: Path) -> None:
    """A stub server (a real one cannot be cut mid-RDB on demand) sends 10 of 100 bytes."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(4096)  # INFO server
            conn.sendall(b"-NOPERM no INFO for you\r\n")
            for reply in (b"+OK\r\n", b"+OK\r\n", b"+FULLRESYNC abc 0\r\n\n\n$100\r\nREDIS0010"):
                conn.recv(4096)
                conn.sendall(reply)

    thread = threading.Thread(target=serve)
    thread.start()
    endpoint = RedisEndpoint("127.0.0.1", listener.getsockname()[1])
    with pytest.raises(SourceError, match="short read"):
        fetch_rdb(endpoint, tmp_path / "dump.rdb", timeout=10)
    thread.join()
    listener.close()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_one_flipped_byte_fails_the_rdb_checks(
    own_server: RedisServer, source: redis.Redis, tmp_path: Path
) -> None:
    populate(source)
    dest = tmp_path / "dump.rdb"
    fetch_rdb(own_server.endpoint, dest, timeout=60)
    data = bytearray(dest.read_bytes())
    data[len(data) // 2] ^= 0x01
    dest.write_bytes(bytes(data))
    with pytest.raises(SourceError, match=r"RDB check .* failed"):
        validate_rdb(dest)
    with pytest.raises(SourceError, match="exited"):
        fingerprint_rdb(dest)


def test_copy_keys_reproduces_the_fingerprint_and_ttls(
    own_server: RedisServer, source: redis.Redis, redis_db: RedisEndpoint, tmp_path: Path
) -> None:
    populate(source)
    dest = tmp_path / "dump.rdb"
    fetch_rdb(own_server.endpoint, dest, timeout=60)
    expected = fingerprint_rdb(dest)
    with connect(redis_db) as target:
        target.flushall()
        assert target_is_empty(target)
        with ephemeral_redis(dest) as restored:
            assert copy_keys(restored, target, replace=False) == 14
            with pytest.raises(SourceError, match="BUSYKEY"):
                copy_keys(restored, target, replace=False)
            assert copy_keys(restored, target, replace=True, batch=3) == 14
        assert not target_is_empty(target)
        assert compare(expected, fingerprint_redis(target)) == []
        assert 0 < target.pttl("s:ttl") <= TTL_MS
        assert target.pttl("s:plain") == -1
        target.flushall()


def test_the_ephemeral_server_is_gone_after_the_context(
    own_server: RedisServer, source: redis.Redis, tmp_path: Path
) -> None:
    source.set("k", "v")
    dest = tmp_path / "dump.rdb"
    fetch_rdb(own_server.endpoint, dest, timeout=60)
    with ephemeral_redis(dest) as client:
        pid = client.info("server")["process_id"]
        assert client.get("k") == b"v"
        assert Path(f"/proc/{pid}").exists()
    assert not Path(f"/proc/{pid}").exists()
    assert dest.exists()


def test_compare_names_each_difference() -> None:
    base = RedisFingerprints.from_dict(
        {"dbs": {"0": {"keys": 2, "types": {"string": 2}, "with_ttl": 1, "digest": "aa"}}}
    )
    other = RedisFingerprints.from_dict(
        {
            "dbs": {
                "0": {"keys": 2, "types": {"string": 1, "hash": 1}, "with_ttl": 0, "digest": "bb"},
                "3": {"keys": 1, "types": {"set": 1}, "with_ttl": 0, "digest": "cc"},
            }
        }
    )
    assert compare(base, base) == []
    assert compare(base, other) == [
        "db 0: 1 hash keys, expected 0",
        "db 0: 1 string keys, expected 2",
        "db 0: 0 keys with a TTL, expected 1",
        "db 0: content digest differs",
        "db 3: 1 keys, expected 0",
    ]
