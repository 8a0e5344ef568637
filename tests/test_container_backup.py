"""The drtool image (``drtool:ci``, built by .ci/docker-images from the repository's Dockerfile
on the local Python base) and a one-shot ``backup`` run as a container.

The chat stack comes up from ``chat_stack/docker-compose.yml`` on the test images, seeded from
the host; drtool's ``docker-compose.backup.yml`` then runs ``backup init`` and ``backup`` the
way production does (config file mounted, secrets as files owned by uid 10001 and read through
``DRTOOL_*_FILE``, the chat network joined as an external network). The repository is an S3
bucket on the stack's S3 server; the operator lists and verifies it from the host.

Each run uses its own Compose projects and network (small override files rename the fixed
network ``cotalk-data``, publish on random 127.0.0.1 ports and add the ``drtool.test=1``
label); everything is removed with ``down -v`` afterwards.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import docker
import pytest
import tomli_w
from docker.models.containers import Container
from support.cli import run_drtool
from support.docker_tier import (
    LABELS,
    LOOPBACK,
    POSTGRES_IMAGE,
    REDIS_IMAGE,
    S3_IMAGE,
    boto3_s3,
    require_image,
    skip_or_fail_docker,
)

from chat_stack.seed import SeedSizes, seed
from drtool import keys
from drtool.config import Config, KeysConfig, RepositoryConfig
from drtool.endpoints import PostgresEndpoint, RedisEndpoint, S3Endpoint, StackEndpoints
from drtool.repository.access import Repo, open_repo
from drtool.repository.catalog import load_snapshot
from drtool.wal.index import load_index

pytestmark = pytest.mark.docker

ROOT = Path(__file__).resolve().parent.parent
DRTOOL_IMAGE = os.environ.get("DRTOOL_TEST_IMAGE", "drtool:ci")
DRTOOL_UID = 10001  # the image's `drtool` user (Dockerfile)
CHAT_COMPOSE = ROOT / "chat_stack" / "docker-compose.yml"
BACKUP_COMPOSE = ROOT / "docker-compose.backup.yml"
CHAT_SERVICES = {"postgres": "5432/tcp", "redis": "6379/tcp", "minio": "9000/tcp"}
S3_ACCESS_KEY = "cotalk"
REPO_BUCKET = "drtool-repo"
READY_TIMEOUT = 120.0
COMMAND_TIMEOUT = 300
BACKUP_SECRETS = (
    "postgres_password",
    "redis_password",
    "minio_access_key",
    "minio_secret_key",
    "repo_access_key",
    "repo_secret_key",
)


@pytest.fixture(scope="module")
def drtool_image(docker_client: docker.DockerClient) -> str:
    """The image under test (skip, or fail in CI, when .ci/docker-images did not build it)."""
    require_image(docker_client, DRTOOL_IMAGE)
    return DRTOOL_IMAGE


def run_image(client: docker.DockerClient, image: str, command: list[str], **kwargs: object) -> str:
    """Run a throw-away container to completion; its stdout and stderr (exit 0 required).

    The container goes with its anonymous volumes (the image declares /var/lib/drtool one).
    """
    container = client.containers.run(image, command, labels=dict(LABELS), detach=True, **kwargs)
    try:
        status = container.wait(timeout=COMMAND_TIMEOUT)["StatusCode"]
        out = container.logs(stdout=True, stderr=True).decode(errors="replace")
    finally:
        container.remove(force=True, v=True)
    assert status == 0, f"{image} {command} exited {status}:\n{out[-4000:]}"
    return out


def test_image_runs_drtool_as_non_root_with_its_tools(
    docker_client: docker.DockerClient, drtool_image: str
) -> None:
    config = docker_client.images.get(drtool_image).attrs["Config"]
    assert config["User"] == "drtool"
    assert config["Entrypoint"] == ["drtool"]

    usage = run_image(docker_client, drtool_image, ["--help"])
    for command in ("backup", "restore", "schedule", "verify"):
        assert f"  {command}" in usage, command

    script = (
        "id -u; id -g; pg_dump --version; pg_restore --version; age --version; "
        "zstd --version; redis-cli --version"
    )
    out = run_image(docker_client, drtool_image, ["-c", script], entrypoint=["/bin/sh"])
    lines = out.splitlines()
    assert lines[:2] == [str(DRTOOL_UID), str(DRTOOL_UID)]
    pg_major = int(lines[2].split()[-1].split(".")[0])
    # Debian's client (15) in CI, PGDG's 16 in production: >= the test server's 15
    assert lines[2].startswith("pg_dump (PostgreSQL) ") and pg_major >= 15
    assert lines[3].startswith("pg_restore (PostgreSQL) ")
    assert re.fullmatch(r"v?1\.\d+\.\d+", lines[4]), lines[4]  # age (Debian's: no "v")
    assert "Zstandard" in lines[5]
    assert lines[6].startswith("redis-cli 7")


# --- the stack and the backup, through Compose ------------------------------------------------


def compose_binary() -> str:
    binary = shutil.which("docker-compose")
    if binary is None:
        skip_or_fail_docker("docker-compose not installed (apt-get install docker-compose)")
    return binary


@dataclass
class Compose:
    """One Compose project: its files and the environment its interpolation needs."""

    project: str
    files: list[Path]
    env: dict[str, str]

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        argv = [compose_binary(), "-p", self.project]
        for f in self.files:
            argv += ["-f", str(f)]
        done = subprocess.run(
            [*argv, *args],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
        )
        if check:
            assert done.returncode == 0, (
                f"docker-compose {' '.join(args)} exited {done.returncode}\n"
                f"--- stdout ---\n{done.stdout[-4000:]}\n--- stderr ---\n{done.stderr[-4000:]}"
            )
        return done

    def containers(self, client: docker.DockerClient) -> list[Container]:
        label = f"com.docker.compose.project={self.project}"
        return client.containers.list(all=True, filters={"label": label})

    def down(self, client: docker.DockerClient) -> None:
        """``down -v``, then remove whatever it left (containers, volumes, networks)."""
        self.run("down", "-v", "--remove-orphans", "--timeout", "5", check=False)
        label = f"com.docker.compose.project={self.project}"
        for container in self.containers(client):
            container.remove(force=True, v=True)
        for volume in client.volumes.list(filters={"label": label}):
            volume.remove(force=True)
        for network in client.networks.list(filters={"label": label}):
            network.remove()


def base_env() -> dict[str, str]:
    """The caller's environment without drtool's or the chat stack's own settings."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("DRTOOL_", "CHAT_"))}


