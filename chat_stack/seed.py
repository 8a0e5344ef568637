"""Fill a co-talk stack with deterministic fake data: PostgreSQL rows, MinIO objects, Redis state.

``python -m chat_stack.seed --users 50 --rooms 10 --messages 2000 --attachments 30 --seed 1``

The same seed gives the same rows and objects byte for byte: timestamps derive from a fixed
base date, ids are explicit. Redis holds state consistent with the rows (unread counters,
recent lists) plus ephemeral keys (sessions, presence, rate limits) whose TTLs and rate-limit
windows follow the wall clock. A stack that already holds chat data is refused unless
``force`` is set, which first wipes the chat tables, the layout's Redis keys and the bucket.
"""

from __future__ import annotations

import argparse
import bisect
import itertools
import math
import random
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any
from urllib.parse import quote

import psycopg
import redis
from psycopg import sql
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from chat_stack import generate, redis_layout
from chat_stack.schema import (
    TABLES,
    apply_schema,
    deferred_indexes_and_foreign_keys,
    month_start,
)
from chat_stack.stores import (
    OneLineParser,
    add_connection_options,
    connect_postgres,
    connect_redis,
    endpoints_from,
    ensure_bucket,
    run_cli,
)
from drtool.endpoints import StackEndpoints
from drtool.errors import UsageError
from drtool.s3session import s3_client

SEED_START = date(2025, 1, 1)
SEED_MONTHS = 6
BASE = datetime(SEED_START.year, SEED_START.month, SEED_START.day, tzinfo=UTC)
MIN_OBJECT = 1024
MAX_OBJECT = 2 * 1024 * 1024
UPLOAD_THREADS = 4
LIMITS = {"users": 10_000_000, "rooms": 1_000_000, "messages": 1_000_000_000}
REDIS_BATCH = 5000
COLUMNS = {
    "users": ("id", "username", "display_name", "email", "status", "created_at"),
    "friendships": ("user_id", "friend_id", "requester_id", "status", "created_at"),
    "chat_rooms": ("id", "kind", "name", "created_by", "created_at"),
    "chat_room_members": ("room_id", "user_id", "role", "joined_at"),
    "messages": ("id", "room_id", "sender_id", "kind", "content", "created_at", "edited_at"),
    "attachments": (
        "id",
        "room_id",
        "message_id",
        "message_created_at",
        "uploader_id",
        "object_key",
        "original_filename",
        "size_bytes",
        "sha256",
        "content_type",
        "created_at",
    ),
    "read_receipts": ("room_id", "user_id", "last_read_message_id", "updated_at"),
}


@dataclass(frozen=True)
class SeedSizes:
    """How much data to create."""

    users: int
    rooms: int
    messages: int
    attachments: int
    #: months the messages span from SEED_START (one partition each)
    months: int = SEED_MONTHS
    #: month-on-month growth of the message rate (0.1: each month 10 % more than the last), so
    #: recent months are larger as in a growing chat service; 0 spreads them evenly
    growth: float = 0.0

    def validate(self) -> None:
        """Raise a UsageError (exit 2) naming the first nonsense size."""
        for name, value in vars(self).items():
            if value < 0:
                raise UsageError(f"--{name} must be >= 0 (got {value})")
            if value > LIMITS.get(name, LIMITS["messages"]):
                raise UsageError(f"--{name} is too large (got {value})")
        if self.months < 1:
            raise UsageError(f"--months must be >= 1 (got {self.months})")
        if not 0.0 <= self.growth <= 10.0:  # also refuses nan
            raise UsageError(f"--growth must be between 0 and 10 (got {self.growth})")
        if self.users < 2:
            raise UsageError(f"--users must be >= 2 for anyone to chat (got {self.users})")
        if self.messages > 0 and self.rooms < 1:
            raise UsageError("--rooms must be >= 1 when --messages > 0")
        if self.attachments > self.messages:
            raise UsageError(
                f"--attachments ({self.attachments}) cannot exceed --messages ({self.messages})"
            )


@dataclass(frozen=True)
class SeedResult:
    """What a seed created."""

    counts: dict[str, int]
    redis_keys: int
    objects: int
    object_bytes: int
    seconds: float


