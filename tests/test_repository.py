"""The repository layer: signed manifests, the repository header, the catalog, locks, verify.

Snapshots are written with the real :class:`SnapshotWriter` (sealed with age, signed with
Ed25519) into real storage: a directory or a SeaweedFS bucket. ``RepoKit`` is shared with
tests/test_retention.py and tests/test_repo_commands.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from drtool import keys
from drtool.config import Config, load_config
from drtool.endpoints import RedisEndpoint, S3Endpoint
from drtool.errors import ConfigError, IntegrityError, Locked, NotFound
from drtool.repository import access, catalog, layout
from drtool.repository.ids import new_id
from drtool.repository.locks import LockInfo, read_locks, repository_lock, unlock
from drtool.repository.manifest import (
    ComponentEntry,
    Manifest,
    ObjectEntry,
    canonical,
    manifest_sha256,
    open_manifest,
    sign_manifest,
)
from drtool.repository.writer import SnapshotWriter
from drtool.services import repo as svc
from drtool.services.backup import run_backup
from drtool.storage import Storage

T0 = datetime(2026, 11, 20, 2, 0, tzinfo=UTC)


# -- the kit: a real repository with synthetic snapshots -------------------------------------


@dataclass
class Snap:
    """One committed synthetic snapshot."""

    snapshot_id: str
    manifest: Manifest
    stored: bytes  # the manifest as stored
    dump: bytes  # the plaintext of its own object

    @property
    def dump_key(self) -> str:
        return f"{layout.snapshot_prefix(self.snapshot_id)}postgres/dump.pgdump.zst.age"


@dataclass
class RepoKit:
    """An initialised repository, its keys and config files, and a snapshot factory."""

    tmp: Path
    url: str
    config_file: Path  # recipients, signing key, verify key and the identity
    storage: Storage
    info: layout.RepoInfo
    signing_key: Ed25519PrivateKey
    verify_key: str
    recipient: str
    identity_file: Path
    sections: dict[str, dict[str, object]]
    blobs: dict[str, ObjectEntry] = field(default_factory=dict)
    snaps: list[Snap] = field(default_factory=list)

    def config(self, **keys_section: object) -> Config:
        """The config, with ``keys`` settings replaced (a value of None removes the setting)."""
        return load_config(self.write_config(**keys_section), {})

    def write_config(self, name: str = "", **keys_section: object) -> Path:
        """Write a config file like the kit's, ``keys`` settings replaced; return its path."""
        if not keys_section and not name:
            return self.config_file
        section = {**self.sections["keys"], **keys_section}
        doc = {**self.sections, "keys": {k: v for k, v in section.items() if v is not None}}
        path = self.tmp / f"drtool-{name or secrets.token_hex(3)}.toml"
        path.write_text(tomli_w.dumps(doc))
        return path

    def writer(self, snapshot_id: str) -> SnapshotWriter:
        return SnapshotWriter(
            self.storage, self.info, snapshot_id, self.signing_key, (self.recipient,)
        )

    def snapshot(
        self,
        when: datetime,
        *,
        blobs: tuple[str, ...] = (),
        dump: bytes | None = None,
        chain: bool = True,
    ) -> Snap:
        """Write and commit a snapshot started at ``when``: one pg dump object plus ``blobs``.

        A blob already in the repository is reused (shared), as the MinIO backup does.
        """
        snapshot_id = new_id(when)
        writer = self.writer(snapshot_id)
        dump = dump if dump is not None else b"PGDMP" + secrets.token_bytes(3000)
        written = writer.put_snapshot_object("postgres", "dump.pgdump", [dump], kind="pg_dump")
        blob_entries = []
        for blob_id in blobs:
            if blob_id not in self.blobs:
                content = f"attachment {blob_id}".encode() * 50
                self.blobs[blob_id] = writer.put_blob(blob_id, [content]).entry
            blob_entries.append(self.blobs[blob_id])
        components = [
            ComponentEntry("postgres", (written.entry,), written.plain_bytes, 0.5, "16.4")
        ]
        if blob_entries:
            components.append(ComponentEntry("minio", tuple(blob_entries), 1000, 0.2))
        previous = self.snaps[-1] if chain and self.snaps else None
        manifest = Manifest(
            repo_id=self.info.repo_id,
            snapshot_id=snapshot_id,
            started=when.isoformat(timespec="seconds"),
            finished=(when + timedelta(minutes=3)).isoformat(timespec="seconds"),
            host="nas",
            stack="co-talk",
            drtool_version="0.1.0",
            components=tuple(components),
            previous_id=previous.snapshot_id if previous else None,
            previous_sha256=manifest_sha256(previous.stored) if previous else None,
        )
        stored = writer.commit(manifest)
        snap = Snap(snapshot_id, manifest, stored, dump)
        self.snaps.append(snap)
        return snap

    def records(self) -> dict[str, catalog.SnapshotRecord]:
        """The catalog's listing, by id."""
        listed = catalog.list_snapshots(self.storage, [self.verify_key], self.info.repo_id)
        return {r.snapshot_id: r for r in listed}

    def keys_in_storage(self) -> set[str]:
        return {o.key for o in self.storage.list()}


