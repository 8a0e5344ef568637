"""``drtool restore --at TIME --component postgres --into-volume NAME``: the Docker deployment.

The history of tests/test_pitr.py (a streamer, a base backup, A commits, the target, B
commits) on the local PostgreSQL 15; the restore runs with ``postgres.image`` set to the
locally built ``drtool-test/postgres:15`` (the production default, ``postgres:16-alpine``,
cannot be pulled here). The new volume must hold A and not B, promoted and stopped; the
existing ("configured") volume is refused by name and left exactly as it was; an image of
another major is refused in one line, and a bit-flipped segment with exit 5, before anything
is created; nothing of the restore's own (containers, the WAL volume) is left.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import docker
import pytest
from docker.errors import NotFound
from support.cli import run_drtool
from support.docker_tier import LABELS, POSTGRES16_IMAGE, POSTGRES_IMAGE, require_image
from support.wal_kit import (  # noqa: F401 (fixtures)
    SEG,
    History,
    WalKit,
    admin,
    kit_fixture,
    record_history,
    wal_pg_fixture,
)

from drtool.services.restore.pitr_volume import LABEL
from drtool.wal.names import parse_lsn, parse_segment, segment_of_lsn

pytestmark = pytest.mark.slow
DATA = "/var/lib/postgresql/data"
SERVER_OPTIONS = ["-c", "listen_addresses=127.0.0.1", "-c", "port=5432"]
SERVER_OPTIONS += ["-c", "unix_socket_directories=/tmp"]


@pytest.fixture
def volumes(docker_client: docker.DockerClient) -> Iterator[list[str]]:
    """Names of volumes the test made or expects: removed afterwards, whatever happened."""
    names: list[str] = []
    yield names
    for name in names:
        with contextlib.suppress(NotFound):
            docker_client.volumes.get(name).remove(force=True)


def _restore(
    history: History, image: str, volume: str, *extra: str, config: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return run_drtool(
        "restore",
        "--component",
        "postgres",
        "--yes",
        "--json",
        "--at",
        history.at.isoformat(),
        "--into-volume",
        volume,
        *extra,
        config=config or history.kit.operator,
        extra_env={"DRTOOL_POSTGRES_IMAGE": image},
    )


def _files(client: docker.DockerClient, volume: str) -> str:
    """``find`` over a volume, with sizes: what it holds, to compare before and after."""
    out = client.containers.run(
        POSTGRES_IMAGE,
        ["-c", "cd /v && find . -printf '%p %s\\n' | sort && cat marker"],
        entrypoint=["sh"],
        volumes={volume: {"bind": "/v", "mode": "ro"}},
        network_mode="none",
        labels=LABELS,
        remove=True,
    )
    return bytes(out).decode()


def _production_volume(client: docker.DockerClient, name: str) -> str:
    """An existing volume standing for the chat stack's ``pgdata``; returns its listing."""
    client.volumes.create(name, labels=LABELS)
    client.containers.run(
        POSTGRES_IMAGE,
        ["-c", "echo production > /v/marker && mkdir /v/base && echo 1 > /v/base/x"],
        entrypoint=["sh"],
        volumes={name: {"bind": "/v", "mode": "rw"}},
        network_mode="none",
        labels=LABELS,
        remove=True,
    )
    return _files(client, name)


def _notes(client: docker.DockerClient, volume: str, password: str) -> list[str]:
    """Start the restored volume's server (a plain start: no recovery left to do) and read."""
    container: Any = client.containers.run(
        POSTGRES_IMAGE,
        ["-D", DATA, *SERVER_OPTIONS],
        entrypoint=["postgres"],
        user="postgres",
        volumes={volume: {"bind": DATA, "mode": "rw"}},
        network_mode="none",
        labels=LABELS,
        stop_signal="SIGINT",
        detach=True,
    )
    try:
        argv = ["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", "cotalk", "-XAt"]
        wait_for_log = "database system was shut down at"  # a clean stop: no crash recovery
        argv += ["-c", "SELECT pg_is_in_recovery(); SELECT note FROM marks ORDER BY note"]
        for _ in range(200):
            code, out = container.exec_run(argv, environment={"PGPASSWORD": password})
            if code == 0:
                assert wait_for_log in bytes(container.logs()).decode(), "not a clean stop"
                lines = bytes(out).decode().split()
                assert lines[0] == "f", lines  # promoted: not a standby
                return lines[1:]
            container.reload()
            assert container.status == "running", bytes(container.logs()).decode()[-2000:]
            time.sleep(0.3)
        pytest.fail(f"the restored server did not answer: {bytes(out).decode()}")
    finally:
        container.stop(timeout=60)
        container.remove(force=True)


def _probe_volumes_left(client: docker.DockerClient, since: datetime) -> tuple[int, list[str]]:
    """The image probes run since ``since`` (containers labelled ``drtool.pitr=probe``) and
    the volumes mounted into them that still exist (the image declares a VOLUME: a probe run
    with ``remove=True`` left its anonymous volume behind)."""
    until = datetime.now(UTC) + timedelta(seconds=1)
    window = {"since": since, "until": until, "decode": True}
    probes = {
        e["Actor"]["ID"]
        for e in client.events(
            **window, filters={"type": "container", "event": "create", "label": f"{LABEL}=probe"}
        )
    }
    mounted = {
        e["Actor"]["ID"]
        for e in client.events(**window, filters={"type": "volume", "event": "mount"})
        if e["Actor"]["Attributes"].get("container") in probes
    }
    left = []
    for name in sorted(mounted):
        with contextlib.suppress(NotFound):
            left.append(client.volumes.get(name).name)
    return len(probes), left


