"""A whole co-talk stack (PostgreSQL, Redis, S3) as local processes in one state directory.

Layout of ``state_dir``::

    stack.json              name, ports, pids, paths (no secrets)
    secrets/                0700; pg_password, redis_password, s3_access_key, s3_secret_key (0600)
    postgres/               data/, sock/, postgres.log (owned by postgres when run as root)
    redis/                  redis.conf (0600), data/, redis.log
    minio/                  SeaweedFS data/, sockets, seaweed.log

The servers are detached: ``up`` and ``down`` may run in different processes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from drtool.endpoints import StackEndpoints
from drtool.errors import ConfigError, DrtoolError, NotFound, UsageError
from drtool.runtime import binaries
from drtool.runtime.pgserver import PostgresServer
from drtool.runtime.procs import ensure_ports_free, free_port_block, write_secret
from drtool.runtime.redisserver import RedisServer
from drtool.runtime.s3server import PORT_OFFSETS, SeaweedServer
from drtool.runtime.server import LocalServer

STATE_FILE = "stack.json"
STATE_FORMAT = 1
BUCKETS = ("attachments",)
_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,39}")
_SECRET_NAMES = ("pg_password", "redis_password", "s3_access_key", "s3_secret_key")


@dataclass(frozen=True)
class StackPorts:
    """The ports of one local stack (SeaweedFS uses ``s3_base`` +0..4 and +10000..10004)."""

    postgres: int
    redis: int
    s3_base: int

    @classmethod
    def pick(cls) -> StackPorts:
        """Free ports on 127.0.0.1, distinct from each other."""
        postgres = free_port_block((0,), set())
        redis = free_port_block((0,), {postgres})
        return cls(postgres, redis, free_port_block(PORT_OFFSETS, {postgres, redis}))


class LocalStack:
    """The three servers of a stack, their state recorded in ``state_dir/stack.json``."""

    def __init__(
        self,
        state_dir: Path,
        name: str,
        postgres: PostgresServer,
        redis: RedisServer,
        minio: SeaweedServer,
    ) -> None:
        self.state_dir = state_dir
        self.name = name
        self.postgres = postgres
        self.redis = redis
        self.minio = minio

    @classmethod
    def up(
        cls,
        state_dir: Path,
        name: str,
        *,
        pg_bin_dir: Path | None = None,
        pg_major: int | None = None,
        ports: StackPorts | None = None,
        timeout: float = 30.0,
    ) -> LocalStack:
        """Start a stack in a new (or empty) ``state_dir`` and create its buckets.

        ``pg_major`` (or ``pg_bin_dir``) picks the PostgreSQL server: a major that is not
        installed is MissingBinary, never a server of another major. On any failure, Ctrl-C
        included, whatever was started is stopped and ``state_dir`` removed before the error
        propagates.
        """
        if not _NAME.fullmatch(name):
            raise UsageError(f"stack name {name!r} is invalid; use 1-40 of a-z, 0-9, _ and -")
        state_dir = state_dir.absolute()
        if state_dir.exists() and any(state_dir.iterdir()):
            raise UsageError(
                f"state directory {state_dir} is not empty; choose a new one "
                "(or run `drtool stack down` if a stack is up there)"
            )
        ports = ports or StackPorts.pick()
        stack = cls(
            state_dir,
            name,
            PostgresServer(
                state_dir / "postgres",
                port=ports.postgres,
                bin_dir=binaries.pg_bin_dir(pg_bin_dir, major=pg_major),
            ),
            RedisServer(state_dir / "redis", port=ports.redis),
            SeaweedServer(state_dir / "minio", base_port=ports.s3_base),
        )
        for server in stack.servers:
            ensure_ports_free(f"the {server.what} server of stack {name!r}", server.ports)
        try:
            stack._create(timeout)
        except BaseException as exc:
            try:
                stack.down()
            except DrtoolError as cleanup:
                exc.add_note(f"cleanup after the failed start also failed: {cleanup}")
            raise
        return stack

    @classmethod
    def load(cls, state_dir: Path) -> LocalStack:
        """The stack recorded in ``state_dir`` (NotFound if there is none)."""
        state_dir = state_dir.absolute()
        path = state_dir / STATE_FILE
        try:
            state = json.loads(path.read_text())
            secret = {key: (state_dir / "secrets" / key).read_text() for key in _SECRET_NAMES}
        except FileNotFoundError as exc:
            raise NotFound(
                f"no local stack in {state_dir} ({Path(str(exc.filename)).name} is missing); "
                "start one with `drtool stack up`"
            ) from None
        except (OSError, ValueError) as exc:
            problem = type(exc).__name__
            raise ConfigError(f"{path}: unreadable ({problem}); remove {state_dir}") from None
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ConfigError(f"{path}: not a stack state of format {STATE_FORMAT}")
        try:
            servers = state["servers"]
            return cls(
                state_dir,
                str(state["name"]),
                PostgresServer.from_state(servers["postgres"], secret["pg_password"]),
                RedisServer.from_state(servers["redis"], secret["redis_password"]),
                SeaweedServer.from_state(
                    servers["minio"], secret["s3_access_key"], secret["s3_secret_key"]
                ),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"{path}: missing or bad field {exc}; remove {state_dir}") from None

    @property
    def servers(self) -> tuple[LocalServer, ...]:
        """PostgreSQL, Redis and the S3 server, in start order."""
        return (self.postgres, self.redis, self.minio)

    @property
    def endpoints(self) -> StackEndpoints:
        """Where the stack's data stores are, with their credentials."""
        return StackEndpoints(
            postgres=self.postgres.endpoint,
            redis=self.redis.endpoint,
            minio=self.minio.endpoint,
            buckets=BUCKETS,
        )

    def status(self) -> dict[str, dict[str, object]]:
        """Per server (postgres, redis, minio): running, pid, port, log."""
        return {
            "postgres": self.postgres.status(),
            "redis": self.redis.status(),
            "minio": self.minio.status(),
        }

    def down(self, keep_data: bool = False) -> None:
        """Stop every server (idempotent); then remove ``state_dir`` unless ``keep_data``."""
        errors: list[DrtoolError] = []
        for server in reversed(self.servers):
            try:
                server.stop()
            except DrtoolError as exc:
                errors.append(exc)
        if errors:
            raise errors[0]
        if not keep_data and self.state_dir.exists():
            shutil.rmtree(self.state_dir)

    def __enter__(self) -> LocalStack:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.down()

    def _create(self, timeout: float) -> None:
        """First start: secrets, servers and buckets, saving the state after each step.

        Saving as it goes lets ``stack down`` stop whatever did start when a later step fails.
        """
        self.state_dir.mkdir(parents=True, exist_ok=True)
        # 0711 lets the postgres user (when we are root) reach postgres/ without listing the rest
        self.state_dir.chmod(0o711 if os.geteuid() == 0 else 0o700)
        values = (
            self.postgres.password,
            self.redis.password,
            self.minio.access_key,
            self.minio.secret_key,
        )
        for key, value in zip(_SECRET_NAMES, values, strict=True):
            write_secret(self.state_dir / "secrets" / key, value)
        self.save()
        for server in self.servers:
            server.start(timeout)
            self.save()
        for bucket in BUCKETS:
            self.minio.create_bucket(bucket)

    def save(self) -> None:
        """Record the servers' state (ports, pids) in ``stack.json``."""
        state = {
            "format": STATE_FORMAT,
            "name": self.name,
            "buckets": list(BUCKETS),
            "servers": {
                "postgres": self.postgres.to_state(),
                "redis": self.redis.to_state(),
                "minio": self.minio.to_state(),
            },
        }
        tmp = self.state_dir / f"{STATE_FILE}.tmp"
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        tmp.replace(self.state_dir / STATE_FILE)