def blob_id() -> str:
    return secrets.token_hex(16)


def make_kit(tmp: Path, url: str, s3: S3Endpoint | None = None) -> RepoKit:
    """Keys, a config file and an initialised repository at ``url``."""
    key_dir = tmp / "keys"
    key_dir.mkdir(mode=0o700)
    identity_file = key_dir / "operator.key"
    recipient = keys.write_identity(identity_file, passphrase=None)
    verify_key = keys.write_signing_key(key_dir / "signing.key")
    repository: dict[str, object] = {"url": url}
    if s3 is not None:
        (key_dir / "s3-access").write_text(s3.access_key)
        (key_dir / "s3-secret").write_text(s3.secret_key)
        repository |= {
            "endpoint_url": s3.endpoint_url,
            "access_key_file": str(key_dir / "s3-access"),
            "secret_key_file": str(key_dir / "s3-secret"),
        }
    sections: dict[str, dict[str, object]] = {
        "repository": repository,
        "keys": {
            "recipients": [recipient],
            "signing_key_file": str(key_dir / "signing.key"),
            "verify_key": verify_key,
            "identity_file": str(identity_file),
        },
    }
    config_file = tmp / "drtool.toml"
    config_file.write_text(tomli_w.dumps(sections))
    cfg = load_config(config_file, {})
    info = svc.init_repo(cfg)
    return RepoKit(
        tmp=tmp,
        url=url,
        config_file=config_file,
        storage=access.storage_for(cfg),
        info=info,
        signing_key=keys.load_signing_key(key_dir / "signing.key"),
        verify_key=verify_key,
        recipient=recipient,
        identity_file=identity_file,
        sections=sections,
    )


def file_kit(tmp: Path) -> RepoKit:
    (tmp / "repo").mkdir()
    return make_kit(tmp, (tmp / "repo").as_uri())


def s3_kit(tmp: Path, s3: S3Endpoint, bucket: str) -> RepoKit:
    return make_kit(tmp, f"s3://{bucket}/drtool", s3)


@pytest.fixture(name="kit")
def fixture_kit(tmp_path: Path) -> RepoKit:
    """A repository in a local directory."""
    return file_kit(tmp_path)


@pytest.fixture(name="any_kit", params=["file", "s3"])
def fixture_any_kit(request: pytest.FixtureRequest, tmp_path: Path) -> RepoKit:
    """A repository on each storage backend (a directory; a SeaweedFS bucket)."""
    if request.param == "file":
        return file_kit(tmp_path)
    return s3_kit(
        tmp_path, request.getfixturevalue("s3_server"), request.getfixturevalue("s3_bucket")
    )


def rewrite(kit: RepoKit, key: str, data: bytes) -> None:
    """Replace a stored object (what an attacker or a broken disk does)."""
    kit.storage.put_bytes(key, data)