@dataclass
class _Room:
    """A room being generated, with its members and the ids of its messages in order."""

    id: int
    kind: str
    name: str | None
    created_at: datetime
    members: list[int]
    joined: list[datetime]
    message_ids: list[int] = field(default_factory=list)
    last_post: dict[int, int] = field(default_factory=dict)  # user -> index in message_ids


@dataclass(frozen=True)
class _Attachment:
    """An attachment row before its object is uploaded."""

    id: int
    room_id: int
    message_id: int
    created_at: datetime
    uploader_id: int
    file_type: generate.FileType
    filename: str
    object_key: str
    size: int

    def row(self, size: int, sha256: str) -> tuple[object, ...]:
        """The attachments row, once the object is stored with this size and digest."""
        return (
            self.id,
            self.room_id,
            self.message_id,
            self.created_at,
            self.uploader_id,
            self.object_key,
            self.filename,
            size,
            sha256,
            self.file_type.content_type,
            self.created_at,
        )


@dataclass(frozen=True)
class _Loaded:
    """What the PostgreSQL load produced, for the Redis load and the result."""

    counts: dict[str, int]
    rooms: list[_Room]
    objects: list[tuple[int, str]]  # (size, sha256) per attachment
    unread: dict[int, dict[int, int]]  # user -> room -> count


