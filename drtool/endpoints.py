"""Value objects naming where a stack's servers are and how to log in.

They are plain data: the local runtime fills them in, the config builds them, the sources and
the restore targets read them. ``__repr__`` hides the secrets so that an endpoint can be logged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NotRequired, TypedDict


class PgConnectKwargs(TypedDict):
    """What :meth:`PostgresEndpoint.connect_kwargs` gives ``psycopg.connect(**...)``."""

    host: str
    port: int
    user: str
    dbname: str
    password: NotRequired[str]


@dataclass(frozen=True)
class PostgresEndpoint:
    """A PostgreSQL server and the database drtool works on."""

    host: str
    port: int
    user: str
    dbname: str
    password: str | None = field(default=None, repr=False)

    def conninfo(self, dbname: str | None = None) -> str:
        """A libpq key/value string without the password (pass it via ``PGPASSWORD``)."""
        return f"host={self.host} port={self.port} user={self.user} dbname={dbname or self.dbname}"

    def libpq_env(self) -> dict[str, str]:
        """Environment for libpq tools (pg_dump, pg_restore, psql): the password stays off argv."""
        env = {"PGHOST": self.host, "PGPORT": str(self.port), "PGUSER": self.user}
        if self.password:
            env["PGPASSWORD"] = self.password
        return env

    def connect_kwargs(self, dbname: str | None = None) -> PgConnectKwargs:
        """Keyword arguments for ``psycopg.connect`` (typed, so no caller needs a cast)."""
        kwargs: PgConnectKwargs = {
            "host": self.host,
            "port": self.port,
            "user": self.user,
            "dbname": dbname or self.dbname,
        }
        if self.password:
            kwargs["password"] = self.password
        return kwargs


@dataclass(frozen=True)
class RedisEndpoint:
    """A Redis server."""

    host: str
    port: int
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False
    db: int = 0


@dataclass(frozen=True)
class S3Endpoint:
    """An S3-compatible server (MinIO, SeaweedFS, AWS S3, Backblaze B2)."""

    endpoint_url: str
    access_key: str = field(repr=False)
    secret_key: str = field(repr=False)
    region: str = "us-east-1"


@dataclass(frozen=True)
class StackEndpoints:
    """The three data stores of one co-talk stack."""

    postgres: PostgresEndpoint
    redis: RedisEndpoint
    minio: S3Endpoint
    buckets: tuple[str, ...] = ("attachments",)
