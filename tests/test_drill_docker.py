"""Restore drills on the ``docker`` runtime, with the test images of ``.ci/docker-images``.

The scratch stack is three labelled containers on an internal network, reached at their
addresses; it is always removed: after a pass, a failed start, an exception, SIGTERM. A drill
killed outright leaves containers that ``drtool drill cleanup`` removes.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import docker
import psycopg
import pytest
from support.cli import run_drtool, start_drtool
from support.docker_tier import BASE_IMAGE, POSTGRES_IMAGE, REDIS_IMAGE, S3_IMAGE, require_image
from support.stacks import Repository, make_repository, source_stack

from drtool import liveness
from drtool.config import load_config
from drtool.drills.definition import DockerImages, DrillDefinition, ReportSettings
from drtool.drills.runtime_docker import (
    LABEL,
    _diagnose,
    cleanup_docker,
    docker_scratch,
    owner_labels,
    watch_memory,
)
from drtool.endpoints import PostgresEndpoint, S3Endpoint
from drtool.errors import SourceError
from drtool.services.drill import run_drill
from drtool.sources.redis_client import connect as connect_redis

IMAGES = DockerImages(postgres_image=POSTGRES_IMAGE, redis_image=REDIS_IMAGE, minio_image=S3_IMAGE)
PATIENCE = 300.0


@dataclass(frozen=True)
class World:
    """A seeded source stack and a repository holding one snapshot of it."""

    repo: Repository
    snapshot_id: str
    config: Path


@pytest.fixture(scope="module")
def images(docker_client: docker.DockerClient) -> DockerImages:
    """The test images, which must exist (nothing can be pulled here)."""
    for image in (POSTGRES_IMAGE, REDIS_IMAGE, S3_IMAGE):
        require_image(docker_client, image)
    return IMAGES


@pytest.fixture(scope="module")
def world(
    tmp_path_factory: pytest.TempPathFactory,
    images: DockerImages,
    pg_server: PostgresEndpoint,
    s3_server: S3Endpoint,
) -> Iterator[World]:
    """2,000 messages and 20 attachments, one snapshot, and an operator config."""
    directory = tmp_path_factory.mktemp("drill-docker")
    with source_stack(directory, pg_server, s3_server) as source:
        repo = make_repository(directory / "repo", source)
        snapshot_id = repo.backup()
        yield World(repo, snapshot_id, repo.operator_config(directory / "operator.toml"))


BIG_VALUES = 48  # 1 MiB values of random bytes: a 48 MiB RDB, ~50 MiB in Redis's memory


@pytest.fixture(scope="module")
def big_redis_world(
    tmp_path_factory: pytest.TempPathFactory,
    images: DockerImages,
    pg_server: PostgresEndpoint,
    s3_server: S3Endpoint,
) -> Iterator[World]:
    """The seed plus 48 MiB of incompressible Redis values, one snapshot."""
    directory = tmp_path_factory.mktemp("drill-docker-big")
    with source_stack(directory, pg_server, s3_server) as source:
        with connect_redis(source.redis) as client:
            for n in range(BIG_VALUES):
                client.set(f"bulk:{n}", os.urandom(1024 * 1024))
        repo = make_repository(directory / "repo", source)
        snapshot_id = repo.backup()
        yield World(repo, snapshot_id, repo.operator_config(directory / "operator.toml"))


def leftovers(client: docker.DockerClient, label: str = LABEL) -> list[str]:
    """Containers (running or not) and networks carrying ``label``."""
    containers = client.containers.list(all=True, filters={"label": label}, ignore_removed=True)
    networks = client.networks.list(filters={"label": label})
    return [f"container {c.name}" for c in containers] + [f"network {n.name}" for n in networks]


@pytest.fixture
def clean_engine(docker_client: docker.DockerClient) -> Iterator[docker.DockerClient]:
    """No drill containers before the test; none left behind by a failing one."""
    assert leftovers(docker_client) == [], "drill containers from elsewhere: run drill cleanup"
    yield docker_client
    # whatever a failing test left, this test process's drills included (cleanup keeps those)
    for container in docker_client.containers.list(
        all=True, filters={"label": LABEL}, ignore_removed=True
    ):
        container.remove(force=True, v=True)
    for network in docker_client.networks.list(filters={"label": LABEL}):
        network.remove()


@pytest.mark.docker
def test_a_drill_on_docker_passes_and_leaves_nothing(
    world: World, clean_engine: docker.DockerClient, tmp_path: Path
) -> None:
    reports = tmp_path / "reports"
    spec = DrillDefinition(runtime="docker", docker=IMAGES, report=ReportSettings(dir=str(reports)))
    report = run_drill(load_config(world.config, {}), home=tmp_path / "home", spec=spec)
    assert report.error == ""
    assert report.passed, [(c.name, c.detail) for c in report.checks if not c.passed]
    assert report.runtime == "docker" and report.snapshot_id == world.snapshot_id
    assert len(report.checks) == 8 and all(c.passed for c in report.checks)
    assert set(report.phases_s) == {"up", "restore", "checks", "down"}
    assert json.loads((reports / f"{report.drill_id}.json").read_text())["passed"] is True
    assert (reports / f"{report.drill_id}.md").exists()
    assert leftovers(clean_engine, f"{LABEL}={report.drill_id}") == []


@pytest.mark.docker
def test_the_scratch_stack_is_internal_labelled_tmpfs_and_limited(
    images: DockerImages, clean_engine: docker.DockerClient
) -> None:
    drill_id = "20250101T000000Z-0001"
    with docker_scratch(drill_id, replace(images, data="tmpfs")) as endpoints:
        (network,) = clean_engine.networks.list(filters={"label": f"{LABEL}={drill_id}"})
        assert network.attrs["Internal"] is True
        containers = clean_engine.containers.list(filters={"label": f"{LABEL}={drill_id}"})
        roles = {c.labels[f"{LABEL}.role"]: c for c in containers}
        assert sorted(roles) == ["minio", "postgres", "redis"]
        for role, container in roles.items():
            host = container.attrs["HostConfig"]
            assert list(container.attrs["NetworkSettings"]["Networks"]) == [network.name], role
            assert not host.get("PortBindings") and not host.get("PublishAllPorts"), role
            assert host["Tmpfs"], role  # data = "tmpfs"; the default keeps it on disk
            assert host["Memory"] > 0, role
        assert roles["postgres"].attrs["HostConfig"]["Memory"] == 512 * 1024 * 1024
        assert roles["postgres"].attrs["Config"]["StopSignal"] == "SIGINT"
        # the Redis password is in the environment only, never on a command line
        redis_cmd = " ".join(roles["redis"].attrs["Config"]["Cmd"])
        assert endpoints.redis.password and endpoints.redis.password not in redis_cmd
        top = roles["redis"].top()
        assert all(endpoints.redis.password not in " ".join(p) for p in top["Processes"])
        with psycopg.connect(**endpoints.postgres.connect_kwargs()) as conn:
            fs = conn.execute("SELECT setting FROM pg_settings WHERE name = 'fsync'").fetchone()
        assert fs == ("off",)
    assert leftovers(clean_engine) == []


@pytest.mark.docker
def test_an_exception_inside_tears_the_stack_down(
    images: DockerImages, clean_engine: docker.DockerClient
) -> None:
    with (
        pytest.raises(RuntimeError, match="check blew up"),
        docker_scratch("20250101T000000Z-0002", images),
    ):
        assert leftovers(clean_engine) != []
        raise RuntimeError("check blew up")
    assert leftovers(clean_engine) == []


@pytest.mark.docker
def test_a_start_failing_midway_leaves_nothing(
    images: DockerImages, clean_engine: docker.DockerClient
) -> None:
    require_image(clean_engine, BASE_IMAGE)
    # the base image has no MinIO: its container fails to start after the other two did
    broken = DockerImages(
        postgres_image=images.postgres_image,
        redis_image=images.redis_image,
        minio_image=BASE_IMAGE,
    )
    with (
        pytest.raises(SourceError, match="docker: drill stack did not start"),
        docker_scratch("20250101T000000Z-0003", broken),
    ):
        pytest.fail("the stack must not come up")
    assert leftovers(clean_engine) == []


def start_drill(world: World, tmp_path: Path) -> subprocess.Popen[str]:
    """``drtool drill run`` of a docker definition, in the background."""
    definition = tmp_path / "docker.toml"
    definition.write_text(
        f'name = "docker"\nruntime = "docker"\n'
        f'[docker]\npostgres_image = "{IMAGES.postgres_image}"\n'
        f'redis_image = "{IMAGES.redis_image}"\nminio_image = "{IMAGES.minio_image}"\n'
        f'[report]\ndir = "{tmp_path / "reports"}"\n'
    )
    return start_drtool(
        "drill",
        "run",
        "--definition",
        str(definition),
        config=world.config,
        home=tmp_path / "home",
    )


def wait_for_containers(proc: subprocess.Popen[str], client: docker.DockerClient) -> None:
    deadline = time.monotonic() + PATIENCE
    while not client.containers.list(all=True, filters={"label": LABEL}, ignore_removed=True):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            _, err = proc.communicate()
            pytest.fail(f"no drill container ever appeared (exit {proc.returncode}):\n{err}")
        time.sleep(0.05)


@pytest.mark.docker
def test_sigterm_tears_the_containers_down(
    world: World, clean_engine: docker.DockerClient, tmp_path: Path
) -> None:
    proc = start_drill(world, tmp_path)
    wait_for_containers(proc, clean_engine)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=PATIENCE)
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1] == "error: interrupted"
    assert leftovers(clean_engine) == []


@pytest.mark.docker
def test_sigkill_leaves_containers_that_cleanup_removes(
    world: World, clean_engine: docker.DockerClient, tmp_path: Path
) -> None:
    proc = start_drill(world, tmp_path)
    wait_for_containers(proc, clean_engine)
    # 19.13: while the drill runs, cleanup leaves its containers alone
    running = run_drtool("drill", "cleanup", config=world.config, home=tmp_path / "other-home")
    assert running.returncode == 0, running.stderr
    assert "removed" not in running.stdout
    assert f"its drill runs ({socket.gethostname()}/{proc.pid}" in running.stdout
    assert leftovers(clean_engine) != []
    proc.kill()
    proc.communicate(timeout=PATIENCE)
    left = leftovers(clean_engine)
    assert left != []
    run = run_drtool("drill", "cleanup", config=world.config, home=tmp_path / "home")
    assert run.returncode == 0, run.stderr
    removed = {line.removeprefix("removed ") for line in run.stdout.splitlines()}
    assert set(left) <= removed
    assert leftovers(clean_engine) == []


def test_cleanup_without_an_engine_removes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
    assert cleanup_docker() == ([], [])


def dead_pid() -> int:
    """A pid that existed and is gone (reaped)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _planted(client: docker.DockerClient, drill_id: str, owner: dict[str, str]) -> None:
    """A stopped container of drill ``drill_id`` whose owner labels are ``owner``."""
    client.containers.create(
        BASE_IMAGE, ["true"], labels={LABEL: drill_id, **owner}, name=f"drtool-drill-{drill_id}"
    )