# -- manifests --------------------------------------------------------------------------------


def test_manifest_round_trip_is_canonical_and_signed(kit: RepoKit) -> None:
    snap = kit.snapshot(T0, blobs=(blob_id(),))
    assert snap.manifest.started == "2026-11-20T02:00:00+00:00"
    doc = json.loads(kit.storage.get_bytes(layout.manifest_key(snap.snapshot_id)))
    assert set(doc) == {"body", "signature"}
    assert doc["body"]["format"] == "drtool-manifest/1"
    # the signature covers the canonical body, as docs/FORMAT.md tells a third party
    body_bytes = json.dumps(
        doc["body"], sort_keys=True, separators=(",", ":"), ensure_ascii=False
    ).encode()
    assert canonical(doc["body"]) == body_bytes
    keys.verify_signature(keys.parse_verify_key(kit.verify_key), body_bytes, doc["signature"])
    opened = open_manifest(snap.stored, [kit.verify_key], name="m")
    assert opened == snap.manifest
    assert [o.kind for o in opened.objects()] == ["pg_dump", "blob"]
    # every object is listed with its stored size and sha256, for a key-less verify
    for obj in opened.objects():
        data = kit.storage.get_bytes(obj.key)
        assert (len(data), hashlib.sha256(data).hexdigest()) == (obj.size, obj.sha256)


def test_manifest_holds_nothing_about_users_in_the_clear(kit: RepoKit) -> None:
    dump = b"PGDMP secret message: meet at dawn"
    snap = kit.snapshot(T0, dump=dump)
    assert b"meet at dawn" not in snap.stored
    assert b"meet at dawn" not in kit.storage.get_bytes(snap.dump_key)


def test_altered_manifest_body_is_invalid(kit: RepoKit) -> None:
    snap = kit.snapshot(T0)
    doc = json.loads(snap.stored)
    doc["body"]["host"] = "evil"
    rewrite(kit, layout.manifest_key(snap.snapshot_id), json.dumps(doc).encode())
    with pytest.raises(IntegrityError, match="signature does not verify"):
        open_manifest(json.dumps(doc).encode(), [kit.verify_key], name="m")
    record = kit.records()[snap.snapshot_id]
    assert not record.valid
    assert record.problem is not None
    assert "signature does not verify" in record.problem
    assert layout.manifest_key(snap.snapshot_id) in record.problem


def test_manifest_signed_by_another_key_is_invalid(kit: RepoKit) -> None:
    snap = kit.snapshot(T0)
    forged = sign_manifest(replace(snap.manifest, host="evil"), Ed25519PrivateKey.generate())
    rewrite(kit, layout.manifest_key(snap.snapshot_id), forged)
    record = kit.records()[snap.snapshot_id]
    assert not record.valid
    assert record.problem is not None and "signature does not verify" in record.problem
    # the listing still shows it: INVALID, never silently hidden
    rows = [svc.record_summary(r) for r in svc.list_records(kit.config())]
    assert [(r["id"], r["status"]) for r in rows] == [(snap.snapshot_id, "INVALID")]


def test_unreadable_manifest_is_invalid(kit: RepoKit) -> None:
    snap = kit.snapshot(T0)
    rewrite(kit, layout.manifest_key(snap.snapshot_id), b"{not json")
    record = kit.records()[snap.snapshot_id]
    assert record.problem is not None and "not a drtool manifest" in record.problem


def test_manifest_copied_from_another_repository_is_invalid(kit: RepoKit, tmp_path: Path) -> None:
    snap = kit.snapshot(T0)
    # the same signing key signs a manifest naming another repo, placed in this one's slot
    other = replace(snap.manifest, repo_id="0" * 16)
    rewrite(kit, layout.manifest_key(snap.snapshot_id), sign_manifest(other, kit.signing_key))
    record = kit.records()[snap.snapshot_id]
    assert record.problem is not None
    assert "belongs to another snapshot or repository" in record.problem


