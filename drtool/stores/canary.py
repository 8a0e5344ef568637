"""Canaries: a small, timed write to each store, so a restore can measure what it lost.

A snapshot's time says when the backup started, not what each store's copy holds: a Redis
RDB, a bucket listing and a PostgreSQL snapshot are taken at different moments, and a copy
can be older than it looks (a stalled WAL stream, a capture loop that missed a minute). So
drtool writes, every minute, the current time into each store:

- PostgreSQL: a row of ``drtool.canary`` (its own schema, the only table drtool writes);
- Redis: the key ``drtool:canary`` (one key, overwritten);
- MinIO: an object ``drtool-canary/<time>`` in each protected bucket (older ones removed).

After a restore, the newest canary found in each store bounds what that store lost: the
moment asked for minus the newest canary is the store's **measured** recovery point (at most
one interval more than the truth). A store with no canary reports none, never zero.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import psycopg
import redis

from drtool.endpoints import StackEndpoints
from drtool.errors import DrtoolError, NotFound, SourceError
from drtool.sources.minio import MinioStore, ObjectMeta
from drtool.sources.redis_client import connect as connect_redis

log = logging.getLogger(__name__)

SCHEMA = "drtool"
TABLE = f"{SCHEMA}.canary"
REDIS_KEY = "drtool:canary"
OBJECT_PREFIX = "drtool-canary/"
TIME_FORMAT = "%Y%m%dT%H%M%S.%fZ"  # sorts as it reads: the newest key is the last listed
DEFAULT_KEEP = timedelta(days=1)

POSTGRES, REDIS = "postgres", "redis"


def minio_name(bucket: str) -> str:
    """The store name a bucket's canary is reported under."""
    return f"minio:{bucket}"


@dataclass
class CanaryWrite:
    """What one round wrote: the time, and per store either nothing or the error's message."""

    at: datetime
    written: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


