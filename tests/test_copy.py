"""``drtool copy``: a second repository filled key-less, checked, resumable (issue 15.4).

Real stores only: directories and SeaweedFS buckets, a fault proxy between the copy and the
destination, the real ``drtool`` command killed mid-way.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import time
import tomllib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from support.cli import drtool_argv, drtool_env, run_drtool
from support.compare import assert_same_redis, bucket_objects, table_rows
from support.fault_proxy import Rule, fault_proxy
from support.repo_kit import T0, RepoKit, blob_id, file_kit, s3_kit
from support.stacks import make_repository, source_stack

from drtool.config import load_config
from drtool.endpoints import PostgresEndpoint, RedisEndpoint, S3Endpoint, StackEndpoints
from drtool.errors import ConfigError
from drtool.repository import catalog, chain, layout
from drtool.repository.access import storage_for
from drtool.repository.ids import new_id
from drtool.repository.manifest import ComponentEntry, Manifest, manifest_sha256
from drtool.s3session import s3_client
from drtool.services.copy import run_copy
from drtool.storage import Storage
from drtool.wal import index as wal_index
from drtool.wal.pruned import append_pruned, load_pruned

DEST = "offsite"


def _secret(kit: RepoKit, name: str, value: str) -> str:
    path = kit.tmp / "keys" / name
    path.write_text(value)
    path.chmod(0o600)
    return str(path)


def s3_dest(kit: RepoKit, s3: S3Endpoint, endpoint_url: str | None = None) -> dict[str, Any]:
    """A ``[repositories.offsite]`` table for a fresh bucket on ``s3`` (maybe via a proxy)."""
    bucket = f"copy-{secrets.token_hex(6)}"
    s3_client(s3).create_bucket(Bucket=bucket)
    return {
        "url": f"s3://{bucket}/copy",
        "endpoint_url": endpoint_url or s3.endpoint_url,
        "access_key_file": _secret(kit, "dest-access", s3.access_key),
        "secret_key_file": _secret(kit, "dest-secret", s3.secret_key),
    }


def file_dest(kit: RepoKit) -> dict[str, Any]:
    """A ``[repositories.offsite]`` table for a directory that does not exist yet."""
    return {"url": (kit.tmp / "offsite" / "repo").as_uri()}


def copy_config(kit: RepoKit, dest: dict[str, Any], **keys_section: object) -> Path:
    """The kit's config plus the destination as ``[repositories.offsite]``."""
    base = kit.write_config(secrets.token_hex(3), **keys_section)
    doc = load_toml(base)
    doc["repositories"] = {DEST: dest}
    path = kit.tmp / f"copy-{secrets.token_hex(3)}.toml"
    path.write_text(tomli_w.dumps(doc))
    return path


def load_toml(path: Path) -> dict[str, Any]:
    return tomllib.loads(path.read_text())


def dest_storage(config: Path) -> Storage:
    return storage_for(load_config(config, {}).with_repository(DEST))


def object_keys(storage: Storage) -> set[str]:
    """Every key but locks (a run's own lock comes and goes)."""
    return {o.key for o in storage.list() if not o.key.startswith(layout.LOCKS)}


def three_snapshots(kit: RepoKit) -> list[str]:
    """Three chained snapshots sharing blobs (an incremental MinIO snapshot reuses them)."""
    shared = [blob_id() for _ in range(4)]
    kit.snapshot(T0, blobs=tuple(shared[:3]))
    kit.snapshot(T0 + timedelta(days=1), blobs=tuple(shared))
    kit.snapshot(T0 + timedelta(days=2), blobs=(*shared, blob_id()))
    return [s.snapshot_id for s in kit.snaps]


