"""A ``backup-cron`` container killed mid-backup and started again is not locked out (19.9).

drtool is PID 1 of the container and the container keeps its host name across ``docker kill``
+ ``docker start``, so the lock of the killed run names the same host and pid as the new
scheduler. The lock also records the pid's start time (and boot id, container id): the new
PID 1 started later, so the old lock is recognised as dead and swept by the next backup.

The run is held mid-backup by the Redis server itself: ``repl-diskless-sync-delay`` makes it
wait before sending the RDB the backup asked for, while the backup holds the lock.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest
import tomli_w
from support.docker_tier import LABELS, REDIS_IMAGE, require_image
from test_container_backup import DRTOOL_IMAGE, DRTOOL_UID

from drtool import keys

pytestmark = pytest.mark.docker

WAIT_S = 240.0  # generous: conditions are waited for, never timed


def wait_for(condition: object, what: str) -> None:
    """Poll ``condition()`` until true; fail naming ``what``."""
    deadline = time.monotonic() + WAIT_S
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.5)


def _owned_dir(path: Path, mode: int = 0o700) -> Path:
    path.mkdir(parents=True, mode=mode)
    path.chmod(mode)
    os.chown(path, DRTOOL_UID, DRTOOL_UID)
    return path


@pytest.fixture
def network(docker_client: docker.DockerClient) -> Iterator[str]:
    """A network of its own for the test's containers."""
    net = docker_client.networks.create(
        f"drtool-locks-{secrets.token_hex(4)}", driver="bridge", labels=dict(LABELS)
    )
    try:
        yield str(net.name)
    finally:
        for container in docker_client.containers.list(
            all=True, filters={"network": net.name, "label": next(iter(LABELS))}
        ):
            container.remove(force=True, v=True)
        net.remove()


def _redis_cli(container: object, password: str, *args: str) -> str:
    code, out = container.exec_run(  # type: ignore[attr-defined]
        ["redis-cli", "--no-auth-warning", "-a", password, *args]
    )
    assert code == 0, out
    return str(out.decode().strip())


def test_killed_backup_cron_container_is_not_locked_out_after_docker_start(  # noqa: PLR0915
    docker_client: docker.DockerClient, network: str, tmp_path: Path
) -> None:
    require_image(docker_client, DRTOOL_IMAGE)
    require_image(docker_client, REDIS_IMAGE)
    password = secrets.token_urlsafe(16)
    redis = docker_client.containers.run(
        REDIS_IMAGE,
        name=f"{network}-redis",
        environment={"REDIS_PASSWORD": password},
        network=network,
        labels=dict(LABELS),
        detach=True,
    )
    wait_for(lambda: redis.exec_run(["redis-cli", "-a", password, "ping"])[0] == 0, "redis")
    _redis_cli(redis, password, "SET", "k", "v")
    # the backup's SYNC now waits 10 minutes before the RDB is sent: the run holds the lock
    _redis_cli(redis, password, "CONFIG", "SET", "repl-diskless-sync", "yes")
    _redis_cli(redis, password, "CONFIG", "SET", "repl-diskless-sync-delay", "600")

    repo = _owned_dir(tmp_path / "repo")
    state = _owned_dir(tmp_path / "state")
    etc = tmp_path / "etc"
    (etc / "schedules").mkdir(parents=True)
    recipient = keys.write_identity(tmp_path / "operator.key", passphrase=None)
    verify_key = keys.write_signing_key(etc / "signing.key")
    os.chown(etc / "signing.key", DRTOOL_UID, DRTOOL_UID)
    (etc / "drtool.toml").write_text(
        tomli_w.dumps(
            {
                "repository": {"url": "file:///repo"},
                "keys": {
                    "recipients": [recipient],
                    "verify_key": verify_key,
                    "signing_key_file": "/etc/drtool/signing.key",
                },
                "redis": {"host": f"{network}-redis"},
                "backup": {"state_dir": "/state"},
            }
        )
    )
    (etc / "schedules" / "redis.toml").write_text(
        tomli_w.dumps(
            {
                "jobs": {
                    "redis": {
                        "kind": "backup",
                        "components": ["redis"],
                        "every": "1h",
                        "retries": 0,
                    }
                }
            }
        )
    )
    for path in (etc, etc / "schedules"):
        path.chmod(0o755)
    for path in (etc / "drtool.toml", etc / "schedules" / "redis.toml"):
        path.chmod(0o644)
    env = {"DRTOOL_CONFIG": "/etc/drtool/drtool.toml", "DRTOOL_REDIS_PASSWORD": password}
    mounts = {
        str(etc): {"bind": "/etc/drtool", "mode": "ro"},
        str(repo): {"bind": "/repo", "mode": "rw"},
        str(state): {"bind": "/state", "mode": "rw"},
    }
    init = docker_client.containers.run(
        DRTOOL_IMAGE,
        ["init"],
        environment=env,
        volumes=mounts,
        labels=dict(LABELS),
        detach=True,
    )
    try:
        assert init.wait(timeout=WAIT_S)["StatusCode"] == 0, init.logs().decode()
    finally:
        init.remove(force=True, v=True)

    cron = docker_client.containers.run(
        DRTOOL_IMAGE,
        ["schedule", "run"],  # the image's default: PID 1, as in docker-compose.backup.yml
        environment=env,
        volumes=mounts,
        network=network,
        labels=dict(LABELS),
        detach=True,
    )
    locks = repo / "locks"
    wait_for(lambda: locks.is_dir() and any(locks.iterdir()), "the backup to take the lock")
    [held] = [json.loads(p.read_text()) for p in locks.iterdir()]
    assert held["pid"] == 1 and held["operation"] == "backup"

    cron.kill()  # SIGKILL: no release, no cleanup (an OOM kill does the same)
    cron.wait(timeout=WAIT_S)
    assert [p.name for p in locks.iterdir()] == [f"{held['lock_id']}.json"]  # left behind
    _redis_cli(redis, password, "CONFIG", "SET", "repl-diskless-sync-delay", "0")

    cron.start()  # same container: same host name, and drtool is PID 1 again
    cron.reload()
    assert cron.attrs["Config"]["Hostname"] == held["host"]

    def succeeded() -> bool:
        path = state / "schedule" / "redis.json"
        job = json.loads(path.read_text()) if path.exists() else {}
        if job.get("exit_code") not in (None, 0):
            pytest.fail(f"the backup after the restart failed: {job}")
        return job.get("last_success") is not None

    try:
        wait_for(succeeded, "the backup after the restart to succeed")
    except BaseException:
        print(cron.logs().decode(errors="replace")[-4000:])
        raise
    logs = cron.logs().decode(errors="replace")
    assert "locked by" not in logs
    assert "removed the lock of" in logs and "pid reused" in logs
    # the dead run's lock was swept, the new one released
    assert not locks.exists() or list(locks.iterdir()) == []
    health = cron.exec_run(["drtool", "schedule", "health"])
    assert health.exit_code == 0, health.output.decode()
