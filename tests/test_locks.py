"""Lock liveness (ADR 0011): a dead holder's lock never blocks and is swept; a live one stays.

Each holder is a real process (or a real dead one): a lock names host, boot id, container,
pid and the pid's start time, and carries a heartbeat. The container restart itself (PID 1
of ``backup-cron`` after ``docker kill`` + ``docker start``) is tested in the Docker tier:
tests/test_container_backup.py.
"""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from support.backup_kit import make_backup_kit as make_kit
from support.repo_kit import RepoKit, dead_pid, plant_lock
from test_repo_commands import drtool, failed, ok
from test_storage_faults import PolicyServer

from drtool import liveness
from drtool.config import load_config
from drtool.endpoints import PostgresEndpoint, RedisEndpoint, S3Endpoint
from drtool.errors import Locked
from drtool.repository import access, layout
from drtool.repository.locks import LAPSE, read_locks, repository_lock, verdict
from drtool.s3session import s3_client
from drtool.services.backup import run_backup


@pytest.fixture
def live_process() -> Iterator[subprocess.Popen[bytes]]:
    """Another live process on this host (a holder that must be respected)."""
    proc = subprocess.Popen(["sleep", "600"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def _now(delta: timedelta = timedelta()) -> str:
    return (datetime.now(UTC) + delta).isoformat(timespec="seconds")


def holder_of(pid: int, **changes: object) -> dict[str, Any]:
    """The holder fields of process ``pid`` of this host, as a lock records them."""
    here = liveness.current(pid)
    fields: dict[str, Any] = {
        "boot_id": here.boot_id,
        "container": here.container,
        "pid_start": here.started,
        "heartbeat": _now(),
        "heartbeat_s": 60.0,
    }
    return fields | changes


def test_a_dead_pid_on_this_host_is_swept_by_the_next_writer(repo_kit: RepoKit) -> None:
    pid = dead_pid()
    plant_lock(repo_kit, host=liveness.current().host, pid=pid, since=datetime.now(UTC))  # legacy
    fresh = plant_lock(
        repo_kit,
        host=liveness.current().host,
        pid=pid,
        since=datetime.now(UTC),
        **holder_of(pid, pid_start=12345),
    )
    [lock] = [lk for lk in read_locks(repo_kit.storage) if lk.key == fresh]
    assert verdict(lock) == (False, f"process {pid} is gone")  # heartbeat fresh, process gone
    with repository_lock(repo_kit.storage, "backup") as held:
        assert [lk.lock_id for lk in read_locks(repo_kit.storage)] == [held.lock_id]
    assert read_locks(repo_kit.storage) == []


def test_a_reused_pid_is_a_dead_holder(
    repo_kit: RepoKit, live_process: subprocess.Popen[bytes]
) -> None:
    """PID 1 of a restarted container: the pid runs, but it is another process (later start)."""
    pid = live_process.pid
    start = liveness.process_start(pid)
    assert start is not None
    plant_lock(
        repo_kit,
        host=liveness.current().host,
        pid=pid,
        since=datetime.now(UTC),
        **holder_of(pid, pid_start=start - 100),
    )
    [lock] = read_locks(repo_kit.storage)
    alive, why = verdict(lock)
    assert not alive and "pid reused" in why
    with repository_lock(repo_kit.storage, "backup"):
        pass
    assert read_locks(repo_kit.storage) == []


def test_a_live_holder_is_never_swept_and_the_error_names_the_command(
    repo_kit: RepoKit, live_process: subprocess.Popen[bytes]
) -> None:
    pid = live_process.pid
    since = datetime.now(UTC) - timedelta(hours=13)  # older than the legacy 12 h: still alive
    key = plant_lock(repo_kit, host=liveness.current().host, pid=pid, since=since, **holder_of(pid))
    [lock] = read_locks(repo_kit.storage)
    with pytest.raises(Locked) as caught, repository_lock(repo_kit.storage, "prune"):
        pytest.fail("a writer got the lock of a live holder")
    message = str(caught.value)
    assert message.startswith(f"repository locked by {lock.host}/{pid} (backup) since ")
    assert "heartbeat" in message
    assert message.endswith(f"if that run is gone: `drtool unlock --id {lock.lock_id}`")
    assert ok(drtool(repo_kit.config_file, "unlock")).strip() == "no stale locks"
    assert [lk.key for lk in read_locks(repo_kit.storage)] == [key]
    failed(drtool(repo_kit.config_file, "prune", "--keep-last", "1"), 11)
    assert [lk.key for lk in read_locks(repo_kit.storage)] == [key]
    out = ok(drtool(repo_kit.config_file, "unlock", "--id", lock.lock_id))
    assert out.strip() == f"removed lock of {lock.describe()}: asked for by id"
    assert read_locks(repo_kit.storage) == []
    assert failed(drtool(repo_kit.config_file, "unlock", "--id", "nope"), 10).startswith(
        "lock nope"
    )


def test_another_hosts_lock_with_a_stale_heartbeat_is_dead(any_repo_kit: RepoKit) -> None:
    """A recreated container (new host name) or another NAS: only the heartbeat can tell."""
    since = datetime.now(UTC) - timedelta(minutes=30)
    other: dict[str, Any] = {
        "boot_id": "0000-other-boot",
        "container": "",
        "pid_start": 99,
        "heartbeat_s": 60.0,
    }
    stale = plant_lock(
        any_repo_kit,
        host="old-container",
        pid=1,
        since=since,
        **other | {"heartbeat": _now(-timedelta(seconds=LAPSE * 60 + 30))},
    )
    live = plant_lock(
        any_repo_kit, host="other-nas", pid=1, since=since, **other | {"heartbeat": _now()}
    )
    # the live one blocks a writer; `drtool unlock` removes the dead one only
    with (
        pytest.raises(Locked, match="locked by other-nas/1"),
        repository_lock(any_repo_kit.storage, "backup"),
    ):
        pass
    out = ok(drtool(any_repo_kit.config_file, "unlock"))
    assert out.startswith("removed lock of old-container/1 (backup) since ")
    assert "no heartbeat since" in out
    assert [lk.key for lk in read_locks(any_repo_kit.storage)] == [live]
    assert stale not in {lk.key for lk in read_locks(any_repo_kit.storage)}


def test_a_process_never_waits_for_its_own_leftover_lock(repo_kit: RepoKit) -> None:
    """A lock of this very process that it no longer holds (an earlier job's failed release)."""
    here = liveness.current()
    plant_lock(
        repo_kit, host=here.host, pid=here.pid, since=datetime.now(UTC), **holder_of(here.pid)
    )
    [lock] = read_locks(repo_kit.storage)
    assert verdict(lock) == (False, "left by this process, which no longer holds it")
    with repository_lock(repo_kit.storage, "backup") as held:
        assert [lk.lock_id for lk in read_locks(repo_kit.storage)] == [held.lock_id]
        # while held, this process's own lock blocks a second writer of the same process
        with pytest.raises(Locked), repository_lock(repo_kit.storage, "prune"):
            pytest.fail("a second writer got the lock")
    assert read_locks(repo_kit.storage) == []


def _stored_heartbeat(repo_kit: RepoKit, key: str) -> str | None:
    [lock] = [lk for lk in read_locks(repo_kit.storage) if lk.key == key]
    return lock.heartbeat


def test_the_holder_refreshes_its_heartbeat_and_stops_when_it_cannot(repo_kit: RepoKit) -> None:
    with repository_lock(repo_kit.storage, "backup", heartbeat_s=0.2) as held:
        first = _stored_heartbeat(repo_kit, held.key)
        deadline = time.monotonic() + 30
        while _stored_heartbeat(repo_kit, held.key) == first:
            assert time.monotonic() < deadline, "the heartbeat was never refreshed"
            time.sleep(0.1)
        held.ensure_held()  # a refreshed heartbeat: the holder may commit
        # the repository's locks/ stops taking writes: the holder must stop before committing
        locks_dir = Path(repo_kit.url.removeprefix("file://")) / layout.LOCKS
        shutil.rmtree(locks_dir)
        locks_dir.write_text("not a directory")
        deadline = time.monotonic() + 30
        with pytest.raises(Locked, match="heartbeat could not be written"):
            while time.monotonic() < deadline:
                held.ensure_held()
                time.sleep(0.1)
        locks_dir.unlink()


# -- 19.2: a lock that cannot be removed after the commit ------------------------------------


def _deny_every_delete(endpoint: S3Endpoint, bucket: str) -> None:
    """A bucket policy: the backup identity may not delete anything, its locks included."""
    principal = {"AWS": "arn:aws:iam::000000000000:user/backup"}
    policy = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Deny",
                "Principal": principal,
                "Action": ["s3:DeleteObject", "s3:DeleteObjectVersion"],
                "Resource": [f"arn:aws:s3:::{bucket}/*"],
            }
        ],
    }
    s3_client(endpoint).put_bucket_policy(Bucket=bucket, Policy=json.dumps(policy))