def _refused_before_anything_is_created(
    history: History, docker_client: docker.DockerClient, configured: str, fresh: str
) -> None:
    """A bad name, an existing volume, another major, a dry run, a bit-flipped segment:
    each refused (or only planned) with no volume of ``fresh``'s name created."""
    kit = history.kit
    # a one-character name is not a Docker volume name: refused before anything is read
    result = _restore(history, POSTGRES_IMAGE, "x")
    assert result.returncode == 2 and "not a Docker volume name" in result.stderr

    # the configured volume (any existing one) is refused by name, untouched
    result = _restore(history, POSTGRES_IMAGE, configured)
    assert result.returncode == 2, result.stderr
    assert f"volume {configured} exists" in result.stderr and "Traceback" not in result.stderr

    # an image of another major: one line, nothing created
    if POSTGRES16_IMAGE in {t for i in docker_client.images.list() for t in i.tags}:
        result = _restore(history, POSTGRES16_IMAGE, fresh)
        assert result.returncode == 2, result.stderr
        assert result.stderr.strip().count("\n") == 0, result.stderr
        assert "runs PostgreSQL 16." in result.stderr, result.stderr
        assert "the base backup was taken with PostgreSQL 15." in result.stderr
        with pytest.raises(NotFound):
            docker_client.volumes.get(fresh)

    # a dry run: the plan and the stored hashes, nothing created (the image's probe leaves
    # no volume behind either)
    since = datetime.now(UTC) - timedelta(seconds=1)
    dry = _restore(history, POSTGRES_IMAGE, fresh, "--dry-run")
    probes, left = _probe_volumes_left(docker_client, since)
    assert probes >= 1 and left == [], left
    assert dry.returncode == 0, dry.stderr
    planned = json.loads(dry.stdout)
    assert planned["data_dir"] == f"docker volume {fresh}" and planned["hash_checked"] > 0
    with pytest.raises(NotFound):
        docker_client.volumes.get(fresh)

    # a bit-flipped segment: refused (exit 5, naming it) before any volume is created
    needed = segment_of_lsn(parse_lsn(history.lsn), 1, SEG).segno
    name = next(n for n in kit.segments() if parse_segment(n, SEG).segno >= needed)
    stored = kit.repo_dir / f"wal/{name[:8]}/{name}.zst.age"
    good = stored.read_bytes()
    stored.write_bytes(good[:100] + bytes([good[100] ^ 4]) + good[101:])
    try:
        result = _restore(history, POSTGRES_IMAGE, fresh)
    finally:
        stored.write_bytes(good)
    assert result.returncode == 5 and name in result.stderr, result.stderr
    with pytest.raises(NotFound):
        docker_client.volumes.get(fresh)


def test_restore_to_a_moment_into_a_new_docker_volume(
    kit: WalKit, runtime_root: Path, docker_client: docker.DockerClient, volumes: list[str]
) -> None:
    require_image(docker_client, POSTGRES_IMAGE)
    scratch = runtime_root / f"pitr-vol-{uuid.uuid4().hex[:6]}"
    scratch.mkdir(mode=0o711)
    history = record_history(kit, scratch)
    configured = f"drtool-test-configured-{uuid.uuid4().hex[:8]}"
    fresh = f"drtool-test-pitr-{uuid.uuid4().hex[:8]}"
    volumes += [configured, fresh]
    before = _production_volume(docker_client, configured)

    _refused_before_anything_is_created(history, docker_client, configured, fresh)

    # no password configured: drtool's psql uses the container's socket (trust, its own hba
    # file in the WAL volume), so the reached position is still asked of the server
    no_password = kit.root / "operator-no-password.toml"
    no_password.write_text(
        "\n".join(
            line
            for line in kit.operator.read_text().splitlines()
            if not line.startswith("password_file")
        )
    )
    result = _restore(history, POSTGRES_IMAGE, fresh, config=no_password)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["image_id"].startswith("sha256:")
    assert not any("shut down" in n for n in out["notes"]), out["notes"]
    assert out["volume"] == fresh and out["image"] == POSTGRES_IMAGE
    assert out["base_snapshot"] == history.base
    reached = datetime.fromisoformat(out["reached_time"])
    assert reached <= history.at  # A's commit, the last one replayed
    assert out["reached_lsn"]
    assert docker_client.volumes.get(fresh).attrs["Labels"].get(LABEL)
    # nothing of the restore's own is left: no container, no WAL volume
    assert docker_client.containers.list(all=True, filters={"label": LABEL}) == []
    assert [v.name for v in docker_client.volumes.list(filters={"label": LABEL})] == [fresh]

    assert _notes(docker_client, fresh, kit.server.password) == ["A"]
    assert _files(docker_client, configured) == before
    # the source kept running, untouched: both transactions
    with admin(kit.server.endpoint) as conn:
        assert [r[0] for r in conn.execute("SELECT note FROM marks ORDER BY note")] == ["A", "B"]
