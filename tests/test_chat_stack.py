"""The included co-talk data stack: schema, deterministic seed and live traffic, on real servers."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql

from chat_stack import redis_layout
from chat_stack.schema import TABLES, apply_schema
from chat_stack.seed import (
    SEED_MONTHS,
    SEED_START,
    SeedResult,
    SeedSizes,
    _at,
    seed,
    time_offset,
)
from chat_stack.stores import connect_redis
from chat_stack.traffic import run_traffic
from drtool.endpoints import (
    PostgresEndpoint,
    RedisEndpoint,
    S3Endpoint,
    StackEndpoints,
)
from drtool.errors import UsageError
from drtool.s3session import s3_client

SMALL = SeedSizes(users=50, rooms=10, messages=2000, attachments=30)


@pytest.fixture
def stack(
    pg_database: PostgresEndpoint, redis_db: RedisEndpoint, s3_server: S3Endpoint, s3_bucket: str
) -> StackEndpoints:
    """A fresh, empty stack."""
    return StackEndpoints(pg_database, redis_db, s3_server, (s3_bucket,))


@pytest.fixture
def other_stack(
    pg_server: PostgresEndpoint, redis_server: RedisEndpoint, s3_server: S3Endpoint
) -> Iterator[StackEndpoints]:
    """A second fresh stack: another database, Redis db 1, another bucket."""
    name = f"test_{uuid.uuid4().hex[:12]}"
    admin = dataclasses.replace(pg_server, dbname="postgres")
    with psycopg.connect(**admin.connect_kwargs(), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    other_redis = dataclasses.replace(redis_server, db=1)
    with connect_redis(other_redis) as client:
        client.flushdb()
    yield StackEndpoints(
        dataclasses.replace(pg_server, dbname=name),
        other_redis,
        s3_server,
        (name.replace("_", "-"),),
    )
    with psycopg.connect(**admin.connect_kwargs(), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def seeded(stack: StackEndpoints) -> SeedResult:
    """The stack seeded with the small sizes and seed 1."""
    return seed(stack, SMALL, seed=1, progress=False)


def connect(endpoint: PostgresEndpoint) -> psycopg.Connection:
    """A connection to the stack's database."""
    return psycopg.connect(**endpoint.connect_kwargs())


def table_digests(endpoint: PostgresEndpoint) -> dict[str, tuple[int, str]]:
    """Row count and md5 of the ordered rows, per table."""
    digests = {}
    with connect(endpoint) as conn:
        for table in TABLES:
            query = sql.SQL(
                "SELECT count(*), md5(string_agg(t::text, E'\\n' ORDER BY t::text)) FROM {} t"
            ).format(sql.Identifier(table))
            row = conn.execute(query).fetchone()
            assert row is not None
            digests[table] = (row[0], row[1])
    return digests


def bucket_objects(stack: StackEndpoints) -> dict[str, tuple[str, str, dict[str, str]]]:
    """Every object of the attachments bucket: key -> (sha256, content type, metadata)."""
    client = s3_client(stack.minio)
    objects = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=stack.buckets[0]):
        for item in page.get("Contents", []):
            got = client.get_object(Bucket=stack.buckets[0], Key=item["Key"])
            digest = hashlib.sha256(got["Body"].read()).hexdigest()
            objects[item["Key"]] = (digest, got["ContentType"], got["Metadata"])
    return objects


def assert_cross_store_integrity(stack: StackEndpoints) -> None:
    """Attachments have their objects, Redis counters and lists agree with PostgreSQL."""
    objects = bucket_objects(stack)
    with connect(stack.postgres) as conn, connect_redis(stack.redis) as client:
        rows = conn.execute(
            "SELECT object_key, size_bytes, sha256, content_type, uploader_id FROM attachments"
        ).fetchall()
        assert len(rows) == len(objects)
        for key, _size, digest, content_type, uploader in rows:
            assert objects[key][:2] == (digest, content_type)
            assert objects[key][2]["sha256"] == digest
            assert objects[key][2]["uploader-id"] == str(uploader)
        s3 = s3_client(stack.minio)
        for key, size, *_ in rows[:5]:
            assert s3.head_object(Bucket=stack.buckets[0], Key=key)["ContentLength"] == size

        expected_unread = {
            (user, room): count
            for user, room, count in conn.execute(
                "SELECT r.user_id, r.room_id, count(*) FROM read_receipts r "
                "JOIN messages m ON m.room_id = r.room_id "
                "AND m.id > coalesce(r.last_read_message_id, 0) GROUP BY 1, 2"
            )
        }
        unread = {}
        for key in client.scan_iter(match=redis_layout.UNREAD_PATTERN):
            user = redis_layout.user_id_of_unread(key)
            for room, count in client.hgetall(key).items():
                unread[(user, int(room))] = int(count)
        assert unread == expected_unread

        rooms_with_messages = [
            row[0] for row in conn.execute("SELECT DISTINCT room_id FROM messages")
        ]
        recent_keys = client.scan_iter(match=redis_layout.RECENT_PATTERN)
        assert {redis_layout.room_id_of_recent(key) for key in recent_keys} == set(
            rooms_with_messages
        )
        for room in rooms_with_messages:
            latest = [
                row[0]
                for row in conn.execute(
                    "SELECT id FROM messages WHERE room_id = %s ORDER BY id DESC LIMIT %s",
                    (room, redis_layout.RECENT_LENGTH),
                )
            ]
            stored = client.lrange(redis_layout.recent_key(room), 0, -1)
            assert [int(message_id) for message_id in stored] == latest

        outsiders = conn.execute(
            "SELECT count(*) FROM messages m LEFT JOIN chat_room_members c "
            "ON c.room_id = m.room_id AND c.user_id = m.sender_id WHERE c.user_id IS NULL"
        ).fetchone()
        assert outsiders == (0,)