def test_deleted_object_makes_the_snapshot_invalid(kit: RepoKit) -> None:
    snap = kit.snapshot(T0)
    kit.storage.delete(snap.dump_key)
    record = kit.records()[snap.snapshot_id]
    assert record.problem == f"missing object {snap.dump_key}"


def test_deleted_shared_blob_invalidates_every_snapshot_using_it(kit: RepoKit) -> None:
    shared = blob_id()
    first = kit.snapshot(T0, blobs=(shared,))
    second = kit.snapshot(T0 + timedelta(hours=1), blobs=(shared,))
    third = kit.snapshot(T0 + timedelta(hours=2))
    kit.storage.delete(layout.blob_key(shared))
    records = kit.records()
    for snap in (first, second):
        assert records[snap.snapshot_id].problem == f"missing object {layout.blob_key(shared)}"
    assert records[third.snapshot_id].valid


def test_truncated_object_makes_the_snapshot_invalid(kit: RepoKit) -> None:
    snap = kit.snapshot(T0)
    data = kit.storage.get_bytes(snap.dump_key)
    rewrite(kit, snap.dump_key, data[:-10])
    record = kit.records()[snap.snapshot_id]
    assert record.problem == (
        f"object {snap.dump_key} is {len(data) - 10} bytes, manifest says {len(data)}"
    )


def test_invalid_snapshots_are_never_resolved(kit: RepoKit) -> None:
    good = kit.snapshot(T0)
    bad = kit.snapshot(T0 + timedelta(hours=1))
    kit.storage.delete(bad.dump_key)
    records = list(kit.records().values())
    assert catalog.resolve(records, "latest").snapshot_id == good.snapshot_id
    with pytest.raises(IntegrityError, match=f"snapshot {bad.snapshot_id} is INVALID: missing"):
        catalog.resolve(records, bad.snapshot_id)
    with pytest.raises(NotFound, match="not found"):
        catalog.resolve(records, "20260101T000000Z-abcd")
    kit.storage.delete(good.dump_key)
    with pytest.raises(NotFound, match="no valid snapshot in the repository"):
        catalog.resolve(list(kit.records().values()), "latest")


def test_resolve_at_picks_the_newest_valid_snapshot_not_after_the_time(kit: RepoKit) -> None:
    early = kit.snapshot(T0)
    middle = kit.snapshot(T0 + timedelta(days=1))
    kit.snapshot(T0 + timedelta(days=2))
    records = list(kit.records().values())
    at = T0 + timedelta(days=1, hours=5)
    assert catalog.resolve(records, "latest", at=at).snapshot_id == middle.snapshot_id
    assert catalog.resolve(records, "latest", at=T0).snapshot_id == early.snapshot_id
    with pytest.raises(NotFound, match="no valid snapshot at or before 2026-11-19"):
        catalog.resolve(records, "latest", at=T0 - timedelta(days=1))


def test_latest_is_the_newest_snapshot_holding_every_asked_store(kit: RepoKit) -> None:
    """Schedules back stores up separately: `latest` skips snapshots missing a store."""
    full = kit.snapshot(T0, blobs=(blob_id(),))  # postgres + minio
    pg_only = kit.snapshot(T0 + timedelta(hours=6))
    records = list(kit.records().values())
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


def test_listing_reads_manifests_only_and_sorts_by_time(kit: RepoKit) -> None:
    later = kit.snapshot(T0 + timedelta(days=1))
    earlier = kit.snapshot(T0)
    # an uncommitted snapshot (data, no manifest) is not listed
    kit.writer(new_id(T0 + timedelta(days=2))).put_snapshot_object(
        "postgres", "dump.pgdump", [b"partial"], kind="pg_dump"
    )
    records = catalog.list_snapshots(kit.storage, [kit.verify_key], kit.info.repo_id)
    assert [r.snapshot_id for r in records] == [earlier.snapshot_id, later.snapshot_id]
    # the chain's previous is the newest authentic manifest; its objects are not checked
    kit.storage.delete(later.dump_key)
    newest = catalog.newest_authentic(kit.storage, [kit.verify_key], kit.info.repo_id)
    assert newest is not None and newest.snapshot_id == later.snapshot_id
    assert not kit.records()[later.snapshot_id].valid
    # a manifest that does not verify is passed over for the one before it
    kit.storage.put_bytes(layout.manifest_key(later.snapshot_id), b"{}")
    newest = catalog.newest_authentic(kit.storage, [kit.verify_key], kit.info.repo_id)
    assert newest is not None and newest.snapshot_id == earlier.snapshot_id


