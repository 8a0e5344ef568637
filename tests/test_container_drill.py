"""The shipped ``drill`` service of docker-compose.backup.yml, as shipped: a full weekly drill.

The chat stack comes up from ``chat_stack/docker-compose.yml`` (see test_container_backup.py);
a snapshot of it is taken into an S3 repository on the stack's own S3 server. Then the `drill`
service starts from the shipped compose file with its real mounts, user (uid 10001), state
volume, Docker socket and schedule (schedules/drill.toml: the never-run weekly drill runs at
start). The definition mounted at the shipped place is restore_drills/weekly.toml with only its
image names replaced by the test images (nothing can be pulled here). The drill must pass and
every channel must be delivered: the report files in the state volume, the history in the
repository.

The override only renames the external network, labels what the test creates and swaps the
definition's source file: Compose merges volumes by their path in the container, so the mount
point is the shipped one.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

import docker
import pytest
import tomli_w
from support.cli import run_drtool
from support.docker_tier import LABELS, POSTGRES_IMAGE, REDIS_IMAGE, S3_IMAGE, boto3_s3
from support.stacks import stack_sections
from test_container_backup import (
    BACKUP_COMPOSE,
    DRTOOL_UID,
    REPO_BUCKET,
    ROOT,
    S3_ACCESS_KEY,
    ChatStack,
    Compose,
    base_env,
    chat_stack,  # noqa: F401 - the fixture
    drtool_image,  # noqa: F401 - the fixture
    service_container,
    write_override,
    write_secret,
)

from chat_stack.seed import SeedSizes, seed
from drtool import keys

pytestmark = pytest.mark.docker

DRILL_MOUNT = "/var/lib/drtool/restore_drills/weekly.toml"  # docker-compose.backup.yml
PATIENCE = 600.0  # a full drill on three scratch containers; waited for, never timed


def weekly_with_test_images(path: Path) -> Path:
    """restore_drills/weekly.toml with the test images (the only change)."""
    text = (ROOT / "restore_drills" / "weekly.toml").read_text()
    for shipped, local in (
        ('"postgres:16-alpine"', f'"{POSTGRES_IMAGE}"'),
        ('"redis:7-alpine"', f'"{REDIS_IMAGE}"'),
        ('"minio/minio"', f'"{S3_IMAGE}"'),
    ):
        assert shipped in text, shipped
        text = text.replace(shipped, local)
    path.write_text(text)
    path.chmod(0o644)
    return path


def job_state(container: docker.models.containers.Container) -> dict[str, object] | None:
    """The drill job's row of ``drtool schedule list --json`` inside the service."""
    result = container.exec_run(["drtool", "schedule", "list", "--json"], user="drtool")
    if result.exit_code != 0:
        return None
    rows = {r["job"]: r for r in json.loads(result.output.decode())}
    row = rows.get("drill")
    return row if row and row.get("exit_code") is not None else None


