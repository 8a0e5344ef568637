"""The included co-talk stack as local processes: up, seed, status, down.

Each named stack lives in ``<home>/stacks/<name>/``; ``up`` writes ``drtool.toml`` there, a
ready-to-use config for the running stack whose credentials are files beside it (mode 0600).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tomli_w

from drtool.endpoints import StackEndpoints
from drtool.errors import UsageError
from drtool.runtime.local import LocalStack
from drtool.stores import registry

if TYPE_CHECKING:  # the seeder (psycopg, redis, boto3, rich) loads only to seed: restores
    # and drills find stacks here without it (ADR 0032)
    from chat_stack.seed import SeedResult

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,30}$")


def stack_dir(home: Path, name: str) -> Path:
    """The state directory of stack ``name``."""
    if not NAME_RE.match(name):
        raise UsageError(
            f"stack name {name!r}: use 1-31 lowercase letters, digits, '-' or '_' (e.g. source)"
        )
    return home / "stacks" / name


def config_path(home: Path, name: str) -> Path:
    """Where ``up`` writes the stack's drtool config."""
    return stack_dir(home, name) / "drtool.toml"


@dataclass(frozen=True)
class StackUp:
    """A started stack and the config file written for it."""

    stack: LocalStack
    config_path: Path


def stack_up(
    home: Path, name: str, *, pg_major: int | None = None, pg_bin_dir: Path | None = None
) -> StackUp:
    """Start the stack's servers (PostgreSQL of ``pg_major`` or from ``pg_bin_dir``, else
    Debian's newest) and write a config for it."""
    stack = LocalStack.up(stack_dir(home, name), name, pg_major=pg_major, pg_bin_dir=pg_bin_dir)
    try:
        path = write_config(stack.state_dir / "drtool.toml", stack_config(stack), stack.name)
    except BaseException:
        stack.down()
        raise
    return StackUp(stack, path)


def stack_config(stack: LocalStack) -> dict[str, Any]:
    """Config sections for a running local stack; credentials stay in its 0600 secret files."""
    ep = stack.endpoints
    secrets = stack.state_dir / "secrets"
    return {
        "postgres": {
            "host": ep.postgres.host,
            "port": ep.postgres.port,
            "user": ep.postgres.user,
            "dbname": ep.postgres.dbname,
            "password_file": str(secrets / "pg_password"),
            # the server's own client tools: pg_dump must not be older than the server
            "bin_dir": str(stack.postgres.bin_dir),
        },
        "redis": {
            "host": ep.redis.host,
            "port": ep.redis.port,
            "password_file": str(secrets / "redis_password"),
        },
        "minio": {
            "endpoint_url": ep.minio.endpoint_url,
            "region": ep.minio.region,
            "access_key_file": str(secrets / "s3_access_key"),
            "secret_key_file": str(secrets / "s3_secret_key"),
            "buckets": list(ep.buckets),
        },
    }


def write_config(path: Path, doc: dict[str, Any], what: str) -> Path:
    """Write a drtool TOML config (it holds no secret values, only paths to them)."""
    path.write_text(f"# drtool config for {what}\n" + tomli_w.dumps(doc))
    return path


def stack_load(home: Path, name: str) -> LocalStack:
    """The running stack ``name`` (NotFound when it is not up)."""
    return LocalStack.load(stack_dir(home, name))


def stack_down(home: Path, name: str) -> None:
    """Stop the stack's servers and remove its state."""
    stack_load(home, name).down()


def stack_seed(
    home: Path,
    name: str,
    *,
    users: int,
    rooms: int,
    messages: int,
    attachments: int,
    seed: int,
    progress: bool,
    force: bool = False,
) -> SeedResult:
    """Seed the running stack ``name`` with deterministic chat data."""
    endpoints = stack_load(home, name).endpoints
    from chat_stack.seed import SeedSizes
    from chat_stack.seed import seed as seed_chat_data

    sizes = SeedSizes(users=users, rooms=rooms, messages=messages, attachments=attachments)
    return seed_chat_data(endpoints, sizes, seed, progress, force)


def store_counts(endpoints: StackEndpoints) -> list[list[object]]:
    """What each store holds: rows per table, Redis keys, objects and bytes per bucket."""
    return [row for store in registry.STORES for row in store.counts(endpoints)]


def stack_status(home: Path, name: str) -> dict[str, Any]:
    """The servers of stack ``name`` and, when all run, what each store holds."""
    stack = stack_load(home, name)
    servers = stack.status()
    running = all(s["running"] for s in servers.values())
    return {
        "name": name,
        "servers": servers,
        "counts": store_counts(stack.endpoints) if running else [],
    }