@pytest.mark.docker
def test_cleanup_judges_owners_it_cannot_see_by_their_container(
    clean_engine: docker.DockerClient,
) -> None:
    """19.13: a drill started in another container, or on another host, is not ours to judge
    by pid: its container's fate tells (gone, stopped or restarted: dead; running: kept)."""
    require_image(clean_engine, BASE_IMAGE)
    other = liveness.Owner("elsewhere", "other-boot", "", 7, 100)
    runner = clean_engine.containers.run(
        BASE_IMAGE, ["sleep", "600"], labels={"drtool.test": "1"}, detach=True
    )
    try:
        runner.reload()
        started = runner.attrs["State"]["StartedAt"]
        in_runner = replace(other, container=runner.id)
        _planted(clean_engine, "t-gone", owner_labels(replace(other, container="0" * 64)))
        _planted(clean_engine, "t-runs", owner_labels(in_runner, started))
        _planted(clean_engine, "t-restarted", owner_labels(in_runner, "2001-01-01T00:00:00Z"))
        _planted(clean_engine, "t-host", owner_labels(other))
        _planted(clean_engine, "t-legacy", {})
        _planted(clean_engine, "t-dead", owner_labels(liveness.current(dead_pid())))
        removed, kept = cleanup_docker()
        assert sorted(removed) == [
            "container drtool-drill-t-dead",
            "container drtool-drill-t-gone",
            "container drtool-drill-t-restarted",
        ]
        assert [k.split(":")[0] for k in kept] == ["drill t-host", "drill t-legacy", "drill t-runs"]
        assert "run `drtool drill cleanup` there" in kept[0]
        assert "older drtool" in kept[1]
        assert "which runs" in kept[2]
        runner.stop(timeout=1)
        removed, kept = cleanup_docker()
        assert removed == ["container drtool-drill-t-runs"]
    finally:
        runner.remove(force=True)


