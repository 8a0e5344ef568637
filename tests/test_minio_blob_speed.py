"""The MinIO snapshot's fast path (issue 14 item 4, ADR 0035), against real SeaweedFS.

- An attachment that does not compress (JPEG, PNG, video: random-looking bytes) is stored as a
  zstd frame of raw blocks, no compressor run; one that compresses is compressed as before.
  Both open with the stock ``age -d | zstd -d`` and restore byte-identical; a damaged raw blob
  is still refused before anything is written.
- A blob put of a snapshot is not confirmed by a HEAD each: the commit's listing confirms its
  size and the ETag the PUT answered, so a blob stored other than sent is never committed.
- The restore fetches and decrypts each blob once when the scratch dir has room for all of
  them (the checked plaintext is kept for the uploads), and re-stages per upload when not.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from support.cli import run_drtool
from support.compare import bucket_objects
from support.fault_proxy import fault_proxy
from support.repo_kit import RepoKit, blob_id, make_repo_kit, s3_kit
from support.stacks import make_repository

from drtool.config import load_config
from drtool.endpoints import PostgresEndpoint, RedisEndpoint, S3Endpoint, StackEndpoints
from drtool.errors import IntegrityError
from drtool.pipeline.compress import FRAME_MAGIC, PROBE_SIZE, compress
from drtool.pipeline.header import SKIPPABLE_MAGIC
from drtool.repository import layout
from drtool.repository.access import storage_for
from drtool.repository.ids import new_id
from drtool.repository.manifest import ComponentEntry, Manifest
from drtool.s3session import s3_client
from drtool.services.restore.run import RestoreOptions, run_restore
from drtool.sources.minio import MinioStore
from drtool.storage.file import FileStorage
from drtool.storage.s3 import S3Storage
from drtool.stores.minio import restore as bucket_restore

JPEG = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + os.urandom(300_000)
TEXT = b"".join(b"line %d of a log that compresses well\n" % i for i in range(8000))


def _plain_frame(kit: RepoKit, key: str) -> bytes:
    """The object's plaintext as the stock ``age -d`` gives it: header frame + data frame."""
    return _age_decrypt(b"".join(kit.storage.get(key)), kit.identity_file)


def _age_decrypt(stored: bytes, identity: Path) -> bytes:
    done = subprocess.run(
        ["age", "-d", "-i", str(identity)], input=stored, capture_output=True, check=True
    )
    return done.stdout


def _block_types(frame: bytes) -> list[int]:
    """The type of each block of a zstd frame without dictionary (0 raw, 1 RLE, 2 compressed)."""
    assert frame[:4] == FRAME_MAGIC
    descriptor = frame[4]
    single_segment = (descriptor >> 5) & 1
    fcs = (0, 2, 4, 8)[descriptor >> 6] or single_segment
    pos, types = 5 + (0 if single_segment else 1) + (0, 1, 2, 4)[descriptor & 3] + fcs, []
    while True:
        header = int.from_bytes(frame[pos : pos + 3], "little")
        kind, size = (header >> 1) & 3, header >> 3
        types.append(kind)
        pos += 3 + (1 if kind == 1 else size)
        if header & 1:
            return types


def _data_frame(plain: bytes) -> bytes:
    """The zstd data frame after the inner header's skippable frame."""
    assert plain[:4] == SKIPPABLE_MAGIC
    return plain[8 + int.from_bytes(plain[4:8], "little") :]


def _stock_unzstd(frame: bytes) -> bytes:
    return subprocess.run(["zstd", "-d", "-c"], input=frame, capture_output=True, check=True).stdout