def copy_cli(config: Path, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    return run_drtool("copy", "--json", *args, config=config, **kw)


def listed(config: Path, *args: str) -> dict[str, str]:
    done = run_drtool("list", "--json", *args, config=config)
    assert done.returncode == 0, done.stderr
    return {row["id"]: row["status"] for row in json.loads(done.stdout)}


@pytest.fixture(params=["file", "s3"])
def dest_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def make_dest(kind: str, kit: RepoKit, request: pytest.FixtureRequest) -> dict[str, Any]:
    if kind == "file":
        return file_dest(kit)
    return s3_dest(kit, request.getfixturevalue("s3_server"))


# -- the copy and what can be done with it ---------------------------------------------------


@pytest.mark.slow
def test_copy_verifies_with_read_data_and_a_second_run_uploads_nothing(
    any_repo_kit: RepoKit, dest_kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """file->file, file->s3, s3->file, s3->s3 (two buckets): the copy passes
    `verify --all --read-data --repository offsite`; the next copy uploads and reads nothing."""
    kit = any_repo_kit
    ids = three_snapshots(kit)
    config = copy_config(kit, make_dest(dest_kind, kit, request))
    done = copy_cli(config, home=tmp_path / "home")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["initialised"] and result["copied"] == ids
    objects = {o.key for s in kit.snaps for o in s.manifest.objects()}
    assert result["uploaded"] == len(objects)  # shared blobs once
    verify = run_drtool(
        "verify", "--all", "--read-data", "--repository", DEST, "--json", config=config
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert {o["snapshot_id"] for o in json.loads(verify.stdout)} == set(ids)
    assert listed(config, "--repository", DEST) == dict.fromkeys(ids, "VALID")
    header = dest_storage(config).get_bytes(layout.REPO_FILE)
    assert header == kit.storage.get_bytes(layout.REPO_FILE)  # the same repository
    again = copy_cli(config, home=tmp_path / "home")
    assert again.returncode == 0, again.stderr
    second = json.loads(again.stdout)
    assert (second["copied"], second["already"]) == ([], 3)
    assert (second["uploaded"], second["checked"]) == (0, 0)


def test_new_snapshots_reuse_the_blobs_already_copied(repo_kit: RepoKit, tmp_path: Path) -> None:
    kit = repo_kit
    shared = [blob_id() for _ in range(3)]
    kit.snapshot(T0, blobs=tuple(shared))
    config = copy_config(kit, file_dest(kit))
    cfg = load_config(config, {})
    run_copy(cfg, home=tmp_path, destination=DEST)
    kit.snapshot(T0 + timedelta(days=1), blobs=tuple(shared))
    result = run_copy(cfg, home=tmp_path, destination=DEST)
    assert result.copied == [kit.snaps[-1].snapshot_id]
    assert result.uploaded == 1  # its own dump; the blobs are there (trusted, not re-read)
    assert (result.trusted, result.checked) == (3, 0)


@pytest.mark.slow
def test_named_snapshot_only_and_an_invalid_one_is_refused(
    repo_kit: RepoKit, tmp_path: Path
) -> None:
    kit = repo_kit
    ids = three_snapshots(kit)
    config = copy_config(kit, file_dest(kit))
    done = copy_cli(config, ids[0], home=tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["copied"] == [ids[0]]
    assert set(listed(config, "--repository", DEST)) == {ids[0]}
    missing = copy_cli(config, "20990101T000000Z-0000", home=tmp_path)
    assert missing.returncode != 0 and "Traceback" not in missing.stderr
    assert "not found" in missing.stderr


def test_source_damage_is_not_copied_and_named(repo_kit: RepoKit, tmp_path: Path) -> None:
    """A flipped byte in the source: that snapshot is not committed on the destination
    (exit 5, named), the others are; the damaged bytes are not stored there."""
    kit = repo_kit
    ids = three_snapshots(kit)
    dump = Path(kit.url.removeprefix("file://")) / kit.snaps[1].dump_key
    data = bytearray(dump.read_bytes())
    data[-5] ^= 0x01
    dump.write_bytes(bytes(data))
    config = copy_config(kit, file_dest(kit))
    done = copy_cli(config, home=tmp_path)
    assert done.returncode == 5, done.stderr
    assert ids[1] in done.stderr and "sha256" in done.stderr
    assert set(listed(config, "--repository", DEST)) == {ids[0], ids[2]}
    assert kit.snaps[1].dump_key not in object_keys(dest_storage(config))


# -- refusals ---------------------------------------------------------------------------------


def test_a_destination_of_another_repository_is_refused_untouched(
    repo_kit: RepoKit, tmp_path: Path
) -> None:
    """`drtool init` made the destination with the same keys: another repository id."""
    kit = repo_kit
    three_snapshots(kit)
    other = tmp_path / "other"
    other.mkdir()
    dest = {"url": (other / "repo").as_uri()}
    config = copy_config(kit, dest)
    init = run_drtool("init", config=config, extra_env={"DRTOOL_REPOSITORY_URL": dest["url"]})
    assert init.returncode == 0, init.stderr
    before = {(o.key, o.size) for o in dest_storage(config).list()}
    done = copy_cli(config, home=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "not a copy of the source's repository" in done.stderr
    assert "nothing was written" in done.stderr and "Traceback" not in done.stderr
    assert {(o.key, o.size) for o in dest_storage(config).list()} == before


def test_a_non_empty_store_without_a_repository_is_refused(
    repo_kit: RepoKit, tmp_path: Path
) -> None:
    kit = repo_kit
    kit.snapshot(T0)
    target = tmp_path / "stuff"
    target.mkdir()
    (target / "holiday.jpg").write_bytes(b"x")
    config = copy_config(kit, {"url": target.as_uri()})
    done = copy_cli(config, home=tmp_path)
    assert done.returncode == 2 and "not a drtool repository" in done.stderr
    assert sorted(p.name for p in target.iterdir()) == ["holiday.jpg"]


def test_unknown_repository_names_are_config_errors(repo_kit: RepoKit, tmp_path: Path) -> None:
    config = copy_config(repo_kit, file_dest(repo_kit))
    done = run_drtool("list", "--repository", "nope", config=config)
    assert done.returncode == 2 and "no repository named 'nope'" in done.stderr
    done = copy_cli(config, "--to", "nope", home=tmp_path)
    assert done.returncode == 2 and "known: primary, offsite" in done.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text('[repositories.primary]\nurl = "file:///x"\n')
    with pytest.raises(ConfigError, match="not 'primary'"):
        load_config(bad, {})
    bad.write_text('[repositories.b]\nurl = "file:///x"\nsecret_key = "literal"\n')
    with pytest.raises(ConfigError, match="secrets are not allowed"):
        load_config(bad, {})


# -- interruptions ----------------------------------------------------------------------------


@pytest.mark.slow
def test_faults_on_the_way_then_a_resumed_copy_uploads_each_object_once(
    s3_server: S3Endpoint, s3_bucket: str, tmp_path: Path
) -> None:
    """S3 -> S3 through a fault proxy: throttling (503 SlowDown) and a connection dropped
    mid-request are retried; an object the destination keeps refusing fails the run
    (exit 4, nothing listed for its snapshot). The resumed copy completes and uploads no
    object the first run stored (counted at the proxy)."""
    kit = s3_kit(tmp_path, s3_server, s3_bucket)
    ids = three_snapshots(kit)
    last_blob = [o.key for o in kit.snaps[-1].manifest.objects() if o.kind == "blob"][-1]
    with fault_proxy(s3_server.endpoint_url) as proxy:
        config = copy_config(kit, s3_dest(kit, s3_server, proxy.endpoint_url))
        faults = [
            Rule("PUT", r"/blobs/", times=2, status=503, code="SlowDown"),
            Rule("PUT", r"/postgres/dump", times=1, reset_request_after=200),
            Rule("GET", r"/postgres/dump", times=1, delay=0.5),
            Rule("PUT", last_blob.split("/")[-1], times=None, status=500),
        ]
        proxy.add(*faults)
        first = copy_cli(config, home=tmp_path / "home")
        assert first.returncode == 4, first.stderr
        assert "Traceback" not in first.stderr
        assert [f.hits > 0 for f in faults] == [True] * 4
        proxy.clear()
        after_first = object_keys(dest_storage(config))
        assert ids[0] in listed(config, "--repository", DEST)
        assert ids[2] not in listed(config, "--repository", DEST)
        puts_before = len(proxy.seen)
        second = copy_cli(config, home=tmp_path / "home")
        assert second.returncode == 0, second.stderr
        resumed = [t for m, t in proxy.seen[puts_before:] if m == "PUT"]
        assert listed(config, "--repository", DEST) == dict.fromkeys(ids, "VALID")
        verify = run_drtool("verify", "--all", "--repository", DEST, config=config)
        assert verify.returncode == 0, verify.stdout + verify.stderr
    uploaded_again = {
        k for k in after_first if any(t.split("?")[0].endswith("/" + k) for t in resumed)
    }
    assert uploaded_again == set()  # nothing stored by the first run was sent again
    assert any(last_blob in t for t in resumed)  # the one refused before went up now
    assert all("/locks/" in t or "/snapshots/" in t or "/blobs/" in t for t in resumed)


def test_a_copy_killed_before_a_manifest_shows_no_partial_snapshot(
    repo_kit: RepoKit, tmp_path: Path
) -> None:
    """kill -9 (crash point) with every object of the first snapshot stored, its manifest
    not: the destination lists nothing; the resumed copy reads those objects back instead
    of uploading them."""
    kit = repo_kit
    ids = three_snapshots(kit)
    config = copy_config(kit, file_dest(kit))
    killed = run_drtool(
        "copy", config=config, home=tmp_path, extra_env={"DRTOOL_CRASH_AT": "copy-before-manifest"}
    )
    assert killed.returncode == 137
    assert listed(config, "--repository", DEST) == {}
    left = object_keys(dest_storage(config)) - {layout.REPO_FILE}
    assert left == {o.key for o in kit.snaps[0].manifest.objects()}
    done = copy_cli(config, home=tmp_path)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["copied"] == ids
    assert result["checked"] == len(left)  # read back, not uploaded again
    assert listed(config, "--repository", DEST) == dict.fromkeys(ids, "VALID")


@pytest.mark.slow
def test_a_copy_killed_at_a_random_point_lists_only_complete_snapshots(
    repo_kit: RepoKit, tmp_path: Path
) -> None:
    """A real SIGKILL once the destination holds some blobs, wherever the copy is then."""
    kit = repo_kit
    blobs = tuple(blob_id() for _ in range(150))
    for day in range(3):
        kit.snapshot(T0 + timedelta(days=day), blobs=blobs[: 50 * (day + 1)])
    config = copy_config(kit, file_dest(kit))
    root = Path(str(file_dest(kit)["url"]).removeprefix("file://"))
    proc = subprocess.Popen(
        drtool_argv("copy", "--jobs", "1", config=config),
        env=drtool_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        while proc.poll() is None and len(list(root.glob("blobs/*/*"))) < 60:
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    storage = dest_storage(config)
    records = catalog.list_snapshots(storage, [kit.verify_key], kit.info.repo_id)
    assert all(r.valid for r in records), [(r.snapshot_id, r.reason) for r in records]
    done = copy_cli(config, home=tmp_path)
    assert done.returncode == 0, done.stderr
    assert listed(config, "--repository", DEST) == dict.fromkeys(
        (s.snapshot_id for s in kit.snaps), "VALID"
    )


# -- the WAL index and tombstones ---------------------------------------------------------------


def test_wal_chunks_and_files_are_copied_in_order(repo_kit: RepoKit, tmp_path: Path) -> None:
    """Two signed index chunks naming WAL objects: after the copy the destination's index
    loads without a problem and names the same, present objects."""
    kit = repo_kit
    kit.snapshot(T0)
    index = wal_index.load_index(kit.storage, [kit.verify_key], kit.info.repo_id)
    for n in (1, 2):
        name = f"0000000100000000000000{n:02d}"
        data = secrets.token_bytes(5000)
        info = kit.storage.put_bytes(wal_index.object_key(name), data)
        entry = wal_index.WalEntry(
            name,
            "segment",
            1,
            wal_index.object_key(name),
            info.size,
            hashlib.sha256(data).hexdigest(),
            16 << 20,
            "0" * 64,
            "2026-12-05T00:00:00+00:00",
        )
        wal_index.append_chunk(
            kit.storage,
            index,
            [entry],
            signing_key=kit.signing_key,
            host="nas",
            created="2026-12-05T00:00:00+00:00",
            segment_size=16 << 20,
        )
    config = copy_config(kit, file_dest(kit))
    result = run_copy(load_config(config, {}), home=tmp_path, destination=DEST)
    assert (result.wal_chunks, result.problems) == (2, [])
    copied = wal_index.load_index(dest_storage(config), [kit.verify_key], kit.info.repo_id)
    assert copied.problems == [] and sorted(copied.entries) == sorted(
        wal_index.load_index(kit.storage, [kit.verify_key], kit.info.repo_id).entries
    )
    assert run_copy(load_config(config, {}), home=tmp_path, destination=DEST).wal_chunks == 0
    verify = run_drtool("wal", "verify", "--repository", DEST, "--json", config=config)
    assert verify.returncode == 0, verify.stdout + verify.stderr

    # the source prunes segment 1 (signed removal record, then the object): a new copy
    # destination gets the record and never asks for the file
    removed = "000000010000000000000001"
    append_pruned(
        kit.storage,
        load_pruned(kit.storage, [kit.verify_key], kit.info.repo_id),
        repo_id=kit.info.repo_id,
        signing_key=kit.signing_key,
        host="nas",
        created="2026-12-06T00:00:00+00:00",
        floor_segment="000000010000000000000002",
        base_snapshot="-",
        removed=[removed],
    )
    kit.storage.delete(wal_index.object_key(removed))
    config2 = copy_config(kit, {"url": (kit.tmp / "second" / "repo").as_uri()})
    result = run_copy(load_config(config2, {}), home=tmp_path, destination=DEST)
    assert (result.wal_chunks, result.problems) == (2, [])
    verify = run_drtool("wal", "verify", "--repository", DEST, "--json", config=config2)
    assert verify.returncode == 0, verify.stdout + verify.stderr


@pytest.mark.slow
def test_a_snapshot_pruned_before_it_was_copied_leaves_no_chain_gap(
    repo_kit: RepoKit, tmp_path: Path
) -> None:
    """Copy S1, prune S2 at the source (tombstone), copy again: the destination holds S1 and S3
    and its verify finds no chain problem, because the tombstone came along."""
    kit = repo_kit
    ids = three_snapshots(kit)
    config = copy_config(kit, file_dest(kit))
    assert copy_cli(config, ids[0], home=tmp_path).returncode == 0
    tombstone = chain.tombstone_key(ids[1], manifest_sha256(kit.snaps[1].stored))
    kit.storage.put_bytes(tombstone, b"")
    kit.storage.delete(layout.manifest_key(ids[1]))
    done = copy_cli(config, home=tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["tombstones"] == 1
    verify = run_drtool("verify", "--all", "--repository", DEST, config=config)
    assert verify.returncode == 0, verify.stdout + verify.stderr


# -- Object Lock: the destination's own settings ------------------------------------------------


def test_the_destinations_object_lock_applies_to_what_is_copied(
    repo_kit: RepoKit, s3_server: S3Endpoint, tmp_path: Path
) -> None:
    """Source without a lock (a directory), destination a locked bucket with retain_days = 3:
    every copied object and manifest is retained about 3 days from the copy; a blob the
    destination already had is extended to the new snapshot's date before its manifest."""
    kit = repo_kit
    shared = [blob_id() for _ in range(2)]
    kit.snapshot(T0, blobs=tuple(shared))
    bucket = f"lock-{secrets.token_hex(6)}"
    s3_client(s3_server).create_bucket(Bucket=bucket, ObjectLockEnabledForBucket=True)
    dest = {
        **s3_dest(kit, s3_server),
        "url": f"s3://{bucket}/copy",
        "object_lock_mode": "GOVERNANCE",
        "retain_days": 3,
    }
    config = copy_config(kit, dest)
    cfg = load_config(config, {})
    first = run_copy(cfg, home=tmp_path, destination=DEST)
    storage = dest_storage(config)
    kit.snapshot(T0 + timedelta(days=1), blobs=tuple(shared))
    later = datetime.now(UTC) + timedelta(days=10)
    second = run_copy(cfg, home=tmp_path, destination=DEST, now=later)
    assert len(first.copied) == len(second.copied) == 1
    for snap, when in ((kit.snaps[0], None), (kit.snaps[1], later)):
        manifest_until = storage.retention(layout.manifest_key(snap.snapshot_id))
        assert manifest_until is not None
        if when is not None:
            assert manifest_until >= when + timedelta(days=3) - timedelta(minutes=1)
    blob_keys = [o.key for o in kit.snaps[1].manifest.objects() if o.kind == "blob"]
    for key in blob_keys:  # reused by the second snapshot: extended before its manifest
        until = storage.retention(key)
        assert until is not None and until >= later + timedelta(days=3) - timedelta(minutes=1)


# -- restore from the copy ----------------------------------------------------------------------


@pytest.mark.slow
def test_restore_from_the_copy_equals_the_source(
    tmp_path: Path,
    pg_server: PostgresEndpoint,
    s3_server: S3Endpoint,
    pg_database: PostgresEndpoint,
    redis_db: RedisEndpoint,
    s3_bucket: str,
) -> None:
    """A real backup (file://), copied by `drtool copy` to a bucket, restored with
    `drtool restore --repository offsite`: tables, Redis and MinIO equal the source; the
    copy is read, not the primary (its directory is gone by then)."""
    with source_stack(tmp_path / "src", pg_server, s3_server) as source:
        repo = make_repository(tmp_path / "src", source)
        snapshot_id = repo.backup()
        backup_doc = load_toml(repo.backup_config)
        key_dir = tmp_path / "keys"
        key_dir.mkdir(mode=0o700)
        bucket = f"copy-{secrets.token_hex(6)}"
        s3_client(s3_server).create_bucket(Bucket=bucket)
        for name, value in (("ak", s3_server.access_key), ("sk", s3_server.secret_key)):
            (key_dir / name).write_text(value)
        offsite = {
            "url": f"s3://{bucket}/copy",
            "endpoint_url": s3_server.endpoint_url,
            "access_key_file": str(key_dir / "ak"),
            "secret_key_file": str(key_dir / "sk"),
        }
        backup_doc["repositories"] = {DEST: offsite}
        backup_config = tmp_path / "backup-copy.toml"
        backup_config.write_text(tomli_w.dumps(backup_doc))
        done = copy_cli(backup_config, home=tmp_path / "home")
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["copied"] == [snapshot_id]
        target = StackEndpoints(pg_database, redis_db, s3_server, (s3_bucket,))
        op_path = repo.operator_config(tmp_path / "op.toml", {"t": target})
        op_doc = load_toml(op_path)
        op_doc["repositories"] = {DEST: offsite}
        op_path.write_text(tomli_w.dumps(op_doc))
        shutil.rmtree(tmp_path / "src" / "repository")  # the provider is down
        run = run_drtool(
            "restore", "latest", "--repository", DEST, "--target", "t", "--yes", "--json",
            config=op_path,
        )  # fmt: skip
        assert run.returncode == 0, run.stderr
        result = json.loads(run.stdout)
        assert result["snapshot_id"] == snapshot_id and result["ok"]
        assert table_rows(target.postgres) == table_rows(source.postgres)
        assert_same_redis(source.redis, target.redis)
        assert bucket_objects(target.minio, s3_bucket) == bucket_objects(
            source.minio, source.buckets[0]
        )


def test_a_newer_source_header_and_rotation_records_are_copied_and_recheck_the_copy(
    repo_kit: RepoKit, tmp_path: Path
) -> None:
    """After a key rotation at the source (a new header, records under rotations/), the next
    copy replaces the destination's header, copies the records and checks every object the
    destination holds again: one that differs (here: a flipped byte) is uploaded again."""
    kit = repo_kit
    three_snapshots(kit)
    config = copy_config(kit, file_dest(kit))
    cfg = load_config(config, {})
    run_copy(cfg, home=tmp_path, destination=DEST)
    header = json.loads(kit.storage.get_bytes(layout.REPO_FILE))
    header["recipients"].append("age1newrecipientxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx")
    kit.storage.put_bytes(layout.REPO_FILE, json.dumps(header).encode())
    kit.storage.put_bytes("rotations/r1/plan.json", b'{"body": {}, "signature": ""}')
    dest = dest_storage(config)
    stale = kit.snaps[0].dump_key
    data = bytearray(dest.get_bytes(stale))
    data[-3] ^= 0x01
    dest.put_bytes(stale, bytes(data))
    result = run_copy(cfg, home=tmp_path, destination=DEST)
    objects = {o.key for s in kit.snaps for o in s.manifest.objects()}
    assert dest.get_bytes(layout.REPO_FILE) == kit.storage.get_bytes(layout.REPO_FILE)
    assert dest.get_bytes("rotations/r1/plan.json") == kit.storage.get_bytes(
        "rotations/r1/plan.json"
    )
    assert (result.uploaded, result.checked) == (1, len(objects) - 1)
    assert dest.get_bytes(stale) == kit.storage.get_bytes(stale)
    again = run_copy(cfg, home=tmp_path, destination=DEST)
    assert (again.uploaded, again.checked) == (0, 0)


# -- bounded memory ----------------------------------------------------------------------------


def _peak_rss_mib(config: Path, home: Path) -> float:
    """Run `drtool copy` and return its peak resident memory (this child only, wait4)."""
    proc = subprocess.Popen(
        drtool_argv("copy", config=config, home=home),
        env=drtool_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    _, status, usage = os.wait4(proc.pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, proc.stderr.read() if proc.stderr else ""
    proc.returncode = 0
    return usage.ru_maxrss / 1024  # KiB on Linux


@pytest.mark.slow
def test_a_large_object_is_streamed_not_held(
    repo_kit: RepoKit, s3_server: S3Endpoint, tmp_path: Path
) -> None:
    """A 160 MiB dump copied to S3 (8 MiB parts): the copy's peak memory grows by far less
    than the object over a copy of a tiny repository (it would if the object were held)."""
    small = tmp_path / "small"
    small.mkdir()
    tiny = file_kit(small)
    tiny.snapshot(T0)
    baseline = _peak_rss_mib(copy_config(tiny, s3_dest(tiny, s3_server)), tmp_path)
    kit = repo_kit
    snapshot_id = new_id(T0)
    writer = kit.writer(snapshot_id)
    size = 160 << 20
    random_mib = (secrets.token_bytes(1 << 20) for _ in range(size >> 20))  # incompressible
    written = writer.put_snapshot_object("postgres", "dump.pgdump", random_mib, kind="pg_dump")
    when = T0.isoformat()
    component = ComponentEntry("postgres", (written.entry,), size, 1.0)
    manifest = Manifest(
        kit.info.repo_id, snapshot_id, when, when, "nas", "co-talk", "0.1.0", (component,)
    )
    writer.commit(manifest)
    assert written.entry.size > size
    config = copy_config(kit, s3_dest(kit, s3_server))
    peak = _peak_rss_mib(config, tmp_path)
    assert peak - baseline < 80, (baseline, peak)  # 3 parts of 8 MiB in flight, and slack
    assert listed(config, "--repository", DEST) == {snapshot_id: "VALID"}