def _progress(enabled: bool) -> Progress:
    """A progress display on stderr, inert unless enabled."""
    return Progress(
        TextColumn("{task.description:<12}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not enabled,
    )


def _at(offset_us: int) -> datetime:
    """The time ``offset_us`` microseconds after the base date."""
    return BASE + timedelta(microseconds=offset_us)


def span_us(months: int) -> int:
    """Microseconds from SEED_START to the end of its ``months``-th month."""
    return int((month_start(SEED_START, months) - SEED_START).total_seconds() * 1_000_000)


def time_offset(fraction: float, months: int, growth: float) -> int:
    """Where the message at ``fraction`` (0..1) of all messages falls, in us after SEED_START.

    The message rate grows by ``growth`` a month, an exponential density over the span: the
    inverse of its cumulative distribution maps evenly spaced fractions (message ids, in time
    order) to times, so the ids stay in time order and month m holds about (1+growth)**m as
    many messages as the first.
    """
    k = months * math.log1p(growth)
    share = fraction if k < 1e-12 else math.log1p(fraction * math.expm1(k)) / k
    return int(share * span_us(months))


def _copy(cur: psycopg.Cursor, table: str, rows: Iterable[Sequence[Any]]) -> int:
    """COPY rows (in the order of ``COLUMNS[table]``) into a table; returns how many."""
    statement = sql.SQL("COPY {} ({}) FROM STDIN").format(
        sql.Identifier(table), sql.SQL(", ").join(map(sql.Identifier, COLUMNS[table]))
    )
    count = 0
    with cur.copy(statement) as copy:
        for row in rows:
            copy.write_row(row)
            count += 1
    return count


def _users(seed: int, count: int) -> list[tuple[int, str, str, str, str, datetime]]:
    """User rows, created one after the other in the 400 days before the base date."""
    rng = random.Random(f"{seed}:users")
    slot = 369 * 86_400_000_000 // count
    rows = []
    for user_id in range(1, count + 1):
        name = generate.username(rng, user_id)
        status = "disabled" if rng.random() < 0.02 else "active"
        created = _at(-400 * 86_400_000_000 + (user_id - 1) * slot + rng.randrange(slot))
        rows.append(
            (user_id, name, generate.display_name(rng), f"{name}@cotalk.example", status, created)
        )
    return rows


def _friendships(
    seed: int, created: Sequence[datetime]
) -> list[tuple[int, int, int, str, datetime]]:
    """Friendship rows (smaller id first): each user asks up to four others."""
    rng = random.Random(f"{seed}:friendships")
    users = len(created)
    pairs: dict[tuple[int, int], tuple[int, int, int, str, datetime]] = {}
    for user in range(1, users + 1):
        for _ in range(rng.randint(0, 4)):
            other = rng.randint(1, users)
            key = (min(user, other), max(user, other))
            if other == user or key in pairs:
                continue
            status = rng.choices(("accepted", "pending", "blocked"), (80, 15, 5))[0]
            since = max(created[user - 1], created[other - 1])
            pairs[key] = (*key, user, status, since + timedelta(seconds=rng.randint(1, 86_400)))
    return list(pairs.values())


def _rooms(seed: int, users: int, count: int) -> list[_Room]:
    """Rooms with Zipf-like sizes: a few big groups, many small ones, 30 % direct chats."""
    rng = random.Random(f"{seed}:rooms")
    groups = count - count * 3 // 10 if count >= 4 else count
    rooms = []
    for room_id in range(1, count + 1):
        if room_id <= groups:
            size = min(users, max(3, round(users * 0.6 / room_id**0.9)))
            kind, name = "group", generate.room_name(rng, room_id)
        else:
            size, kind, name = 2, "direct", None
        members = rng.sample(range(1, users + 1), size)
        created = _at(-30 * 86_400_000_000 + rng.randrange(28 * 86_400_000_000))
        joined = [created] + [
            created + timedelta(seconds=rng.randint(1, 86_400)) for _ in members[1:]
        ]
        rooms.append(_Room(room_id, kind, name, created, members, joined))
    return rooms


def _member_rows(rooms: Sequence[_Room]) -> Iterator[tuple[int, int, str, datetime]]:
    """chat_room_members rows; the first member owns the room."""
    for room in rooms:
        for index, (user, joined) in enumerate(zip(room.members, room.joined, strict=True)):
            yield room.id, user, "owner" if index == 0 else "member", joined


def _message_rows(
    seed: int,
    count: int,
    attachments: int,
    rooms: Sequence[_Room],
    found: list[_Attachment],
    on_attachment: Callable[[_Attachment], None],
    months: int = SEED_MONTHS,
    growth: float = 0.0,
) -> Iterator[tuple[int, int, int, str, str, datetime, datetime | None]]:
    """Message rows in id (= time) order; records each room's messages and the attachments."""
    rng = random.Random(f"{seed}:messages")
    att_rng = random.Random(f"{seed}:attachments")
    chosen = set(att_rng.sample(range(count), attachments))
    cumulative = list(itertools.accumulate(1 / rank**0.8 for rank in range(1, len(rooms) + 1)))
    total = cumulative[-1] if cumulative else 0.0
    for index in range(count):
        room = rooms[min(bisect.bisect(cumulative, rng.random() * total), len(rooms) - 1)]
        sender = room.members[int(len(room.members) * rng.random() ** 2)]
        created = _at(time_offset((index + rng.random()) / max(count, 1), months, growth))
        message_id = index + 1
        if index in chosen:
            kind = "attachment"
            file_type = att_rng.choice(generate.FILE_TYPES)
            content = generate.file_name(att_rng, file_type)
            attachment_id = len(found) + 1
            key = (
                f"rooms/{room.id}/{created:%Y/%m}/{attachment_id}-"
                f"{att_rng.getrandbits(64):016x}{file_type.extension}"
            )
            size = generate.log_uniform_size(att_rng, MIN_OBJECT, MAX_OBJECT)
            item = _Attachment(
                attachment_id, room.id, message_id, created, sender, file_type, content, key, size
            )
            found.append(item)
            on_attachment(item)
        else:
            kind, content = "text", generate.message_text(rng)
        edited = created + timedelta(seconds=rng.randint(5, 600)) if rng.random() < 0.02 else None
        room.last_post[sender] = len(room.message_ids)
        room.message_ids.append(message_id)
        yield message_id, room.id, sender, kind, content, created, edited


def _put_object(client: Any, bucket: str, seed: int, item: _Attachment) -> tuple[int, str]:
    """Upload one attachment's object; returns its size and sha256."""
    data = generate.attachment_bytes(seed, item.id, item.size, item.file_type)
    digest = generate.sha256_hex(data)
    client.put_object(
        Bucket=bucket,
        Key=item.object_key,
        Body=data,
        ContentType=item.file_type.content_type,
        Metadata={
            "uploader-id": str(item.uploader_id),
            "room-id": str(item.room_id),
            "original-filename": quote(item.filename),
            "sha256": digest,
        },
    )
    return len(data), digest


class _Uploader:
    """Uploads attachments in a small thread pool while the rows are still being written.

    Leaving the block by an exception cancels the uploads not yet started.
    """

    def __init__(self, client: Any, bucket: str, seed: int) -> None:
        self._client, self._bucket, self._seed = client, bucket, seed
        self._pool = ThreadPoolExecutor(UPLOAD_THREADS, thread_name_prefix="upload")
        self._futures: list[Future[tuple[int, str]]] = []

    def __enter__(self) -> _Uploader:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        self._pool.shutdown(wait=True, cancel_futures=kind is not None)

    def submit(self, item: _Attachment) -> None:
        """Start uploading one attachment's object."""
        self._futures.append(
            self._pool.submit(_put_object, self._client, self._bucket, self._seed, item)
        )

    def results(self, bar: Progress) -> list[tuple[int, str]]:
        """Wait for every upload; (size, sha256) in submission order."""
        task = bar.add_task("attachments", total=len(self._futures))
        for _ in as_completed(self._futures):
            bar.advance(task)
        return [future.result() for future in self._futures]


def _receipts(
    seed: int, rooms: Sequence[_Room], months: int = SEED_MONTHS, growth: float = 0.0
) -> tuple[list[tuple[int, int, int | None, datetime]], dict[int, dict[int, int]]]:
    """Read receipts per member and the unread counters they imply (user -> room -> count).

    A member has read at least up to their own last message; 60 % are fully caught up.
    """
    rng = random.Random(f"{seed}:receipts")
    count = max(sum(len(room.message_ids) for room in rooms), 1)
    rows: list[tuple[int, int, int | None, datetime]] = []
    unread: dict[int, dict[int, int]] = {}
    for room in rooms:
        ids = room.message_ids
        for user, joined in zip(room.members, room.joined, strict=True):
            read = -1
            if ids:
                read = len(ids) - 1
                if rng.random() >= 0.6:
                    lag = 1 + int(rng.expovariate(1 / 15))
                    read = max(room.last_post.get(user, -1), len(ids) - 1 - lag)
            if read >= 0:
                # Reading happens up to an hour after the message was sent.
                at = time_offset(ids[read] / count, months, growth)
                seen = _at(at + rng.randrange(3_600_000_000))
                rows.append((room.id, user, ids[read], seen))
            else:
                rows.append((room.id, user, None, joined))
            if len(ids) - 1 - read > 0:
                unread.setdefault(user, {})[room.id] = len(ids) - 1 - read
    return rows, unread


def _load_redis(
    client: redis.Redis,
    seed: int,
    users: int,
    rooms: Sequence[_Room],
    unread: dict[int, dict[int, int]],
) -> int:
    """Write unread counters, recent lists, sessions, presence, rate limits; returns key count."""
    rng = random.Random(f"{seed}:redis")
    window = redis_layout.ratelimit_window(time.time())
    now = datetime.now(UTC).isoformat(timespec="seconds")
    pipe = client.pipeline(transaction=False)
    keys = 0

    def flush_if_full() -> None:
        if len(pipe) >= REDIS_BATCH:
            pipe.execute()

    for user, counts in unread.items():
        pipe.hset(redis_layout.unread_key(user), mapping=counts)  # type: ignore[arg-type]
        keys += 1
        flush_if_full()
    for room in rooms:
        if room.message_ids:
            latest = room.message_ids[-redis_layout.RECENT_LENGTH :][::-1]
            pipe.rpush(redis_layout.recent_key(room.id), *latest)
            keys += 1
            flush_if_full()
    online = 0
    for user in range(1, users + 1):
        if rng.random() < 0.3:
            key = redis_layout.session_key(f"{rng.getrandbits(128):032x}")
            agent = rng.choice(("co-talk-android/3.2", "co-talk-ios/3.2", "co-talk-web/1.9"))
            pipe.hset(key, mapping={"user_id": user, "created_at": now, "user_agent": agent})
            pipe.expire(key, redis_layout.SESSION_TTL_S)
            keys += 1
        if rng.random() < 0.1:
            pipe.set(redis_layout.presence_key(user), "online", ex=redis_layout.PRESENCE_TTL_S)
            pipe.sadd(redis_layout.ONLINE_USERS, user)
            pipe.set(
                redis_layout.ratelimit_key(user, window),
                rng.randint(1, 20),
                ex=redis_layout.RATELIMIT_TTL_S,
            )
            keys += 2
            online += 1
        flush_if_full()
    pipe.execute()
    return keys + (1 if online else 0)


def _existing_data(conn: psycopg.Connection, client: redis.Redis, s3: Any, bucket: str) -> str:
    """Where chat data already lives ('' when the stack is empty)."""
    for table in TABLES:
        exists = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (table,)).fetchone()
        if exists and exists[0]:
            query = sql.SQL("SELECT EXISTS (SELECT 1 FROM {})").format(sql.Identifier(table))
            row = conn.execute(query).fetchone()
            if row and row[0]:
                return f"PostgreSQL table {table} has rows"
    for pattern in redis_layout.ALL_PATTERNS:
        for _ in client.scan_iter(match=pattern, count=1000):
            return f"Redis has keys matching {pattern}"  # not the key: tokens are secrets
    if s3.list_objects_v2(Bucket=bucket, MaxKeys=1).get("KeyCount", 0):
        return f"bucket {bucket} has objects"
    return ""


