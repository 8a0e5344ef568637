"""Keep writing chat messages into a seeded stack, as the co-talk app would.

``python -m chat_stack.traffic --rate 50 --duration 60`` (Ctrl-C or SIGTERM stops it cleanly)

Each message: its attachment object (about 1 in 20 of 1 KiB-256 KiB by default;
``--attachment-share`` and ``--attachment-bytes MIN-MAX`` change the mix, e.g. the capture
benchmark's 10 % of 100 KB-5 MB) is uploaded first, then the message, the
attachment row and the sender's read receipt are committed, then Redis is updated (unread
counters of the other members, the room's recent list, presence, rate limit). Messages due in
the same tick share one transaction and one Redis MULTI.
"""

from __future__ import annotations

import argparse
import itertools
import math
import random
import secrets
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from types import FrameType
from typing import Any
from urllib.parse import quote

import psycopg
import redis

from chat_stack import generate, redis_layout
from chat_stack.schema import ensure_partitions
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

ATTACHMENT_SHARE = 0.05
READ_SHARE = 0.2
MAX_OBJECT = 256 * 1024
MAX_BATCH = 200
MAX_RATE = 100_000.0


@dataclass(frozen=True)
class AttachmentMix:
    """Which share of messages carries an attachment, and its size range (log-uniform)."""

    share: float = ATTACHMENT_SHARE
    min_bytes: int = 1024
    max_bytes: int = MAX_OBJECT

    def check(self) -> None:
        """Raise a UsageError (exit 2) unless 0 <= share <= 1 and 1 <= min <= max."""
        if not 0 <= self.share <= 1:
            raise UsageError(f"--attachment-share must be between 0 and 1 (got {self.share:g})")
        if not 1 <= self.min_bytes <= self.max_bytes:
            raise UsageError(
                "--attachment-bytes must be MIN-MAX with 1 <= MIN <= MAX "
                f"(got {self.min_bytes}-{self.max_bytes})"
            )


@dataclass(frozen=True)
class TrafficStats:
    """What a traffic run wrote."""

    messages: int
    attachments: int
    object_bytes: int
    seconds: float


@dataclass(frozen=True)
class _Posted:
    """One committed message, for the Redis update that follows."""

    message_id: int
    room_id: int
    sender_id: int
    others: Sequence[int]
    reader_id: int | None


def _load_rooms(conn: psycopg.Connection) -> list[tuple[int, list[int]]]:
    """Every room with its member ids."""
    rows = conn.execute(
        "SELECT room_id, array_agg(user_id ORDER BY user_id) FROM chat_room_members "
        "GROUP BY room_id ORDER BY room_id"
    ).fetchall()
    return [(room_id, list(members)) for room_id, members in rows]


def _upload(
    client: Any, bucket: str, rng: random.Random, room_id: int, sender: int, mix: AttachmentMix
) -> dict[str, Any]:
    """Upload a new attachment object; returns the fields of its row."""
    file_type = rng.choice(generate.FILE_TYPES)
    filename = generate.file_name(rng, file_type)
    size = generate.log_uniform_size(rng, mix.min_bytes, mix.max_bytes)
    token = secrets.randbits(64)  # unique across runs, unlike the seeded choices
    data = generate.attachment_bytes(token, 0, size, file_type)
    digest = generate.sha256_hex(data)
    key = f"rooms/{room_id}/{datetime.now(UTC):%Y/%m}/t-{token:016x}{file_type.extension}"
    client.put_object(
        Bucket=bucket,
        Key=key,
        Body=data,
        ContentType=file_type.content_type,
        Metadata={
            "uploader-id": str(sender),
            "room-id": str(room_id),
            "original-filename": quote(filename),
            "sha256": digest,
        },
    )
    return {
        "object_key": key,
        "original_filename": filename,
        "size_bytes": size,
        "sha256": digest,
        "content_type": file_type.content_type,
    }


