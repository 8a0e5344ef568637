"""Drill checks on a restored co-talk stack: the links between messages, rooms and files.

Each check returns a named :class:`CheckResult`. ``fail`` means the restored data is wrong;
``skew`` marks differences explained by the stores being snapshotted one after another
(Redis and MinIO are taken after PostgreSQL, so they may know newer rooms, users or
messages): reported with figures, never a failure.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field
from typing import Any

import psycopg

from chat_stack import redis_layout
from drtool.endpoints import RedisEndpoint, StackEndpoints

# boto3 and redis are imported by the checks that use them, when a drill runs them: the
# PostgreSQL store imports this module, and a backup of PostgreSQL alone needs neither

MAX_EXAMPLES = 5
LATEST_PAGE = 50


@dataclass
class CheckResult:
    """One named check: passed or not, a one-line detail, figures and failing examples."""

    name: str
    passed: bool
    detail: str
    figures: dict[str, Any] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)


def _connect_pg(endpoints: StackEndpoints) -> psycopg.Connection[Any]:
    return psycopg.connect(**endpoints.postgres.connect_kwargs())


def attachments_have_objects(endpoints: StackEndpoints, *, workers: int = 4) -> CheckResult:
    """Every attachment row has its object, with the row's size and sha256."""
    bucket = endpoints.buckets[0]
    with _connect_pg(endpoints) as conn:
        rows = conn.execute("SELECT object_key, size_bytes, sha256 FROM attachments").fetchall()
    from drtool.sources.minio import MinioStore

    store = MinioStore(endpoints.minio, max_pool=workers * 2)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        found = list(pool.map(lambda r: store.digest(bucket, r[0]), rows))
    missing, different = [], []
    for (key, size, sha), got in zip(rows, found, strict=True):
        if got is None:
            missing.append(key)
        elif got != (size, sha):
            different.append(
                f"{key}: {got[0]} bytes sha256 {got[1][:12]}, row says {size} {sha[:12]}"
            )
    problems = [f"missing object {k}" for k in missing] + different
    present = len(rows) - len(missing) - len(different)
    return CheckResult(
        "attachments have their objects",
        not problems,
        f"{len(rows)} attachment rows; {present} objects present, {len(missing)} missing, "
        f"{len(different)} differ",
        {
            "rows": len(rows),
            "present": present,
            "missing": len(missing),
            "different": len(different),
        },
        problems[:MAX_EXAMPLES],
    )


def _scan(client: Any, pattern: str) -> Iterator[str]:
    for key in client.scan_iter(match=pattern, count=1000):
        yield key.decode() if isinstance(key, bytes) else key


def _redis_nodes(endpoint: RedisEndpoint) -> list[RedisEndpoint]:
    """The server itself, or every master of a Redis Cluster (a SCAN sees one node's keys)."""
    from drtool.sources.redis_client import connect as connect_redis
    from drtool.sources.redis_cluster import discover, is_cluster, node_endpoint

    with closing(connect_redis(endpoint)) as client:
        if not is_cluster(client):
            return [endpoint]
    return [node_endpoint(endpoint, shard) for shard in discover(endpoint)]


REDIS_REFERENCES = "redis points to existing rows"