def _wipe(conn: psycopg.Connection, client: redis.Redis, s3: Any, bucket: str) -> None:
    """Delete the chat tables' rows, the layout's Redis keys and the bucket's objects."""
    present = [
        table
        for table in TABLES
        if (row := conn.execute("SELECT to_regclass(%s)", (table,)).fetchone()) and row[0]
    ]
    if present:
        conn.execute(
            sql.SQL("TRUNCATE {} RESTART IDENTITY CASCADE").format(
                sql.SQL(", ").join(map(sql.Identifier, present))
            )
        )
        conn.execute("ALTER SEQUENCE IF EXISTS messages_id_seq RESTART")
    for pattern in redis_layout.ALL_PATTERNS:
        batch = list(client.scan_iter(match=pattern, count=1000))
        for start in range(0, len(batch), 1000):
            client.unlink(*batch[start : start + 1000])
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        objects = [{"Key": item["Key"]} for item in page.get("Contents", [])]
        if objects:
            s3.delete_objects(Bucket=bucket, Delete={"Objects": objects, "Quiet": True})


def _sync_sequences(conn: psycopg.Connection) -> None:
    """Move the id sequences past the explicitly assigned ids."""
    for table in ("users", "chat_rooms", "attachments"):
        conn.execute(
            sql.SQL(
                "SELECT setval(pg_get_serial_sequence({}, 'id'), coalesce(max(id), 0) + 1, false) "
                "FROM {}"
            ).format(sql.Literal(table), sql.Identifier(table))
        )
    conn.execute("SELECT setval('messages_id_seq', coalesce(max(id), 0) + 1, false) FROM messages")