def write_override(path: Path, doc: Mapping[str, object]) -> Path:
    """A Compose override file (JSON is YAML)."""
    path.write_text(json.dumps(doc, indent=2))
    return path


def write_secret(path: Path, text: str, *, owner: int) -> Path:
    """A 0600 secret file owned by ``owner`` (the container user reads it through a bind)."""
    path.write_text(text + "\n")
    path.chmod(0o600)
    os.chown(path, owner, owner)
    return path


def service_container(client: docker.DockerClient, project: Compose, service: str) -> Container:
    found = [
        c
        for c in project.containers(client)
        if c.labels.get("com.docker.compose.service") == service
    ]
    assert len(found) == 1, f"{service}: {[c.name for c in found]}"
    return found[0]


def wait_healthy(client: docker.DockerClient, project: Compose) -> None:
    """Wait for every chat service's Compose healthcheck (compose 1.29 has no `up --wait`)."""
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        containers = {s: service_container(client, project, s) for s in CHAT_SERVICES}
        states = {s: c.attrs["State"] for s, c in containers.items()}
        health = {s: state.get("Health", {}).get("Status") for s, state in states.items()}
        if all(h == "healthy" for h in health.values()):
            return
        broken = [
            s
            for s, state in states.items()
            if health[s] == "unhealthy" or state["Status"] in ("exited", "dead")
        ]
        if broken or time.monotonic() > deadline:
            service = (broken or [s for s, h in health.items() if h != "healthy"])[0]
            logs = containers[service].logs().decode(errors="replace")[-4000:]
            pytest.fail(f"chat service {service} not healthy: {states[service]}\n{logs}")
        time.sleep(0.5)


