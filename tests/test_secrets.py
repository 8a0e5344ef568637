"""S1: canary secrets appear nowhere (RELIABILITY.md).

The stack runs on credentials that are canaries — random, recognisable values: the S3 secret
key (repository and MinIO), the PostgreSQL password (a role of our own), the Redis password (a
redis-server of our own) and the passphrase of the operator's identity file. Every run below
uses ``--debug`` (DEBUG logs and tracebacks) through the real CLI: successes (backup, verify
with the identity, show, list) and failures (wrong password, unreachable repository, corrupt
object, locked repository, restore into a non-empty target, wrong passphrase). Afterwards no
canary may appear in stdout/stderr, in any stored object (manifests, ``drtool-repo.json``,
locks, encrypted data), in object metadata (HEAD of every object), or in the argv of any
process while a backup runs (``/proc/*/cmdline`` sampled, plus a ``pg_dump`` wrapper that
records its own argv and environment variable names).

K1 (an identity in the backup's env or config is refused) is proven in tests/test_backup.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import secrets
import subprocess
import threading
import tomllib
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import tomli_w
from psycopg import sql
from support.backup_kit import BackupKit, make_backup_kit
from support.cli import one_error

from drtool.endpoints import PostgresEndpoint
from drtool.pipeline.age import encrypt_with_passphrase
from drtool.repository import access
from drtool.repository.locks import repository_lock
from drtool.runtime import binaries
from drtool.runtime.procs import HOST, free_port_block
from drtool.runtime.redisserver import RedisServer
from drtool.runtime.s3server import SeaweedServer
from drtool.s3session import s3_client

pytestmark = pytest.mark.slow  # one long scan of everything a backup and restore leave behind

S3_SECRET = f"CanaryS3{secrets.token_hex(10)}"
PG_PASSWORD = f"CanaryPg{secrets.token_hex(10)}"
REDIS_PASSWORD = f"CanaryRedis{secrets.token_hex(10)}"
PASSPHRASE = f"CanaryPass{secrets.token_hex(10)}"
WRONG = f"CanaryWrong{secrets.token_hex(10)}"
CANARIES = (S3_SECRET, PG_PASSWORD, REDIS_PASSWORD, PASSPHRASE, WRONG)


def leaks(text: str | bytes) -> list[str]:
    """The canaries found in ``text``."""
    data = text.encode() if isinstance(text, str) else text
    return [c for c in CANARIES if c.encode() in data]


@dataclasses.dataclass
class World:
    """A kit on canary credentials, the operator config with a passphrase identity."""

    kit: BackupKit
    operator: Path
    s3: SeaweedServer
    outputs: list[str]

    def run(
        self, *args: str, config: Path | None = None, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """``drtool --debug ARGS``; its output is kept for the final leak check."""
        done = self.kit.drtool("--debug", *args, config=config, env=env)
        self.outputs += [done.stdout, done.stderr]
        return done


@pytest.fixture
def world(tmp_path: Path, pg_server: PostgresEndpoint) -> Iterator[World]:
    role = f"canary_{secrets.token_hex(4)}"
    dbname = f"canary_{secrets.token_hex(4)}"
    admin = dataclasses.replace(pg_server, dbname="postgres")
    with psycopg.connect(**admin.connect_kwargs(), autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN SUPERUSER PASSWORD {}").format(
                sql.Identifier(role), sql.Literal(PG_PASSWORD)
            )
        )
        conn.execute(
            sql.SQL("CREATE DATABASE {} OWNER {}").format(
                sql.Identifier(dbname), sql.Identifier(role)
            )
        )
    pg = dataclasses.replace(pg_server, user=role, dbname=dbname, password=PG_PASSWORD)
    rd_server = RedisServer(tmp_path / "redis", password=REDIS_PASSWORD)
    s3 = SeaweedServer(
        tmp_path / "s3", access_key=f"canaryak{secrets.token_hex(4)}", secret_key=S3_SECRET
    )
    rd_server.start()
    s3.start()
    try:
        bucket = f"src-{secrets.token_hex(5)}"
        s3_client(s3.endpoint).create_bucket(Bucket=bucket)
        kit = make_backup_kit(tmp_path, pg, rd_server.endpoint, s3.endpoint, bucket)
        # the operator's identity, protected by a passphrase (read from a 0600 file)
        protected = kit.tmp / "keys" / "operator-protected.key"
        protected.write_bytes(
            b"".join(encrypt_with_passphrase([kit.identity_file.read_bytes()], PASSPHRASE, 10))
        )
        protected.chmod(0o600)
        passfile = kit.tmp / "keys" / "passphrase"
        passfile.write_text(PASSPHRASE)
        passfile.chmod(0o600)
        operator = kit.tmp / "operator-canary.toml"
        doc = tomllib.loads(kit.operator_config.read_text())
        doc["keys"]["identity_file"] = str(protected)
        doc["keys"]["identity_passphrase_file"] = str(passfile)
        for section in ("postgres", "redis", "minio"):  # production = the canary stack
            doc[section] = kit.sections[section]
        operator.write_text(tomli_w.dumps(doc))
        yield World(kit, operator, s3, [])
    finally:
        s3.stop()
        rd_server.stop()
        with psycopg.connect(**admin.connect_kwargs(), autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname))
            )
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


def _recording_pg_dump(tmp: Path) -> tuple[Path, Path]:
    """A bin dir whose ``pg_dump`` records its argv and env names, then execs the real one."""
    real = binaries.pg_bin_dir()
    bin_dir = tmp / "rec-bin"
    bin_dir.mkdir()
    for tool in ("pg_dumpall", "pg_restore", "psql"):
        (bin_dir / tool).symlink_to(real / tool)
    record = tmp / "pg_dump.record"
    stub = bin_dir / "pg_dump"
    stub.write_text(
        "#!/bin/bash\n"
        f'printf "%s\\n" "ARGV $0 $*" >> "{record}"\n'
        f'env | cut -d= -f1 | sed "s/^/ENV /" >> "{record}"\n'
        f'exec "{real / "pg_dump"}" "$@"\n'
    )
    stub.chmod(0o755)
    return bin_dir, record


class ArgvSampler:
    """Reads every process's ``/proc/PID/cmdline`` in a loop until stopped."""

    def __init__(self) -> None:
        self.seen: set[bytes] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            for path in Path("/proc").glob("[0-9]*/cmdline"):
                with contextlib.suppress(OSError):
                    self.seen.add(path.read_bytes())

    def __enter__(self) -> ArgvSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def test_s1_canaries_appear_nowhere(world: World, tmp_path: Path) -> None:
    kit = world.kit
    bin_dir, record = _recording_pg_dump(tmp_path)
    config = kit.write_config("canary", postgres={"bin_dir": str(bin_dir)})

    # successes: a backup (argv sampled), verify with the passphrase identity, show, list
    with ArgvSampler() as sampler:
        done = world.run("backup", "--json", config=config)
    assert done.returncode == 0, done.stderr[-2000:]
    snapshot_id = json.loads(done.stdout)["snapshot_id"]
    assert any(b"pg_dump" in cmd for cmd in sampler.seen)  # the sampler saw the children
    leaked = [cmd for cmd in sampler.seen if leaks(cmd)]
    assert leaked == []
    recorded = record.read_text()
    assert recorded.startswith("ARGV ") and leaks(recorded) == []
    # the password reaches pg_dump through its environment (private to the process), not argv
    assert "ENV PGPASSWORD" in recorded.splitlines() or "ENV PGPASSFILE" in recorded.splitlines()
    assert world.run("verify", "--all", "--read-data", config=world.operator).returncode == 0
    assert world.run("show", snapshot_id, "--json", config=world.operator).returncode == 0
    assert world.run("list", config=world.operator).returncode == 0

    # failures
    wrong_pg = kit.tmp / "wrong-pg"
    wrong_pg.write_text(WRONG)
    bad = kit.write_config("wrong-pg", postgres={"password_file": str(wrong_pg)})
    one_error(world.run("backup", config=bad), 3)

    wrong_redis = kit.tmp / "wrong-redis"
    wrong_redis.write_text(WRONG)
    bad = kit.write_config("wrong-redis", redis={"password_file": str(wrong_redis)})
    one_error(world.run("backup", "--component", "redis", config=bad), 3)

    closed = f"http://{HOST}:{free_port_block((0,), set())}"
    bad = kit.write_config("closed", repository={"endpoint_url": closed})
    one_error(world.run("backup", config=bad), 4)

    wrong_pass = kit.tmp / "wrong-pass"
    wrong_pass.write_text(WRONG)
    doc = tomllib.loads(world.operator.read_text())
    doc["keys"]["identity_passphrase_file"] = str(wrong_pass)
    bad_operator = kit.tmp / "operator-wrong-pass.toml"
    bad_operator.write_text(tomli_w.dumps(doc))
    failed = world.run("verify", "--all", "--read-data", config=bad_operator)
    assert failed.returncode in (5, 12), failed.stderr[-2000:]

    storage = access.storage_for(kit.operator())
    with repository_lock(storage, "backup"):
        one_error(world.run("backup", config=config), 11)

    # restore into the non-empty production stack without --force: refused
    one_error(
        world.run("restore", "latest", "--component", "postgres", "--yes", config=world.operator),
        2,
    )

    # a corrupt object: flip one byte of the stored dump
    m = kit.manifest(snapshot_id)
    dump = next(o for o in m.objects() if o.kind == "pg_dump")
    client = s3_client(world.s3.endpoint)
    key = f"drtool/{dump.key}"
    raw = bytearray(client.get_object(Bucket=kit.repo_bucket, Key=key)["Body"].read())
    raw[len(raw) // 2] ^= 0x01
    client.put_object(Bucket=kit.repo_bucket, Key=key, Body=bytes(raw))
    one_error(world.run("verify", "--all", "--read-data", config=world.operator), 5)

    # nothing anywhere: outputs, every stored object and its metadata
    assert [leaks(text) for text in world.outputs if leaks(text)] == []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=kit.repo_bucket):
        for item in page.get("Contents", []):
            body = client.get_object(Bucket=kit.repo_bucket, Key=item["Key"])["Body"].read()
            assert leaks(body) == [], item["Key"]
            head = client.head_object(Bucket=kit.repo_bucket, Key=item["Key"])
            assert leaks(json.dumps(head, default=str)) == [], item["Key"]
