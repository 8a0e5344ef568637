"""``drtool backup`` end to end on real servers: CLI, consistency, fingerprints, incremental MinIO.

Every test seeds a small co-talk stack (PostgreSQL database, Redis, a SeaweedFS bucket playing
MinIO), backs it up into an S3 repository (a second SeaweedFS bucket) through the real
``drtool`` command and checks what an operator would see: exit codes, ``list``/``show``/
``verify`` output, and decrypted contents compared with the live or restored stores.

``BackupKit``/``make_kit`` are shared with tests/test_backup_faults.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
import tomli_w

from chat_stack.seed import SeedSizes, seed
from chat_stack.traffic import run_traffic
from drtool import keys
from drtool.config import Config, load_config
from drtool.endpoints import PostgresEndpoint, RedisEndpoint, S3Endpoint, StackEndpoints
from drtool.repository import access
from drtool.repository.catalog import SnapshotRecord
from drtool.repository.manifest import Manifest
from drtool.repository.minio_index import decode_index
from drtool.s3session import s3_client
from drtool.services import repo as svc
from drtool.services.minio_snapshot import _Budget
from drtool.sources import postgres as pg
from drtool.sources.pg_fingerprint import PgFingerprints, compute_fingerprints
from drtool.sources.redis_fingerprint import RedisFingerprints, fingerprint_rdb
from drtool.storage import Storage

ROOT = Path(__file__).resolve().parent.parent
DRTOOL = ROOT / ".venv" / "bin" / "drtool"
SIZES = SeedSizes(users=50, rooms=10, messages=3000, attachments=30)
SEED = 7
REPO_PREFIX = "drtool"


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
        env = {k: v for k, v in os.environ.items() if not k.startswith("DRTOOL_")}
        env.update(DRTOOL_HOME=str(self.home), **self.extra_env, **extra)
        return env

    def drtool(
        self, *args: str, config: Path | None = None, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run the real ``drtool`` command (backup-host config unless ``config`` is given)."""
        argv = [str(DRTOOL), "--config", str(config or self.backup_config), *args]
        return subprocess.run(
            argv, capture_output=True, text=True, env=env or self.env(), timeout=600, check=False
        )

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


def error_lines(stderr: str) -> list[str]:
    """The ``error: ...`` lines drtool printed (there must be exactly one on failure)."""
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


def one_error(done: subprocess.CompletedProcess[str], code: int) -> str:
    """Assert exit ``code`` and exactly one one-line error message; return it."""
    assert done.returncode == code, (done.returncode, done.stderr[-2000:])
    lines = error_lines(done.stderr)
    assert len(lines) == 1, done.stderr[-2000:]
    return lines[0]


def _secret_file(directory: Path, name: str, value: str) -> str:
    path = directory / name
    path.write_text(value)
    path.chmod(0o600)
    return str(path)