def write_canaries(
    endpoints: StackEndpoints,
    buckets: Iterable[str],
    *,
    now: datetime | None = None,
    keep: timedelta = DEFAULT_KEEP,
) -> CanaryWrite:
    """Write one canary to each store; a store that fails is reported, the others still written.

    One store down must not stop the canaries of the others: the measured RPO of a store is
    only as good as its canaries were regular.
    """
    at = now or datetime.now(UTC)
    result = CanaryWrite(at)
    writers: list[tuple[str, Callable[[], None]]] = [
        (POSTGRES, lambda: _write_postgres(endpoints, at, keep)),
        (REDIS, lambda: _write_redis(endpoints, at)),
    ]
    store: MinioStore | None = None
    for bucket in buckets:
        store = store or MinioStore(endpoints.minio)
        writers.append((minio_name(bucket), _minio_writer(store, bucket, at, keep)))
    for name, write in writers:
        try:
            write()
            result.written.append(name)
        except DrtoolError as exc:
            result.failed[name] = exc.message
        except (psycopg.Error, OSError) as exc:
            result.failed[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    return result


def _write_postgres(endpoints: StackEndpoints, at: datetime, keep: timedelta) -> None:
    """One row (the schema and table created when missing); rows older than ``keep`` go."""
    try:
        with psycopg.connect(**endpoints.postgres.connect_kwargs(), autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}")
            conn.execute(f"CREATE TABLE IF NOT EXISTS {TABLE} (written_at timestamptz PRIMARY KEY)")
            with conn.transaction():
                conn.execute(
                    f"INSERT INTO {TABLE} (written_at) VALUES (%s) ON CONFLICT DO NOTHING", (at,)
                )
                conn.execute(f"DELETE FROM {TABLE} WHERE written_at < %s", (at - keep,))
    except psycopg.OperationalError as exc:
        raise SourceError(f"postgres canary: {str(exc).splitlines()[0][:200]}") from None


def _write_redis(endpoints: StackEndpoints, at: datetime) -> None:
    client = connect_redis(endpoints.redis, timeout=5.0)
    try:
        client.set(REDIS_KEY, at.isoformat())
    except (redis.RedisError, OSError) as exc:  # named, never a value
        raise SourceError(f"redis canary: {type(exc).__name__}") from None
    finally:
        client.close()


def _minio_writer(
    store: MinioStore, bucket: str, at: datetime, keep: timedelta
) -> Callable[[], None]:
    def write() -> None:
        key = OBJECT_PREFIX + at.strftime(TIME_FORMAT)
        meta = ObjectMeta("text/plain", {"drtool-canary": "1"})
        store.put_bytes(bucket, key, at.isoformat().encode(), meta)
        for obj in store.list_objects(bucket, OBJECT_PREFIX):
            written = parse_key(obj.key)
            if written is not None and written < at - keep:
                store.delete(bucket, obj.key)

    return write


def parse_key(key: str) -> datetime | None:
    """The time in a canary object's key, None for any other key."""
    if not key.startswith(OBJECT_PREFIX):
        return None
    try:
        return datetime.strptime(key[len(OBJECT_PREFIX) :], TIME_FORMAT).replace(tzinfo=UTC)
    except ValueError:
        return None


def newest_canaries(
    endpoints: StackEndpoints, buckets: Iterable[str]
) -> dict[str, datetime | None]:
    """The newest canary in each store (None: the store holds none, or could not be read)."""
    found: dict[str, datetime | None] = {
        POSTGRES: newest_postgres(endpoints),
        REDIS: _newest_redis(endpoints),
    }
    store: MinioStore | None = None
    for bucket in buckets:
        store = store or MinioStore(endpoints.minio)
        found[minio_name(bucket)] = _newest_object(store, bucket)
    return found


def newest_postgres(endpoints: StackEndpoints) -> datetime | None:
    """The newest canary in PostgreSQL alone (a drill of PostgreSQL reads no other store)."""
    try:
        with psycopg.connect(**endpoints.postgres.connect_kwargs()) as conn:
            exists = conn.execute("SELECT to_regclass(%s)", (TABLE,)).fetchone()
            if not exists or exists[0] is None:
                return None
            row = conn.execute(f"SELECT max(written_at) FROM {TABLE}").fetchone()
    except psycopg.Error as exc:
        log.warning("postgres canary: cannot read it (%s)", type(exc).__name__)
        return None
    value = row[0] if row else None
    return value.astimezone(UTC) if isinstance(value, datetime) else None


def _newest_redis(endpoints: StackEndpoints) -> datetime | None:
    client = connect_redis(endpoints.redis, timeout=5.0, decode=True)
    try:
        value = client.get(REDIS_KEY)
    except (redis.RedisError, OSError) as exc:
        log.warning("redis canary: cannot read it (%s)", type(exc).__name__)
        return None
    finally:
        client.close()
    try:
        return datetime.fromisoformat(str(value)).astimezone(UTC) if value else None
    except ValueError:
        return None


def _newest_object(store: MinioStore, bucket: str) -> datetime | None:
    newest: datetime | None = None
    try:
        for obj in store.list_objects(bucket, OBJECT_PREFIX):
            written = parse_key(obj.key)
            if written is not None and (newest is None or written > newest):
                newest = written
    except (NotFound, SourceError) as exc:
        log.warning("%s canary: cannot read it (%s)", minio_name(bucket), exc.message)
        return None
    return newest


def measured_rpo(moment: datetime, newest: dict[str, datetime | None]) -> dict[str, float | None]:
    """Seconds each store lost before ``moment`` by its newest canary (None: no canary).

    A negative value is a canary written after the moment: the store holds data from past
    the moment (a copy taken too late, or a clock skew) — never clamped to 0, which would
    read as "nothing lost"; :func:`past_the_moment` names such stores for the checks.
    """
    return {
        name: None if found is None else round((moment - found).total_seconds(), 1)
        for name, found in newest.items()
    }


def past_the_moment(measured: dict[str, float | None]) -> list[str]:
    """``redis: its newest canary is 12 s past the moment`` for each store holding one."""
    return [
        f"{name}: its newest canary is {-value:.1f} s past the moment"
        for name, value in sorted(measured.items())
        if value is not None and value < 0
    ]
