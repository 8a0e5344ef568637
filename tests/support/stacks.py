"""A seeded source stack and a configured ``file://`` repository backing it up, with
operator configs for restores into target stacks.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from psycopg import sql

from chat_stack.seed import SeedSizes, seed
from drtool.config import load_config
from drtool.endpoints import PostgresEndpoint, S3Endpoint, StackEndpoints
from drtool.runtime.redisserver import RedisServer
from drtool.s3session import s3_client
from drtool.services.backup import run_backup
from drtool.services.repo_setup import set_up_repository
from drtool.services.stack import write_config
from drtool.stores.registry import COMPONENTS
from support.compare import execute

SMALL = SeedSizes(users=50, rooms=10, messages=2000, attachments=20)


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
    (directory / "repository").mkdir(parents=True)
    setup = set_up_repository(
        directory,
        {"url": (directory / "repository").as_uri()},
        stores=stack_sections(source, directory / "secrets"),
        state_dir=directory / "state",
    )
    return Repository(
        directory, source, setup.keys.identity_file, setup.keys.verify_key, setup.backup_config
    )


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