def test_uncommitted_snapshot_is_not_committed_when_an_object_is_short(kit: RepoKit) -> None:
    snapshot_id = new_id(T0)
    writer = kit.writer(snapshot_id)
    written = writer.put_snapshot_object("postgres", "dump.pgdump", [b"x" * 500], kind="pg_dump")
    kit.storage.put_bytes(written.entry.key, b"short")
    manifest = Manifest(
        kit.info.repo_id, snapshot_id, "s", "f", "nas", "co-talk", "0.1.0",
        (ComponentEntry("postgres", (written.entry,), 500, 0.1),),
    )  # fmt: skip
    with pytest.raises(IntegrityError, match="not committed"):
        writer.commit(manifest)
    assert not kit.storage.exists(layout.manifest_key(snapshot_id))
    assert kit.records() == {}


def test_ids_of_runs_within_one_second_sort_in_start_order() -> None:
    """`latest` and the hash chain follow id order, so one second must not scramble it."""
    starts = [T0 + timedelta(milliseconds=ms) for ms in (0, 1, 2, 500, 998, 999)]
    for _ in range(50):
        ids = [new_id(when) for when in starts]
        assert sorted(ids) == ids
        assert all(re.fullmatch(r"20261120T020000Z-[0-9a-f]{4}", i) for i in ids)


def test_hash_chain_records_the_previous_manifest(kit: RepoKit) -> None:
    first = kit.snapshot(T0)
    second = kit.snapshot(T0 + timedelta(hours=1))
    records = kit.records()
    assert second.manifest.previous_id == first.snapshot_id
    stored_first = kit.storage.get_bytes(layout.manifest_key(first.snapshot_id))
    assert second.manifest.previous_sha256 == hashlib.sha256(stored_first).hexdigest()
    assert records[first.snapshot_id].manifest_sha256 == second.manifest.previous_sha256


def test_a_real_backup_chains_to_the_previous_snapshot(
    tmp_path: Path, redis_db: RedisEndpoint, s3_server: S3Endpoint, s3_bucket: str
) -> None:
    """Two real (Redis-only) backups: the second manifest names the first and its hash."""
    kit = s3_kit(tmp_path, s3_server, s3_bucket)
    redis_section = {"host": redis_db.host, "port": redis_db.port}
    sections = {**kit.sections, "redis": redis_section}
    sections["keys"] = {k: v for k, v in sections["keys"].items() if k != "identity_file"}
    backup_file = tmp_path / "backup.toml"
    backup_file.write_text(tomli_w.dumps(sections))
    env = {}
    if redis_db.password:
        env["DRTOOL_REDIS_PASSWORD"] = redis_db.password
    cfg = load_config(backup_file, env)
    first = run_backup(cfg, home=tmp_path / "home", env=env, components=("redis",))
    second = run_backup(cfg, home=tmp_path / "home", env=env, components=("redis",))
    records = kit.records()
    assert list(records) == sorted([first.snapshot_id, second.snapshot_id])
    m2 = records[second.snapshot_id].manifest
    assert m2 is not None and m2.previous_id == first.snapshot_id
    stored = kit.storage.get_bytes(layout.manifest_key(first.snapshot_id))
    assert m2.previous_sha256 == hashlib.sha256(stored).hexdigest()
    outcomes = svc.verify(kit.config(), None, read_data=True)
    assert [(o.snapshot_id, o.problems) for o in outcomes] == [
        (first.snapshot_id, []),
        (second.snapshot_id, []),
    ]