def _load_postgres(
    cur: psycopg.Cursor, seed: int, sizes: SeedSizes, uploader: _Uploader, bar: Progress
) -> _Loaded:
    """COPY every table, uploading the attachments' objects meanwhile."""
    users = _users(seed, sizes.users)
    rooms = _rooms(seed, sizes.users, sizes.rooms)
    counts = {
        "users": _copy(cur, "users", users),
        "friendships": _copy(cur, "friendships", _friendships(seed, [u[5] for u in users])),
        "chat_rooms": _copy(
            cur, "chat_rooms", ((r.id, r.kind, r.name, r.members[0], r.created_at) for r in rooms)
        ),
        "chat_room_members": _copy(cur, "chat_room_members", _member_rows(rooms)),
    }
    attachments: list[_Attachment] = []
    task = bar.add_task("messages", total=sizes.messages)
    rows = _message_rows(
        seed,
        sizes.messages,
        sizes.attachments,
        rooms,
        attachments,
        uploader.submit,
        sizes.months,
        sizes.growth,
    )
    with deferred_indexes_and_foreign_keys(cur.connection, "messages"):
        counts["messages"] = _copy(cur, "messages", _advancing(rows, bar, task))
    stored = uploader.results(bar)
    counts["attachments"] = _copy(
        cur,
        "attachments",
        (a.row(size, digest) for a, (size, digest) in zip(attachments, stored, strict=True)),
    )
    receipts, unread = _receipts(seed, rooms, sizes.months, sizes.growth)
    counts["read_receipts"] = _copy(cur, "read_receipts", receipts)
    return _Loaded(counts, rooms, stored, unread)


