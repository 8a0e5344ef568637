"""The Docker test images (.ci/docker-images) behave as drtool needs, and internal networks
have no way out.

Each image starts, accepts authenticated clients and refuses others. A container attached
only to an ``internal=True`` network reaches no outside address and no container of another
network, while containers on it reach each other by alias and the host reaches them by address.
"""

from __future__ import annotations

import dataclasses
import secrets
import time
import uuid
from collections.abc import Iterator

import docker
import psycopg
import pytest
import redis
from botocore.exceptions import ClientError
from docker.models.networks import Network
from redis.backoff import NoBackoff
from redis.retry import Retry
from support.docker_tier import (
    BASE_IMAGE,
    LABELS,
    REDIS_IMAGE,
    boto3_s3,
    redis_container,
    require_image,
)

from drtool.endpoints import PostgresEndpoint, RedisEndpoint, S3Endpoint

pytestmark = pytest.mark.docker

# redis-py retries an AuthenticationError (a ConnectionError) with backoff by default: ~4 s
NO_RETRY = Retry(NoBackoff(), 0)

# One TCP connect attempt (2 s at most) to each HOST:PORT argument, all at once.
PROBE_SCRIPT = r"""
for target in "$@"; do
  (
    if timeout 2 bash -c "exec 3<>/dev/tcp/${target%:*}/${target#*:}" 2>/dev/null; then
      echo "CONNECTED $target"
    else
      echo "BLOCKED $target"
    fi
  ) &
done
wait
"""


def run_probe(client: docker.DockerClient, network: str, targets: list[str]) -> dict[str, str]:
    """Run PROBE_SCRIPT in a throw-away base container attached only to ``network``.

    Returns ``CONNECTED`` or ``BLOCKED`` per target.
    """
    container = client.containers.run(
        BASE_IMAGE,
        ["/bin/bash", "-c", PROBE_SCRIPT, "probe", *targets],
        network=network,
        labels=dict(LABELS),
        detach=True,
    )
    try:
        assert container.wait(timeout=60)["StatusCode"] == 0
        out = container.logs().decode()
    finally:
        container.remove(force=True, v=True)
    verdicts = {}
    for line in out.splitlines():
        word, _, target = line.partition(" ")
        if word in ("CONNECTED", "BLOCKED"):
            verdicts[target] = word
    return verdicts


def container_ip(client: docker.DockerClient, container_id: str, network: str) -> str:
    """The address of a container on one network."""
    attrs = client.containers.get(container_id).attrs
    return str(attrs["NetworkSettings"]["Networks"][network]["IPAddress"])


@pytest.fixture
def internal_network(docker_client: docker.DockerClient) -> Iterator[Network]:
    """A fresh ``internal=True`` bridge network, removed afterwards."""
    network = docker_client.networks.create(
        f"drtool-test-{uuid.uuid4().hex[:10]}", driver="bridge", internal=True, labels=LABELS
    )
    try:
        yield network
    finally:
        network.reload()
        for container in network.containers:
            network.disconnect(container, force=True)
        network.remove()


def test_postgres_accepts_its_password_only(docker_postgres: PostgresEndpoint) -> None:
    ep = docker_postgres
    assert ep.host == "127.0.0.1"
    with psycopg.connect(**ep.connect_kwargs()) as conn:
        row = conn.execute(
            "SELECT current_user, current_database(), current_setting('server_version_num')::int,"
            " (SELECT usesuper FROM pg_user WHERE usename = current_user)"
        ).fetchone()
        assert row == ("cotalk", "cotalk", row[2], True)  # type: ignore[index]
        assert row is not None and row[2] >= 150000
        # the password was stored as SCRAM, and TCP logins need it
        rolpassword = conn.execute(
            "SELECT rolpassword FROM pg_authid WHERE rolname = current_user"
        ).fetchone()
        assert rolpassword is not None and rolpassword[0].startswith("SCRAM-SHA-256$")
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(**dataclasses.replace(ep, password="wrong").connect_kwargs())


def test_redis_requires_its_password(docker_redis: RedisEndpoint) -> None:
    ep = docker_redis
    with redis.Redis(host=ep.host, port=ep.port, password=ep.password) as conn:
        assert conn.ping() is True
        conn.set("k", "v")
        assert conn.get("k") == b"v"
        # no persistence by default; the password is in no command line
        assert conn.config_get("save") == {"save": ""}
        assert conn.config_get("appendonly") == {"appendonly": "no"}
    with (
        redis.Redis(host=ep.host, port=ep.port, retry=NO_RETRY) as anon,
        pytest.raises(redis.exceptions.AuthenticationError),
    ):
        anon.ping()
    with (
        redis.Redis(host=ep.host, port=ep.port, password="wrong", retry=NO_RETRY) as bad,
        pytest.raises(redis.exceptions.AuthenticationError),
    ):
        bad.ping()