# -- the repository header ------------------------------------------------------------------


def test_init_refuses_an_existing_repository(kit: RepoKit) -> None:
    before = kit.storage.get_bytes(layout.REPO_FILE)
    with pytest.raises(ConfigError, match="is already a drtool repository; not touched"):
        svc.init_repo(kit.config())
    assert kit.storage.get_bytes(layout.REPO_FILE) == before
    info = json.loads(before)
    assert info["format_version"] == 1
    assert info["recipients"] == [kit.recipient]
    assert info["verify_keys"] == [kit.verify_key]


def test_newer_format_is_refused_naming_both_versions(kit: RepoKit) -> None:
    doc = json.loads(kit.storage.get_bytes(layout.REPO_FILE))
    doc["format_version"] = 99
    rewrite(kit, layout.REPO_FILE, json.dumps(doc).encode())
    with pytest.raises(ConfigError) as caught:
        svc.list_records(kit.config())
    assert "format version 99 is newer than this drtool supports (1)" in str(caught.value)


def test_unreadable_header_is_an_integrity_error(kit: RepoKit) -> None:
    rewrite(kit, layout.REPO_FILE, b"garbage")
    with pytest.raises(IntegrityError, match=r"drtool-repo.json at .* is unreadable"):
        svc.list_records(kit.config())


