"""Direct comparisons of what two stacks hold: PostgreSQL rows, Redis keys, S3 objects."""

from __future__ import annotations

import dataclasses
from typing import Any

import psycopg
import redis
from psycopg import sql

from drtool.endpoints import PostgresEndpoint, RedisEndpoint, S3Endpoint
from drtool.s3session import s3_client


def execute(endpoint: PostgresEndpoint, statement: Any, params: tuple[Any, ...] = ()) -> Any:
    """Run one statement (autocommit) on ``endpoint``; the first row or None."""
    with psycopg.connect(**endpoint.connect_kwargs(), autocommit=True) as conn:
        cur = conn.execute(statement, params)
        return cur.fetchone() if cur.description else None


def databases(endpoint: PostgresEndpoint, like: str) -> list[str]:
    """Names of the server's databases matching the LIKE pattern."""
    admin = dataclasses.replace(endpoint, dbname="postgres")
    with psycopg.connect(**admin.connect_kwargs()) as conn:
        rows = conn.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE %s ORDER BY 1", (like,)
        ).fetchall()
    return [r[0] for r in rows]


def table_rows(endpoint: PostgresEndpoint) -> dict[str, list[str]]:
    """Every user table's rows as text, sorted: a direct comparison of two databases."""
    with psycopg.connect(**endpoint.connect_kwargs()) as conn:
        conn.execute("SET TimeZone = 'UTC'")
        tables = conn.execute(
            "SELECT schemaname, tablename FROM pg_tables "
            "WHERE schemaname NOT IN ('pg_catalog', 'information_schema') ORDER BY 1, 2"
        ).fetchall()
        return {
            f"{schema}.{table}": [
                row[0]
                for row in conn.execute(
                    sql.SQL("SELECT r::text FROM {} r ORDER BY 1").format(
                        sql.Identifier(schema, table)
                    )
                ).fetchall()
            ]
            for schema, table in tables
        }


def redis_contents(endpoint: RedisEndpoint) -> dict[tuple[int, bytes], tuple[str, Any, int]]:
    """Every key of every db: (type, canonical value, PTTL)."""
    out: dict[tuple[int, bytes], tuple[str, Any, int]] = {}
    for db in range(16):
        client = redis.Redis(
            host=endpoint.host, port=endpoint.port, password=endpoint.password, db=db
        )
        with client:
            for key in client.scan_iter(count=1000):
                raw = client.type(key)
                kind = raw.decode() if isinstance(raw, bytes) else raw
                value: Any
                if kind == "string":
                    value = client.get(key)
                elif kind == "list":
                    value = client.lrange(key, 0, -1)
                elif kind == "set":
                    value = sorted(client.smembers(key))
                elif kind == "hash":
                    value = sorted(client.hgetall(key).items())
                elif kind == "zset":
                    value = client.zrange(key, 0, -1, withscores=True)
                else:
                    value = client.dump(key)
                out[(db, key)] = (kind, value, client.pttl(key))
    return out


def assert_same_redis(
    source: RedisEndpoint, target: RedisEndpoint, ttl_tolerance_ms: int = 60_000
) -> None:
    """Same keys, types and values; TTLs present on the same keys and within tolerance."""
    a, b = redis_contents(source), redis_contents(target)
    assert a.keys() == b.keys()
    for key, (kind, value, ttl) in a.items():
        kind2, value2, ttl2 = b[key]
        assert (kind, value) == (kind2, value2), key
        assert (ttl < 0) == (ttl2 < 0), key
        assert abs(ttl - ttl2) <= ttl_tolerance_ms, key


def bucket_objects(
    endpoint: S3Endpoint, bucket: str
) -> dict[str, tuple[bytes, str, dict[str, str]]]:
    """Every object of ``bucket``: (bytes, content type, user metadata)."""
    client = s3_client(endpoint)
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for item in page.get("Contents", []):
            got = client.get_object(Bucket=bucket, Key=item["Key"])
            out[item["Key"]] = (got["Body"].read(), got["ContentType"], dict(got["Metadata"]))
    return out
