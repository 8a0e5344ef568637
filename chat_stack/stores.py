"""Connection settings (flag > ``CHAT_*`` env > default) and clients for the three stores.

Secrets come only from the environment (``CHAT_PG_PASSWORD``, ``CHAT_REDIS_PASSWORD``,
``CHAT_S3_SECRET_KEY``, or the file named by the same variable with ``_FILE``), never from argv.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from typing import Any, NoReturn
from urllib.parse import unquote, urlsplit

import psycopg
import redis
from botocore.exceptions import BotoCoreError, ClientError

from drtool.endpoints import (
    PostgresEndpoint,
    RedisEndpoint,
    S3Endpoint,
    StackEndpoints,
)
from drtool.errors import ConfigError, DrtoolError, SourceError
from drtool.sources.redis_client import connect

STORE_ERRORS = (psycopg.Error, redis.RedisError, BotoCoreError, ClientError, OSError)


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line on stderr and exit 2."""

    def error(self, message: str) -> NoReturn:
        """Print ``error: <message>`` and exit 2."""
        self.exit(2, f"error: {message}\n")


def add_connection_options(parser: argparse.ArgumentParser) -> None:
    """Add the non-secret connection flags shared by seed and traffic."""
    group = parser.add_argument_group("connections (flags override CHAT_* environment)")
    group.add_argument("--pg-host", help="PostgreSQL host [CHAT_PG_HOST, 127.0.0.1]")
    group.add_argument("--pg-port", type=int, help="PostgreSQL port [CHAT_PG_PORT, 5432]")
    group.add_argument("--pg-user", help="PostgreSQL user [CHAT_PG_USER, cotalk]")
    group.add_argument("--pg-db", help="PostgreSQL database [CHAT_PG_DB, cotalk]")
    group.add_argument("--redis-url", help="redis://[user@]host:port/db [CHAT_REDIS_URL]")
    group.add_argument("--redis-host", help="Redis host [CHAT_REDIS_HOST, 127.0.0.1]")
    group.add_argument("--redis-port", type=int, help="Redis port [CHAT_REDIS_PORT, 6379]")
    group.add_argument("--redis-db", type=int, help="Redis database [CHAT_REDIS_DB, 0]")
    group.add_argument("--s3-endpoint", help="S3/MinIO URL [CHAT_S3_ENDPOINT, :9000]")
    group.add_argument("--s3-access-key", help="S3 access key id [CHAT_S3_ACCESS_KEY]")
    group.add_argument("--bucket", help="attachments bucket [CHAT_S3_BUCKET, attachments]")


def _secret(env: Mapping[str, str], name: str) -> str | None:
    """A secret from ``name`` or from the file named by ``name_FILE``."""
    path = env.get(f"{name}_FILE")
    if path:
        try:
            with open(path, encoding="utf-8") as handle:
                return handle.read().strip()
        except OSError as exc:
            raise ConfigError(f"{name}_FILE: cannot read {path} ({exc.strerror})") from None
    return env.get(name) or None


def _int(value: str, name: str) -> int:
    """Parse an integer setting or raise a ConfigError naming it."""
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{name}: not an integer (got {value!r})") from None


def _redis_endpoint(args: argparse.Namespace, env: Mapping[str, str]) -> RedisEndpoint:
    """The Redis endpoint from ``--redis-url``/``CHAT_REDIS_URL`` or host/port/db settings."""
    password = _secret(env, "CHAT_REDIS_PASSWORD")
    url = args.redis_url or env.get("CHAT_REDIS_URL")
    if url:
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss") or not parts.hostname:
            raise ConfigError("redis url: expected redis://host:port/db")
        path = parts.path.strip("/")
        return RedisEndpoint(
            host=parts.hostname,
            port=parts.port or 6379,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else password,
            tls=parts.scheme == "rediss",
            db=_int(path, "redis url database") if path else 0,
        )
    return RedisEndpoint(
        host=args.redis_host or env.get("CHAT_REDIS_HOST", "127.0.0.1"),
        port=args.redis_port or _int(env.get("CHAT_REDIS_PORT", "6379"), "CHAT_REDIS_PORT"),
        password=password,
        db=args.redis_db
        if args.redis_db is not None
        else _int(env.get("CHAT_REDIS_DB", "0"), "CHAT_REDIS_DB"),
    )


def endpoints_from(
    args: argparse.Namespace, env: Mapping[str, str] | None = None
) -> StackEndpoints:
    """Build the stack's endpoints from parsed flags, then ``CHAT_*`` variables, then defaults."""
    env = os.environ if env is None else env
    postgres = PostgresEndpoint(
        host=args.pg_host or env.get("CHAT_PG_HOST", "127.0.0.1"),
        port=args.pg_port or _int(env.get("CHAT_PG_PORT", "5432"), "CHAT_PG_PORT"),
        user=args.pg_user or env.get("CHAT_PG_USER", "cotalk"),
        dbname=args.pg_db or env.get("CHAT_PG_DB", "cotalk"),
        password=_secret(env, "CHAT_PG_PASSWORD"),
    )
    access_key = args.s3_access_key or env.get("CHAT_S3_ACCESS_KEY")
    secret_key = _secret(env, "CHAT_S3_SECRET_KEY")
    if not access_key or not secret_key:
        raise ConfigError("S3 credentials: set CHAT_S3_ACCESS_KEY and CHAT_S3_SECRET_KEY")
    minio = S3Endpoint(
        endpoint_url=args.s3_endpoint or env.get("CHAT_S3_ENDPOINT", "http://127.0.0.1:9000"),
        access_key=access_key,
        secret_key=secret_key,
    )
    bucket = args.bucket or env.get("CHAT_S3_BUCKET", "attachments")
    return StackEndpoints(
        postgres=postgres, redis=_redis_endpoint(args, env), minio=minio, buckets=(bucket,)
    )


def connect_postgres(endpoint: PostgresEndpoint) -> psycopg.Connection:
    """Open a connection or raise a SourceError naming the server."""
    try:
        return psycopg.connect(**endpoint.connect_kwargs(), connect_timeout=10)
    except psycopg.Error as exc:
        raise SourceError(
            f"cannot connect to PostgreSQL at {endpoint.host}:{endpoint.port}: {first_line(exc)}"
        ) from None


def connect_redis(endpoint: RedisEndpoint) -> redis.Redis:
    """Open a client (strings decoded) and ping it, or raise a SourceError naming the server."""
    client = connect(endpoint, decode=True)
    try:
        client.ping()
    except redis.RedisError as exc:
        client.close()
        raise SourceError(
            f"cannot connect to Redis at {endpoint.host}:{endpoint.port}: {first_line(exc)}"
        ) from None
    return client


def ensure_bucket(client: Any, endpoint: S3Endpoint, bucket: str) -> None:
    """Create the bucket unless it exists, or raise a SourceError naming the server."""
    try:
        client.head_bucket(Bucket=bucket)
        return
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket"):
            raise SourceError(
                f"S3 at {endpoint.endpoint_url}: bucket {bucket}: {first_line(exc)}"
            ) from None
    except BotoCoreError as exc:
        raise SourceError(f"cannot connect to S3 at {endpoint.endpoint_url}: {exc}") from None
    client.create_bucket(Bucket=bucket)


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's text."""
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()
    return type(exc).__name__


def run_cli(body: Any) -> NoReturn:
    """Run a command body; report errors on one line with their exit code, no traceback."""
    try:
        body()
    except DrtoolError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except STORE_ERRORS as exc:
        print(f"error: {type(exc).__name__}: {first_line(exc)}", file=sys.stderr)
        sys.exit(3)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(0)