def test_missing_repository_says_run_init(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    kit_dir = tmp_path / "kit"
    kit_dir.mkdir()
    kit = file_kit(kit_dir)
    doc = {**kit.sections, "repository": {"url": (tmp_path / "empty").as_uri()}}
    path = tmp_path / "empty.toml"
    path.write_text(tomli_w.dumps(doc))
    with pytest.raises(NotFound, match=r"no drtool repository at .*run `drtool init` first"):
        svc.list_records(load_config(path, {}))


def test_pinned_verify_key_overrides_the_repository_header(kit: RepoKit) -> None:
    """Storage credentials alone cannot swap the key: the operator pins it in config."""
    snap = kit.snapshot(T0)
    attacker = Ed25519PrivateKey.generate()
    forged = sign_manifest(replace(snap.manifest, host="evil"), attacker)
    rewrite(kit, layout.manifest_key(snap.snapshot_id), forged)
    doc = json.loads(kit.storage.get_bytes(layout.REPO_FILE))
    doc["verify_keys"] = [keys.verify_key_text(attacker.public_key())]
    rewrite(kit, layout.REPO_FILE, json.dumps(doc).encode())
    [record] = svc.list_records(kit.config())
    assert record.problem is not None and "signature does not verify" in record.problem


# -- verify ----------------------------------------------------------------------------------


def test_verify_passes_on_good_data(any_kit: RepoKit) -> None:
    shared = blob_id()
    a = any_kit.snapshot(T0, blobs=(shared,))
    b = any_kit.snapshot(T0 + timedelta(hours=1), blobs=(shared, blob_id()))
    keyless = svc.verify(any_kit.config(identity_file=None), None, read_data=False)
    assert [(o.snapshot_id, o.problems) for o in keyless] == [
        (a.snapshot_id, []),
        (b.snapshot_id, []),
    ]
    # a shared blob is checked once
    assert [o.objects for o in keyless] == [2, 2]
    full = svc.verify(any_kit.config(), "latest", read_data=True)
    assert [(o.snapshot_id, o.problems, o.read_data) for o in full] == [(b.snapshot_id, [], True)]


def test_verify_names_an_object_with_a_flipped_byte(kit: RepoKit) -> None:
    snap = kit.snapshot(T0)
    data = bytearray(kit.storage.get_bytes(snap.dump_key))
    data[len(data) // 2] ^= 0x01
    rewrite(kit, snap.dump_key, bytes(data))
    # same size: the listing cannot tell, the stored sha256 can
    assert kit.records()[snap.snapshot_id].valid
    [outcome] = svc.verify(kit.config(identity_file=None), snap.snapshot_id, read_data=False)
    assert outcome.problems == [f"{snap.dump_key}: stored sha256 differs from the manifest"]
    [outcome] = svc.verify(kit.config(), snap.snapshot_id, read_data=True)
    assert len(outcome.problems) == 1 and outcome.problems[0].startswith(snap.dump_key)


def test_verify_read_data_without_identity_is_a_config_error(kit: RepoKit) -> None:
    kit.snapshot(T0)
    with pytest.raises(ConfigError, match="--read-data needs an identity"):
        svc.verify(kit.config(identity_file=None), None, read_data=True)


def test_verify_of_an_empty_repository_is_not_a_success(kit: RepoKit) -> None:
    with pytest.raises(NotFound, match="no snapshots"):
        svc.verify(kit.config(), None, read_data=False)


def test_object_moved_into_another_snapshot_fails_read_data_verify(kit: RepoKit) -> None:
    """C4: a valid object of snapshot A in B's slot, with B's manifest re-signed to match."""
    a = kit.snapshot(T0)
    b = kit.snapshot(T0 + timedelta(hours=1))
    moved = kit.storage.get_bytes(a.dump_key)
    rewrite(kit, b.dump_key, moved)
    # the attacker holds the signing key (the NAS): sizes and hashes all agree with the manifest
    entry = replace(
        b.manifest.components[0].objects[0],
        size=len(moved),
        sha256=hashlib.sha256(moved).hexdigest(),
    )
    component = replace(b.manifest.components[0], objects=(entry,))
    forged = replace(b.manifest, components=(component,))
    rewrite(kit, layout.manifest_key(b.snapshot_id), sign_manifest(forged, kit.signing_key))
    [keyless] = svc.verify(kit.config(), b.snapshot_id, read_data=False)
    assert keyless.problems == []  # without a key nothing can tell
    [outcome] = svc.verify(kit.config(), b.snapshot_id, read_data=True)
    assert outcome.problems == [
        f"{b.dump_key}: belongs to snapshot {a.snapshot_id} component postgres "
        f"(repo {kit.info.repo_id}, kind pg_dump), expected snapshot {b.snapshot_id} "
        f"component postgres (repo {kit.info.repo_id}, kind pg_dump)"
    ]


def test_show_reads_fingerprints_only_with_an_identity(kit: RepoKit) -> None:
    snapshot_id = new_id(T0)
    writer = kit.writer(snapshot_id)
    prints = {"fingerprints": {"tables": {"messages": {"rows": 42, "digest": "ab"}}}}
    fp = writer.put_snapshot_object(
        "postgres", "fingerprints.json", [json.dumps(prints).encode()], kind="fingerprints"
    )
    manifest = Manifest(
        kit.info.repo_id, snapshot_id, "s", "f", "nas", "co-talk", "0.1.0",
        (ComponentEntry("postgres", (fp.entry,), fp.plain_bytes, 0.1),),
    )  # fmt: skip
    writer.commit(manifest)
    shown = svc.show_snapshot(kit.config(), "latest")
    assert shown.fingerprints == {"postgres": prints}
    assert svc.show_snapshot(kit.config(identity_file=None), snapshot_id).fingerprints == {}
    assert b"messages" not in kit.storage.get_bytes(fp.entry.key)


# -- locks -----------------------------------------------------------------------------------


def dead_pid() -> int:
    """A pid that existed and is gone (reaped)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def plant_lock(
    kit: RepoKit, *, host: str, pid: int, since: datetime, op: str = "backup", **holder: Any
) -> str:
    """A lock object as a holder would write it; ``holder``: boot_id, pid_start, heartbeat..."""
    lock = LockInfo(
        f"{since:%Y%m%dT%H%M%S}-{secrets.token_hex(4)}", host, pid, op, since.isoformat(), **holder
    )
    kit.storage.put_bytes(lock.key, json.dumps(asdict(lock)).encode())
    return lock.key


def test_second_writer_is_locked_out_naming_the_holder(any_kit: RepoKit) -> None:
    with repository_lock(any_kit.storage, "backup") as held:
        with pytest.raises(Locked) as caught, repository_lock(any_kit.storage, "prune"):
            pytest.fail("a second writer got the lock")
        message = str(caught.value)
        assert f"locked by {socket.gethostname()}/{os.getpid()} (backup) since {held.since}" in (
            message
        )
        assert caught.value.exit_code == 11
        assert [lk.lock_id for lk in read_locks(any_kit.storage)] == [held.lock_id]
    assert read_locks(any_kit.storage) == []
    with repository_lock(any_kit.storage, "prune"):
        pass


def test_lock_is_released_when_the_block_fails(kit: RepoKit) -> None:
    with pytest.raises(RuntimeError, match="boom"), repository_lock(kit.storage, "backup"):
        raise RuntimeError("boom")
    assert read_locks(kit.storage) == []
    assert kit.keys_in_storage() == {layout.REPO_FILE}


def test_live_lock_of_another_host_blocks(kit: RepoKit) -> None:
    since = datetime.now(UTC) - timedelta(minutes=5)
    plant_lock(kit, host="other-nas", pid=1, since=since)
    expected = f"locked by other-nas/1 (backup) since {since.isoformat()}"
    with pytest.raises(Locked, match=re.escape(expected)), repository_lock(kit.storage, "prune"):
        pass
    assert unlock(kit.storage, everything=False) == []  # a live lock is not stale


def test_stale_locks_are_ignored_and_removed_by_unlock(kit: RepoKit) -> None:
    dead = plant_lock(kit, host=socket.gethostname(), pid=dead_pid(), since=datetime.now(UTC))
    old = plant_lock(kit, host="other-nas", pid=1, since=datetime.now(UTC) - timedelta(days=2))
    assert {lk.key for lk, _ in svc.unlock_repo(kit.config(), everything=False)} == {dead, old}
    assert read_locks(kit.storage) == []
    dead = plant_lock(kit, host=socket.gethostname(), pid=dead_pid(), since=datetime.now(UTC))
    old = plant_lock(kit, host="other-nas", pid=1, since=datetime.now(UTC) - timedelta(days=2))
    with repository_lock(kit.storage, "backup") as mine:
        # the writer sweeps dead holders' locks (ADR 0011)
        assert [lk.lock_id for lk in read_locks(kit.storage)] == [mine.lock_id]
    assert mine.operation == "backup"
    assert read_locks(kit.storage) == []


def test_unlock_all_removes_live_locks_too(kit: RepoKit) -> None:
    plant_lock(kit, host="other-nas", pid=1, since=datetime.now(UTC))
    assert svc.unlock_repo(kit.config(), everything=False) == []
    [(removed, why)] = svc.unlock_repo(kit.config(), everything=True)
    assert (removed.host, removed.pid, why) == ("other-nas", 1, "--all")
    assert read_locks(kit.storage) == []


def test_unreadable_lock_object_does_not_block(kit: RepoKit) -> None:
    kit.storage.put_bytes(f"{layout.LOCKS}junk.json", b"not json")
    with repository_lock(kit.storage, "backup"):
        pass


# -- listing errors are errors, never "empty" -----------------------------------------------


@pytest.fixture(name="looping_blobs")
def fixture_looping_blobs(kit: RepoKit) -> Iterator[RepoKit]:
    """A file repository whose blobs/ listing fails (a symlink loop where a blob dir was)."""
    kit.snapshot(T0, blobs=(blob_id(),))
    root = Path(kit.url.removeprefix("file://"))
    loop = root / "blobs" / "zz"
    os.symlink("zz", loop)
    yield kit
    loop.unlink()
    shutil.rmtree(root / "blobs" / "zz", ignore_errors=True)


def test_listing_error_is_an_error_not_an_empty_repository(looping_blobs: RepoKit) -> None:
    from drtool.errors import StorageError

    with pytest.raises(StorageError, match="blobs/zz: cannot stat"):
        svc.list_records(looping_blobs.config())
