"""`drtool keys rotate` (ADR 0023) on real repositories: a directory and SeaweedFS (S3).

Every stored object gets a new age header for the new recipient set while its payload stays
byte-identical; signed rotation records keep old manifests (and their hash chain) and the WAL
index verifiable. Proven here by decrypting every object with the added identity (drtool and
stock `age -d`), failing with the removed one, and `drtool verify --all --read-data`.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import tomli_w
from support.backup_kit import make_backup_kit
from support.cli import run_drtool
from support.fault_proxy import fault_proxy
from support.repo_kit import T0, RepoKit, blob_id, s3_kit

from drtool import keys
from drtool.endpoints import PostgresEndpoint, RedisEndpoint, S3Endpoint
from drtool.errors import IntegrityError, WrongKey
from drtool.faults import ROTATE_CRASH_POINTS
from drtool.pipeline.age import decrypt
from drtool.pipeline.header import InnerHeader
from drtool.pipeline.seal import seal_bytes
from drtool.repository import layout
from drtool.s3session import s3_client
from drtool.wal.index import WalEntry, append_chunk, load_index, object_key

MiB = 1 << 20


def _sealed_objects(kit: RepoKit) -> list[str]:
    return sorted(k for k in kit.keys_in_storage() if k.endswith(".age"))


def _payload(raw: bytes) -> bytes:
    """The bytes after the textual age header (nonce and STREAM chunks)."""
    end = raw.index(b"\n---") + 1
    return raw[raw.index(b"\n", end) + 1 :]


def _add_wal_segment(kit: RepoKit) -> str:
    """One sealed WAL file named by a signed index chunk, as the streamer commits it."""
    name = "000000010000000000000003"
    plain = secrets.token_bytes(2000)
    header = InnerHeader(kit.info.repo_id, name, "wal", "wal-segment")
    stored = seal_bytes(plain, header=header, recipients=[kit.recipient])
    key = object_key(name)
    kit.storage.put_bytes(key, stored)
    index = load_index(kit.storage, [kit.verify_key], kit.info.repo_id)
    entry = WalEntry(
        name=name,
        kind="segment",
        timeline=1,
        key=key,
        size=len(stored),
        sha256=hashlib.sha256(stored).hexdigest(),
        plain_size=len(plain),
        plain_sha256=hashlib.sha256(plain).hexdigest(),
        sealed=T0.isoformat(),
    )
    append_chunk(
        kit.storage,
        index,
        [entry],
        signing_key=kit.signing_key,
        host="nas",
        created=T0.isoformat(),
        segment_size=16 * MiB,
    )
    return key


def _populate(kit: RepoKit, big: bool = False) -> None:
    shared = blob_id()
    kit.snapshot(T0, blobs=(shared, blob_id()))
    kit.snapshot(T0 + timedelta(days=1), blobs=(shared, blob_id()))
    if big:  # incompressible: the stored object is > 5 MiB, the S3 copy path
        kit.snapshot(T0 + timedelta(days=2), dump=b"PGDMP" + secrets.token_bytes(7 * MiB))
    _add_wal_segment(kit)


def _new_identity(kit: RepoKit, name: str) -> tuple[Path, str]:
    path = kit.tmp / "keys" / name
    return path, keys.write_identity(path, passphrase=None)


def _decrypts(raw: bytes, identity_file: Path, name: str) -> bool:
    try:
        b"".join(decrypt([raw], keys.load_identities(identity_file, None), name=name))
    except WrongKey:
        return False
    return True


def _rotate(kit: RepoKit, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return run_drtool("keys", "rotate", *args, config=kit.config_file, extra_env=env)


def _check_rotated(kit: RepoKit, new_key: Path, before: dict[str, bytes]) -> None:
    """Every object: payload unchanged, the new identity decrypts it, the old one does not."""
    for key in _sealed_objects(kit):
        raw = kit.storage.get_bytes(key)
        assert _payload(raw) == _payload(before[key]), key
        assert _decrypts(raw, new_key, key), key
        assert not _decrypts(raw, kit.identity_file, key), key


@pytest.mark.slow  # ~5-7 s: five drtool runs
def test_rotate_replaces_a_recipient_and_everything_still_verifies(any_repo_kit: RepoKit) -> None:
    kit = any_repo_kit
    _populate(kit)
    new_key, new_recipient = _new_identity(kit, "new.key")
    before = {k: kit.storage.get_bytes(k) for k in _sealed_objects(kit)}
    manifests = {k: kit.storage.get_bytes(k) for k in kit.keys_in_storage() if "manifest" in k}

    done = _rotate(kit, "--add-recipient", new_recipient, "--remove-recipient", kit.recipient)
    assert done.returncode == 0, done.stderr
    assert f"{len(before)} objects re-wrapped" in done.stdout

    _check_rotated(kit, new_key, before)
    info = layout.read_repo_info(kit.storage)
    assert info.recipients == (new_recipient,)
    # the signed manifests (and so the hash chain) are untouched
    assert {k: kit.storage.get_bytes(k) for k in manifests} == manifests

    # stock age: the new identity decrypts a rotated object, the payload decompresses
    dump = kit.snaps[0].dump_key
    local = kit.tmp / "dump.age"
    local.write_bytes(kit.storage.get_bytes(dump))
    plain = subprocess.run(
        f"age -d -i {new_key} {local} | zstd -d", shell=True, capture_output=True, check=True
    ).stdout
    assert plain == kit.snaps[0].dump

    operator = kit.write_config("new-operator", identity_file=str(new_key))
    verified = run_drtool("verify", "--all", "--read-data", config=operator)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    listed = run_drtool("list", "--json", config=operator)
    assert [r["status"] for r in json.loads(listed.stdout)] == ["VALID", "VALID"]
    wal = run_drtool("wal", "verify", "--read-data", config=operator)
    assert wal.returncode == 0, wal.stdout + wal.stderr

    again = _rotate(kit, "--add-recipient", new_recipient, "--remove-recipient", kit.recipient)
    assert again.returncode == 2  # the old identity no longer opens anything; nothing changed


def test_rotate_refuses_without_an_identity_or_a_trusted_signing_key(repo_kit: RepoKit) -> None:
    kit = repo_kit
    _populate(kit)
    _, new_recipient = _new_identity(kit, "new.key")
    no_identity = kit.write_config("noid", identity_file=None)
    done = run_drtool("keys", "rotate", "--add-recipient", new_recipient, config=no_identity)
    assert done.returncode == 2 and "identity_file" in done.stderr
    assert "Traceback" not in done.stderr
    no_signing = kit.write_config("nosign", signing_key_file=None)
    done = run_drtool("keys", "rotate", "--add-recipient", new_recipient, config=no_signing)
    assert done.returncode == 2 and "signing_key_file" in done.stderr
    bad = run_drtool("keys", "rotate", "--add-recipient", "age1nonsense", config=kit.config_file)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert layout.read_repo_info(kit.storage).recipients == (kit.recipient,)


@pytest.mark.slow
@pytest.mark.parametrize("point", ROTATE_CRASH_POINTS)
def test_a_rotation_killed_at_each_point_finishes_when_run_again(
    any_repo_kit: RepoKit, point: str
) -> None:
    kit = any_repo_kit
    _populate(kit)
    new_key, new_recipient = _new_identity(kit, "new.key")
    before = {k: kit.storage.get_bytes(k) for k in _sealed_objects(kit)}
    args = ("--add-recipient", new_recipient, "--remove-recipient", kit.recipient)

    killed = _rotate(kit, *args, DRTOOL_CRASH_AT=point, DRTOOL_ROTATE_BATCH="2")
    assert killed.returncode == 137, killed.stderr
    # killed half-way: every object is whole, opened by the old or by the new identity
    for key in _sealed_objects(kit):
        raw = kit.storage.get_bytes(key)
        assert _payload(raw) == _payload(before[key])
        assert _decrypts(raw, kit.identity_file, key) or _decrypts(raw, new_key, key)

    # the lock of the killed run is recognised as dead (same host, pid gone): no unlock
    resumed = _rotate(kit, DRTOOL_ROTATE_BATCH="2")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed" in resumed.stdout
    if point == "rotate-after-object":  # rewritten, not yet recorded: taken from its intent
        assert "1 recognised" in resumed.stdout
    _check_rotated(kit, new_key, before)
    operator = kit.write_config("new-operator", identity_file=str(new_key))
    verified = run_drtool("verify", "--all", "--read-data", config=operator)
    assert verified.returncode == 0, verified.stdout + verified.stderr


@pytest.mark.slow
def test_s3_rotation_copies_large_payloads_server_side(
    tmp_path: Path, s3_server: S3Endpoint, s3_bucket: str
) -> None:
    """A 7 MiB dump costs its header + one 5 MiB part of upload; the rest is UploadPartCopy."""
    kit = s3_kit(tmp_path, s3_server, s3_bucket)
    _populate(kit, big=True)
    big = kit.snaps[-1].dump_key
    big_size = kit.storage.head(big).size
    assert big_size > 7 * MiB
    new_key, new_recipient = _new_identity(kit, "new.key")
    before = {k: kit.storage.get_bytes(k) for k in _sealed_objects(kit)}
    repository_bytes = sum(o.size for o in kit.storage.list())

    with fault_proxy(s3_server.endpoint_url) as proxy:
        sections = {
            **kit.sections,
            "repository": {**kit.sections["repository"], "endpoint_url": proxy.endpoint_url},
        }
        config = tmp_path / "via-proxy.toml"
        config.write_text(tomli_w.dumps(sections))
        done = run_drtool(
            "keys", "rotate", "--add-recipient", new_recipient, "--remove-recipient",
            kit.recipient, config=config,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        bodies = list(proxy.bodies)

    _check_rotated(kit, new_key, before)
    big_path = "/" + s3_bucket + "/drtool/" + big
    big_puts = [(m, t, n) for m, t, n in bodies if t.startswith(big_path) and m == "PUT"]
    copied = [t for m, t, n in big_puts if "partNumber=" in t and n == 0]
    uploaded = sum(n for _, _, n in big_puts)
    assert copied, big_puts  # UploadPartCopy: the rest of the payload never left the server
    assert 5 * MiB < uploaded < 5 * MiB + 4096  # the header and the first 5 MiB part
    sent = sum(n for _, _, n in bodies)
    small = sum(n for k, n in ((k, len(v)) for k, v in before.items()) if k != big)
    assert sent < 5 * MiB + small + 256 * 1024  # records, lock and header are small
    print(f"repository {repository_bytes} B, rotation uploaded {sent} B")


@pytest.mark.slow
def test_after_a_rotation_the_next_backup_reuses_every_blob(
    tmp_path: Path,
    pg_database: PostgresEndpoint,
    redis_db: RedisEndpoint,
    s3_server: S3Endpoint,
    s3_bucket: str,
) -> None:
    """A real backup, a rotation that adds a recipient (every blob's size changes), then the
    runbook's next step (keys.recipients on the backup host) and a backup: nothing re-uploaded."""
    kit = make_backup_kit(tmp_path, pg_database, redis_db, s3_server, s3_bucket)
    first = kit.backup_ok()
    attachments = dict(kit.manifest(first).component("minio").details[kit.bucket])  # type: ignore[union-attr]
    escrow = tmp_path / "escrow.key"
    escrow_recipient = keys.write_identity(escrow, passphrase=None)
    rotator = kit.write_config("rotator", keys={"identity_file": str(kit.identity_file)})
    done = kit.drtool("keys", "rotate", "--add-recipient", escrow_recipient, config=rotator)
    assert done.returncode == 0, done.stderr

    recipients = list(layout.read_repo_info(kit.storage()).recipients)
    assert recipients[-1] == escrow_recipient and len(recipients) == 2
    kit.backup_config = kit.write_config("after-rotation", keys={"recipients": recipients})
    second = kit.backup_ok()
    details = kit.manifest(second).component("minio").details[kit.bucket]  # type: ignore[union-attr]
    assert details == {"uploaded": 0, "reused": attachments["uploaded"]}
    verified = kit.verify_all()
    assert verified.returncode == 0, verified.stdout + verified.stderr
    # the new snapshot's own objects were sealed for both recipients: the escrow key opens them
    dump = kit.storage().get_bytes(f"snapshots/{second}/postgres/dump.pgdump.zst.age")
    assert _decrypts(dump, escrow, "dump")


@pytest.mark.slow
def test_object_lock_keeps_the_old_versions_and_the_rotation_says_until_when(
    tmp_path: Path, s3_server: S3Endpoint
) -> None:
    """On an Object Lock bucket the old versions (old headers) stay: the removed key still
    opens them, the new versions carry the same retention, and the output names the date."""
    bucket = f"lock-{secrets.token_hex(6)}"
    admin = s3_client(s3_server)
    admin.create_bucket(Bucket=bucket, ObjectLockEnabledForBucket=True)
    kit = s3_kit(tmp_path, s3_server, bucket)
    kit.sections["repository"]["object_lock_mode"] = "GOVERNANCE"
    kit.config_file.write_text(tomli_w.dumps(kit.sections))
    kit.snapshot(T0, dump=b"PGDMP" + secrets.token_bytes(7 * MiB))  # the copy path too
    until = (datetime.now(UTC) + timedelta(days=2)).replace(microsecond=0)
    for key in _sealed_objects(kit):
        admin.put_object_retention(
            Bucket=bucket,
            Key=f"drtool/{key}",
            Retention={"Mode": "GOVERNANCE", "RetainUntilDate": until},
        )
    new_key, new_recipient = _new_identity(kit, "new.key")

    args = ("--add-recipient", new_recipient, "--remove-recipient", kit.recipient)
    killed = _rotate(kit, *args, DRTOOL_CRASH_AT="rotate-before-header")
    assert killed.returncode == 137, killed.stderr
    done = _rotate(kit)  # resumed: the date comes from the signed done records
    assert done.returncode == 0, done.stderr
    assert f"stay until {until.isoformat()}" in done.stdout, done.stdout
    for key in _sealed_objects(kit):
        versions = admin.list_object_versions(Bucket=bucket, Prefix=f"drtool/{key}")["Versions"]
        assert len(versions) == 2, key
        old = next(v for v in versions if not v["IsLatest"])
        raw = b"".join(kit.storage.get(key, version_id=old["VersionId"]))
        assert _decrypts(raw, kit.identity_file, key)  # the removed key: until the date
        assert _decrypts(kit.storage.get_bytes(key), new_key, key)
        assert not _decrypts(kit.storage.get_bytes(key), kit.identity_file, key)
        assert kit.storage.retention(key) == until  # the new version is locked as long


def test_a_header_rewrite_whose_result_differs_from_the_prediction_replaces_nothing(
    any_repo_kit: RepoKit,
) -> None:
    """The object changed between the read and the rewrite: the old object stays, whole."""
    kit = any_repo_kit
    snap = kit.snapshot(T0)
    key = snap.dump_key
    before = kit.storage.get_bytes(key)
    info = kit.storage.head(key)
    with pytest.raises(IntegrityError, match="changed while its header was rewritten"):
        kit.storage.rewrite_head(key, b"new header", 10, source=info, expect_sha256="0" * 64)
    assert kit.storage.get_bytes(key) == before


def test_a_wrong_identity_is_refused_before_anything_is_written(repo_kit: RepoKit) -> None:
    kit = repo_kit
    kit.snapshot(T0)
    stranger, _ = _new_identity(kit, "stranger.key")
    _, new_recipient = _new_identity(kit, "new.key")
    config = kit.write_config("stranger", identity_file=str(stranger))
    done = run_drtool("keys", "rotate", "--add-recipient", new_recipient, config=config)
    assert done.returncode == 12, done.stderr  # wrong or missing key
    assert "no identity matches" in done.stderr and "Traceback" not in done.stderr
    assert not [k for k in kit.keys_in_storage() if k.startswith("rotations/")]