def test_an_incompressible_blob_is_stored_raw_a_compressible_one_compressed(
    s3_server: S3Endpoint, s3_bucket: str, tmp_path: Path
) -> None:
    kit = s3_kit(tmp_path, s3_server, s3_bucket)
    writer = kit.writer("unused")
    raw = writer.put_blob(blob_id(), [JPEG[:100_000], JPEG[100_000:]])
    packed = writer.put_blob(blob_id(), [TEXT])

    frame = _data_frame(_plain_frame(kit, raw.entry.key))
    assert frame[:4] == FRAME_MAGIC
    assert frame[4] == 0x00  # no content size, no checksum: written by drtool, not the compressor
    assert (frame[6] >> 1) & 3 == 0  # the first block is a raw block
    assert len(frame) < len(JPEG) + 20  # 3 bytes per 128 KiB block and a 6-byte header
    assert _stock_unzstd(frame) == JPEG
    assert (raw.plain_bytes, raw.plain_sha256) == (len(JPEG), hashlib.sha256(JPEG).hexdigest())

    frame = _data_frame(_plain_frame(kit, packed.entry.key))
    assert len(frame) < len(TEXT) // 5
    assert _stock_unzstd(frame) == TEXT


def test_the_probe_leaves_small_and_mixed_streams_correct() -> None:
    """Streams shorter than the probe, empty ones, and ones cut in odd pieces round-trip."""
    for data in (b"", b"x", os.urandom(PROBE_SIZE - 1), os.urandom(3 * 131072 + 5)):
        pieces = [data[i : i + 70_001] for i in range(0, len(data), 70_001)] or [b""]
        frame = b"".join(compress(pieces, probe=True))
        assert _stock_unzstd(frame) == data


def test_a_blob_stored_other_than_sent_is_not_committed(
    s3_server: S3Endpoint, s3_bucket: str, tmp_path: Path
) -> None:
    """No HEAD after a snapshot's blob put; the commit's listing compares size and ETag."""
    with fault_proxy(s3_server.endpoint_url) as proxy:
        endpoint = S3Endpoint(proxy.endpoint_url, s3_server.access_key, s3_server.secret_key)
        kit = make_repo_kit(tmp_path, f"s3://{s3_bucket}/drtool", endpoint)
        started = datetime(2026, 1, 5, 3, 0, tzinfo=UTC)
        snapshot_id = new_id(started)
        writer = kit.writer(snapshot_id)
        proxy.seen.clear()
        written = writer.put_blob(blob_id(), [JPEG], confirm=False)
        assert [m for m, _ in proxy.seen] == ["PUT"]  # no HEAD
        # the server now holds other bytes of the same size (a broken disk, a racing writer)
        full = f"drtool/{written.entry.key}"
        stored = s3_client(s3_server).get_object(Bucket=s3_bucket, Key=full)["Body"].read()
        s3_client(s3_server).put_object(Bucket=s3_bucket, Key=full, Body=stored[::-1])
        manifest = Manifest(
            repo_id=kit.info.repo_id,
            snapshot_id=snapshot_id,
            started=started.isoformat(timespec="seconds"),
            finished=(started + timedelta(minutes=1)).isoformat(timespec="seconds"),
            host="nas",
            stack="co-talk",
            drtool_version="0.1.0",
            components=(ComponentEntry("minio", (written.entry,), len(JPEG), 0.1),),
        )
        with pytest.raises(IntegrityError, match=r"differs from what was sent.*not committed"):
            writer.commit(manifest)
        assert not kit.storage.exists(layout.manifest_key(snapshot_id))


