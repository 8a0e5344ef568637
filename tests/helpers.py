"""Shared test helpers: a configured repository with real snapshots of a seeded stack, and
direct comparisons of what two stacks hold (rows, Redis keys, objects).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
import redis
from psycopg import sql

from chat_stack.seed import SeedSizes, seed
from drtool import keys
from drtool.config import load_config
from drtool.endpoints import PostgresEndpoint, RedisEndpoint, S3Endpoint, StackEndpoints
from drtool.runtime.redisserver import RedisServer
from drtool.s3session import s3_client
from drtool.services import repo as repo_svc
from drtool.services.backup import COMPONENTS, run_backup
from drtool.services.stack import write_config

SMALL = SeedSizes(users=50, rooms=10, messages=2000, attachments=20)
DRTOOL = str(Path(sys.executable).with_name("drtool"))


def stack_sections(stack: StackEndpoints, secrets: Path) -> dict[str, Any]:
    """Config sections for ``stack``; its credentials go to 0600 files under ``secrets``."""
    secrets.mkdir(parents=True, exist_ok=True, mode=0o700)
    tag = uuid.uuid4().hex[:8]

    def secret(name: str, value: str | None) -> str:
        path = secrets / f"{tag}-{name}"
        path.write_text(value or "")
        path.chmod(0o600)
        return str(path)

    pg, rd, s3 = stack.postgres, stack.redis, stack.minio
    return {
        "postgres": {
            "host": pg.host,
            "port": pg.port,
            "user": pg.user,
            "dbname": pg.dbname,
            "password_file": secret("pg", pg.password),
        },
        "redis": {
            "host": rd.host,
            "port": rd.port,
            "password_file": secret("redis", rd.password),
            **({"username": rd.username} if rd.username else {}),
        },
        "minio": {
            "endpoint_url": s3.endpoint_url,
            "region": s3.region,
            "access_key_file": secret("s3-access", s3.access_key),
            "secret_key_file": secret("s3-secret", s3.secret_key),
            "buckets": list(stack.buckets),
        },
    }


@dataclass(frozen=True)
class Repository:
    """A file:// repository backing up ``source``, with the keys and configs to use it."""

    directory: Path
    source: StackEndpoints
    identity: Path
    verify_key: str
    backup_config: Path

    @property
    def url(self) -> str:
        """The repository URL."""
        return (self.directory / "repository").as_uri()

    def backup(self, now: datetime | None = None, components: tuple[str, ...] = COMPONENTS) -> str:
        """Take one snapshot of the source stack (``components`` of it); return its id."""
        cfg = load_config(self.backup_config, {})
        result = run_backup(cfg, home=self.directory, env={}, components=components, now=now)
        return result.snapshot_id

    def operator_config(
        self,
        path: Path,
        targets: dict[str, StackEndpoints] | None = None,
        *,
        identity: Path | None = None,
        url: str | None = None,
        scratch: Path | None = None,
    ) -> Path:
        """A restore-side config: identity, pinned verify key, restore ``targets``."""
        secrets = path.parent / "secrets"
        doc: dict[str, Any] = {
            **stack_sections(self.source, secrets),
            "repository": {"url": url or self.url},
            "keys": {
                "identity_file": str(identity or self.identity),
                "verify_key": self.verify_key,
            },
            "targets": {
                name: stack_sections(stack, secrets) for name, stack in (targets or {}).items()
            },
        }
        if scratch is not None:
            doc["backup"] = {"scratch_dir": str(scratch)}
        return write_config(path, doc, "a test operator")


def make_repository(directory: Path, source: StackEndpoints) -> Repository:
    """Keys, a backup-host config and an initialised file:// repository for ``source``."""
    (directory / "keys").mkdir(parents=True, mode=0o700)
    (directory / "repository").mkdir()
    identity = directory / "keys" / "operator.key"
    recipient = keys.write_identity(identity, passphrase=None)
    verify_key = keys.write_signing_key(directory / "keys" / "signing.key")
    backup_config = write_config(
        directory / "backup.toml",
        {
            **stack_sections(source, directory / "secrets"),
            "repository": {"url": (directory / "repository").as_uri()},
            "keys": {
                "recipients": [recipient],
                "signing_key_file": str(directory / "keys" / "signing.key"),
                "verify_key": verify_key,
            },
            "backup": {"state_dir": str(directory / "state")},
        },
        "a test backup host",
    )
    repo_svc.init_repo(load_config(backup_config, {}))
    return Repository(directory, source, identity, verify_key, backup_config)


@contextmanager
def source_stack(
    directory: Path, pg_server: PostgresEndpoint, s3_server: S3Endpoint, sizes: SeedSizes = SMALL
) -> Iterator[StackEndpoints]:
    """A seeded source stack: its own database, its own redis-server, its own bucket."""
    name = f"src_{uuid.uuid4().hex[:10]}"
    admin = dataclasses.replace(pg_server, dbname="postgres")
    execute(admin, sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    bucket = f"src-{uuid.uuid4().hex[:10]}"
    s3_client(s3_server).create_bucket(Bucket=bucket)
    server = RedisServer(directory / "redis-source")
    server.start()
    try:
        stack = StackEndpoints(
            dataclasses.replace(pg_server, dbname=name), server.endpoint, s3_server, (bucket,)
        )
        seed(stack, sizes, 7, progress=False)
        yield stack
    finally:
        server.stop()
        execute(
            admin, sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


def execute(endpoint: PostgresEndpoint, statement: Any, params: tuple[Any, ...] = ()) -> Any:
    """Run one statement (autocommit) on ``endpoint``; the first row or None."""
    with psycopg.connect(**endpoint.connect_kwargs(), autocommit=True) as conn:  # type: ignore[arg-type]
        cur = conn.execute(statement, params)
        return cur.fetchone() if cur.description else None


def databases(endpoint: PostgresEndpoint, like: str) -> list[str]:
    """Names of the server's databases matching the LIKE pattern."""
    admin = dataclasses.replace(endpoint, dbname="postgres")
    with psycopg.connect(**admin.connect_kwargs()) as conn:  # type: ignore[arg-type]
        rows = conn.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE %s ORDER BY 1", (like,)
        ).fetchall()
    return [r[0] for r in rows]


def table_rows(endpoint: PostgresEndpoint) -> dict[str, list[str]]:
    """Every user table's rows as text, sorted: a direct comparison of two databases."""
    with psycopg.connect(**endpoint.connect_kwargs()) as conn:  # type: ignore[arg-type]
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


@dataclass(frozen=True)
class CliRun:
    """A finished ``drtool`` subprocess."""

    code: int
    stdout: str
    stderr: str


def run_drtool(
    *args: str, config: Path, home: Path | None = None, extra_env: dict[str, str] | None = None
) -> CliRun:
    """Run the ``drtool`` CLI (stdin not a terminal); its exit code and output."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DRTOOL_")}
    env.update(extra_env or {})
    argv = [DRTOOL, "--config", str(config), *(["--home", str(home)] if home else []), *args]
    done = subprocess.run(
        argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env, timeout=600
    )
    return CliRun(done.returncode, done.stdout, done.stderr)


def alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie is dead: it only waits to be reaped)."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat_line.rsplit(")", 1)[1].split()[0] != "Z"


def processes_in(directory: Path) -> list[str]:
    """Live processes that run in ``directory`` or name it on their command line."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or not alive(int(proc.name)):
            continue
        try:
            cwd = os.readlink(proc / "cwd")
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if cwd.startswith(str(directory)) or str(directory) in cmdline:
            found.append(f"{proc.name}: {cmdline}")
    return found