@pytest.mark.slow
def test_a_committed_backup_whose_lock_cannot_be_removed_exits_0_and_says_so(
    tmp_path: Path,
    pg_database: PostgresEndpoint,
    redis_db: RedisEndpoint,
    s3_server: S3Endpoint,
    s3_bucket: str,
) -> None:
    server = PolicyServer(tmp_path / "nodelete-s3")
    server.start()
    try:
        kit = make_kit(
            tmp_path, pg_database, redis_db, s3_server, s3_bucket, repo_s3=server.endpoint
        )
        bucket = f"nodelete-{secrets.token_hex(5)}"
        s3_client(server.endpoint).create_bucket(Bucket=bucket)
        _deny_every_delete(server.endpoint, bucket)
        keydir = kit.tmp / "keys"
        (keydir / "backup-ak").write_text(server.backup_key)
        (keydir / "backup-sk").write_text(server.backup_secret)
        repository = {
            "url": f"s3://{bucket}/drtool",
            "access_key_file": str(keydir / "backup-ak"),
            "secret_key_file": str(keydir / "backup-sk"),
        }
        config = kit.write_config("nodelete", repository=repository)
        assert kit.drtool("init", config=config).returncode == 0

        first = kit.backup(config=config)
        assert first.returncode == 0, first.stderr
        snapshot_id = json.loads(first.stdout)["snapshot_id"]
        [warning] = json.loads(first.stdout)["warnings"]
        assert warning.startswith("the repository lock locks/")
        assert "could not be removed" in warning and "it is marked released" in warning
        assert "`drtool unlock` removes it" in warning
        assert "warning: the repository lock locks/" in first.stderr
        storage = access.storage_for(load_config(config, {}))
        [left] = read_locks(storage)
        assert left.released and verdict(left)[0] is False

        # the next run (another process, or this one) is not blocked by it
        second = kit.backup(config=config)
        assert second.returncode == 0, second.stderr
        again = run_backup(
            load_config(config, {}), home=kit.tmp / "home", env={}, components=("redis",)
        )
        assert again.warnings and again.warnings[0].startswith("the repository lock locks/")
        listed = kit.drtool("list", "--json", config=config)
        assert listed.returncode == 0, listed.stderr
        valid = {r["id"] for r in json.loads(listed.stdout) if r["status"] == "VALID"}
        assert {snapshot_id, json.loads(second.stdout)["snapshot_id"], again.snapshot_id} <= valid
    finally:
        server.stop()