@pytest.mark.slow
def test_attachments_round_trip_raw_and_compressed_and_a_damaged_raw_blob_is_refused(
    pg_database: PostgresEndpoint,
    redis_server: RedisEndpoint,
    s3_server: S3Endpoint,
    s3_bucket: str,
    tmp_path: Path,
) -> None:
    client = s3_client(s3_server)
    client.put_object(Bucket=s3_bucket, Key="rooms/1/photo.jpg", Body=JPEG,
                      ContentType="image/jpeg", Metadata={"uploader": "7"})  # fmt: skip
    client.put_object(Bucket=s3_bucket, Key="rooms/1/log.txt", Body=TEXT, ContentType="text/plain")
    client.put_object(Bucket=s3_bucket, Key="rooms/1/empty", Body=b"")
    repo = make_repository(
        tmp_path / "repo", StackEndpoints(pg_database, redis_server, s3_server, (s3_bucket,))
    )
    repo.backup(components=("minio",))
    blobs = sorted((tmp_path / "repo" / "repository" / "blobs").rglob("*.zst.age"))
    sizes = sorted(p.stat().st_size for p in blobs)
    assert len(sizes) == 3
    assert sizes[1] < len(TEXT) // 5  # the log compressed
    photo = _data_frame(_age_decrypt(max(blobs, key=lambda p: p.stat().st_size).read_bytes(),
                                     repo.identity))  # fmt: skip
    assert set(_block_types(photo)) == {0}  # the photo stored raw: every block a raw block
    log = next(p for p in blobs if p.stat().st_size == sizes[1])
    assert 2 in _block_types(_data_frame(_age_decrypt(log.read_bytes(), repo.identity)))

    def restore(bucket: str) -> subprocess.CompletedProcess[str]:
        client.create_bucket(Bucket=bucket)
        target = StackEndpoints(pg_database, redis_server, s3_server, (bucket,))
        config = repo.operator_config(tmp_path / f"{bucket}.toml", {"t": target})
        return run_drtool("restore", "latest", "--target", "t", "--component", "minio",
                          "--yes", "--json", config=config)  # fmt: skip

    good = f"target-{uuid.uuid4().hex[:10]}"
    run = restore(good)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["ok"]
    assert bucket_objects(s3_server, good) == bucket_objects(s3_server, s3_bucket)

    raw_blob = max(blobs, key=lambda p: p.stat().st_size)
    data = bytearray(raw_blob.read_bytes())
    data[len(data) // 2] ^= 1
    raw_blob.write_bytes(bytes(data))
    bad = f"target-{uuid.uuid4().hex[:10]}"
    run = restore(bad)
    assert run.returncode == 5, run.stderr
    assert raw_blob.name.split(".")[0] in run.stderr
    assert bucket_objects(s3_server, bad) == {}  # nothing written


def _restore_counting_reads(
    endpoints: tuple[PostgresEndpoint, RedisEndpoint, S3Endpoint, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    *,
    objects: dict[str, bytes],
    scratch_dir: str = "",
    components: tuple[str, ...] = ("minio",),
) -> list[str]:
    """Back up ``objects``, restore the bucket into a new one; the blob reads it made.

    With ``postgres`` among ``components`` the database is restored over itself (``force``)."""
    pg, redis, s3, source = endpoints
    client = s3_client(s3)
    for key, body in objects.items():
        client.put_object(Bucket=source, Key=key, Body=body)
    repo = make_repository(tmp_path / "repo", StackEndpoints(pg, redis, s3, (source,)))
    snapshot_id = repo.backup(components=components)
    bucket = f"target-{uuid.uuid4().hex[:10]}"
    target = StackEndpoints(pg, redis, s3, (bucket,))
    cfg = load_config(repo.operator_config(tmp_path / "op.toml", {"t": target}), {})
    if scratch_dir:
        cfg = replace(cfg, backup=replace(cfg.backup, scratch_dir=scratch_dir))
    reads: list[str] = []
    real_get = FileStorage.get

    def counting_get(self: FileStorage, key: str, **kw: Any) -> Iterator[bytes]:
        if key.startswith(layout.BLOBS):
            reads.append(key)
        return real_get(self, key, **kw)

    monkeypatch.setattr(FileStorage, "get", counting_get)
    result = run_restore(
        cfg,
        home=tmp_path / "home",
        options=RestoreOptions(
            ref=snapshot_id, components=components, target="t", yes=True, force=True
        ),
        confirm=lambda r: True,
    )
    assert result.ok, result.components
    assert [c.name for c in result.components] == list(components)
    assert bucket_objects(s3, bucket) == bucket_objects(s3, source)
    return reads


def _fake_statvfs(monkeypatch: pytest.MonkeyPatch, free: int) -> None:
    """The restore's own scratch dir (``drtool-restore-*``) reports ``free`` bytes, 4 KiB
    blocks, plenty of inodes: what a fuller disk would say, the rest of the machine as is."""
    real = os.statvfs

    def statvfs(path: Any) -> os.statvfs_result:
        st = real(path)
        if "drtool-restore-" not in str(path):
            return st
        blocks = free // 4096
        figures = (4096, 4096, st.f_blocks, blocks, blocks, st.f_files, st.f_ffree, 10**6)
        return os.statvfs_result((*figures, st.f_flag, st.f_namemax))

    monkeypatch.setattr(os, "statvfs", statvfs)


PHOTOS = {f"rooms/{i}/photo.jpg": JPEG[i:] for i in range(4)}


@pytest.mark.slow
@pytest.mark.parametrize("room", [True, False], ids=["room", "no-room"])
def test_the_restore_reads_each_blob_once_when_the_scratch_dir_has_room(
    pg_database: PostgresEndpoint,
    redis_server: RedisEndpoint,
    s3_server: S3Endpoint,
    s3_bucket: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    room: bool,
) -> None:
    """Blob reads from the repository: one per blob with room (the checked plaintext is kept
    for the uploads), two without (the check pass, then each upload's own staging)."""
    if not room:
        monkeypatch.setattr(bucket_restore, "SCRATCH_RESERVE", 1 << 60)
    endpoints = (pg_database, redis_server, s3_server, s3_bucket)
    reads = _restore_counting_reads(endpoints, tmp_path, monkeypatch, objects=PHOTOS)
    assert len(set(reads)) == 4
    assert len(reads) == (4 if room else 8)


@pytest.mark.slow
def test_the_restore_keeps_no_plaintext_when_the_disk_has_room_for_it_only_once(
    pg_database: PostgresEndpoint,
    redis_server: RedisEndpoint,
    s3_server: S3Endpoint,
    s3_bucket: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Free space for the bucket plus the reserve, but not twice the bucket (the target's
    MinIO data may share that disk): the per-object path (8 reads), not keeping (the old
    decision kept it: 4 reads, and a one-host restore could then fill the disk halfway)."""
    bucket_bytes = sum(len(body) for body in PHOTOS.values())
    _fake_statvfs(monkeypatch, bucket_restore.SCRATCH_RESERVE + bucket_bytes * 3 // 2)
    endpoints = (pg_database, redis_server, s3_server, s3_bucket)
    reads = _restore_counting_reads(endpoints, tmp_path, monkeypatch, objects=PHOTOS)
    assert len(reads) == 8


@pytest.mark.slow
def test_the_restore_keeps_no_plaintext_where_the_other_stores_need_the_room(
    pg_database: PostgresEndpoint,
    redis_server: RedisEndpoint,
    s3_server: S3Endpoint,
    s3_bucket: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Free space exactly twice the kept bucket (in 4 KiB blocks) plus the reserve: enough for
    a MinIO-only restore (kept, 4 reads), not for one that also restores PostgreSQL, whose
    dump the decision must leave room for (the per-object path, 8 reads)."""
    kept = sum(-(-len(body) // 4096) * 4096 for body in PHOTOS.values())
    _fake_statvfs(monkeypatch, bucket_restore.SCRATCH_RESERVE + 2 * kept)
    endpoints = (pg_database, redis_server, s3_server, s3_bucket)
    alone = _restore_counting_reads(endpoints, tmp_path / "alone", monkeypatch, objects=PHOTOS)
    assert len(alone) == 4
    with_pg = _restore_counting_reads(
        endpoints, tmp_path / "pg", monkeypatch, objects={}, components=("postgres", "minio")
    )
    assert len(with_pg) == 8


@pytest.mark.slow
def test_the_restore_keeps_no_plaintext_on_tmpfs(
    pg_database: PostgresEndpoint,
    redis_server: RedisEndpoint,
    s3_server: S3Endpoint,
    s3_bucket: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """backup.scratch_dir on a real tmpfs (/dev/shm): RAM beside the live stack, so each
    upload stages its blob again (8 reads) however much it reports free."""
    if bucket_restore.mount_type(Path("/dev/shm")) != "tmpfs":
        pytest.skip("/dev/shm is not a tmpfs on this machine")
    scratch = Path("/dev/shm") / f"drtool-test-{uuid.uuid4().hex[:8]}"
    scratch.mkdir()
    try:
        endpoints = (pg_database, redis_server, s3_server, s3_bucket)
        reads = _restore_counting_reads(
            endpoints, tmp_path, monkeypatch, objects=PHOTOS, scratch_dir=str(scratch)
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    assert len(reads) == 8


@pytest.mark.slow
def test_each_kept_plaintext_is_removed_after_the_last_object_using_it_is_put(
    pg_database: PostgresEndpoint,
    redis_server: RedisEndpoint,
    s3_server: S3Endpoint,
    s3_bucket: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The scratch dir seen at each upload: 8 distinct blobs on 4 workers, so by the last
    upload at least 4 were put and their files gone (the old code kept all 8 to the end)."""
    objects = {f"rooms/{i}/photo.jpg": JPEG[i:] for i in range(8)}
    seen: list[tuple[str, int]] = []
    real_upload = MinioStore.upload

    def watching_upload(self: MinioStore, bucket: str, key: str, path: Path, meta: Any) -> None:
        assert path.exists(), key
        if path.name.startswith("blob-"):
            seen.append((key, len(list(path.parent.glob("blob-*")))))
        real_upload(self, bucket, key, path, meta)

    monkeypatch.setattr(MinioStore, "upload", watching_upload)
    endpoints = (pg_database, redis_server, s3_server, s3_bucket)
    reads = _restore_counting_reads(endpoints, tmp_path, monkeypatch, objects=objects)
    assert len(reads) == 8  # kept: each blob read once
    assert len(seen) == 8  # every object put from a kept file
    assert seen[-1][1] <= 4  # at most 4 in flight: the others' files are gone


def test_the_keep_decision_counts_blocks_inodes_the_other_stores_and_refuses_ram() -> None:
    """keep_decision on statvfs figures: each file in whole blocks, inodes, the other stores'
    scratch bytes, twice the bucket plus the reserve; never tmpfs/ramfs."""
    reserve = bucket_restore.SCRATCH_RESERVE
    sizes = [1] * 1000  # 1,000 one-byte blobs take 1,000 blocks of 4 KiB
    fits = bucket_restore.ScratchFigures(reserve + 2 * 4096 * 1000, 4096, 10**6, "ext4")
    assert bucket_restore.keep_decision(fits, sizes, 0) == ""
    short = replace(fits, free=fits.free - 1)
    assert "bytes free" in bucket_restore.keep_decision(short, sizes, 0)
    assert "bytes free" in bucket_restore.keep_decision(fits, sizes, 1)  # another store's byte
    few_inodes = replace(fits, inodes=1000 + bucket_restore.INODE_RESERVE - 1)
    assert "inodes" in bucket_restore.keep_decision(few_inodes, sizes, 0)
    # btrfs and vfat report no inodes at all (f_files == 0): nothing to check, not "0 free"
    no_table = replace(fits, inodes=0, total_inodes=0)
    assert bucket_restore.keep_decision(no_table, sizes, 0) == ""
    assert "bytes free" in bucket_restore.keep_decision(replace(no_table, free=0), sizes, 0)
    assert "inodes" in bucket_restore.keep_decision(replace(fits, inodes=0), sizes, 0)
    for ram in ("tmpfs", "ramfs"):
        assert ram in bucket_restore.keep_decision(replace(fits, fs_type=ram), sizes, 0)
    assert bucket_restore.mount_type(Path("/proc/self")) == "proc"  # read from /proc/mounts


@pytest.mark.parametrize("workers", [0, 65])
def test_minio_workers_out_of_bounds_is_a_config_error(
    pg_database: PostgresEndpoint,
    redis_server: RedisEndpoint,
    s3_server: S3Endpoint,
    s3_bucket: str,
    tmp_path: Path,
    workers: int,
) -> None:
    """Checked when the config is loaded (1..64), by any command, not only at backup start."""
    repo = make_repository(
        tmp_path / "repo", StackEndpoints(pg_database, redis_server, s3_server, (s3_bucket,))
    )
    text = repo.backup_config.read_text()
    assert text.rstrip().splitlines()[-1].startswith("state_dir")  # [backup] is the last table
    repo.backup_config.write_text(text + f"minio_workers = {workers}\n")
    for command in (("backup", "--component", "minio"), ("list",)):
        run = run_drtool(*command, config=repo.backup_config)
        assert run.returncode == 2, run.stderr
        assert f"backup.minio_workers: must be 1 to 64 (got {workers})" in run.stderr
        assert "Traceback" not in run.stderr
        assert len(run.stderr.strip().splitlines()) == 1


def test_the_repository_client_pools_a_connection_per_minio_worker_part(
    s3_server: S3Endpoint, s3_bucket: str, tmp_path: Path
) -> None:
    """backup.minio_workers sizes the repository's S3 client pool (it was max(10, parts + 2)),
    so the workers' parallel blob puts do not discard and reopen connections."""
    kit = s3_kit(tmp_path, s3_server, s3_bucket)
    cfg = kit.config()
    for workers in (8, 32):
        cfg = replace(cfg, backup=replace(cfg.backup, minio_workers=workers))
        storage = storage_for(cfg)
        assert isinstance(storage, S3Storage)
        pool = storage._client.meta.config.max_pool_connections  # type: ignore[attr-defined]
        assert pool == workers * storage.options.max_concurrency + 2


@pytest.mark.slow
def test_a_killed_restores_scratch_dir_is_swept_by_the_next_restore(
    pg_database: PostgresEndpoint,
    redis_server: RedisEndpoint,
    s3_server: S3Endpoint,
    s3_bucket: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A restore SIGKILLed with a bucket's plaintext in its scratch dir: the next restore
    removes that dir (its owner pid is dead) and logs it; a running restore's dir, one without
    an owner file and one from another pid namespace stay."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from drtool.stores.stage import owned_scratch\n"
        "with owned_scratch(Path(sys.argv[1])) as d:\n"
        "    (d / 'blob-0').write_bytes(b'plaintext' * 1000)\n"
        "    print(d, flush=True)\n"
        "    time.sleep(600)\n"
    )
    killed = subprocess.Popen(
        [sys.executable, "-c", code, str(scratch)], stdout=subprocess.PIPE, text=True
    )
    assert killed.stdout is not None
    left = Path(killed.stdout.readline().strip())
    killed.kill()
    killed.wait()
    assert (left / "blob-0").exists()  # SIGKILL: no cleanup ran
    running = scratch / "drtool-restore-running"
    running.mkdir()
    (running / "owner").write_text((left / "owner").read_text().replace(
        str(killed.pid), str(os.getpid())))  # fmt: skip
    unowned = scratch / "drtool-restore-unowned"
    unowned.mkdir()
    foreign = scratch / "drtool-restore-foreign"
    foreign.mkdir()
    (foreign / "owner").write_text(f"{killed.pid} pid:[1]\n")
    caplog.set_level(logging.WARNING)
    endpoints = (pg_database, redis_server, s3_server, s3_bucket)
    _restore_counting_reads(endpoints, tmp_path, monkeypatch, objects=PHOTOS,
                            scratch_dir=str(scratch))  # fmt: skip
    assert not left.exists()
    assert running.exists() and unowned.exists() and foreign.exists()
    assert sorted(p.name for p in scratch.iterdir()) == sorted(
        ["drtool-restore-running", "drtool-restore-unowned", "drtool-restore-foreign"]
    )  # the restore's own dir removed after it
    assert f"removed scratch dir {left}" in caplog.text


def _killed_owner(scratch: Path, *, keep: str = "") -> Path:
    """The scratch dir of a real process that made it with owned_scratch (and wrote ``keep``
    there), then was SIGKILLed: no cleanup ran."""
    code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from drtool.stores.stage import owned_scratch\n"
        "with owned_scratch(Path(sys.argv[1])) as d:\n"
        "    (d / 'blob-0').write_bytes(b'plaintext' * 1000)\n"
        "    if sys.argv[2]:\n"
        "        (d / sys.argv[2]).write_bytes(b'the only copy')\n"
        "    print(d, flush=True)\n"
        "    time.sleep(600)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(scratch), keep], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    left = Path(proc.stdout.readline().strip())
    proc.kill()
    proc.wait()
    proc.stdout.close()
    return left


def test_a_gone_restores_dir_holding_kept_data_is_not_swept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An older drtool kept a Redis container's previous data file (``*pre_restore*``) in its
    scratch dir: the sweep leaves such a dir, and says why, where it removed it before."""
    from drtool.stores.stage import sweep_stale

    caplog.set_level(logging.WARNING)
    kept = _killed_owner(tmp_path, keep="dump.rdb.pre_restore_20260101_000000.tar")
    plain = _killed_owner(tmp_path)
    assert sweep_stale(tmp_path) == [plain]
    assert (kept / "dump.rdb.pre_restore_20260101_000000.tar").read_bytes() == b"the only copy"
    assert "holds kept data (dump.rdb.pre_restore_20260101_000000.tar)" in caplog.text


def test_a_live_restores_dir_is_not_swept_even_when_its_pid_looks_dead(tmp_path: Path) -> None:
    """A pid (and a namespace inode, equal in every host's initial namespace) is ambiguous on
    a scratch dir shared between hosts: another host's live restore would look dead. Its
    flock on the owner file is not: a dir whose owner file names a dead pid but is still held
    by a live process stays, and goes once that process is gone (the kernel drops the lock).
    Also swept only for this host and boot."""
    from drtool.stores.stage import OWNER_FILE, sweep_stale

    code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from drtool.stores.stage import owned_scratch\n"
        "with owned_scratch(Path(sys.argv[1])) as d:\n"
        "    print(d, flush=True)\n"
        "    time.sleep(600)\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None
        live = Path(holder.stdout.readline().strip())
        dead = subprocess.Popen(["true"])
        dead.wait()
        owner = live / OWNER_FILE
        fields = owner.read_text().split()
        assert len(fields) == 4 and fields[0] == str(holder.pid)
        owner.write_text(" ".join([str(dead.pid), *fields[1:]]) + "\n")  # same file, lock held
        assert sweep_stale(tmp_path) == [] and live.exists()
        other = _killed_owner(tmp_path)  # dead and unlocked, but another host's or boot's
        mine = (other / OWNER_FILE).read_text().split()
        for i in (2, 3):
            theirs = [*mine[:i], "elsewhere", *mine[i + 1 :]]
            (other / OWNER_FILE).write_text(" ".join(theirs) + "\n")
            assert sweep_stale(tmp_path) == [] and other.exists()
        holder.kill()
        holder.wait()
        assert sweep_stale(tmp_path) == [live]
    finally:
        holder.kill()
        holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()