@pytest.mark.docker
def test_history_names_the_cause_of_a_drill_that_failed_with_an_error(
    world: World, clean_engine: docker.DockerClient, tmp_path: Path
) -> None:
    """No check failed (the stack never came up): ``drill history`` still says why."""
    missing = "127.0.0.1:1/drtool-test/no-such-image:none"  # a registry that refuses at once
    definition = tmp_path / "missing.toml"
    definition.write_text(
        f'name = "missing"\nruntime = "docker"\n[docker]\npostgres_image = "{missing}"\n'
        f'[report]\ndir = "{tmp_path / "reports"}"\n'
    )
    run = run_drtool("drill", "run", "--definition", str(definition), "--json",
                     config=world.config, home=tmp_path / "home")  # fmt: skip
    assert run.returncode == 6, run.stderr
    drill_id = json.loads(run.stdout)["drill_id"]
    history = run_drtool("drill", "history", "--json", config=world.config)
    assert history.returncode == 0, history.stderr
    (entry,) = [d for d in json.loads(history.stdout) if d["drill_id"] == drill_id]
    assert entry["passed"] is False and entry["failed_checks"] == []
    assert f"docker: image {missing} is not on this engine" in entry["error"]
    # wide enough for the row (a table on a pipe is cut to 80 columns: another issue)
    table = run_drtool("drill", "history", config=world.config, extra_env={"COLUMNS": "400"})
    (row,) = [line for line in table.stdout.splitlines() if drill_id in line]
    assert "FAIL" in row and "not on this engine" in row
    assert leftovers(clean_engine) == []