def make_kit(
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
    identity = key_dir / "operator.key"
    recipient = keys.write_identity(identity, passphrase=None)
    verify_key = keys.write_signing_key(key_dir / "signing.key")
    repository = {
        "url": f"s3://{repo_bucket}/{REPO_PREFIX}",
        "endpoint_url": repo_s3.endpoint_url,
        "access_key_file": _secret_file(key_dir, "repo-ak", repo_s3.access_key),
        "secret_key_file": _secret_file(key_dir, "repo-sk", repo_s3.secret_key),
        "part_size_mb": part_size_mb,
    }
    sections: dict[str, dict[str, Any]] = {
        "repository": repository,
        "keys": {
            "recipients": [recipient],
            "signing_key_file": str(key_dir / "signing.key"),
            "verify_key": verify_key,
        },
        "backup": {"state_dir": str(tmp / "state")},
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
    backup_config = tmp / "backup.toml"
    backup_config.write_text(tomli_w.dumps(sections))
    operator_config = tmp / "operator.toml"
    operator_config.write_text(
        tomli_w.dumps(
            {
                "repository": repository,
                "keys": {"identity_file": str(identity), "verify_key": verify_key},
            }
        )
    )
    home = tmp / "home"
    home.mkdir()
    svc.init_repo(load_config(backup_config, {}))
    return BackupKit(
        tmp=tmp,
        endpoints=endpoints,
        repo_s3=repo_s3,
        repo_bucket=repo_bucket,
        sections=sections,
        backup_config=backup_config,
        operator_config=operator_config,
        identity_file=identity,
        home=home,
    )


@pytest.fixture
def kit(
    tmp_path: Path,
    pg_database: PostgresEndpoint,
    redis_db: RedisEndpoint,
    s3_server: S3Endpoint,
    s3_bucket: str,
) -> BackupKit:
    return make_kit(tmp_path, pg_database, redis_db, s3_server, s3_bucket)


def pg_fingerprints(endpoint: PostgresEndpoint, dbname: str | None = None) -> PgFingerprints:
    with psycopg.connect(**endpoint.connect_kwargs(dbname)) as conn:  # type: ignore[arg-type]
        return compute_fingerprints(conn)


# -- the CLI ---------------------------------------------------------------------------------


def test_cli_backup_lists_valid_and_show_decrypts_fingerprints(kit: BackupKit) -> None:
    done = kit.backup()
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    snapshot_id = result["snapshot_id"]
    assert [c["name"] for c in result["components"]] == ["postgres", "redis", "minio"]
    assert all(c["stored_bytes"] > 0 for c in result["components"])

    assert kit.listed() == {snapshot_id: "VALID"}

    shown = kit.drtool("show", snapshot_id, "--json", config=kit.operator_config)
    assert shown.returncode == 0, shown.stderr
    doc = json.loads(shown.stdout)
    assert doc["status"] == "VALID"
    live = pg_fingerprints(kit.endpoints.postgres)
    recorded = PgFingerprints.from_dict(doc["fingerprints"]["postgres"]["fingerprints"])
    assert recorded == live  # nothing wrote meanwhile: the live database is what was saved
    assert recorded.tables["public.messages"].rows == SIZES.messages
    assert set(doc["fingerprints"]) == {"postgres", "redis"}

    # the backup host itself cannot read them: it has no identity
    keyless = kit.drtool("show", snapshot_id, "--json")
    assert keyless.returncode == 0, keyless.stderr
    assert json.loads(keyless.stdout)["fingerprints"] == {}
    assert kit.verify_all().returncode == 0


# -- consistency -------------------------------------------------------------------------------


def test_postgres_snapshot_is_consistent_under_writes(kit: BackupKit, tmp_path: Path) -> None:
    """Fingerprints recorded while traffic writes equal a pg_restore of the stored dump."""
    ep = kit.endpoints.postgres
    stop = threading.Event()
    stats: list[Any] = []
    errors: list[BaseException] = []

    def traffic() -> None:
        try:
            stats.append(run_traffic(kit.endpoints, 40.0, 600.0, 11, stop))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    def messages_now() -> int:
        with psycopg.connect(**ep.connect_kwargs()) as conn:  # type: ignore[arg-type]
            row = conn.execute("SELECT count(*) FROM messages").fetchone()
            assert row is not None
            return int(row[0])

    thread = threading.Thread(target=traffic, daemon=True)
    thread.start()
    try:
        while messages_now() <= SIZES.messages and not errors:  # the writers are under way
            stop.wait(0.1)
        snapshot_id = kit.backup_ok("postgres")
        prints = kit.fingerprints(snapshot_id)["postgres"]["fingerprints"]
        recorded = PgFingerprints.from_dict(prints)
        while messages_now() <= recorded.tables["public.messages"].rows and not errors:
            stop.wait(0.1)  # let the live database move past the snapshot
    finally:
        stop.set()
        thread.join(60)
    assert not errors, errors
    assert stats and stats[0].messages > 0

    archive = tmp_path / "restored.pgdump"
    archive.write_bytes(kit.decrypt(snapshot_id, "postgres", "pg_dump"))
    restored_db = f"{ep.dbname}_restored"
    pg.create_database(ep, restored_db)
    try:
        pg.restore_dump(archive, ep, restored_db, timeout=300, keep_owners=False)
        restored = pg_fingerprints(ep, restored_db)
    finally:
        pg.drop_database(ep, restored_db)
    assert restored == recorded
    assert recorded.tables["public.messages"].rows > SIZES.messages  # traffic before the snapshot
    live = pg_fingerprints(ep)
    assert live != recorded
    assert live.tables["public.messages"].rows > recorded.tables["public.messages"].rows


def test_redis_fingerprints_match_the_stored_rdb(kit: BackupKit, tmp_path: Path) -> None:
    snapshot_id = kit.backup_ok("redis")
    rdb = tmp_path / "dump.rdb"
    rdb.write_bytes(kit.decrypt(snapshot_id, "redis", "redis_rdb"))
    recorded = kit.fingerprints(snapshot_id)["redis"]
    assert recorded["rdb"]["sha256"] == hashlib.sha256(rdb.read_bytes()).hexdigest()
    from_rdb = fingerprint_rdb(rdb)
    assert RedisFingerprints.from_dict(recorded["fingerprints"]) == from_rdb
    assert from_rdb.to_dict() != RedisFingerprints({}).to_dict()  # the seeded keys are in it


# -- MinIO incremental -------------------------------------------------------------------------


def _blob_keys(m: Manifest) -> set[str]:
    return {o.key for o in m.objects() if o.kind == "blob"}


def _minio_details(m: Manifest, bucket: str) -> dict[str, int]:
    comp = next(c for c in m.components if c.name == "minio")
    return dict(comp.details[bucket])


def test_upload_budget_bounds_the_bytes_held_at_once() -> None:
    """Workers hold at most the budget together; a request above it runs alone, not forever."""
    budget = _Budget(10)
    held, peak, lock = [0], [0], threading.Lock()

    def work(size: int) -> None:
        with budget.hold(size):
            with lock:
                held[0] += min(size, 10)
                peak[0] = max(peak[0], held[0])
            time.sleep(0.002)
            with lock:
                held[0] -= min(size, 10)

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(work, [3, 4, 25, 2, 6, 10, 1] * 10))
    assert held[0] == 0 and 0 < peak[0] <= 10


def test_minio_incremental_uploads_only_new_and_changed_objects(kit: BackupKit) -> None:
    first = kit.backup_ok("minio")
    m1 = kit.manifest(first)
    index1 = kit.index(first)
    assert len(index1) == SIZES.attachments
    assert _minio_details(m1, kit.bucket) == {"uploaded": SIZES.attachments, "reused": 0}
    blobs_before = kit.stored_keys("blobs/")
    assert blobs_before == _blob_keys(m1)

    client = s3_client(kit.endpoints.minio)
    keys_sorted = sorted(index1)
    changed_key, deleted_key = keys_sorted[0], keys_sorted[1]
    new_key = "rooms/1/new-upload.bin"
    new_content = secrets.token_bytes(3000)
    changed_content = secrets.token_bytes(index1[changed_key].size + 17)
    client.put_object(
        Bucket=kit.bucket,
        Key=new_key,
        Body=new_content,
        ContentType="application/x-test",
        Metadata={"uploader": "42"},
    )
    client.put_object(Bucket=kit.bucket, Key=changed_key, Body=changed_content)
    client.delete_object(Bucket=kit.bucket, Key=deleted_key)

    second = kit.backup_ok("minio")
    m2 = kit.manifest(second)
    index2 = kit.index(second)
    # only the new and the overwritten object were read and stored again
    assert _minio_details(m2, kit.bucket) == {
        "uploaded": 2,
        "reused": SIZES.attachments - 2,
    }
    new_blobs = _blob_keys(m2) - _blob_keys(m1)
    assert len(new_blobs) == 2
    assert kit.stored_keys("blobs/") == blobs_before | new_blobs

    assert set(index2) == set(index1) - {deleted_key} | {new_key}
    assert index2[new_key].sha256 == hashlib.sha256(new_content).hexdigest()
    assert index2[new_key].content_type == "application/x-test"
    assert index2[new_key].metadata == {"uploader": "42"}
    assert index2[changed_key].sha256 == hashlib.sha256(changed_content).hexdigest()
    assert index2[changed_key].blob != index1[changed_key].blob
    unchanged = set(index2) - {new_key, changed_key}
    assert all(index2[k].blob == index1[k].blob for k in unchanged)

    assert kit.listed() == {first: "VALID", second: "VALID"}
    verified = kit.verify_all()
    assert verified.returncode == 0, verified.stderr
    assert [o["problems"] for o in json.loads(verified.stdout)] == [[], []]


# -- K1: no identity on the backup host ------------------------------------------------------


def _identity_text(kit: BackupKit) -> str:
    line = next(
        ln for ln in kit.identity_file.read_text().splitlines() if ln.startswith("AGE-SECRET")
    )
    return line.strip()


def test_identity_in_the_environment_is_refused(kit: BackupKit) -> None:
    before = kit.stored_keys()
    done = kit.backup(env=kit.env(SOME_APP_KEY=_identity_text(kit)))
    message = one_error(done, 2)
    assert "SOME_APP_KEY" in message and "identity" in message
    assert _identity_text(kit) not in done.stderr + done.stdout
    assert kit.stored_keys() == before
    assert kit.listed() == {}


def test_identity_file_in_the_backup_config_is_refused(kit: BackupKit) -> None:
    before = kit.stored_keys()
    config = kit.write_config("with-identity", keys={"identity_file": str(kit.identity_file)})
    done = kit.backup(config=config)
    message = one_error(done, 2)
    assert "keys.identity_file" in message
    assert kit.stored_keys() == before
    assert kit.listed() == {}


def test_deleted_newest_manifest_stops_the_next_backup(kit: BackupKit) -> None:
    """Issue 18.7: the backup host remembers its last commit; a repository behind it (the
    newest manifest deleted, or an older copy restored) is refused, unless accepted."""
    first = kit.backup_ok("redis")
    second = kit.backup_ok("redis")
    state = json.loads((kit.tmp / "state" / "last-commit.json").read_text())
    assert state["snapshot_id"] == second
    kit.storage().delete(f"snapshots/{second}/manifest.json")
    done = kit.backup("redis")
    message = one_error(done, 5)
    assert f"repository rolled back: this host last committed snapshot {second}" in message
    assert f"the newest authentic one now is snapshot {first}" in message
    assert "--accept-rollback" in message
    assert list(kit.listed()) == [first]  # nothing chained past it
    done = kit.drtool(
        "backup", "--component", "redis", "--json", "--accept-rollback", "test: manifest removed"
    )
    assert done.returncode == 0, done.stderr
    assert "accepted (--accept-rollback): test: manifest removed" in done.stderr
    third = json.loads(done.stdout)["snapshot_id"]
    assert kit.manifest(third).previous_id == first
    assert list(kit.listed()) == [first, third]
