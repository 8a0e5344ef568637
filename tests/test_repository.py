"""The repository layer: signed manifests, the repository header, the catalog, locks, verify.

Snapshots are written with the real :class:`SnapshotWriter` (sealed with age, signed with
Ed25519) into real storage: a directory or a SeaweedFS bucket (tests/support/repo_kit.py,
through the ``repo_kit`` fixtures of tests/conftest.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import tomli_w
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from support.repo_kit import (
    T0,
    RepoKit,
    blob_id,
    dead_pid,
    file_kit,
    plant_lock,
    s3_kit,
)

from drtool import keys
from drtool.config import load_config
from drtool.endpoints import RedisEndpoint, S3Endpoint
from drtool.errors import ConfigError, IntegrityError, Locked, NotFound
from drtool.repository import catalog, layout
from drtool.repository.ids import new_id
from drtool.repository.locks import read_locks, repository_lock, unlock
from drtool.repository.manifest import (
    ComponentEntry,
    Manifest,
    canonical,
    open_manifest,
    sign_manifest,
)
from drtool.services import repo as svc
from drtool.services.backup import run_backup


def rewrite(repo_kit: RepoKit, key: str, data: bytes) -> None:
    """Replace a stored object (what an attacker or a broken disk does)."""
    repo_kit.storage.put_bytes(key, data)


# -- manifests --------------------------------------------------------------------------------


def test_manifest_round_trip_is_canonical_and_signed(repo_kit: RepoKit) -> None:
    snap = repo_kit.snapshot(T0, blobs=(blob_id(),))
    assert snap.manifest.started == "2026-11-20T02:00:00+00:00"
    doc = json.loads(repo_kit.storage.get_bytes(layout.manifest_key(snap.snapshot_id)))
    assert set(doc) == {"body", "signature"}
    assert doc["body"]["format"] == "drtool-manifest/1"
    # the signature covers the canonical body, as docs/FORMAT.md tells a third party
    body_bytes = json.dumps(
        doc["body"], sort_keys=True, separators=(",", ":"), ensure_ascii=False
    ).encode()
    assert canonical(doc["body"]) == body_bytes
    keys.verify_signature(keys.parse_verify_key(repo_kit.verify_key), body_bytes, doc["signature"])
    opened = open_manifest(snap.stored, [repo_kit.verify_key], name="m")
    assert opened == snap.manifest
    assert [o.kind for o in opened.objects()] == ["pg_dump", "blob"]
    # every object is listed with its stored size and sha256, for a key-less verify
    for obj in opened.objects():
        data = repo_kit.storage.get_bytes(obj.key)
        assert (len(data), hashlib.sha256(data).hexdigest()) == (obj.size, obj.sha256)


def test_manifest_holds_nothing_about_users_in_the_clear(repo_kit: RepoKit) -> None:
    dump = b"PGDMP secret message: meet at dawn"
    snap = repo_kit.snapshot(T0, dump=dump)
    assert b"meet at dawn" not in snap.stored
    assert b"meet at dawn" not in repo_kit.storage.get_bytes(snap.dump_key)


def test_altered_manifest_body_is_invalid(repo_kit: RepoKit) -> None:
    snap = repo_kit.snapshot(T0)
    doc = json.loads(snap.stored)
    doc["body"]["host"] = "evil"
    rewrite(repo_kit, layout.manifest_key(snap.snapshot_id), json.dumps(doc).encode())
    with pytest.raises(IntegrityError, match="signature does not verify"):
        open_manifest(json.dumps(doc).encode(), [repo_kit.verify_key], name="m")
    record = repo_kit.records()[snap.snapshot_id]
    assert not record.valid
    assert record.problem is not None
    assert "signature does not verify" in record.problem
    assert layout.manifest_key(snap.snapshot_id) in record.problem


def test_manifest_signed_by_another_key_is_invalid(repo_kit: RepoKit) -> None:
    snap = repo_kit.snapshot(T0)
    forged = sign_manifest(replace(snap.manifest, host="evil"), Ed25519PrivateKey.generate())
    rewrite(repo_kit, layout.manifest_key(snap.snapshot_id), forged)
    record = repo_kit.records()[snap.snapshot_id]
    assert not record.valid
    assert record.problem is not None and "signature does not verify" in record.problem
    # the listing still shows it: INVALID, never silently hidden
    rows = [svc.record_summary(r) for r in svc.list_records(repo_kit.config())]
    assert [(r["id"], r["status"]) for r in rows] == [(snap.snapshot_id, "INVALID")]


def test_unreadable_manifest_is_invalid(repo_kit: RepoKit) -> None:
    snap = repo_kit.snapshot(T0)
    rewrite(repo_kit, layout.manifest_key(snap.snapshot_id), b"{not json")
    record = repo_kit.records()[snap.snapshot_id]
    assert record.problem is not None and "not a drtool manifest" in record.problem


def test_manifest_copied_from_another_repository_is_invalid(
    repo_kit: RepoKit, tmp_path: Path
) -> None:
    snap = repo_kit.snapshot(T0)
    # the same signing key signs a manifest naming another repo, placed in this one's slot
    other = replace(snap.manifest, repo_id="0" * 16)
    rewrite(
        repo_kit, layout.manifest_key(snap.snapshot_id), sign_manifest(other, repo_kit.signing_key)
    )
    record = repo_kit.records()[snap.snapshot_id]
    assert record.problem is not None
    assert "belongs to another snapshot or repository" in record.problem


def test_deleted_object_makes_the_snapshot_invalid(repo_kit: RepoKit) -> None:
    snap = repo_kit.snapshot(T0)
    repo_kit.storage.delete(snap.dump_key)
    record = repo_kit.records()[snap.snapshot_id]
    assert record.problem == f"missing object {snap.dump_key}"


def test_deleted_shared_blob_invalidates_every_snapshot_using_it(repo_kit: RepoKit) -> None:
    shared = blob_id()
    first = repo_kit.snapshot(T0, blobs=(shared,))
    second = repo_kit.snapshot(T0 + timedelta(hours=1), blobs=(shared,))
    third = repo_kit.snapshot(T0 + timedelta(hours=2))
    repo_kit.storage.delete(layout.blob_key(shared))
    records = repo_kit.records()
    for snap in (first, second):
        assert records[snap.snapshot_id].problem == f"missing object {layout.blob_key(shared)}"
    assert records[third.snapshot_id].valid


def test_truncated_object_makes_the_snapshot_invalid(repo_kit: RepoKit) -> None:
    snap = repo_kit.snapshot(T0)
    data = repo_kit.storage.get_bytes(snap.dump_key)
    rewrite(repo_kit, snap.dump_key, data[:-10])
    record = repo_kit.records()[snap.snapshot_id]
    assert record.problem == (
        f"object {snap.dump_key} is {len(data) - 10} bytes, manifest says {len(data)}"
    )


def test_invalid_snapshots_are_never_resolved(repo_kit: RepoKit) -> None:
    good = repo_kit.snapshot(T0)
    bad = repo_kit.snapshot(T0 + timedelta(hours=1))
    repo_kit.storage.delete(bad.dump_key)
    records = list(repo_kit.records().values())
    assert catalog.resolve(records, "latest").snapshot_id == good.snapshot_id
    with pytest.raises(IntegrityError, match=f"snapshot {bad.snapshot_id} is INVALID: missing"):
        catalog.resolve(records, bad.snapshot_id)
    with pytest.raises(NotFound, match="not found"):
        catalog.resolve(records, "20260101T000000Z-abcd")
    repo_kit.storage.delete(good.dump_key)
    with pytest.raises(NotFound, match="no valid snapshot in the repository"):
        catalog.resolve(list(repo_kit.records().values()), "latest")


def test_resolve_at_picks_the_newest_valid_snapshot_not_after_the_time(repo_kit: RepoKit) -> None:
    early = repo_kit.snapshot(T0)
    middle = repo_kit.snapshot(T0 + timedelta(days=1))
    repo_kit.snapshot(T0 + timedelta(days=2))
    records = list(repo_kit.records().values())
    at = T0 + timedelta(days=1, hours=5)
    assert catalog.resolve(records, "latest", at=at).snapshot_id == middle.snapshot_id
    assert catalog.resolve(records, "latest", at=T0).snapshot_id == early.snapshot_id
    with pytest.raises(NotFound, match="no valid snapshot at or before 2026-11-19"):
        catalog.resolve(records, "latest", at=T0 - timedelta(days=1))


def test_latest_is_the_newest_snapshot_holding_every_asked_store(repo_kit: RepoKit) -> None:
    """Schedules back stores up separately: `latest` skips snapshots missing a store."""
    full = repo_kit.snapshot(T0, blobs=(blob_id(),))  # postgres + minio
    pg_only = repo_kit.snapshot(T0 + timedelta(hours=6))
    records = list(repo_kit.records().values())
    assert catalog.resolve(records, "latest").snapshot_id == pg_only.snapshot_id
    pick = catalog.resolve(records, "latest", components=("postgres",))
    assert pick.snapshot_id == pg_only.snapshot_id
    pick = catalog.resolve(records, "latest", components=("postgres", "minio"))
    assert pick.snapshot_id == full.snapshot_id
    with pytest.raises(
        NotFound,
        match=r"no valid snapshot holding redis in the repository \(the newest holds postgres\)",
    ):
        catalog.resolve(records, "latest", components=("redis",))


def test_listing_reads_manifests_only_and_sorts_by_time(repo_kit: RepoKit) -> None:
    later = repo_kit.snapshot(T0 + timedelta(days=1))
    earlier = repo_kit.snapshot(T0)
    # an uncommitted snapshot (data, no manifest) is not listed
    repo_kit.writer(new_id(T0 + timedelta(days=2))).put_snapshot_object(
        "postgres", "dump.pgdump", [b"partial"], kind="pg_dump"
    )
    records = catalog.list_snapshots(repo_kit.storage, [repo_kit.verify_key], repo_kit.info.repo_id)
    assert [r.snapshot_id for r in records] == [earlier.snapshot_id, later.snapshot_id]
    # the chain's previous is the newest authentic manifest; its objects are not checked
    repo_kit.storage.delete(later.dump_key)
    newest = catalog.newest_authentic(
        repo_kit.storage, [repo_kit.verify_key], repo_kit.info.repo_id
    )
    assert newest is not None and newest.snapshot_id == later.snapshot_id
    assert not repo_kit.records()[later.snapshot_id].valid
    # a manifest that does not verify is passed over for the one before it
    repo_kit.storage.put_bytes(layout.manifest_key(later.snapshot_id), b"{}")
    newest = catalog.newest_authentic(
        repo_kit.storage, [repo_kit.verify_key], repo_kit.info.repo_id
    )
    assert newest is not None and newest.snapshot_id == earlier.snapshot_id


def test_uncommitted_snapshot_is_not_committed_when_an_object_is_short(repo_kit: RepoKit) -> None:
    snapshot_id = new_id(T0)
    writer = repo_kit.writer(snapshot_id)
    written = writer.put_snapshot_object("postgres", "dump.pgdump", [b"x" * 500], kind="pg_dump")
    repo_kit.storage.put_bytes(written.entry.key, b"short")
    manifest = Manifest(
        repo_kit.info.repo_id, snapshot_id, "s", "f", "nas", "co-talk", "0.1.0",
        (ComponentEntry("postgres", (written.entry,), 500, 0.1),),
    )  # fmt: skip
    with pytest.raises(IntegrityError, match="not committed"):
        writer.commit(manifest)
    assert not repo_kit.storage.exists(layout.manifest_key(snapshot_id))
    assert repo_kit.records() == {}


def test_ids_of_runs_within_one_second_sort_in_start_order() -> None:
    """`latest` and the hash chain follow id order, so one second must not scramble it."""
    starts = [T0 + timedelta(milliseconds=ms) for ms in (0, 1, 2, 500, 998, 999)]
    for _ in range(50):
        ids = [new_id(when) for when in starts]
        assert sorted(ids) == ids
        assert all(re.fullmatch(r"20261120T020000Z-[0-9a-f]{4}", i) for i in ids)


def test_hash_chain_records_the_previous_manifest(repo_kit: RepoKit) -> None:
    first = repo_kit.snapshot(T0)
    second = repo_kit.snapshot(T0 + timedelta(hours=1))
    records = repo_kit.records()
    assert second.manifest.previous_id == first.snapshot_id
    stored_first = repo_kit.storage.get_bytes(layout.manifest_key(first.snapshot_id))
    assert second.manifest.previous_sha256 == hashlib.sha256(stored_first).hexdigest()
    assert records[first.snapshot_id].manifest_sha256 == second.manifest.previous_sha256


def test_a_real_backup_chains_to_the_previous_snapshot(
    tmp_path: Path, redis_db: RedisEndpoint, s3_server: S3Endpoint, s3_bucket: str
) -> None:
    """Two real (Redis-only) backups: the second manifest names the first and its hash."""
    repo_kit = s3_kit(tmp_path, s3_server, s3_bucket)
    redis_section = {"host": redis_db.host, "port": redis_db.port}
    sections = {**repo_kit.sections, "redis": redis_section}
    sections["keys"] = {k: v for k, v in sections["keys"].items() if k != "identity_file"}
    backup_file = tmp_path / "backup.toml"
    backup_file.write_text(tomli_w.dumps(sections))
    env = {}
    if redis_db.password:
        env["DRTOOL_REDIS_PASSWORD"] = redis_db.password
    cfg = load_config(backup_file, env)
    first = run_backup(cfg, home=tmp_path / "home", env=env, components=("redis",))
    second = run_backup(cfg, home=tmp_path / "home", env=env, components=("redis",))
    records = repo_kit.records()
    assert list(records) == sorted([first.snapshot_id, second.snapshot_id])
    m2 = records[second.snapshot_id].manifest
    assert m2 is not None and m2.previous_id == first.snapshot_id
    stored = repo_kit.storage.get_bytes(layout.manifest_key(first.snapshot_id))
    assert m2.previous_sha256 == hashlib.sha256(stored).hexdigest()
    outcomes = svc.verify(repo_kit.config(), None, read_data=True)
    assert [(o.snapshot_id, o.problems) for o in outcomes] == [
        (first.snapshot_id, []),
        (second.snapshot_id, []),
    ]


# -- the repository header ------------------------------------------------------------------


def test_init_refuses_an_existing_repository(repo_kit: RepoKit) -> None:
    before = repo_kit.storage.get_bytes(layout.REPO_FILE)
    with pytest.raises(ConfigError, match="is already a drtool repository; not touched"):
        svc.init_repo(repo_kit.config())
    assert repo_kit.storage.get_bytes(layout.REPO_FILE) == before
    info = json.loads(before)
    assert info["format_version"] == 1
    assert info["recipients"] == [repo_kit.recipient]
    assert info["verify_keys"] == [repo_kit.verify_key]


def test_newer_format_is_refused_naming_both_versions(repo_kit: RepoKit) -> None:
    doc = json.loads(repo_kit.storage.get_bytes(layout.REPO_FILE))
    doc["format_version"] = 99
    rewrite(repo_kit, layout.REPO_FILE, json.dumps(doc).encode())
    with pytest.raises(ConfigError) as caught:
        svc.list_records(repo_kit.config())
    assert "format version 99 is newer than this drtool supports (1)" in str(caught.value)


def test_unreadable_header_is_an_integrity_error(repo_kit: RepoKit) -> None:
    rewrite(repo_kit, layout.REPO_FILE, b"garbage")
    with pytest.raises(IntegrityError, match=r"drtool-repo.json at .* is unreadable"):
        svc.list_records(repo_kit.config())


def test_missing_repository_says_run_init(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    kit_dir = tmp_path / "kit"
    kit_dir.mkdir()
    repo_kit = file_kit(kit_dir)
    doc = {**repo_kit.sections, "repository": {"url": (tmp_path / "empty").as_uri()}}
    path = tmp_path / "empty.toml"
    path.write_text(tomli_w.dumps(doc))
    with pytest.raises(NotFound, match=r"no drtool repository at .*run `drtool init` first"):
        svc.list_records(load_config(path, {}))


def test_pinned_verify_key_overrides_the_repository_header(repo_kit: RepoKit) -> None:
    """Storage credentials alone cannot swap the key: the operator pins it in config."""
    snap = repo_kit.snapshot(T0)
    attacker = Ed25519PrivateKey.generate()
    forged = sign_manifest(replace(snap.manifest, host="evil"), attacker)
    rewrite(repo_kit, layout.manifest_key(snap.snapshot_id), forged)
    doc = json.loads(repo_kit.storage.get_bytes(layout.REPO_FILE))
    doc["verify_keys"] = [keys.verify_key_text(attacker.public_key())]
    rewrite(repo_kit, layout.REPO_FILE, json.dumps(doc).encode())
    [record] = svc.list_records(repo_kit.config())
    assert record.problem is not None and "signature does not verify" in record.problem


# -- verify ----------------------------------------------------------------------------------


def test_verify_passes_on_good_data(any_repo_kit: RepoKit) -> None:
    shared = blob_id()
    a = any_repo_kit.snapshot(T0, blobs=(shared,))
    b = any_repo_kit.snapshot(T0 + timedelta(hours=1), blobs=(shared, blob_id()))
    keyless = svc.verify(any_repo_kit.config(identity_file=None), None, read_data=False)
    assert [(o.snapshot_id, o.problems) for o in keyless] == [
        (a.snapshot_id, []),
        (b.snapshot_id, []),
    ]
    # a shared blob is checked once
    assert [o.objects for o in keyless] == [2, 2]
    full = svc.verify(any_repo_kit.config(), "latest", read_data=True)
    assert [(o.snapshot_id, o.problems, o.read_data) for o in full] == [(b.snapshot_id, [], True)]


def test_verify_names_an_object_with_a_flipped_byte(repo_kit: RepoKit) -> None:
    snap = repo_kit.snapshot(T0)
    data = bytearray(repo_kit.storage.get_bytes(snap.dump_key))
    data[len(data) // 2] ^= 0x01
    rewrite(repo_kit, snap.dump_key, bytes(data))
    # same size: the listing cannot tell, the stored sha256 can
    assert repo_kit.records()[snap.snapshot_id].valid
    [outcome] = svc.verify(repo_kit.config(identity_file=None), snap.snapshot_id, read_data=False)
    assert outcome.problems == [f"{snap.dump_key}: stored sha256 differs from the manifest"]
    [outcome] = svc.verify(repo_kit.config(), snap.snapshot_id, read_data=True)
    assert len(outcome.problems) == 1 and outcome.problems[0].startswith(snap.dump_key)


def test_verify_read_data_without_identity_is_a_config_error(repo_kit: RepoKit) -> None:
    repo_kit.snapshot(T0)
    with pytest.raises(ConfigError, match="--read-data needs an identity"):
        svc.verify(repo_kit.config(identity_file=None), None, read_data=True)


def test_verify_of_an_empty_repository_is_not_a_success(repo_kit: RepoKit) -> None:
    with pytest.raises(NotFound, match="no snapshots"):
        svc.verify(repo_kit.config(), None, read_data=False)


def test_object_moved_into_another_snapshot_fails_read_data_verify(repo_kit: RepoKit) -> None:
    """C4: a valid object of snapshot A in B's slot, with B's manifest re-signed to match."""
    a = repo_kit.snapshot(T0)
    b = repo_kit.snapshot(T0 + timedelta(hours=1))
    moved = repo_kit.storage.get_bytes(a.dump_key)
    rewrite(repo_kit, b.dump_key, moved)
    # the attacker holds the signing key (the NAS): sizes and hashes all agree with the manifest
    entry = replace(
        b.manifest.components[0].objects[0],
        size=len(moved),
        sha256=hashlib.sha256(moved).hexdigest(),
    )
    component = replace(b.manifest.components[0], objects=(entry,))
    forged = replace(b.manifest, components=(component,))
    rewrite(
        repo_kit, layout.manifest_key(b.snapshot_id), sign_manifest(forged, repo_kit.signing_key)
    )
    [keyless] = svc.verify(repo_kit.config(), b.snapshot_id, read_data=False)
    assert keyless.problems == []  # without a key nothing can tell
    [outcome] = svc.verify(repo_kit.config(), b.snapshot_id, read_data=True)
    assert outcome.problems == [
        f"{b.dump_key}: belongs to snapshot {a.snapshot_id} component postgres "
        f"(repo {repo_kit.info.repo_id}, kind pg_dump), expected snapshot {b.snapshot_id} "
        f"component postgres (repo {repo_kit.info.repo_id}, kind pg_dump)"
    ]


def test_show_reads_fingerprints_only_with_an_identity(repo_kit: RepoKit) -> None:
    snapshot_id = new_id(T0)
    writer = repo_kit.writer(snapshot_id)
    prints = {"fingerprints": {"tables": {"messages": {"rows": 42, "digest": "ab"}}}}
    fp = writer.put_snapshot_object(
        "postgres", "fingerprints.json", [json.dumps(prints).encode()], kind="fingerprints"
    )
    manifest = Manifest(
        repo_kit.info.repo_id, snapshot_id, "s", "f", "nas", "co-talk", "0.1.0",
        (ComponentEntry("postgres", (fp.entry,), fp.plain_bytes, 0.1),),
    )  # fmt: skip
    writer.commit(manifest)
    shown = svc.show_snapshot(repo_kit.config(), "latest")
    assert shown.fingerprints == {"postgres": prints}
    assert svc.show_snapshot(repo_kit.config(identity_file=None), snapshot_id).fingerprints == {}
    assert b"messages" not in repo_kit.storage.get_bytes(fp.entry.key)


# -- locks -----------------------------------------------------------------------------------


def test_second_writer_is_locked_out_naming_the_holder(any_repo_kit: RepoKit) -> None:
    with repository_lock(any_repo_kit.storage, "backup") as held:
        with pytest.raises(Locked) as caught, repository_lock(any_repo_kit.storage, "prune"):
            pytest.fail("a second writer got the lock")
        message = str(caught.value)
        assert f"locked by {socket.gethostname()}/{os.getpid()} (backup) since {held.since}" in (
            message
        )
        assert caught.value.exit_code == 11
        assert [lk.lock_id for lk in read_locks(any_repo_kit.storage)] == [held.lock_id]
    assert read_locks(any_repo_kit.storage) == []
    with repository_lock(any_repo_kit.storage, "prune"):
        pass


def test_lock_is_released_when_the_block_fails(repo_kit: RepoKit) -> None:
    with pytest.raises(RuntimeError, match="boom"), repository_lock(repo_kit.storage, "backup"):
        raise RuntimeError("boom")
    assert read_locks(repo_kit.storage) == []
    assert repo_kit.keys_in_storage() == {layout.REPO_FILE}


def test_live_lock_of_another_host_blocks(repo_kit: RepoKit) -> None:
    since = datetime.now(UTC) - timedelta(minutes=5)
    plant_lock(repo_kit, host="other-nas", pid=1, since=since)
    expected = f"locked by other-nas/1 (backup) since {since.isoformat()}"
    with (
        pytest.raises(Locked, match=re.escape(expected)),
        repository_lock(repo_kit.storage, "prune"),
    ):
        pass
    assert unlock(repo_kit.storage, everything=False) == []  # a live lock is not stale


def test_stale_locks_are_ignored_and_removed_by_unlock(repo_kit: RepoKit) -> None:
    dead = plant_lock(repo_kit, host=socket.gethostname(), pid=dead_pid(), since=datetime.now(UTC))
    old = plant_lock(repo_kit, host="other-nas", pid=1, since=datetime.now(UTC) - timedelta(days=2))
    assert {lk.key for lk, _ in svc.unlock_repo(repo_kit.config(), everything=False)} == {dead, old}
    assert read_locks(repo_kit.storage) == []
    dead = plant_lock(repo_kit, host=socket.gethostname(), pid=dead_pid(), since=datetime.now(UTC))
    old = plant_lock(repo_kit, host="other-nas", pid=1, since=datetime.now(UTC) - timedelta(days=2))
    with repository_lock(repo_kit.storage, "backup") as mine:
        # the writer sweeps dead holders' locks (ADR 0011)
        assert [lk.lock_id for lk in read_locks(repo_kit.storage)] == [mine.lock_id]
    assert mine.operation == "backup"
    assert read_locks(repo_kit.storage) == []


def test_unlock_all_removes_live_locks_too(repo_kit: RepoKit) -> None:
    plant_lock(repo_kit, host="other-nas", pid=1, since=datetime.now(UTC))
    assert svc.unlock_repo(repo_kit.config(), everything=False) == []
    [(removed, why)] = svc.unlock_repo(repo_kit.config(), everything=True)
    assert (removed.host, removed.pid, why) == ("other-nas", 1, "--all")
    assert read_locks(repo_kit.storage) == []


def test_unreadable_lock_object_does_not_block(repo_kit: RepoKit) -> None:
    repo_kit.storage.put_bytes(f"{layout.LOCKS}junk.json", b"not json")
    with repository_lock(repo_kit.storage, "backup"):
        pass


# -- listing errors are errors, never "empty" -----------------------------------------------


def test_listing_error_is_an_error_not_an_empty_repository(looping_blobs: RepoKit) -> None:
    from drtool.errors import StorageError

    with pytest.raises(StorageError, match="blobs/zz: cannot stat"):
        svc.list_records(looping_blobs.config())