def test_the_shipped_drill_service_runs_a_full_drill_and_reports(  # noqa: PLR0915
    docker_client: docker.DockerClient,
    drtool_image: str,  # noqa: F811
    chat_stack: ChatStack,  # noqa: F811
    tmp_path: Path,
) -> None:
    stack = chat_stack
    seed(stack.endpoints, SeedSizes(users=20, rooms=5, messages=500, attachments=5), 1, False)
    boto3_s3(stack.endpoints.minio).create_bucket(Bucket=REPO_BUCKET)

    # keys: the operator's identity becomes the drill service's secret
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir(mode=0o700)
    recipient = keys.write_identity(secrets_dir / "drtool_identity", passphrase=None)
    os.chown(secrets_dir / "drtool_identity", DRTOOL_UID, DRTOOL_UID)
    verify_key = keys.write_signing_key(tmp_path / "signing.key")
    for name in ("repo_access_key", "repo_secret_key"):
        value = S3_ACCESS_KEY if name == "repo_access_key" else stack.s3_secret_key
        write_secret(secrets_dir / name, value, owner=DRTOOL_UID)

    # one snapshot of all three stores, taken from the host
    repository = {"url": f"s3://{REPO_BUCKET}/ci"}
    host_repo = {
        **repository,
        "endpoint_url": stack.endpoints.minio.endpoint_url,
        "access_key_file": str(secrets_dir / "repo_access_key"),
        "secret_key_file": str(secrets_dir / "repo_secret_key"),
    }
    host_config = tmp_path / "host.toml"
    host_config.write_text(
        tomli_w.dumps(
            {
                **stack_sections(stack.endpoints, tmp_path / "host-secrets"),
                "repository": host_repo,
                "keys": {
                    "recipients": [recipient],
                    "signing_key_file": str(tmp_path / "signing.key"),
                    "verify_key": verify_key,
                },
                "backup": {"state_dir": str(tmp_path / "state")},
            }
        )
    )
    # the operator reads the history on the host (key-less: no identity needed)
    operator_config = tmp_path / "operator.toml"
    operator_config.write_text(
        tomli_w.dumps({"repository": host_repo, "keys": {"verify_key": verify_key}})
    )
    for args in (("init",), ("backup",)):
        done = run_drtool(
            "--config", str(host_config), "--home", str(tmp_path), *args, env=base_env()
        )
        assert done.returncode == 0, done.stderr

    # the drill service's config: no secret in it (they come as Docker secrets)
    drill_config = tmp_path / "drill.toml"
    drill_config.write_text(
        tomli_w.dumps(
            {
                "repository": {**repository, "endpoint_url": "http://minio:9000"},
                "keys": {"verify_key": verify_key},
                "postgres": {"host": "postgres", "user": "cotalk", "dbname": "cotalk"},
                "redis": {"host": "redis"},
                "minio": {"endpoint_url": "http://minio:9000", "buckets": ["attachments"]},
            }
        )
    )
    drill_config.chmod(0o644)
    weekly = weekly_with_test_images(tmp_path / "weekly.toml")

    tag = uuid.uuid4().hex[:10]
    override = write_override(
        tmp_path / "drill-override.yml",
        {
            "services": {
                "drill": {
                    "labels": dict(LABELS),
                    "volumes": [f"{weekly}:{DRILL_MOUNT}:ro"],  # replaces the shipped source
                }
            },
            "networks": {"cotalk-data": {"external": True, "name": stack.network}},
            "volumes": {"drtool-drill-state": {"labels": dict(LABELS)}},
        },
    )
    drill = Compose(
        f"drtooldrill{tag}",
        [BACKUP_COMPOSE, override],
        {
            **base_env(),
            "DRTOOL_IMAGE": drtool_image,
            "DRTOOL_DRILL_CONFIG": str(drill_config),
            "DRTOOL_SECRETS_DIR": str(secrets_dir),
            "DRTOOL_IDENTITY_FILE": str(secrets_dir / "drtool_identity"),
            "DOCKER_GID": str(os.stat("/var/run/docker.sock").st_gid),
        },
    )
    try:
        drill.run("up", "-d", "drill")
        container = service_container(docker_client, drill, "drill")
        assert container.attrs["Config"]["User"] in ("drtool", str(DRTOOL_UID))
        deadline = time.monotonic() + PATIENCE
        row = None
        while row is None:
            container.reload()
            if container.status != "running" or time.monotonic() > deadline:
                logs = container.logs().decode(errors="replace")[-6000:]
                pytest.fail(f"no drill result (container {container.status}):\n{logs}")
            time.sleep(2)
            row = job_state(container)
        logs = container.logs().decode(errors="replace")
        assert row["exit_code"] == 0, f"{row}\n{logs[-6000:]}"
        listed = container.exec_run(
            ["sh", "-c", "ls /var/lib/drtool/restore_drills/reports"], user="drtool"
        )
        assert listed.exit_code == 0, listed.output
        files = listed.output.decode().split()
    finally:
        drill.down(docker_client)

    history = run_drtool(
        "--config", str(operator_config), "drill", "history", "--json", env=base_env()
    )
    assert history.returncode == 0, history.stderr
    (entry,) = json.loads(history.stdout)
    assert entry["passed"] is True, entry
    assert entry["definition"] == "weekly" and entry["runtime"] == "docker"
    assert sorted(files) == [f"{entry['drill_id']}.json", f"{entry['drill_id']}.md"]
    assert "not delivered" not in logs