def redis_points_to_existing_rows(
    endpoints: StackEndpoints, *, redis_older: bool = False
) -> CheckResult:
    """Unread counters and recent lists name users, rooms and messages that exist.

    Every reference (a counter's room, a recent list's message) is counted once, as
    ``existing``, ``newer`` (an id above PostgreSQL's largest: written after the PostgreSQL
    copy, skew), ``older`` or ``dangling``; the four add up to ``references``. A missing id
    below the largest is ``dangling`` (a failure) when Redis was copied after PostgreSQL (a
    snapshot). In a restore to a moment (``redis_older``) Redis comes from an RDB taken
    *before* the moment, so a row deleted between the RDB and the moment leaves a reference
    that is ``older`` skew, not a failure. A key naming a missing user or room (not a
    reference) is counted in ``dangling_keys`` by the same rule.
    """
    with _connect_pg(endpoints) as conn:
        users = {r[0] for r in conn.execute("SELECT id FROM users")}
        rooms = {r[0] for r in conn.execute("SELECT id FROM chat_rooms")}
        message_ids = {r[0] for r in conn.execute("SELECT id FROM messages")}
    largest = {
        "users": max(users, default=0),
        "rooms": max(rooms, default=0),
        "messages": max(message_ids, default=0),
    }
    exists = {"users": users, "rooms": rooms, "messages": message_ids}
    from drtool.sources.redis_client import connect as connect_redis

    problems: list[str] = []
    skew = {"users": 0, "rooms": 0, "messages": 0}  # newer than PostgreSQL, by kind
    refs = {"existing": 0, "newer": 0, "older": 0, "dangling": 0}
    keys = {"existing": 0, "newer": 0, "older": 0, "dangling": 0}  # keys, not references

    def judge(kind: str, ident: int, where: str, tally: dict[str, int]) -> None:
        if ident in exists[kind]:
            tally["existing"] += 1
        elif ident > largest[kind]:
            skew[kind] += 1
            tally["newer"] += 1
        elif redis_older:
            tally["older"] += 1
        else:
            tally["dangling"] += 1
            problems.append(f"{where}: {kind[:-1]} {ident} does not exist")

    counters = recent_ids = 0
    for node in _redis_nodes(endpoints.redis):  # a cluster: each master's own keys
        client = connect_redis(node)
        try:
            for key in _scan(client, redis_layout.UNREAD_PATTERN):
                judge("users", redis_layout.user_id_of_unread(key), key, keys)
                for room in client.hkeys(key):
                    counters += 1
                    judge("rooms", int(room), key, refs)
            for key in _scan(client, redis_layout.RECENT_PATTERN):
                judge("rooms", redis_layout.room_id_of_recent(key), key, keys)
                for raw in client.lrange(key, 0, -1):
                    recent_ids += 1
                    judge("messages", int(raw), key, refs)
        finally:
            client.close()
    older = (
        f", older than the moment (deleted after the RDB): {refs['older']}" if redis_older else ""
    )
    return CheckResult(
        REDIS_REFERENCES,
        not problems,
        f"{counters} unread counters, {recent_ids} recent-list ids: {refs['existing']} point "
        f"to existing rows, {refs['dangling']} dangling, newer than PostgreSQL (skew): "
        f"{refs['newer']}{older}; keys naming a missing user or room: {keys['dangling']}",
        {
            "counters": counters,
            "recent_ids": recent_ids,
            "references": counters + recent_ids,
            **refs,
            "dangling_keys": keys["dangling"],
            "older_keys": keys["older"],
            "skew": skew,
        },
        problems[:MAX_EXAMPLES],
    )


LATEST_SQL = """
SELECT m.id, m.sender_id, m.kind, m.content, m.created_at,
       a.object_key, a.size_bytes, a.sha256
FROM (SELECT * FROM messages WHERE room_id = %s
      ORDER BY created_at DESC, id DESC LIMIT %s) m
LEFT JOIN attachments a ON a.message_id = m.id AND a.message_created_at = m.created_at
ORDER BY m.created_at DESC, m.id DESC
"""


def latest_messages_readable(
    endpoints: StackEndpoints, *, sample: int = 10, seed: int = 0
) -> CheckResult:
    """The latest 50 messages of sampled rooms, read as the app reads them, with their files."""
    bucket = endpoints.buckets[0]
    from drtool.sources.minio import MinioStore

    store = MinioStore(endpoints.minio)
    with _connect_pg(endpoints) as conn:
        room_ids = [r[0] for r in conn.execute("SELECT id FROM chat_rooms ORDER BY id")]
        busiest = conn.execute(
            "SELECT room_id FROM messages GROUP BY room_id ORDER BY count(*) DESC LIMIT 1"
        ).fetchone()
        chosen = random.Random(seed).sample(room_ids, min(sample, len(room_ids)))
        if busiest and busiest[0] not in chosen:
            chosen.append(busiest[0])
        problems: list[str] = []
        messages = files = 0
        for room_id in chosen:
            rows = conn.execute(LATEST_SQL, (room_id, LATEST_PAGE)).fetchall()
            messages += len(rows)
            times = [r[4] for r in rows]
            if times != sorted(times, reverse=True):
                problems.append(f"room {room_id}: latest messages out of order")
            for row in rows:
                if row[3] is None or row[1] is None:
                    problems.append(f"room {room_id} message {row[0]}: unreadable row")
                if row[5] is not None:
                    files += 1
                    got = store.digest(bucket, row[5])
                    if got != (row[6], row[7]):
                        problems.append(
                            f"room {room_id} message {row[0]}: file {row[5]} not intact"
                        )
    return CheckResult(
        "latest messages readable",
        not problems,
        f"{len(chosen)} rooms sampled, {messages} messages and {files} files read",
        {"rooms": len(chosen), "messages": messages, "files": files},
        problems[:MAX_EXAMPLES],
    )
