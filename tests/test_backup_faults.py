"""``drtool backup`` failing closed: producers, sources, storage, kill -9 (P1, P2, P7, L1, L2).

Each case runs the real ``drtool`` command against real servers and checks what a user would
notice: the exit code, one ``error:`` line naming the cause, and "nothing lost" — no new VALID
snapshot listed, the earlier snapshot still verifies (decrypting every object), no multipart
upload left in the repository bucket, and the lock released (the next backup succeeds).

Stub producers (first in ``postgres.bin_dir``) stand in for what a real server cannot do on
demand: a pg_dump that dies mid-stream or succeeds with no output. The crash points use the
test-only ``DRTOOL_CRASH_AT`` hook (drtool/faults.py), which ``os._exit(137)``s like kill -9.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis
from support.backup_kit import (
    Baseline,
    assert_next_backup_succeeds,
    assert_nothing_lost,
    make_backup_kit,
)
from support.cli import one_error
from support.servers import skip_or_fail

from drtool.config import load_config
from drtool.endpoints import PostgresEndpoint, RedisEndpoint, S3Endpoint
from drtool.faults import BACKUP_CRASH_POINTS, ENV, EXIT_CODE
from drtool.repository import access, layout
from drtool.repository.locks import is_stale, read_locks, repository_lock
from drtool.repository.retention import Policy
from drtool.runtime import binaries
from drtool.runtime.procs import HOST, free_port_block
from drtool.runtime.s3server import SeaweedServer
from drtool.s3session import s3_client
from drtool.services import prune as prune_svc

pytestmark = pytest.mark.slow  # every test backs up a seeded stack, then breaks something


@pytest.fixture
def base(
    tmp_path: Path,
    pg_database: PostgresEndpoint,
    redis_db: RedisEndpoint,
    s3_server: S3Endpoint,
    s3_bucket: str,
) -> Baseline:
    kit = make_backup_kit(tmp_path, pg_database, redis_db, s3_server, s3_bucket)
    return Baseline(kit, kit.backup_ok())


def _stub_bin_dir(tmp: Path, body: str) -> Path:
    """A bin dir with the real PostgreSQL tools and a stub ``pg_dump`` running ``body``.

    The stub answers ``--version`` exactly like the real pg_dump (the version pre-flight).
    """
    real = binaries.pg_bin_dir()
    bin_dir = tmp / "stub-bin"
    bin_dir.mkdir()
    for tool in ("pg_dumpall", "pg_restore", "psql"):
        (bin_dir / tool).symlink_to(real / tool)
    version = subprocess.run(
        [str(real / "pg_dump"), "--version"], capture_output=True, text=True, check=True
    ).stdout.strip()
    stub = bin_dir / "pg_dump"
    stub.write_text(
        f'#!/bin/bash\nif [ "$1" = "--version" ]; then echo "{version}"; exit 0; fi\n{body}\n'
    )
    stub.chmod(0o755)
    return bin_dir


# -- producers -------------------------------------------------------------------------------


def test_p1_pg_dump_dying_mid_stream_fails_the_run(base: Baseline, tmp_path: Path) -> None:
    """Stub pg_dump: ``PGDMP`` + 12 MiB of random bytes, then exit 1 with a stderr line.

    12 MiB is more than two 5 MiB parts, so a multipart upload is under way when it dies: it
    must be aborted.
    """
    bin_dir = _stub_bin_dir(
        tmp_path,
        "printf PGDMP; head -c 12582912 /dev/urandom\n"
        'echo "pg_dump: error: query failed: server closed the connection unexpectedly" >&2\n'
        "exit 1",
    )
    config = base.kit.write_config("p1", postgres={"bin_dir": str(bin_dir)})
    message = one_error(base.kit.backup(config=config), 3)
    assert message.startswith("error: pg_dump exited 1: ")
    assert "server closed the connection unexpectedly" in message
    assert_nothing_lost(base)
    assert_next_backup_succeeds(base)


def test_p2_pg_dump_with_empty_output_is_refused(base: Baseline, tmp_path: Path) -> None:
    """Stub pg_dump: exits 0 having written nothing."""
    bin_dir = _stub_bin_dir(tmp_path, "exit 0")
    config = base.kit.write_config("p2", postgres={"bin_dir": str(bin_dir)})
    message = one_error(base.kit.backup(config=config), 3)
    assert "pg_dump produced 0 bytes" in message
    assert_nothing_lost(base)


def test_wrong_postgres_password_fails_without_showing_it(base: Baseline) -> None:
    wrong = f"wrong-{secrets.token_hex(8)}"
    secret = base.kit.tmp / "wrong-pg-password"
    secret.write_text(wrong)
    config = base.kit.write_config("badpw", postgres={"password_file": str(secret)})
    done = base.kit.backup(config=config)
    message = one_error(done, 3)
    assert "cannot connect to PostgreSQL" in message
    assert "password authentication failed" in message
    real = base.kit.endpoints.postgres.password
    assert real
    for text in (done.stdout, done.stderr):
        assert wrong not in text and real not in text
    assert_nothing_lost(base)


@pytest.fixture
def redis_without_sync(tmp_path: Path) -> Iterator[RedisEndpoint]:
    """Our own redis-server with SYNC and PSYNC renamed away (as some hosted Redis do)."""
    port = free_port_block((0,), set())
    data = tmp_path / "redis-nosync"
    data.mkdir()
    password = secrets.token_hex(12)
    conf = data / "redis.conf"
    conf.write_text(
        f'bind {HOST}\nport {port}\nsave ""\nappendonly no\ndir {data}\n'
        f"requirepass {password}\n"
        'rename-command SYNC ""\nrename-command PSYNC ""\n'
    )
    proc = subprocess.Popen(
        [str(binaries.redis_server_binary()), str(conf)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        client = redis.Redis(host=HOST, port=port, password=password)
        for _ in range(200):  # wait until it answers
            try:
                client.ping()
                break
            except redis.ConnectionError:
                assert proc.poll() is None, "redis-server did not start"
                time.sleep(0.05)
        client.set("k", "v")
        client.close()
        yield RedisEndpoint(HOST, port, password=password)
    finally:
        proc.terminate()
        proc.wait(10)


def test_redis_refusing_sync_fails_the_run_when_the_rdb_method_is_required(
    base: Baseline, redis_without_sync: RedisEndpoint
) -> None:
    """With ``redis.method = "rdb"`` a refused SYNC fails the run (the default ``auto`` falls
    back to a logical dump: tests/test_redis_logical.py)."""
    secret = base.kit.tmp / "nosync-password"
    secret.write_text(redis_without_sync.password or "")
    config = base.kit.write_config(
        "nosync",
        redis={"port": redis_without_sync.port, "password_file": str(secret), "method": "rdb"},
    )
    message = one_error(base.kit.backup("redis", config=config), 3)
    assert "Redis refused replication (SYNC)" in message
    assert "+psync" in message  # it says which permissions the backup user needs
    assert_nothing_lost(base)


@pytest.mark.parametrize(
    ("change", "code", "cause"),
    [
        ("missing-bucket", 10, "bucket does not exist"),
        ("wrong-secret", 3, "listing denied"),
    ],
)
def test_minio_bucket_missing_or_denied_fails_the_run(
    base: Baseline, change: str, code: int, cause: str
) -> None:
    minio: dict[str, object]
    if change == "missing-bucket":
        minio = {"buckets": [base.kit.bucket, "no-such-bucket"]}
    else:
        secret = base.kit.tmp / "wrong-minio-secret"
        secret.write_text("not-the-secret")
        minio = {"secret_key_file": str(secret)}
    config = base.kit.write_config(change, minio=minio)
    message = one_error(base.kit.backup(config=config), code)
    assert cause in message
    assert_nothing_lost(base)


# -- storage ---------------------------------------------------------------------------------


def test_repository_at_a_closed_port_fails_naming_the_endpoint(base: Baseline) -> None:
    port = free_port_block((0,), set())
    endpoint = f"http://{HOST}:{port}"
    repository = {**base.kit.sections["repository"], "endpoint_url": endpoint}
    config = base.kit.write_config("closed", repository=repository)
    message = one_error(base.kit.backup(config=config), 4)
    assert f"cannot reach {endpoint}" in message
    assert_nothing_lost(base)


def test_repository_going_down_mid_run_fails_and_loses_nothing(
    tmp_path: Path,
    pg_database: PostgresEndpoint,
    redis_db: RedisEndpoint,
    s3_server: S3Endpoint,
    s3_bucket: str,
) -> None:
    """A dedicated SeaweedFS holds the repository; it is stopped while pg_dump finishes.

    The stop is done by a wrapper around the real pg_dump (placed in ``postgres.bin_dir``):
    it runs pg_dump, then stops the repository server before exiting 0, so the dump's
    upload meets a dead endpoint.
    """
    repo_server = SeaweedServer(tmp_path / "repo-s3")
    repo_server.start()
    try:
        kit = make_backup_kit(
            tmp_path, pg_database, redis_db, s3_server, s3_bucket, repo_s3=repo_server.endpoint
        )
        b = Baseline(kit, kit.backup_ok())

        assert repo_server.daemon is not None
        pgid = repo_server.daemon.pid
        real = binaries.pg_bin_dir() / "pg_dump"
        bin_dir = _stub_bin_dir(
            tmp_path,
            f'"{real}" "$@"; rc=$?\n'
            f"kill -KILL -- -{pgid}\n"
            f"while (exec 3<>/dev/tcp/{HOST}/{repo_server.port}) 2>/dev/null; do sleep 0.1; done\n"
            "exit $rc",
        )
        config = kit.write_config("down", postgres={"bin_dir": str(bin_dir)})
        message = one_error(kit.backup(config=config), 4)
        assert f"cannot reach {repo_server.endpoint.endpoint_url}" in message

        repo_server.daemon = None
        repo_server.start()
        # SeaweedFS answers its S3 port before its volume serves reads (HTTP 500 for a few
        # seconds under load, CI): wait until the repository reads, then judge what it holds
        deadline = time.monotonic() + 120
        while kit.drtool("list", "--json", config=kit.operator_config).returncode != 0:
            assert time.monotonic() < deadline, "the restarted repository server never read"
            time.sleep(1)
        assert_nothing_lost(b, repository_died=True)
        assert_next_backup_succeeds(b)
    finally:
        repo_server.stop()


# -- P7: kill -9 at each step ----------------------------------------------------------------


@pytest.fixture
def big_object(base: Baseline) -> Baseline:
    """A 12 MiB incompressible attachment, so that its blob is a multipart upload (5 MiB parts)."""
    s3_client(base.kit.endpoints.minio).put_object(
        Bucket=base.kit.bucket, Key="rooms/1/video.bin", Body=os.urandom(12 << 20)
    )
    return base


@pytest.mark.parametrize("point", [p for p in BACKUP_CRASH_POINTS if p != "after-minio"])
def test_p7_kill_at_each_step_lists_only_committed_snapshots(
    big_object: Baseline, point: str
) -> None:
    b, kit = big_object, big_object.kit
    before = kit.stored_keys()
    crashed = kit.backup(env=kit.env(**{ENV: point}))
    assert crashed.returncode == EXIT_CODE, crashed.stderr[-2000:]
    listed = kit.listed()
    new = [sid for sid in listed if sid != b.snapshot_id]
    if point == "after-manifest":
        assert len(new) == 1 and listed[new[0]] == "VALID"  # committed before the kill
    else:
        assert new == []
        assert listed == {b.snapshot_id: "VALID"}
    orphans = {k for k in kit.stored_keys() - before if not k.startswith("locks/")}
    assert orphans or point == "upload-part"  # what the dead run wrote stays as garbage
    if point == "upload-part":
        assert len(kit.multipart_uploads()) == 1  # left by the kill: no abort could run

    # the dead run's lock is still there, and stale: its pid is gone
    locks = read_locks(kit.storage())
    assert len(locks) == 1
    assert locks[0].host == socket.gethostname()
    assert is_stale(locks[0], datetime.now(UTC), timedelta(hours=12))

    verified = kit.verify_all()
    assert verified.returncode == 0, verified.stderr

    # the next run proceeds past the stale lock, and sweeps it (ADR 0011)
    after = kit.backup_ok()
    assert kit.listed()[after] == "VALID"
    assert read_locks(kit.storage()) == []

    # prune within the grace period removes nothing of the dead run
    dry = kit.drtool("prune", "--keep-last", "10", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    plan = json.loads(dry.stdout)
    assert plan["garbage"] == [] and plan["stale_uploads"] == 0 and plan["forget"] == []
    # once the grace period has passed, exactly the dead run's leftovers are swept
    later = prune_svc.prune(
        load_config(kit.backup_config, {}),
        Policy(last=10),
        dry_run=True,
        now=datetime.now(UTC) + timedelta(hours=25),
    )
    committed = kit.listed()
    referenced = {o.key for sid in committed for o in kit.manifest(sid).objects()}
    referenced |= {layout.manifest_key(sid) for sid in committed}
    assert set(later.garbage) == orphans - referenced
    assert later.stale_uploads == (1 if point == "upload-part" else 0)


# -- L1: one writer at a time ----------------------------------------------------------------


def test_l1_second_backup_while_locked_exits_11(base: Baseline) -> None:
    storage = access.storage_for(load_config(base.kit.backup_config, {}))
    with repository_lock(storage, "backup") as held:
        message = one_error(base.kit.backup(), 11)
        assert f"locked by {held.host}/{os.getpid()}" in message
        assert f"since {held.since}" in message
        assert base.kit.listed() == {base.snapshot_id: "VALID"}
    assert read_locks(storage) == []
    assert_next_backup_succeeds(base)


@pytest.fixture
def tiny_scratch(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs for the backup's scratch dir (skipped where mounting is not permitted)."""
    mount = tmp_path / "tiny-scratch"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        skip_or_fail(f"cannot mount a tmpfs: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_p6_full_scratch_dir_names_the_dir_and_uploads_nothing(
    base: Baseline, redis_db: RedisEndpoint, tiny_scratch: Path
) -> None:
    """The Redis RDB is staged in the scratch dir: 3 MiB of keys cannot fit in 1 MiB."""
    with redis.Redis(host=redis_db.host, port=redis_db.port, password=redis_db.password) as r:
        for i in range(3):
            r.set(f"p6:big:{i}", secrets.token_bytes(1 << 20))  # incompressible
    before = base.kit.stored_keys()
    config = base.kit.write_config("tiny", backup={"scratch_dir": str(tiny_scratch)})
    message = one_error(base.kit.backup("redis", config=config), 3)
    assert str(tiny_scratch) in message and "no space" in message.lower()
    assert base.kit.stored_keys() == before  # nothing uploaded
    assert list(tiny_scratch.iterdir()) == []
    assert_nothing_lost(base)
