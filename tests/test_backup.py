"""``drtool backup`` end to end on real servers: CLI, consistency, fingerprints, incremental MinIO.

Every test seeds a small co-talk stack (PostgreSQL database, Redis, a SeaweedFS bucket playing
MinIO), backs it up into an S3 repository (a second SeaweedFS bucket) through the real
``drtool`` command and checks what an operator would see: exit codes, ``list``/``show``/
``verify`` output, and decrypted contents compared with the live or restored stores.

The kit (``BackupKit``) is tests/support/backup_kit.py, shared with the fault tests.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psycopg
import pytest
from support.backup_kit import SIZES, BackupKit, make_backup_kit
from support.cli import one_error

from chat_stack.traffic import run_traffic
from drtool.endpoints import PostgresEndpoint, RedisEndpoint, S3Endpoint
from drtool.repository.manifest import Manifest
from drtool.s3session import s3_client
from drtool.sources import postgres as pg
from drtool.sources.pg_fingerprint import PgFingerprints, compare
from drtool.sources.redis_fingerprint import RedisFingerprints, fingerprint_rdb
from drtool.stores.minio.backup import _Budget
from drtool.stores.postgres.restore import fingerprints_of

pytestmark = pytest.mark.slow  # every test seeds a stack and backs it up through the CLI


@pytest.fixture
def kit(
    tmp_path: Path,
    pg_database: PostgresEndpoint,
    redis_db: RedisEndpoint,
    s3_server: S3Endpoint,
    s3_bucket: str,
) -> BackupKit:
    return make_backup_kit(tmp_path, pg_database, redis_db, s3_server, s3_bucket)


def pg_fingerprints(
    endpoint: PostgresEndpoint, like: PgFingerprints, dbname: str | None = None
) -> PgFingerprints:
    """A database's fingerprints taken as ``like`` were (format 5: COPY of every table)."""
    return fingerprints_of(endpoint, dbname or endpoint.dbname, like, workers=2)


def rows(prints: PgFingerprints, table: str) -> int:
    """The rows of ``table``: its own figure, or its partitions' (format 5)."""
    if table in prints.tables:
        return prints.tables[table].rows
    return sum(p.rows for p in prints.partitions.values() if p.table == table)


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
    recorded = PgFingerprints.from_dict(doc["fingerprints"]["postgres"]["fingerprints"])
    assert recorded.format == 5
    live = pg_fingerprints(kit.endpoints.postgres, recorded)
    assert compare(recorded, live) == []  # nothing wrote meanwhile: what was saved
    assert rows(recorded, "public.messages") == SIZES.messages
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
        with psycopg.connect(**ep.connect_kwargs()) as conn:
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
        while messages_now() <= rows(recorded, "public.messages") and not errors:
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
        restored = pg_fingerprints(ep, recorded, restored_db)
    finally:
        pg.drop_database(ep, restored_db)
    assert compare(recorded, restored) == []
    assert rows(recorded, "public.messages") > SIZES.messages  # traffic before the snapshot
    live = pg_fingerprints(ep, recorded)
    assert compare(recorded, live) != []
    assert sum(fp.rows for fp in live.tables.values()) > sum(
        fp.rows for fp in recorded.tables.values()
    )


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
