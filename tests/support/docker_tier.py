"""Pytest helpers for the Docker tier: the test images as containers, via testcontainers.

The images come from ``.ci/docker-images`` (no registry is reachable: they are built from a
debootstrap'ed base). A missing engine or image skips the tests that need them, unless
``DRTOOL_REQUIRE_DOCKER=1`` (set in CI), which turns the skip into a failure.

Load the fixtures with ``pytest_plugins = ["support.docker_tier"]`` (in ``tests/conftest.py`` or a
test module). Every container and network gets the label ``drtool.test=1``; published ports
are bound to 127.0.0.1 only. testcontainers is told not to start Ryuk (its image cannot be
pulled) and to connect to the Docker host, only while a fixture runs.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, NoReturn, TypeVar

import docker
import psycopg
import pytest
import redis
from docker.errors import DockerException, ImageNotFound
from redis.backoff import NoBackoff
from redis.retry import Retry
from testcontainers.core.config import ConnectionMode, testcontainers_config
from testcontainers.core.container import DockerContainer

from drtool.endpoints import PostgresEndpoint, RedisEndpoint, S3Endpoint
from drtool.s3session import s3_client

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

REQUIRE_DOCKER_ENV = "DRTOOL_REQUIRE_DOCKER"
TEST_LABEL = "drtool.test"
LABELS = {TEST_LABEL: "1"}
LOOPBACK = "127.0.0.1"

POSTGRES_IMAGE = os.environ.get("DRTOOL_TEST_POSTGRES_IMAGE", "drtool-test/postgres:15")
# the production major, from the PyPI wheel's binaries (tests/docker/postgres16)
POSTGRES16_IMAGE = os.environ.get("DRTOOL_TEST_POSTGRES16_IMAGE", "drtool-test/postgres:16")
REDIS_IMAGE = os.environ.get("DRTOOL_TEST_REDIS_IMAGE", "drtool-test/redis:7")
S3_IMAGE = os.environ.get("DRTOOL_TEST_S3_IMAGE", "drtool-test/s3:latest")
BASE_IMAGE = os.environ.get("DRTOOL_TEST_BASE_IMAGE", "drtool-test/base:bookworm")

READY_TIMEOUT = 60.0

E = TypeVar("E")


def docker_available(timeout: float = 5.0) -> bool:
    """Whether a Docker engine answers a ping (``DOCKER_HOST`` or the default socket)."""
    try:
        client = docker.from_env(timeout=int(timeout))
    except DockerException:
        return False
    try:
        return bool(client.ping())
    except (DockerException, OSError):
        return False
    finally:
        client.close()


def skip_or_fail_docker(reason: str) -> NoReturn:
    """Skip the test, or fail it when ``DRTOOL_REQUIRE_DOCKER=1``."""
    if os.environ.get(REQUIRE_DOCKER_ENV) == "1":
        pytest.fail(f"{reason} ({REQUIRE_DOCKER_ENV}=1)", pytrace=False)
    pytest.skip(reason)


def require_image(client: docker.DockerClient, image: str) -> None:
    """Skip (or fail) unless ``image`` exists locally: nothing can be pulled here."""
    try:
        client.images.get(image)
    except ImageNotFound:
        skip_or_fail_docker(f"Docker image {image} is missing: run .ci/docker-images")


@contextmanager
def testcontainers_settings() -> Iterator[None]:
    """Ryuk off and ``docker_host`` connection mode, undone on exit.

    testcontainers reads ``TESTCONTAINERS_CONNECTION_MODE`` once at import, so its config
    object is patched as well as the environment.
    """
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TESTCONTAINERS_RYUK_DISABLED", "true")
        mp.setenv("TESTCONTAINERS_CONNECTION_MODE", ConnectionMode.docker_host.value)
        mp.setattr(testcontainers_config, "ryuk_disabled", True)
        mp.setattr(testcontainers_config, "connection_mode_override", ConnectionMode.docker_host)
        yield


@pytest.fixture(scope="session")
def docker_client() -> Iterator[docker.DockerClient]:
    """A Docker SDK client, with the testcontainers settings applied for the session."""
    if not docker_available():
        skip_or_fail_docker("no Docker engine answers (run .ci/docker-images to start one)")
    client = docker.from_env()
    with testcontainers_settings():
        yield client
    client.close()


@dataclass
class ServiceContainer(Generic[E]):
    """A started test container and the endpoint (on 127.0.0.1) of the service inside."""

    container: DockerContainer
    endpoint: E

    @property
    def id(self) -> str:
        """The Docker container id."""
        return self.container.get_container_id()

    def logs(self) -> str:
        """stdout and stderr of the container so far."""
        out, err = self.container.get_logs()
        return (out + err).decode(errors="replace")


def labelled(image: str, **kwargs: object) -> DockerContainer:
    """A ``DockerContainer`` labelled ``drtool.test=1`` (extra kwargs go to docker's create)."""
    return DockerContainer(image).with_kwargs(labels=dict(LABELS), **kwargs)


def publish(container: DockerContainer, port: str) -> None:
    """Publish the container port (``"5432/tcp"``) on a free port of 127.0.0.1 only."""
    # testcontainers hands this dict to docker-py, which accepts (host_ip, host_port).
    container.ports[port] = (LOOPBACK, None)  # type: ignore[assignment]


def host_port(container: DockerContainer, port: str) -> int:
    """The 127.0.0.1 port Docker published for ``port``."""
    return int(container.get_exposed_port(port))  # type: ignore[arg-type]


def wait_until(
    what: str, container: DockerContainer, probe: Callable[[], object], timeout: float
) -> None:
    """Call ``probe`` until it returns without an exception; fail with the logs on timeout."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            probe()
            return
        except Exception as exc:
            last = exc
        wrapped = container.get_wrapped_container()
        wrapped.reload()
        if wrapped.status in ("exited", "dead"):
            break
        time.sleep(0.2)
    out, err = container.get_logs()
    logs = (out + err).decode(errors="replace")[-4000:]
    raise RuntimeError(f"{what} in {container.image} not ready: {last!r}\n--- logs ---\n{logs}")


@contextmanager
def started(container: DockerContainer) -> Iterator[DockerContainer]:
    """Start ``container``; always remove it (and its anonymous volumes) afterwards."""
    try:
        container.start()
        yield container
    finally:
        container.stop(force=True, delete_volume=True)


@contextmanager
def postgres_container(
    client: docker.DockerClient,
    *,
    user: str = "cotalk",
    dbname: str = "cotalk",
    password: str | None = None,
    image: str = POSTGRES_IMAGE,
    timeout: float = READY_TIMEOUT,
) -> Iterator[ServiceContainer[PostgresEndpoint]]:
    """PostgreSQL from ``image``: superuser ``user`` with ``password``, database ``dbname``."""
    require_image(client, image)
    password = password or secrets.token_urlsafe(18)
    container = labelled(image, stop_signal="SIGINT").with_envs(
        POSTGRES_USER=user,
        POSTGRES_DB=dbname,
        POSTGRES_PASSWORD=password,
        # initdb's fsyncs take 3-4 s on overlay2 here; a test server needs none
        POSTGRES_INITDB_ARGS="--no-sync",
    )
    # fast throw-away server (the entrypoint passes leading options on to postgres)
    container.with_command(["-c", "fsync=off", "-c", "full_page_writes=off"])
    publish(container, "5432/tcp")
    with started(container):
        endpoint = PostgresEndpoint(
            host=LOOPBACK,
            port=host_port(container, "5432/tcp"),
            user=user,
            dbname=dbname,
            password=password,
        )

        def probe() -> None:
            with psycopg.connect(**endpoint.connect_kwargs(), connect_timeout=2) as conn:
                conn.execute("SELECT 1")

        wait_until("PostgreSQL", container, probe, timeout)
        yield ServiceContainer(container, endpoint)


@contextmanager
def redis_container(
    client: docker.DockerClient,
    *,
    password: str | None = None,
    image: str = REDIS_IMAGE,
    timeout: float = READY_TIMEOUT,
) -> Iterator[ServiceContainer[RedisEndpoint]]:
    """Redis from ``image`` with ``requirepass`` set to ``password``."""
    require_image(client, image)
    password = password or secrets.token_urlsafe(18)
    container = labelled(image).with_env("REDIS_PASSWORD", password)
    publish(container, "6379/tcp")
    with started(container):
        endpoint = RedisEndpoint(
            host=LOOPBACK, port=host_port(container, "6379/tcp"), password=password
        )

        def probe() -> None:
            with redis.Redis(
                host=endpoint.host,
                port=endpoint.port,
                password=endpoint.password,
                socket_timeout=2,
                socket_connect_timeout=2,
                retry=Retry(NoBackoff(), 0),  # this loop retries
            ) as conn:
                conn.ping()

        wait_until("Redis", container, probe, timeout)
        yield ServiceContainer(container, endpoint)


def boto3_s3(endpoint: S3Endpoint, *, timeout: float = 5.0) -> S3Client:
    """A boto3 S3 client for ``endpoint`` (SigV4, path-style), without retries."""
    client: S3Client = s3_client(endpoint, timeout=timeout, attempts=1)
    return client


@contextmanager
def s3_container(
    client: docker.DockerClient,
    *,
    access_key: str | None = None,
    secret_key: str | None = None,
    image: str = S3_IMAGE,
    timeout: float = READY_TIMEOUT,
) -> Iterator[ServiceContainer[S3Endpoint]]:
    """The S3 stand-in (SeaweedFS) from ``image``, configured like MinIO's root user."""
    require_image(client, image)
    access_key = access_key or f"drtool{secrets.token_hex(6)}"
    secret_key = secret_key or secrets.token_urlsafe(24)
    container = labelled(image).with_envs(
        MINIO_ROOT_USER=access_key, MINIO_ROOT_PASSWORD=secret_key
    )
    publish(container, "9000/tcp")
    with started(container):
        endpoint = S3Endpoint(
            endpoint_url=f"http://{LOOPBACK}:{host_port(container, '9000/tcp')}",
            access_key=access_key,
            secret_key=secret_key,
        )
        s3 = boto3_s3(endpoint, timeout=2)
        wait_until("S3", container, s3.list_buckets, timeout)
        yield ServiceContainer(container, endpoint)


@pytest.fixture
def docker_postgres(docker_client: docker.DockerClient) -> Iterator[PostgresEndpoint]:
    """A fresh PostgreSQL container for one test (superuser ``cotalk``, database ``cotalk``)."""
    with postgres_container(docker_client) as svc:
        yield svc.endpoint


@pytest.fixture
def docker_redis(docker_client: docker.DockerClient) -> Iterator[RedisEndpoint]:
    """A fresh password-protected Redis container for one test."""
    with redis_container(docker_client) as svc:
        yield svc.endpoint


@pytest.fixture
def docker_s3(docker_client: docker.DockerClient) -> Iterator[S3Endpoint]:
    """A fresh S3 (SeaweedFS) container for one test, with generated root credentials."""
    with s3_container(docker_client) as svc:
        yield svc.endpoint