@pytest.mark.docker
@pytest.mark.slow
def test_a_scratch_container_killed_for_memory_is_named_with_the_setting_to_raise(
    big_redis_world: World, clean_engine: docker.DockerClient, tmp_path: Path
) -> None:
    """19.12: a Redis container whose limit cannot hold the snapshot is OOM-killed part-way;
    the drill's error names it and the setting, not the connection the kill broke."""
    spec = DrillDefinition(
        runtime="docker",
        components=("redis",),
        docker=replace(IMAGES, redis_memory="32m"),
        report=ReportSettings(dir=str(tmp_path / "reports")),
    )
    report = run_drill(load_config(big_redis_world.config, {}), home=tmp_path / "home", spec=spec)
    assert report.passed is False
    cause = (
        "the redis scratch container was killed for memory (OOM) at its 32m limit; "
        "raise docker.redis_memory"
    )
    # the watchdog's tick stops the drill once it sees the kill; if the restore fails first,
    # the teardown names the cause ahead of the step's own (network) error
    assert report.error.startswith(
        (f"docker: {cause}", "the drill was stopped while restoring snapshot")
    ), report.error
    assert cause in report.error, report.error
    stored = json.loads((tmp_path / "reports" / f"{report.drill_id}.json").read_text())
    assert "raise docker.redis_memory" in stored["error"]
    assert leftovers(clean_engine) == []


@pytest.mark.docker
@pytest.mark.slow
def test_an_unset_limit_is_sized_from_the_snapshot_and_the_drill_passes(
    big_redis_world: World,
    clean_engine: docker.DockerClient,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """19.12: with no ``redis_memory`` in the definition the limit grows with the snapshot's
    RDB (above the 128m floor), and the drill that a fixed small limit failed passes."""
    spec = DrillDefinition(
        runtime="docker",
        components=("redis",),
        docker=IMAGES,  # no *_memory set: sized from the snapshot
        report=ReportSettings(dir=str(tmp_path / "reports")),
    )
    with caplog.at_level(logging.INFO, logger="drtool.drills.sizing"):
        report = run_drill(
            load_config(big_redis_world.config, {}), home=tmp_path / "home", spec=spec
        )
    assert report.error == "" and report.passed, report.error
    (line,) = [r.getMessage() for r in caplog.records if "scratch memory limits" in r.getMessage()]
    redis_part = next(p for p in line.split("; ") if "redis " in p)
    limit = int(redis_part.split("redis ")[1].split("m ")[0])
    assert limit >= 4 * BIG_VALUES + 64 and limit > 128, line
    assert "postgres 512m (the floor" in line
    assert leftovers(clean_engine) == []


@pytest.mark.docker
def test_a_container_sitting_at_its_memory_limit_is_warned_about_and_named(
    clean_engine: docker.DockerClient, caplog: pytest.LogCaptureFixture
) -> None:
    """19.12: the watchdog's tick samples a drill container's memory: one holding 61 MiB of
    tmpfs data (which counts against the limit and cannot be dropped) under a 64m limit is
    warned about while it runs, and named with the setting to raise when the drill fails."""
    require_image(clean_engine, BASE_IMAGE)
    drill_id = "20250101T000000Z-0004"
    clean_engine.containers.run(
        BASE_IMAGE,
        ["sh", "-c", "head -c 61m /dev/zero > /data/fill && touch /data/done && sleep 600"],
        labels={LABEL: drill_id, f"{LABEL}.role": "minio"},
        name=f"drtool-drill-{drill_id}-minio",
        tmpfs={"/data": "rw"},
        mem_limit="64m",
        detach=True,
    )
    container = clean_engine.containers.get(f"drtool-drill-{drill_id}-minio")
    deadline = time.monotonic() + PATIENCE
    while container.exec_run(["test", "-e", "/data/done"]).exit_code != 0:
        assert time.monotonic() < deadline, container.logs()
        time.sleep(0.2)
    with caplog.at_level(logging.WARNING, logger="drtool.drills.runtime_docker"):
        watch_memory(drill_id)
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(
        "the minio scratch container was at" in w
        and "% of its 64m memory limit; raise docker.minio_memory" in w
        for w in warned
    ), warned
    (found,) = _diagnose(clean_engine, drill_id, sample=True)
    assert found.role == "minio" and found.memory
    assert "raise docker.minio_memory" in found.message()