def test_seed_creates_the_requested_sizes(stack: StackEndpoints, seeded: SeedResult) -> None:
    digests = table_digests(stack.postgres)
    assert {table: count for table, (count, _) in digests.items()} == seeded.counts
    assert (digests["users"][0], digests["chat_rooms"][0]) == (SMALL.users, SMALL.rooms)
    assert (digests["messages"][0], digests["attachments"][0]) == (2000, 30)
    assert seeded.objects == len(bucket_objects(stack)) == 30
    assert seeded.redis_keys > 0
    with connect(stack.postgres) as conn:
        sizes = [
            row[0]
            for row in conn.execute("SELECT count(*) FROM chat_room_members GROUP BY room_id")
        ]
        contents = "".join(row[0] for row in conn.execute("SELECT content FROM messages"))
        names = "".join(row[0] for row in conn.execute("SELECT original_filename FROM attachments"))
    assert max(sizes) >= 5 * min(sizes)  # a few big rooms, many small ones
    assert any("가" <= char <= "힣" for char in contents)
    assert any(char.isascii() and char.isalpha() for char in contents)
    assert any(ord(char) > 0xFFFF for char in contents)  # emoji
    assert any("가" <= char <= "힣" for char in names)


def test_seed_keeps_the_stores_consistent(stack: StackEndpoints, seeded: SeedResult) -> None:
    assert_cross_store_integrity(stack)


@pytest.mark.slow
def test_seed_is_deterministic(stack: StackEndpoints, other_stack: StackEndpoints) -> None:
    seed(stack, SMALL, seed=1, progress=False)
    seed(other_stack, SMALL, seed=1, progress=False)
    assert table_digests(stack.postgres) == table_digests(other_stack.postgres)
    assert bucket_objects(stack) == bucket_objects(other_stack)

    seed(other_stack, SMALL, seed=2, progress=False, force=True)
    first, second = table_digests(stack.postgres), table_digests(other_stack.postgres)
    assert first["messages"] != second["messages"]
    assert first["users"][0] == second["users"][0]
    assert set(bucket_objects(stack)).isdisjoint(bucket_objects(other_stack))
    assert_cross_store_integrity(other_stack)


def test_seed_refuses_a_stack_with_data(stack: StackEndpoints, seeded: SeedResult) -> None:
    with pytest.raises(UsageError, match="already holds chat data"):
        seed(stack, SMALL, seed=1, progress=False)


def test_schema_applies_twice(pg_database: PostgresEndpoint) -> None:
    with connect(pg_database) as conn:
        created = apply_schema(conn, SEED_START, SEED_MONTHS)
        assert created == [f"messages_y2025m{month:02d}" for month in range(1, 7)]
        assert apply_schema(conn, SEED_START, SEED_MONTHS) == []
        assert apply_schema(conn, SEED_START, SEED_MONTHS + 1) == ["messages_y2025m07"]
        conn.commit()
        partitions = conn.execute(
            "SELECT count(*) FROM pg_inherits WHERE inhparent = 'messages'::regclass"
        ).fetchone()
    assert partitions == (8,)  # seven months and the default


def run_module(module: str, *args: str, env: dict[str, str] | None = None) -> Any:
    """Run ``python -m module args`` with only the given CHAT_* variables set."""
    clean = {key: value for key, value in os.environ.items() if not key.startswith("CHAT_")}
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "args",
    [
        ["--users", "1"],
        ["--messages", "-5"],
        ["--messages", "5", "--attachments", "10"],
        ["--rooms", "0", "--messages", "10"],
        ["--users", "lots"],
        ["--users", "10", "--rooms", "2000000"],
        ["--months", "0"],
        ["--growth", "nan"],
        ["--growth", "-0.5"],
    ],
)
def test_seed_rejects_nonsense_sizes(args: list[str]) -> None:
    done = run_module("chat_stack.seed", *args)
    assert done.returncode == 2
    assert done.stderr.startswith("error: ")
    assert done.stderr.count("\n") == 1