def _insert(
    conn: psycopg.Connection, room_id: int, sender: int, content: str, upload: dict[str, Any] | None
) -> int:
    """Insert one message (and its attachment row); returns the message id."""
    kind = "attachment" if upload else "text"
    [(message_id, created_at)] = conn.execute(
        "INSERT INTO messages (room_id, sender_id, kind, content, created_at) "
        "VALUES (%s, %s, %s, %s, clock_timestamp()) RETURNING id, created_at",
        (room_id, sender, kind, content),
    ).fetchall()
    if upload:
        conn.execute(
            "INSERT INTO attachments (room_id, message_id, message_created_at, uploader_id, "
            "object_key, original_filename, size_bytes, sha256, content_type, created_at) "
            "VALUES (%(room)s, %(message)s, %(at)s, %(sender)s, %(object_key)s, "
            "%(original_filename)s, %(size_bytes)s, %(sha256)s, %(content_type)s, %(at)s)",
            {"room": room_id, "message": message_id, "at": created_at, "sender": sender, **upload},
        )
    return int(message_id)


def _mark_read(conn: psycopg.Connection, room_id: int, user_id: int, message_id: int) -> None:
    """Move a member's read receipt to ``message_id``."""
    conn.execute(
        "INSERT INTO read_receipts (room_id, user_id, last_read_message_id, updated_at) "
        "VALUES (%s, %s, %s, clock_timestamp()) ON CONFLICT (room_id, user_id) DO UPDATE "
        "SET last_read_message_id = EXCLUDED.last_read_message_id, "
        "updated_at = EXCLUDED.updated_at",
        (room_id, user_id, message_id),
    )


def _update_redis(client: redis.Redis, posted: Sequence[_Posted]) -> None:
    """Apply a batch of committed messages to Redis in one MULTI."""
    window = redis_layout.ratelimit_window(time.time())
    pipe = client.pipeline(transaction=True)
    for item in posted:
        room = str(item.room_id)
        for user in item.others:
            if user == item.reader_id:
                pipe.hdel(redis_layout.unread_key(user), room)
            else:
                pipe.hincrby(redis_layout.unread_key(user), room, 1)
        pipe.hdel(redis_layout.unread_key(item.sender_id), room)
        recent = redis_layout.recent_key(item.room_id)
        pipe.lpush(recent, item.message_id)
        pipe.ltrim(recent, 0, redis_layout.RECENT_LENGTH - 1)
        pipe.set(
            redis_layout.presence_key(item.sender_id), "online", ex=redis_layout.PRESENCE_TTL_S
        )
        pipe.sadd(redis_layout.ONLINE_USERS, item.sender_id)
        limit = redis_layout.ratelimit_key(item.sender_id, window)
        pipe.incr(limit)
        pipe.expire(limit, redis_layout.RATELIMIT_TTL_S)
    pipe.execute()


def _write_batch(
    conn: psycopg.Connection,
    client: redis.Redis,
    s3: Any,
    bucket: str,
    rng: random.Random,
    rooms: Sequence[tuple[int, list[int]]],
    weights: Sequence[int],
    count: int,
    mix: AttachmentMix,
) -> tuple[int, int]:
    """Write ``count`` messages (objects, then rows, then Redis); returns attachments, bytes."""
    plans = []
    attachments = size = 0
    for room_id, members in rng.choices(rooms, cum_weights=weights, k=count):
        sender = rng.choice(members)
        upload = None
        if rng.random() < mix.share:
            upload = _upload(s3, bucket, rng, room_id, sender, mix)
            attachments, size = attachments + 1, size + upload["size_bytes"]
        others = [user for user in members if user != sender]
        reader = rng.choice(others) if others and rng.random() < READ_SHARE else None
        content = upload["original_filename"] if upload else generate.message_text(rng)
        plans.append((room_id, sender, others, reader, content, upload))
    posted = []
    with conn.transaction():
        for room_id, sender, others, reader, content, upload in plans:
            message_id = _insert(conn, room_id, sender, content, upload)
            _mark_read(conn, room_id, sender, message_id)
            if reader is not None:
                _mark_read(conn, room_id, reader, message_id)
            posted.append(_Posted(message_id, room_id, sender, others, reader))
    _update_redis(client, posted)
    return attachments, size