def published_port(container: Container, port: str) -> int:
    bindings = container.attrs["NetworkSettings"]["Ports"][port]
    return int(next(b["HostPort"] for b in bindings if b["HostIp"] == LOOPBACK))


@dataclass
class ChatStack:
    project: Compose
    network: str
    endpoints: StackEndpoints
    pg_password: str
    redis_password: str
    s3_secret_key: str


@pytest.fixture
def chat_stack(
    docker_client: docker.DockerClient, drtool_image: str, tmp_path: Path
) -> Iterator[ChatStack]:
    """chat_stack/docker-compose.yml on the test images, on a network of its own, healthy."""
    for image in (POSTGRES_IMAGE, REDIS_IMAGE, S3_IMAGE):
        require_image(docker_client, image)
    compose_binary()
    if os.geteuid() != 0:
        skip_or_fail_docker("handing secret files to the container's uid 10001 needs root")
    tag = uuid.uuid4().hex[:10]
    network = f"drtool-test-{tag}"
    directory = tmp_path / "chat"
    directory.mkdir(mode=0o700)
    pg_password, redis_password, s3_secret = (secrets.token_hex(16) for _ in range(3))
    pg_password_file = directory / "postgres_password"
    pg_password_file.write_text(pg_password + "\n")
    pg_password_file.chmod(0o644)  # the test image reads it as `postgres`; the dir is 0700
    labels = dict(LABELS)
    override = write_override(
        directory / "override.yml",
        {
            "services": {name: {"labels": labels} for name in CHAT_SERVICES},
            "networks": {"cotalk": {"name": network, "labels": labels}},
            "volumes": {v: {"labels": labels} for v in ("pgdata", "redisdata", "miniodata")},
        },
    )
    env = {
        **base_env(),
        "CHAT_POSTGRES_IMAGE": POSTGRES_IMAGE,
        "CHAT_REDIS_IMAGE": REDIS_IMAGE,
        "CHAT_MINIO_IMAGE": S3_IMAGE,
        "CHAT_PG_PASSWORD_FILE": str(pg_password_file),
        "CHAT_REDIS_PASSWORD": redis_password,
        "CHAT_S3_ACCESS_KEY": S3_ACCESS_KEY,
        "CHAT_S3_SECRET_KEY": s3_secret,
        # random free ports on 127.0.0.1
        "CHAT_PG_PORT": "0",
        "CHAT_REDIS_PORT": "0",
        "CHAT_S3_PORT": "0",
        "CHAT_S3_CONSOLE_PORT": "0",
    }
    project = Compose(f"drtoolchat{tag}", [CHAT_COMPOSE, override], env)
    try:
        project.run("up", "-d")
        wait_healthy(docker_client, project)
        ports = {
            name: published_port(service_container(docker_client, project, name), port)
            for name, port in CHAT_SERVICES.items()
        }
        endpoints = StackEndpoints(
            postgres=PostgresEndpoint(LOOPBACK, ports["postgres"], "cotalk", "cotalk", pg_password),
            redis=RedisEndpoint(LOOPBACK, ports["redis"], password=redis_password),
            minio=S3Endpoint(f"http://{LOOPBACK}:{ports['minio']}", S3_ACCESS_KEY, s3_secret),
        )
        yield ChatStack(project, network, endpoints, pg_password, redis_password, s3_secret)
    finally:
        project.down(docker_client)