def test_redis_password_with_quotes_and_stays_off_argv(
    docker_client: docker.DockerClient,
) -> None:
    password = 'a "quoted" \\ pass ' + secrets.token_hex(4)
    with redis_container(docker_client, password=password) as svc:
        ep = svc.endpoint
        with redis.Redis(host=ep.host, port=ep.port, password=password) as conn:
            assert conn.ping() is True
        top = svc.container.get_wrapped_container().top()
        assert all(password not in " ".join(p) for p in top["Processes"])


def test_s3_accepts_its_credentials_only(docker_s3: S3Endpoint) -> None:
    s3 = boto3_s3(docker_s3)
    s3.create_bucket(Bucket="drtool-images")
    s3.put_object(Bucket="drtool-images", Key="a/b.txt", Body=b"hello")
    assert s3.get_object(Bucket="drtool-images", Key="a/b.txt")["Body"].read() == b"hello"
    for access_key, secret_key in (
        (docker_s3.access_key, "wrong-secret"),
        ("unknown-key", docker_s3.secret_key),
    ):
        bad = boto3_s3(S3Endpoint(docker_s3.endpoint_url, access_key, secret_key))
        with pytest.raises(ClientError) as err:
            bad.get_object(Bucket="drtool-images", Key="a/b.txt")
        assert err.value.response["Error"]["Code"] in (
            "SignatureDoesNotMatch",
            "InvalidAccessKeyId",
            "AccessDenied",
        )


def test_internal_network_blocks_egress(
    docker_client: docker.DockerClient, internal_network: Network
) -> None:
    """A container only on an internal network reaches neither the outside nor the containers
    of other networks (a drill must not touch the production stack).

    The outside attempt is a single SYN that the host's FORWARD chain drops (engine 20.10 still
    gives such a container a default route to the bridge; newer engines give none).
    """
    require_image(docker_client, BASE_IMAGE)
    with redis_container(docker_client) as other:
        other_target = f"{container_ip(docker_client, other.id, 'bridge')}:6379"
        # control: from the default bridge the probe does connect
        assert run_probe(docker_client, "bridge", [other_target]) == {other_target: "CONNECTED"}

        targets = ["1.1.1.1:53", other_target]
        verdicts = run_probe(docker_client, internal_network.name, targets)
    assert verdicts == dict.fromkeys(targets, "BLOCKED")


def test_host_reaches_internal_service_by_address(
    docker_client: docker.DockerClient, internal_network: Network
) -> None:
    """Published ports do not work on an internal network, but the Docker host reaches a
    container there at its address on the network's bridge."""
    require_image(docker_client, REDIS_IMAGE)
    password = secrets.token_urlsafe(12)
    server = docker_client.containers.run(
        REDIS_IMAGE,
        environment={"REDIS_PASSWORD": password},
        network=internal_network.name,
        labels=dict(LABELS),
        detach=True,
    )
    try:
        address = container_ip(docker_client, server.id, internal_network.name)
        deadline = time.monotonic() + 30
        while True:
            try:
                with redis.Redis(
                    host=address,
                    port=6379,
                    password=password,
                    socket_connect_timeout=2,
                    retry=NO_RETRY,
                ) as conn:
                    assert conn.ping() is True
                break
            except redis.exceptions.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
    finally:
        server.remove(force=True, v=True)


def test_internal_network_reaches_services_by_alias(
    docker_client: docker.DockerClient, internal_network: Network
) -> None:
    """The drill pattern: a service published on 127.0.0.1 via the default bridge, connected
    to the internal network under an alias, is reachable there from an internal-only client."""
    with redis_container(docker_client) as svc:
        internal_network.connect(svc.id, aliases=["redis"])
        client = docker_client.containers.run(
            REDIS_IMAGE,
            [
                "/bin/bash",
                "-c",
                "for i in $(seq 50); do redis-cli -h redis ping && exit; sleep 0.2; done; exit 1",
            ],
            environment={"REDISCLI_AUTH": svc.endpoint.password},
            network=internal_network.name,
            labels=dict(LABELS),
            detach=True,
        )
        try:
            status = client.wait(timeout=60)["StatusCode"]
            out = client.logs().decode()
        finally:
            client.remove(force=True, v=True)
    assert status == 0, out
    assert "PONG" in out