def check_pace(rate: float, duration: float) -> None:
    """Raise a UsageError (exit 2) unless 0 < rate <= MAX_RATE and duration is finite, >= 0."""
    if not 0 < rate <= MAX_RATE:
        raise UsageError(f"--rate must be > 0 and <= {MAX_RATE:g} messages/s (got {rate:g})")
    if not 0 <= duration < math.inf:
        raise UsageError(f"--duration must be a finite number of seconds >= 0 (got {duration:g})")


def run_traffic(
    endpoints: StackEndpoints,
    rate: float,
    duration: float,
    seed: int,
    stop_event: threading.Event,
    mix: AttachmentMix = AttachmentMix(),
) -> TrafficStats:
    """Write about ``rate`` messages/s for ``duration`` seconds or until ``stop_event`` is set.

    The batch in flight is finished before returning, so the stores stay consistent.
    """
    check_pace(rate, duration)
    mix.check()
    rng = random.Random(seed)
    bucket = endpoints.buckets[0]
    s3 = s3_client(endpoints.minio)
    with connect_postgres(endpoints.postgres) as conn, connect_redis(endpoints.redis) as client:
        conn.autocommit = True
        ensure_bucket(s3, endpoints.minio, bucket)
        rooms = _load_rooms(conn)
        if not rooms:
            raise UsageError("the database has no chat rooms: run python -m chat_stack.seed first")
        ensure_partitions(conn, datetime.now(UTC).date(), 2)
        weights = list(itertools.accumulate(len(members) for _, members in rooms))
        started = time.monotonic()
        messages = attachments = size = 0
        while not stop_event.is_set():
            elapsed = time.monotonic() - started
            if elapsed >= duration:
                break
            due = min(int(elapsed * rate) + 1 - messages, MAX_BATCH)
            if due <= 0:
                stop_event.wait(min((messages - elapsed * rate) / rate, duration - elapsed))
                continue
            new_attachments, new_size = _write_batch(
                conn, client, s3, bucket, rng, rooms, weights, due, mix
            )
            messages, attachments, size = (
                messages + due,
                attachments + new_attachments,
                size + new_size,
            )
    return TrafficStats(messages, attachments, size, time.monotonic() - started)


def _byte_range(text: str) -> tuple[int, int]:
    """``MIN-MAX`` in bytes (checked by :meth:`AttachmentMix.check`)."""
    low, _, high = text.partition("-")
    try:
        return int(low), int(high)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN-MAX in bytes (got {text!r})") from None


def _parser() -> argparse.ArgumentParser:
    """The command line of ``python -m chat_stack.traffic``."""
    parser = OneLineParser(prog="python -m chat_stack.traffic", description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=20.0, help="messages per second [20]")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds to run [60]")
    parser.add_argument("--seed", type=int, default=1, help="random seed [1]")
    parser.add_argument(
        "--attachment-share",
        type=float,
        default=ATTACHMENT_SHARE,
        help=f"share of messages with an attachment [{ATTACHMENT_SHARE}]",
    )
    parser.add_argument(
        "--attachment-bytes",
        type=_byte_range,
        default=(1024, MAX_OBJECT),
        metavar="MIN-MAX",
        help=f"attachment sizes, log-uniform [1024-{MAX_OBJECT}]",
    )
    add_connection_options(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: run traffic until the duration ends or SIGINT/SIGTERM arrives."""
    args = _parser().parse_args(argv)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    def body() -> None:
        check_pace(args.rate, args.duration)
        mix = AttachmentMix(args.attachment_share, *args.attachment_bytes)
        mix.check()
        endpoints = endpoints_from(args)
        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        stats = run_traffic(endpoints, args.rate, args.duration, args.seed, stop, mix)
        rate = stats.messages / stats.seconds if stats.seconds else 0.0
        print(
            f"wrote {stats.messages} messages ({rate:.1f}/s), {stats.attachments} attachments "
            f"({stats.object_bytes / 1e6:.1f} MB) in {stats.seconds:.1f} s"
        )

    run_cli(body)


if __name__ == "__main__":
    main()