def _operator_repo(
    secrets_dir: Path, repository: dict[str, str], verify_key: str, endpoint_url: str
) -> Repo:
    cfg = Config(
        repository=RepositoryConfig(
            url=repository["url"],
            endpoint_url=endpoint_url,
            access_key=(secrets_dir / "repo_access_key").read_text().strip(),
            secret_key=(secrets_dir / "repo_secret_key").read_text().strip(),
        ),
        keys=KeysConfig(verify_key=verify_key),
    )
    return open_repo(cfg)


def _wait_for_sealed_wal(backup: Compose, repo: Repo) -> int:
    """Segments the `wal` service sealed into the repository, once there is one (bounded)."""
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        index = load_index(repo.storage, repo.verify_keys, repo.info.repo_id)
        assert not index.problems, index.problems
        if index.segments():
            return len(index.segments())
        if time.monotonic() > deadline:
            logs = backup.run("logs", "--no-color", "wal").stdout
            pytest.fail(f"no WAL sealed by the wal service within {READY_TIMEOUT:.0f} s\n{logs}")
        time.sleep(1)


def test_backup_service_runs_as_a_container(  # noqa: PLR0915
    docker_client: docker.DockerClient, drtool_image: str, chat_stack: ChatStack, tmp_path: Path
) -> None:
    stack = chat_stack
    seeded = seed(
        stack.endpoints,
        SeedSizes(users=20, rooms=5, messages=500, attachments=5),
        1,
        progress=False,
    )
    assert seeded.objects == 5
    boto3_s3(stack.endpoints.minio).create_bucket(Bucket=REPO_BUCKET)

    # The operator's keys stay on the host; the backup host gets the recipient, the verify key
    # and the signing key (a secret).
    operator_dir = tmp_path / "operator"
    operator_dir.mkdir(mode=0o700)
    recipient = keys.write_identity(operator_dir / "operator.key", passphrase=None)
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir(mode=0o700)
    verify_key = keys.write_signing_key(secrets_dir / "drtool_signing_key")
    os.chown(secrets_dir / "drtool_signing_key", DRTOOL_UID, DRTOOL_UID)
    values = {
        "postgres_password": stack.pg_password,
        "redis_password": stack.redis_password,
        "minio_access_key": S3_ACCESS_KEY,
        "minio_secret_key": stack.s3_secret_key,
        "repo_access_key": S3_ACCESS_KEY,
        "repo_secret_key": stack.s3_secret_key,
    }
    for name in BACKUP_SECRETS:
        write_secret(secrets_dir / name, values[name], owner=DRTOOL_UID)

    repository = {"url": f"s3://{REPO_BUCKET}/ci", "endpoint_url": "http://minio:9000"}
    backup_config = tmp_path / "backup.toml"
    backup_config.write_text(
        tomli_w.dumps(
            {
                "repository": repository,
                "keys": {"recipients": [recipient], "verify_key": verify_key},
                "postgres": {"host": "postgres", "user": "cotalk", "dbname": "cotalk"},
                "redis": {"host": "redis"},
                "minio": {"endpoint_url": "http://minio:9000", "buckets": ["attachments"]},
                "wal": {"flush_interval": 2.0},
            }
        )
    )
    backup_config.chmod(0o644)  # no secret in it; mounted read-only for uid 10001

    tag = stack.project.project.removeprefix("drtoolchat")
    override = write_override(
        tmp_path / "backup-override.yml",
        {
            "services": {name: {"labels": dict(LABELS)} for name in ("backup", "wal")},
            "networks": {"cotalk-data": {"external": True, "name": stack.network}},
            "volumes": {"drtool-state": {"labels": dict(LABELS)}},
        },
    )
    backup = Compose(
        f"drtoolbackup{tag}",
        [BACKUP_COMPOSE, override],
        {
            **base_env(),
            "DRTOOL_IMAGE": drtool_image,
            "DRTOOL_BACKUP_CONFIG": str(backup_config),
            "DRTOOL_SECRETS_DIR": str(secrets_dir),
            # only the drill service holds the identity; this run never mounts it
            "DRTOOL_IDENTITY_FILE": str(tmp_path / "no-identity-on-the-backup-host"),
            "DRTOOL_WAL_METRICS_HOST_PORT": "0",  # a random loopback port
        },
    )
    try:
        # as docs/OPERATIONS.md: once `run --rm backup init`, then `run --rm backup`; the
        # `wal` service streams beside it from the chat stack's PostgreSQL (its pg_hba line
        # comes from chat_stack/postgres-init)
        backup.run("run", "--rm", "-T", "backup", "init")
        backup.run("up", "-d", "wal")
        backup.run("run", "--rm", "-T", "backup")
        [wal] = backup.containers(docker_client)  # `run --rm` left nothing behind
        assert wal.labels["com.docker.compose.service"] == "wal"
        repo = _operator_repo(
            secrets_dir, repository, verify_key, stack.endpoints.minio.endpoint_url
        )
        wal_sealed = _wait_for_sealed_wal(backup, repo)
        backup.run("stop", "wal")  # SIGTERM: seal what is closed, exit 0
        wal.reload()
        assert wal.attrs["State"]["ExitCode"] == 0, wal.logs().decode(errors="replace")[-4000:]
    finally:
        backup.down(docker_client)

    operator_config = operator_dir / "operator.toml"
    operator_config.write_text(
        tomli_w.dumps(
            {
                "repository": {
                    **repository,
                    "endpoint_url": stack.endpoints.minio.endpoint_url,
                    "access_key_file": str(secrets_dir / "repo_access_key"),
                    "secret_key_file": str(secrets_dir / "repo_secret_key"),
                },
                "keys": {
                    "identity_file": str(operator_dir / "operator.key"),
                    "verify_key": verify_key,
                },
            }
        )
    )
    listed = run_drtool(
        "list", "--json", config=operator_config, env=base_env(), timeout=COMMAND_TIMEOUT
    )
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert len(rows) == 1, rows
    assert rows[0]["status"] == "VALID", rows[0]
    assert sorted(rows[0]["components"]) == ["minio", "postgres", "redis"]
    assert wal_sealed >= 1
    # wal_level=logical and a REPLICATION role: the logical snapshot records its exact LSN
    # (ADR 0018)
    manifest, _, problem = load_snapshot(
        repo.storage, rows[0]["id"], repo.verify_keys, repo.info.repo_id
    )
    assert manifest is not None, problem
    details = manifest.component("postgres").details  # type: ignore[union-attr]
    assert re.fullmatch(r"[0-9A-F]+/[0-9A-F]+", details["consistent_lsn"]), details

    # the seeded rows are in it (fingerprints decrypt with the operator's identity)
    shown = run_drtool(
        "show",
        rows[0]["id"],
        "--json",
        config=operator_config,
        env=base_env(),
        timeout=COMMAND_TIMEOUT,
    )
    assert shown.returncode == 0, shown.stderr
    prints = json.loads(shown.stdout)["fingerprints"]["postgres"]["fingerprints"]
    tables = prints["tables"]  # format 5: per table and leaf partition (ADR 0033)
    messages = sum(
        tables[name]["rows"]
        for name, part in prints["partitions"].items()
        if part["table"] == "public.messages"
    )
    assert messages == seeded.counts["messages"] == 500, tables
    assert tables["public.attachments"]["rows"] == 5, tables

    verified = run_drtool(
        "verify",
        "--read-data",
        "--json",
        config=operator_config,
        env=base_env(),
        timeout=COMMAND_TIMEOUT,
    )
    assert verified.returncode == 0, verified.stdout + verified.stderr
    outcomes = json.loads(verified.stdout)
    assert [(o["snapshot_id"], o["problems"]) for o in outcomes] == [(rows[0]["id"], [])]