def seed(
    endpoints: StackEndpoints, sizes: SeedSizes, seed: int, progress: bool, force: bool = False
) -> SeedResult:
    """Seed the stack's PostgreSQL, MinIO bucket (``endpoints.buckets[0]``) and Redis.

    Rows are committed in one PostgreSQL transaction once every object is uploaded; Redis is
    written last. Raises UsageError for bad sizes or a non-empty stack (unless ``force``),
    SourceError when a server is unreachable.
    """
    sizes.validate()
    started = time.perf_counter()
    bucket = endpoints.buckets[0]
    s3 = s3_client(endpoints.minio, pool_size=UPLOAD_THREADS * 2)
    with connect_postgres(endpoints.postgres) as conn, connect_redis(endpoints.redis) as client:
        ensure_bucket(s3, endpoints.minio, bucket)
        where = _existing_data(conn, client, s3, bucket)
        if where and not force:
            raise UsageError(f"the stack already holds chat data ({where}); use --force")
        with (
            conn.transaction(),
            conn.cursor() as cur,
            _progress(progress) as bar,
            _Uploader(s3, bucket, seed) as uploader,
        ):
            if where:
                _wipe(conn, client, s3, bucket)
            apply_schema(conn, SEED_START, sizes.months)
            loaded = _load_postgres(cur, seed, sizes, uploader, bar)
            _sync_sequences(conn)
        conn.execute("ANALYZE")
        conn.commit()
        keys = _load_redis(client, seed, sizes.users, loaded.rooms, loaded.unread)
    return SeedResult(
        counts=loaded.counts,
        redis_keys=keys,
        objects=len(loaded.objects),
        object_bytes=sum(size for size, _ in loaded.objects),
        seconds=time.perf_counter() - started,
    )


def _advancing(rows: Iterator[Any], bar: Progress, task: Any, every: int = 10_000) -> Iterator[Any]:
    """Pass rows through, advancing a progress task every ``every`` rows."""
    for count, row in enumerate(rows, 1):
        yield row
        if count % every == 0:
            bar.advance(task, every)
    bar.update(task, completed=bar.tasks[task].total)


def _parser() -> argparse.ArgumentParser:
    """The command line of ``python -m chat_stack.seed``."""
    parser = OneLineParser(prog="python -m chat_stack.seed", description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=1000, help="users (>= 2) [1000]")
    parser.add_argument("--rooms", type=int, default=100, help="chat rooms [100]")
    parser.add_argument("--messages", type=int, default=100_000, help="messages [100000]")
    parser.add_argument("--attachments", type=int, default=200, help="attachments [200]")
    parser.add_argument(
        "--months", type=int, default=SEED_MONTHS, help=f"months of history [{SEED_MONTHS}]"
    )
    parser.add_argument(
        "--growth",
        type=float,
        default=0.0,
        help="month-on-month growth of the message rate, e.g. 0.1 for recent months larger [0]",
    )
    parser.add_argument("--seed", type=int, default=1, help="random seed [1]")
    parser.add_argument("--force", action="store_true", help="wipe existing chat data first")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_connection_options(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: parse flags, seed, print a summary."""
    args = _parser().parse_args(argv)

    def body() -> None:
        sizes = SeedSizes(
            args.users, args.rooms, args.messages, args.attachments, args.months, args.growth
        )
        sizes.validate()
        endpoints = endpoints_from(args)
        show = sys.stderr.isatty() and not args.no_progress
        result = seed(endpoints, sizes, args.seed, progress=show, force=args.force)
        rows = ", ".join(f"{table} {count}" for table, count in result.counts.items())
        rate = result.counts["messages"] / result.seconds if result.seconds else 0.0
        print(f"seeded {rows}")
        print(
            f"objects {result.objects} ({result.object_bytes / 1e6:.1f} MB), redis keys "
            f"{result.redis_keys}; {result.seconds:.1f} s, {rate:,.0f} messages/s"
        )

    run_cli(body)


if __name__ == "__main__":
    main()
