"""Shared fixtures: real PostgreSQL, Redis and SeaweedFS (S3) servers on loopback ports, and
the repositories built on them. Helpers the fixtures use live in tests/support/.

A missing server binary skips the tests that need it, unless ``DRTOOL_REQUIRE_SERVERS=1``
(set in CI), which turns the skip into a failure.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
import redis
from psycopg import sql
from support.repo_kit import T0, RepoKit, blob_id, file_kit, s3_kit
from support.servers import servers_required, skip_or_fail  # noqa: F401 (see below)

from drtool.endpoints import PostgresEndpoint, RedisEndpoint, S3Endpoint
from drtool.runtime.pgserver import PostgresServer
from drtool.runtime.redisserver import RedisServer
from drtool.runtime.s3server import SeaweedServer
from drtool.s3session import s3_client

pytest_plugins = ["support.docker_tier"]  # the Docker tier's fixtures

# skip_or_fail and servers_required moved to tests/support/servers.py; they stay importable from
# here until the branches written against the old conftest are merged


@pytest.hookimpl(tryfirst=True)  # before ``-m`` deselects
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that uses the Docker engine belongs to the Docker tier, and that tier is slow:
    ``-m "not slow"`` (the fast tier) leaves it out."""
    for item in items:
        if "docker_client" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.docker)
        if item.get_closest_marker("docker") is not None:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def runtime_root() -> Iterator[Path]:
    """A directory for local servers that the postgres user can enter (0711)."""
    root = Path(tempfile.mkdtemp(prefix="drtool-test-"))
    root.chmod(0o711)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_server(runtime_root: Path) -> Iterator[PostgresEndpoint]:
    """One PostgreSQL server for the session (superuser endpoint, database ``cotalk``)."""
    with servers_required():
        # a throw-away test server: durability off makes CREATE/DROP DATABASE fast
        server = PostgresServer(
            runtime_root / "pg",
            settings={"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"},
        )
    server.start()
    yield server.endpoint
    server.stop()


# The PostgreSQL majors CI runs the matrix tests on (tests/test_pg_matrix.py): Debian's 15,
# production's 16 and the newest, 18 (both from PyPI wheels, see .ci/bootstrap).
PG_MAJORS = (15, 16, 18)


@dataclasses.dataclass(frozen=True)
class PgUnderTest:
    """A session server of one PostgreSQL major, with that major's client tools."""

    major: int
    bin_dir: Path
    endpoint: PostgresEndpoint


@pytest.fixture(scope="session")
def pg_servers(runtime_root: Path) -> Iterator[Callable[[int], PgUnderTest]]:
    """A server per PostgreSQL major, started on first use; a missing major skips (or fails
    under ``DRTOOL_REQUIRE_SERVERS=1``), never runs on another major."""
    started: dict[int, tuple[PostgresServer, PgUnderTest]] = {}

    def server_of(major: int) -> PgUnderTest:
        if major not in started:
            with servers_required():
                server = PostgresServer(
                    runtime_root / f"pg{major}",
                    major=major,
                    settings={"fsync": "off", "synchronous_commit": "off"},
                )
            server.start()
            started[major] = (server, PgUnderTest(major, server.bin_dir, server.endpoint))
        return started[major][1]

    yield server_of
    for server, _ in started.values():
        server.stop()


@pytest.fixture(scope="session")
def redis_server(runtime_root: Path) -> Iterator[RedisEndpoint]:
    """One redis-server for the session."""
    with servers_required():
        server = RedisServer(runtime_root / "redis")
    server.start()
    yield server.endpoint
    server.stop()


@pytest.fixture(scope="session")
def s3_server(runtime_root: Path) -> Iterator[S3Endpoint]:
    """One SeaweedFS S3 server for the session."""
    with servers_required():
        server = SeaweedServer(runtime_root / "s3")
    server.start()
    yield server.endpoint
    server.stop()


@pytest.fixture
def pg_database(pg_server: PostgresEndpoint) -> Iterator[PostgresEndpoint]:
    """A fresh empty database for one test, dropped afterwards."""
    name = f"test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(
        pg_server.conninfo("postgres"), password=pg_server.password, autocommit=True
    ) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield dataclasses.replace(pg_server, dbname=name)
    with psycopg.connect(
        pg_server.conninfo("postgres"), password=pg_server.password, autocommit=True
    ) as conn:
        conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def redis_db(redis_server: RedisEndpoint) -> RedisEndpoint:
    """The session's Redis with every database flushed before the test."""
    with redis.Redis(
        host=redis_server.host, port=redis_server.port, password=redis_server.password
    ) as client:
        client.flushall()
    return redis_server


@pytest.fixture
def s3_bucket(s3_server: S3Endpoint) -> str:
    """The name of a fresh, empty bucket on the session's S3 server."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    s3_client(s3_server).create_bucket(Bucket=name)
    return name


# -- repositories of synthetic snapshots (tests/support/repo_kit.py) -------------------------


@pytest.fixture
def repo_kit(tmp_path: Path) -> RepoKit:
    """A repository in a local directory."""
    return file_kit(tmp_path)


@pytest.fixture(params=["file", "s3"])
def any_repo_kit(request: pytest.FixtureRequest, tmp_path: Path) -> RepoKit:
    """A repository on each storage backend (a directory; a SeaweedFS bucket)."""
    if request.param == "file":
        return file_kit(tmp_path)
    return s3_kit(
        tmp_path, request.getfixturevalue("s3_server"), request.getfixturevalue("s3_bucket")
    )


@pytest.fixture
def looping_blobs(repo_kit: RepoKit) -> Iterator[RepoKit]:
    """A file repository whose blobs/ listing fails (a symlink loop where a blob dir was)."""
    repo_kit.snapshot(T0, blobs=(blob_id(),))
    root = Path(repo_kit.url.removeprefix("file://"))
    loop = root / "blobs" / "zz"
    os.symlink("zz", loop)
    yield repo_kit
    loop.unlink()
    shutil.rmtree(root / "blobs" / "zz", ignore_errors=True)
