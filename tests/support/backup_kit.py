"""A seeded co-talk stack backed up into an S3 repository through the real ``drtool``
command: keys, a backup-host config and an operator config (tests/test_backup.py and the
fault tests), and the checks that a fault lost nothing.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import redis
import tomli_w

from chat_stack.seed import SeedSizes, seed
from drtool.config import Config, load_config
from drtool.endpoints import PostgresEndpoint, RedisEndpoint, S3Endpoint, StackEndpoints
from drtool.repository import access
from drtool.repository.catalog import SnapshotRecord
from drtool.repository.locks import is_stale, read_locks
from drtool.repository.manifest import Manifest
from drtool.repository.minio_index import decode_index
from drtool.s3session import s3_client
from drtool.services import repo as svc
from drtool.services.repo_setup import set_up_repository
from drtool.storage import Storage
from support.cli import drtool_env, run_drtool

SIZES = SeedSizes(users=50, rooms=10, messages=3000, attachments=30)
SEED = 7
REPO_PREFIX = "drtool"


def backup_redis_while_writing(backup_config: Path, client: Callable[[], Any]) -> str:
    """``drtool backup --component redis`` while a writer keeps adding keys and deleting the
    ones 50 behind (``client()``: a context manager giving a Redis or cluster client); the
    snapshot's id, after checking the backup succeeded with the writer running."""
    stop = threading.Event()
    written = 0

    def write() -> None:
        nonlocal written
        with client() as conn:
            while not stop.is_set():
                conn.set(f"w:{written}", "x")
                conn.delete(f"w:{written - 50}")
                written += 1

    writer = threading.Thread(target=write)
    writer.start()
    try:
        done = run_drtool("backup", "--component", "redis", "--json", config=backup_config)
    finally:
        stop.set()
        writer.join()
    assert done.returncode == 0, done.stderr
    assert written > 0
    return str(json.loads(done.stdout)["snapshot_id"])


# -- the kit ---------------------------------------------------------------------------------