@pytest.mark.slow
@pytest.mark.parametrize(
    "args",
    [
        ["--rate", "0"],
        ["--rate", "nan"],
        ["--duration", "-1"],
        ["--duration", "inf"],
        ["--attachment-share", "1.5"],
        ["--attachment-bytes", "5000-100"],
    ],
)
def test_traffic_rejects_nonsense_pace(args: list[str]) -> None:
    done = run_module("chat_stack.traffic", *args)
    assert (done.returncode, done.stderr.count("\n")) == (2, 1)
    assert done.stderr.startswith("error: --")


def test_seed_times_grow_month_on_month_and_stay_in_id_order() -> None:
    """--growth 0.1: each month about 10 % more messages than the one before (issue 16.4)."""
    n, months = 24_000, 24
    times = [_at(time_offset((i + 0.5) / n, months, 0.1)) for i in range(n)]
    assert times == sorted(times)
    per_month = Counter((t.year, t.month) for t in times)
    assert len(per_month) == months and min(per_month) == (2025, 1)
    counts = [per_month[k] for k in sorted(per_month)]
    assert counts[-1] > 8 * counts[0]  # 1.1 ** 23 = 8.95, months of unequal length aside
    even = Counter((t.year, t.month) for t in (_at(time_offset(i / n, 6, 0.0)) for i in range(n)))
    assert max(even.values()) < 1.15 * min(even.values())  # 0: even (28 to 31 days)


def test_redis_key_names_round_trip() -> None:
    assert redis_layout.user_id_of_unread(redis_layout.unread_key(42)) == 42
    assert redis_layout.room_id_of_recent(redis_layout.recent_key(7)) == 7
    for bad in ("unread:x", "session:42"):
        with pytest.raises(ValueError):
            redis_layout.user_id_of_unread(bad)
    for bad in ("room:7:members", "room::recent", "unread:7"):
        with pytest.raises(ValueError):
            redis_layout.room_id_of_recent(bad)


def free_port() -> int:
    """A loopback port nobody listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_unreachable_server_is_one_line_without_secrets(s3_server: S3Endpoint) -> None:
    env = {
        "CHAT_PG_PORT": str(free_port()),
        "CHAT_PG_PASSWORD": "pg-secret-3f9a",
        "CHAT_S3_ENDPOINT": s3_server.endpoint_url,
        "CHAT_S3_ACCESS_KEY": s3_server.access_key,
        "CHAT_S3_SECRET_KEY": s3_server.secret_key,
    }
    done = run_module("chat_stack.seed", "--messages", "5", "--attachments", "1", env=env)
    assert done.returncode == 3
    assert done.stderr.startswith("error: cannot connect to PostgreSQL")
    assert done.stderr.count("\n") == 1
    for secret in ("pg-secret-3f9a", s3_server.secret_key):
        assert secret not in done.stderr + done.stdout


def test_traffic_adds_messages_and_keeps_integrity(
    stack: StackEndpoints, seeded: SeedResult
) -> None:
    stats = run_traffic(stack, rate=100, duration=2, seed=3, stop_event=threading.Event())
    assert stats.messages > 0
    digests = table_digests(stack.postgres)
    assert digests["messages"][0] == SMALL.messages + stats.messages
    assert digests["attachments"][0] == SMALL.attachments + stats.attachments
    assert_cross_store_integrity(stack)


def stack_env(stack: StackEndpoints) -> dict[str, str]:
    """CHAT_* variables pointing at the stack."""
    env = {
        "CHAT_PG_HOST": stack.postgres.host,
        "CHAT_PG_PORT": str(stack.postgres.port),
        "CHAT_PG_USER": stack.postgres.user,
        "CHAT_PG_DB": stack.postgres.dbname,
        "CHAT_REDIS_HOST": stack.redis.host,
        "CHAT_REDIS_PORT": str(stack.redis.port),
        "CHAT_REDIS_DB": str(stack.redis.db),
        "CHAT_S3_ENDPOINT": stack.minio.endpoint_url,
        "CHAT_S3_ACCESS_KEY": stack.minio.access_key,
        "CHAT_S3_SECRET_KEY": stack.minio.secret_key,
        "CHAT_S3_BUCKET": stack.buckets[0],
    }
    if stack.postgres.password:
        env["CHAT_PG_PASSWORD"] = stack.postgres.password
    if stack.redis.password:
        env["CHAT_REDIS_PASSWORD"] = stack.redis.password
    return env


@pytest.mark.slow
def test_traffic_stops_cleanly_on_sigterm(stack: StackEndpoints, seeded: SeedResult) -> None:
    clean = {key: value for key, value in os.environ.items() if not key.startswith("CHAT_")}
    process = subprocess.Popen(
        [sys.executable, "-m", "chat_stack.traffic", "--rate", "200", "--duration", "600"],
        env={**clean, **stack_env(stack)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        with connect(stack.postgres) as conn:
            conn.autocommit = True
            for _ in range(600):  # until traffic has written something (at most a minute)
                if conn.execute("SELECT count(*) FROM messages").fetchone() != (SMALL.messages,):
                    break
                time.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert (process.returncode, stderr) == (0, "")
    assert stdout.startswith("wrote ")
    assert_cross_store_integrity(stack)