@dataclass
class BackupKit:
    """A seeded stack, keys, a backup-host config, an operator config and an S3 repository."""

    tmp: Path
    endpoints: StackEndpoints
    repo_s3: S3Endpoint
    repo_bucket: str
    sections: dict[str, dict[str, Any]]
    backup_config: Path
    operator_config: Path
    identity_file: Path
    home: Path
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def bucket(self) -> str:
        """The MinIO (attachments) bucket of the stack."""
        return self.endpoints.buckets[0]

    def write_config(self, name: str, **changes: dict[str, Any]) -> Path:
        """A backup-host config like the kit's with whole settings of sections replaced."""
        doc = {s: dict(v) for s, v in self.sections.items()}
        for section, values in changes.items():
            doc.setdefault(section, {}).update(values)
        path = self.tmp / f"{name}.toml"
        path.write_text(tomli_w.dumps(doc))
        return path

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of a drtool child: ours minus DRTOOL_*, plus ``extra``."""
        return drtool_env({"DRTOOL_HOME": str(self.home), **self.extra_env, **extra})

    def drtool(
        self, *args: str, config: Path | None = None, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run the real ``drtool`` command (backup-host config unless ``config`` is given)."""
        return run_drtool(*args, config=config or self.backup_config, env=env or self.env())

    def backup(
        self, *components: str, config: Path | None = None, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """``drtool backup --json`` of ``components`` (all when none are given)."""
        chosen = ",".join(components or ("postgres", "redis", "minio"))
        return self.drtool("backup", "--component", chosen, "--json", config=config, env=env)

    def backup_ok(self, *components: str) -> str:
        """A backup that must succeed; returns the snapshot id."""
        done = self.backup(*components)
        assert done.returncode == 0, done.stderr
        return str(json.loads(done.stdout)["snapshot_id"])

    def listed(self) -> dict[str, str]:
        """``drtool list --json`` (operator side): snapshot id -> VALID/INVALID."""
        done = self.drtool("list", "--json", config=self.operator_config)
        assert done.returncode == 0, done.stderr
        return {row["id"]: row["status"] for row in json.loads(done.stdout)}

    def verify_all(self) -> subprocess.CompletedProcess[str]:
        """``drtool verify --all --read-data`` with the operator's identity."""
        return self.drtool("verify", "--all", "--read-data", "--json", config=self.operator_config)

    def operator(self) -> Config:
        return load_config(self.operator_config, {})

    def storage(self) -> Storage:
        return access.storage_for(self.operator())

    def record(self, snapshot_id: str) -> SnapshotRecord:
        return svc.show_snapshot(self.operator(), snapshot_id).record

    def manifest(self, snapshot_id: str) -> Manifest:
        m = self.record(snapshot_id).manifest
        assert m is not None
        return m

    def fingerprints(self, snapshot_id: str) -> dict[str, Any]:
        """The decrypted fingerprints objects, by component (as ``drtool show`` reads them)."""
        return svc.show_snapshot(self.operator(), snapshot_id).fingerprints

    def decrypt(self, snapshot_id: str, component: str, kind: str) -> bytes:
        """The plaintext of the snapshot's object of ``kind`` (stored hash, header checked)."""
        cfg = self.operator()
        repo = access.open_repo(cfg)
        m = self.manifest(snapshot_id)
        comp = next(c for c in m.components if c.name == component)
        obj = next(o for o in comp.objects if o.kind == kind)
        header = access.snapshot_header(m, component, kind)
        return access.read_object(repo, obj, header, access.identities_of(cfg))

    def index(self, snapshot_id: str) -> dict[str, Any]:
        """The decrypted MinIO bucket index, by key."""
        data = self.decrypt(snapshot_id, "minio", "minio_index")
        return {e.key: e for e in decode_index(data)}

    def multipart_uploads(self) -> list[str]:
        """Keys of unfinished multipart uploads in the repository bucket."""
        page = s3_client(self.repo_s3).list_multipart_uploads(Bucket=self.repo_bucket)
        return [u["Key"] for u in page.get("Uploads", [])]

    def stored_keys(self, prefix: str = "") -> set[str]:
        return {o.key for o in self.storage().list(prefix)}


def _secret_file(directory: Path, name: str, value: str) -> str:
    path = directory / name
    path.write_text(value)
    path.chmod(0o600)
    return str(path)


def make_backup_kit(
    tmp: Path,
    pg_database: PostgresEndpoint,
    redis_db: RedisEndpoint,
    s3_server: S3Endpoint,
    s3_bucket: str,
    *,
    sizes: SeedSizes = SIZES,
    part_size_mb: int = 5,
    repo_s3: S3Endpoint | None = None,
) -> BackupKit:
    """Seed the stack, make keys, write both configs and init an S3 repository.

    The repository is a fresh bucket on ``repo_s3`` (default: the stack's own S3 server).
    """
    with redis.Redis(host=redis_db.host, port=redis_db.port, password=redis_db.password) as r:
        r.config_set("repl-diskless-sync-delay", "0")  # a test server: no 5 s wait per fetch
    endpoints = StackEndpoints(pg_database, redis_db, s3_server, (s3_bucket,))
    seed(endpoints, sizes, SEED, progress=False)
    repo_s3 = repo_s3 or s3_server
    repo_bucket = f"repo-{secrets.token_hex(6)}"
    s3_client(repo_s3).create_bucket(Bucket=repo_bucket)
    key_dir = tmp / "keys"
    key_dir.mkdir(mode=0o700)
    repository = {
        "url": f"s3://{repo_bucket}/{REPO_PREFIX}",
        "endpoint_url": repo_s3.endpoint_url,
        "access_key_file": _secret_file(key_dir, "repo-ak", repo_s3.access_key),
        "secret_key_file": _secret_file(key_dir, "repo-sk", repo_s3.secret_key),
        "part_size_mb": part_size_mb,
    }
    stores = {
        "postgres": {
            "host": pg_database.host,
            "port": pg_database.port,
            "user": pg_database.user,
            "dbname": pg_database.dbname,
            "password_file": _secret_file(key_dir, "pg", pg_database.password or ""),
        },
        "redis": {
            "host": redis_db.host,
            "port": redis_db.port,
            "password_file": _secret_file(key_dir, "redis", redis_db.password or ""),
        },
        "minio": {
            "endpoint_url": s3_server.endpoint_url,
            "access_key_file": _secret_file(key_dir, "minio-ak", s3_server.access_key),
            "secret_key_file": _secret_file(key_dir, "minio-sk", s3_server.secret_key),
            "buckets": [s3_bucket],
        },
    }
    setup = set_up_repository(tmp, repository, stores=stores, state_dir=tmp / "state")
    home = tmp / "home"
    home.mkdir()
    return BackupKit(
        tmp=tmp,
        endpoints=endpoints,
        repo_s3=repo_s3,
        repo_bucket=repo_bucket,
        sections=setup.backup_doc,
        backup_config=setup.backup_config,
        operator_config=setup.operator_config,
        identity_file=setup.keys.identity_file,
        home=home,
    )


# -- after a fault --------------------------------------------------------------------------


@dataclass
class Baseline:
    """A kit with one committed snapshot taken before the fault."""

    kit: BackupKit
    snapshot_id: str


def assert_nothing_lost(b: Baseline, *, repository_died: bool = False) -> None:
    """Only the earlier snapshot is listed, it verifies, no upload is left, the lock is free.

    When the repository itself died, the run could not delete its lock: it must be stale.
    """
    kit = b.kit
    assert kit.listed() == {b.snapshot_id: "VALID"}
    verified = kit.verify_all()
    assert verified.returncode == 0, verified.stderr
    assert kit.multipart_uploads() == []
    locks = read_locks(kit.storage())
    if repository_died:
        assert all(is_stale(lk, datetime.now(UTC), timedelta(hours=12)) for lk in locks)
    else:
        assert locks == []  # released


def assert_next_backup_succeeds(b: Baseline) -> str:
    snapshot_id = b.kit.backup_ok()
    assert b.kit.listed() == {b.snapshot_id: "VALID", snapshot_id: "VALID"}
    return snapshot_id
