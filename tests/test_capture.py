"""Continuous attachment capture against real PostgreSQL, S3 (SeaweedFS) and a file
repository: rows followed by id (late commits included), the bucket never listed, nothing
uploaded twice, the chain verified key-less, captured blobs kept by prune and reused by the
next MinIO backup, and the bucket as it was at a moment restored after a source deletion.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import signal
import threading
import time
import tomllib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
import tomli_w
from support.cli import run_drtool, start_drtool
from support.stacks import Repository, make_repository, source_stack, stack_sections

from chat_stack.seed import SeedSizes
from drtool import keys
from drtool.capture import chain as capture_chain
from drtool.capture.at import bucket_at, restore_bucket_at
from drtool.capture.cache import append_captured, captured_path, read_captured, read_tail
from drtool.capture.capturer import Capturer
from drtool.capture.state import load_state
from drtool.config import CaptureConfig, load_config
from drtool.endpoints import PostgresEndpoint, S3Endpoint, StackEndpoints
from drtool.errors import DrtoolError, WrongKey
from drtool.pipeline.age import decrypt
from drtool.repository import retention
from drtool.repository.access import Repo, open_repo, read_object
from drtool.repository.layout import blob_key
from drtool.repository.minio_index import IndexEntry
from drtool.s3session import s3_client
from drtool.services.capture import build_capturer, run_capture
from drtool.services.prune import plan_prune
from drtool.services.repo_setup import set_up_repository
from drtool.sources.minio import MinioStore

TINY = SeedSizes(users=5, rooms=2, messages=40, attachments=3)
WAIT_S = 60.0


@dataclass
class Kit:
    """A seeded source stack, a repository backing it up, and a restore-side config."""

    stack: StackEndpoints
    repository: Repository
    operator: Path
    tmp: Path

    @property
    def bucket(self) -> str:
        return self.stack.buckets[0]

    def cfg(self) -> Any:
        return load_config(self.repository.backup_config, {})

    def capturer(self, **kw: Any) -> Capturer:
        return build_capturer(self.cfg(), self.repository.directory, **kw)

    def repo(self) -> Repo:
        return open_repo(load_config(self.operator, {}))

    def identities(self) -> list[str]:
        return keys.load_identities(self.repository.identity, None)

    def blob_files(self) -> set[str]:
        return {o.key for o in self.repo().storage.list("blobs/")}

    def connect(self) -> psycopg.Connection[Any]:
        return psycopg.connect(**self.stack.postgres.connect_kwargs())


@pytest.fixture
def kit(tmp_path: Path, pg_server: PostgresEndpoint, s3_server: S3Endpoint) -> Iterator[Kit]:
    with source_stack(tmp_path / "src", pg_server, s3_server, TINY) as stack:
        repository = make_repository(tmp_path / "bk", stack)
        operator = repository.operator_config(tmp_path / "op" / "drtool.toml")
        yield Kit(stack, repository, operator, tmp_path)


@pytest.fixture(params=["file", "s3"])
def any_kit(request: pytest.FixtureRequest, kit: Kit, s3_server: S3Endpoint) -> Kit:
    """``kit``, its repository on a file:// directory or in an S3 bucket."""
    if request.param == "file":
        return kit
    bucket = f"repo-{uuid.uuid4().hex[:10]}"
    s3_client(s3_server).create_bucket(Bucket=bucket)
    secrets = kit.tmp / "s3repo-secrets"
    secrets.mkdir(mode=0o700)
    (secrets / "ak").write_text(s3_server.access_key)
    (secrets / "sk").write_text(s3_server.secret_key)
    directory = kit.tmp / "s3repo"
    setup = set_up_repository(
        directory,
        {
            "url": f"s3://{bucket}/drtool",
            "endpoint_url": s3_server.endpoint_url,
            "access_key_file": str(secrets / "ak"),
            "secret_key_file": str(secrets / "sk"),
        },
        stores=stack_sections(kit.stack, directory / "secrets"),
        state_dir=directory / "state",
    )
    repository = Repository(
        directory, kit.stack, setup.keys.identity_file, setup.keys.verify_key, setup.backup_config
    )
    return Kit(kit.stack, repository, setup.operator_config, kit.tmp)


def put_object(kit: Kit, key: str, data: bytes, meta: dict[str, str] | None = None) -> None:
    s3_client(kit.stack.minio).put_object(
        Bucket=kit.bucket,
        Key=key,
        Body=data,
        ContentType="image/png",
        Metadata=meta or {"origin": "test"},
    )


def insert_row(conn: psycopg.Connection[Any], key: str, data: bytes) -> int:
    """An attachment row for ``key`` on an existing message (not committed here)."""
    with conn.cursor() as cur:
        cur.execute(
            "INSERT INTO attachments (room_id, message_id, message_created_at, uploader_id, "
            "object_key, original_filename, size_bytes, sha256, content_type, created_at) "
            "SELECT room_id, id, created_at, sender_id, %s, 'f.png', %s, %s, 'image/png', now() "
            "FROM messages ORDER BY id LIMIT 1 RETURNING id",
            (key, len(data), hashlib.sha256(data).hexdigest()),
        )
        row = cur.fetchone()
    assert row is not None
    return int(row[0])


def add_attachment(kit: Kit, key: str | None = None, size: int = 3000) -> tuple[str, bytes]:
    """An object and its committed row."""
    key = key or f"att/{uuid.uuid4().hex}.png"
    data = uuid.uuid4().bytes * (size // 16)
    put_object(kit, key, data)
    with kit.connect() as conn:
        insert_row(conn, key, data)
    return key, data


def journaled(kit: Kit) -> dict[str, capture_chain.Captured]:
    """Every journal entry (decrypted with the identity), newest per key."""
    repo, identities = kit.repo(), kit.identities()
    found = capture_chain.load_chain(repo.storage, repo.verify_keys, repo.info.repo_id)
    assert found.problems == []
    out: dict[str, capture_chain.Captured] = {}
    for _, record in found.records:
        header = capture_chain.journal_header(repo.info.repo_id, record.seq)
        data = read_object(
            repo, record.journal.entry(capture_chain.JOURNAL_KIND), header, identities
        )
        for e in capture_chain.decode_journal(data, name=record.journal.key):
            out[e.key] = e
    return out


def count_s3_calls(store: MinioStore) -> list[str]:
    """The S3 operations ``store`` sends from now on, by name (a botocore event hook)."""
    calls: list[str] = []

    def seen(model: Any, **_: Any) -> None:
        calls.append(model.name)

    store._s3.meta.events.register("before-call.s3", seen)
    return calls


def test_late_commits_below_captured_ids_are_not_missed_and_the_bucket_is_never_listed(
    kit: Kit,
) -> None:
    capturer = kit.capturer()
    calls = count_s3_calls(capturer.store)
    with kit.connect() as conn:
        capturer.run_round(conn)  # first run: starts at the newest id
    start = load_state(capturer.state_file()).high
    assert start is not None
    # three writers hold their inserts open; a fourth commits a higher id first
    held = [kit.connect() for _ in range(3)]
    late: dict[int, tuple[str, bytes]] = {}
    for conn in held:
        key, data = f"late/{uuid.uuid4().hex}.png", uuid.uuid4().bytes * 100
        put_object(kit, key, data)
        late[insert_row(conn, key, data)] = (key, data)
    early_key, _ = add_attachment(kit)
    with kit.connect() as conn:
        first = capturer.run_round(conn)
    assert first.captured == 1
    state = load_state(capturer.state_file())
    assert set(state.missing) == set(late)  # every open id is owed, none forgotten
    assert all(i < (state.high or 0) for i in late)
    for conn in held[:2]:  # two commit late, one rolls back
        conn.commit()
        conn.close()
    held[2].rollback()
    held[2].close()
    with kit.connect() as conn:
        second = capturer.run_round(conn)
    assert second.captured == 2
    found = journaled(kit)
    committed = [late[i][0] for i in sorted(late)[:2]]
    assert set(found) == {early_key, *committed}
    for i in sorted(late)[:2]:
        key, data = late[i]
        assert found[key].sha256 == hashlib.sha256(data).hexdigest()
        assert found[key].metadata == {"origin": "test"}
    # the rolled-back id is still owed until the gap timeout drops it
    assert set(load_state(capturer.state_file()).missing) == {sorted(late)[2]}
    with kit.connect() as conn:
        later = capturer.run_round(conn, now=datetime.now(UTC) + timedelta(hours=2))
    assert later.captured == 0
    final = load_state(capturer.state_file())
    assert final.missing == {} and final.gaps_dropped == 1
    assert not any(c.startswith("List") for c in calls), calls
    assert set(calls) <= {"HeadObject", "GetObject"}


class CountedStop(threading.Event):
    """A stop event that records each wait asked for (never sleeps) and stops after ``n``."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n, self.waits = n, list[float | None]()

    def wait(self, timeout: float | None = None) -> bool:
        self.waits.append(timeout)
        return len(self.waits) >= self.n


def test_rounds_start_every_interval_however_long_a_round_takes(kit: Kit) -> None:
    # the clock is read at a round's start and before the wait: the first round "takes"
    # 45 s, the second 90 s (longer than the 60 s interval); the rounds themselves are real
    ticks = iter([100.0, 145.0, 200.0, 290.0])
    stop = CountedStop(2)
    assert kit.cfg().capture.interval_s == 60
    run_capture(
        kit.cfg(), kit.repository.directory, once=False, stop=stop, clock=lambda: next(ticks)
    )
    assert stop.waits == [15.0, 0.0]  # not a whole interval after each round
    assert load_state(kit.capturer().state_file()).last_round


def test_an_object_not_yet_uploaded_is_captured_when_it_appears(kit: Kit) -> None:
    capturer = kit.capturer()
    with kit.connect() as conn:
        capturer.run_round(conn)
    key, data = f"slow/{uuid.uuid4().hex}.png", b"x" * 5000
    with kit.connect() as conn:
        insert_row(conn, key, data)  # the row commits before the object is uploaded
    with kit.connect() as conn:
        assert capturer.run_round(conn).absent == 1
    put_object(kit, key, data)
    never = f"never/{uuid.uuid4().hex}.png"
    with kit.connect() as conn:
        never_id = insert_row(conn, never, data)  # its object is never uploaded
    with kit.connect() as conn:
        assert capturer.run_round(conn).captured == 1
    assert journaled(kit)[key].size == 5000
    assert set(load_state(capturer.state_file()).absent) == {never_id}
    with kit.connect() as conn:
        late = capturer.run_round(conn, now=datetime.now(UTC) + timedelta(hours=2))
    assert late.lost == [never_id] and late.problems
    state = load_state(capturer.state_file())
    assert state.absent == {} and state.objects_lost == 1


def test_a_round_killed_before_its_commit_is_redone_without_a_second_upload(
    any_kit: Kit, monkeypatch: pytest.MonkeyPatch
) -> None:
    kit = any_kit
    capturer = kit.capturer(from_start=True)
    keys_added = [add_attachment(kit)[0] for _ in range(3)]

    def crash(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt("killed before the chain record")

    monkeypatch.setattr(capture_chain, "append_record", crash)
    with kit.connect() as conn, pytest.raises(KeyboardInterrupt):
        capturer.run_round(conn)
    uploaded = kit.blob_files()
    assert len(uploaded) == TINY.attachments + 3
    monkeypatch.undo()
    capturer = kit.capturer(from_start=True)
    with kit.connect() as conn:
        again = capturer.run_round(conn)
    assert (again.uploaded, again.reused) == (0, TINY.attachments + 3)
    assert kit.blob_files() == uploaded
    assert set(keys_added) <= set(journaled(kit))


def journal_of_last_record(kit: Kit) -> list[capture_chain.Captured]:
    """The entries of the chain's newest journal, in their stored order."""
    repo = kit.repo()
    found = capture_chain.load_chain(repo.storage, repo.verify_keys, repo.info.repo_id)
    assert found.problems == [] and found.records
    record = found.records[-1][1]
    header = capture_chain.journal_header(repo.info.repo_id, record.seq)
    data = read_object(
        repo, record.journal.entry(capture_chain.JOURNAL_KIND), header, kit.identities()
    )
    return capture_chain.decode_journal(data, name=record.journal.key)


def rows_by_id(kit: Kit) -> list[tuple[str, str]]:
    """(object key, sha256) of every attachment row, by id (the order a round reads them)."""
    with kit.connect() as conn:
        return [
            (k, h)
            for k, h in conn.execute("SELECT object_key, sha256 FROM attachments ORDER BY id")
        ]


def test_a_round_reads_its_objects_at_once_and_journals_them_in_row_order(kit: Kit) -> None:
    for _ in range(6):
        add_attachment(kit)
    capturer = kit.capturer(from_start=True)
    assert capturer.workers == 4  # the default
    second_get, gets, together = threading.Event(), list[str](), list[bool]()

    def get_started(**_: Any) -> None:
        # the first GET waits (at most 30 s) for a second one to start while it is in flight:
        # one object at a time, the second never starts before the first is sealed
        gets.append("GetObject")
        if len(gets) == 1:
            together.append(second_get.wait(30))
        else:
            second_get.set()

    capturer.store._s3.meta.events.register("before-call.s3.GetObject", get_started)
    with kit.connect() as conn:
        result = capturer.run_round(conn)
    assert together == [True], "the round's objects were read one at a time"
    expected = rows_by_id(kit)
    assert (result.captured, result.uploaded) == (len(expected), len(expected))
    entries = journal_of_last_record(kit)
    # what one object at a time journals: every row once, in row order, its bytes' sha256
    assert [(e.key, e.sha256) for e in entries] == expected
    assert len({e.blob for e in entries}) == len(expected) == len(kit.blob_files())


def test_one_object_failing_mid_round_ends_the_round_and_its_redo_uploads_the_rest_once(
    kit: Kit,
) -> None:
    from botocore.exceptions import EndpointConnectionError

    for _ in range(10):
        add_attachment(kit)
    failing = rows_by_id(kit)[0][0]  # the round's first object: the rest mostly not started
    capturer = kit.capturer(from_start=True)

    def fail_one(params: dict[str, Any], **_: Any) -> None:
        if params.get("Key") == failing:
            raise EndpointConnectionError(endpoint_url="http://127.0.0.1:1")

    capturer.store._s3.meta.events.register("before-parameter-build.s3.GetObject", fail_one)
    with kit.connect() as conn, pytest.raises(DrtoolError) as failed:
        capturer.run_round(conn)
    assert failing in str(failed.value) and "\n" not in str(failed.value)
    assert load_state(capturer.state_file()).high is None  # the round committed nothing
    assert capture_chain.load_chain(kit.repo().storage, [], kit.repo().info.repo_id).last_seq == 0
    stored = kit.blob_files()  # the objects read before and beside the failing one
    assert len(stored) < len(rows_by_id(kit))
    capturer.store._s3.meta.events.unregister("before-parameter-build.s3.GetObject", fail_one)
    with kit.connect() as conn:
        again = capturer.run_round(conn)
    assert (again.captured, again.reused) == (len(rows_by_id(kit)), len(stored))
    assert len(kit.blob_files()) == len(rows_by_id(kit))  # each object stored once
    assert [e.key for e in journal_of_last_record(kit)] == [k for k, _ in rows_by_id(kit)]
    none = {"DRTOOL_CAPTURE_WORKERS": "0"}
    cfg, home = kit.repository.backup_config, kit.repository.directory
    bad = run_drtool("capture", "run", "--once", config=cfg, home=home, extra_env=none)
    assert bad.returncode == 2 and "capture.workers: must be >= 1 (got 0)" in bad.stderr
    assert "Traceback" not in bad.stderr


@pytest.mark.slow
def test_capture_run_killed_and_restarted_neither_misses_nor_journals_twice(kit: Kit) -> None:
    env = {"DRTOOL_CAPTURE_INTERVAL_S": "0.2"}
    args = ("capture", "run")
    cfg, home = kit.repository.backup_config, kit.repository.directory
    state_file = kit.capturer().state_file()

    def wait_captured(n: int) -> None:
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            if state_file.exists() and load_state(state_file).captured >= n:
                return
            time.sleep(0.1)
        raise AssertionError(f"fewer than {n} captured")

    proc = start_drtool(*args, "--from-start", config=cfg, home=home, extra_env=env)
    wait_captured(TINY.attachments)
    for _ in range(4):
        add_attachment(kit)
    proc.send_signal(signal.SIGKILL)  # wherever the round is
    proc.wait(timeout=30)
    for _ in range(3):
        add_attachment(kit)
    proc = start_drtool(*args, config=cfg, home=home, extra_env=env)
    try:
        wait_captured(TINY.attachments + 7)
    finally:
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    objects = list(MinioStore(kit.stack.minio).list_objects(kit.bucket))
    assert len(objects) == TINY.attachments + 7
    entries = journaled(kit)
    assert set(entries) == {o.key for o in objects}
    # each object journaled with one stored blob; a kill between a blob's upload and its
    # cache line may leave up to capture.workers unreferenced extras (garbage prune removes)
    referenced = {blob_key(e.blob) for e in entries.values()}
    stored = kit.blob_files()
    assert len(referenced) == len(objects) and referenced <= stored
    assert len(stored - referenced) <= CaptureConfig().workers
    done = run_drtool("capture", "status", "--json", config=cfg, home=home)
    assert done.returncode == 0 and '"missing": 0' in done.stdout
    human = run_drtool("capture", "status", config=cfg, home=home)
    assert human.returncode == 0 and "0 ids not committed yet" in human.stdout
    assert f"captured {TINY.attachments + 7} objects" in human.stdout


def test_the_next_minio_backup_reuses_captured_blobs_and_prune_keeps_them(kit: Kit) -> None:
    capturer = kit.capturer(from_start=True)
    with kit.connect() as conn:
        capturer.run_round(conn)
    captured = kit.blob_files()
    assert len(captured) == TINY.attachments
    # no snapshot references them yet: prune (grace passed) must still keep them
    repo = kit.repo()
    far = datetime.now(UTC) + timedelta(days=30)
    plan = plan_prune(repo, retention.Policy(last=1), far)
    assert not set(plan.garbage) & captured
    assert set(plan.garbage) == set()
    kit.repository.backup(components=("minio",))
    assert kit.blob_files() == captured  # the snapshot uploaded nothing again
    path = captured_path(kit.repository.directory / "state", repo.info.repo_id, kit.bucket)
    assert len(read_captured(path)) == TINY.attachments
    key, _ = add_attachment(kit)
    with kit.connect() as conn:
        capturer.run_round(conn)  # the snapshot took the earlier ones over: dropped here
    assert set(read_captured(path)) == {key}
    kit.repository.backup(components=("minio",))
    assert len(kit.blob_files()) == TINY.attachments + 1  # the new one captured, not again


@pytest.mark.slow
def test_capture_verify_names_a_removed_record_and_a_damaged_blob(kit: Kit) -> None:
    cfg, home = kit.repository.backup_config, kit.repository.directory
    capturer = kit.capturer()
    with kit.connect() as conn:
        capturer.run_round(conn)
        for _ in range(2):
            add_attachment(kit)
            capturer.run_round(conn)
    root = kit.repository.directory / "repository"
    ok = run_drtool("capture", "verify", config=cfg, home=home)
    assert ok.returncode == 0, ok.stderr
    full = run_drtool("capture", "verify", "--read-data", config=kit.operator, home=home)
    assert full.returncode == 0, full.stderr
    blob = root / sorted(kit.blob_files())[0]
    raw = bytearray(blob.read_bytes())
    raw[len(raw) // 2] ^= 1
    blob.write_bytes(bytes(raw))
    bad = run_drtool("capture", "verify", config=cfg, home=home)
    assert bad.returncode == 5 and blob.name in bad.stdout + bad.stderr
    (root / capture_chain.chain_key(1)).unlink()
    gone = run_drtool("capture", "verify", config=cfg, home=home)
    assert gone.returncode == 5
    assert "capture chain record 2 found where 1 was expected" in gone.stdout
    refused = run_drtool("capture", "run", "--once", config=cfg, home=home)
    assert refused.returncode == 5 and "nothing appended" in refused.stderr
    off = {"DRTOOL_CAPTURE_ENABLED": "false"}
    skipped = run_drtool("capture", "run", "--once", config=cfg, home=home, extra_env=off)
    assert skipped.returncode == 0 and "capture.enabled = false" in skipped.stderr


def test_bucket_at_restores_an_object_deleted_from_the_source_after_its_capture(
    any_kit: Kit, s3_server: S3Endpoint
) -> None:
    kit = any_kit
    kit.repository.backup(components=("minio",))
    capturer = kit.capturer()
    with kit.connect() as conn:
        capturer.run_round(conn)
    key, data = add_attachment(kit)
    with kit.connect() as conn:
        assert capturer.run_round(conn).captured == 1
    moment = datetime.now(UTC)
    MinioStore(kit.stack.minio).delete(kit.bucket, key)
    repo, identities = kit.repo(), kit.identities()
    state = bucket_at(repo, identities, kit.bucket, moment)
    assert key in {e.key for e in state.entries} and state.from_journal == 1

    target = f"at-{uuid.uuid4().hex[:10]}"
    (kit.tmp / "work").mkdir()
    store = MinioStore(dataclasses.replace(s3_server))
    outcome, problems = restore_bucket_at(repo, identities, state, store, target, kit.tmp / "work")
    assert problems == [] and outcome.uploaded == TINY.attachments + 1
    meta, stream = store.read(target, key)
    assert b"".join(stream) == data
    assert (meta.content_type, meta.metadata) == ("image/png", {"origin": "test"})


@pytest.mark.slow
def test_concurrent_writers_committing_late_lose_no_row(kit: Kit) -> None:
    """Writers that hold their insert open for a random while, as rounds run back to back."""
    capturer = kit.capturer()
    with kit.connect() as conn:
        capturer.run_round(conn)
    committed: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def writer(seed: int) -> None:
        rnd = random.Random(seed)
        with kit.connect() as conn:
            while not stop.is_set():
                key, data = f"c{seed}/{uuid.uuid4().hex}.png", rnd.randbytes(500)
                put_object(kit, key, data)
                insert_row(conn, key, data)
                time.sleep(rnd.uniform(0, 0.3))  # the id is taken, the commit comes later
                if rnd.random() < 0.1:
                    conn.rollback()
                    continue
                conn.commit()
                with lock:
                    committed.append(key)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    with kit.connect() as conn:
        for _ in range(15):
            capturer.run_round(conn)
            time.sleep(0.1)
        stop.set()
        for t in threads:
            t.join()
        capturer.run_round(conn)
    found = journaled(kit)
    assert len(committed) > 20
    assert set(committed) <= set(found)
    assert {k for k in found if k.startswith("c")} == set(committed)


@pytest.mark.slow
def test_capture_prune_removes_the_head_behind_a_signed_marker_and_the_chain_still_verifies(
    kit: Kit,
) -> None:
    cfg, home = kit.repository.backup_config, kit.repository.directory
    root = kit.repository.directory / "repository"
    capturer = kit.capturer()
    with kit.connect() as conn:
        capturer.run_round(conn)  # record 1: a heartbeat (the capture follows, nothing new)
        old_key, _ = add_attachment(kit)
        capturer.run_round(conn)  # record 2: before the snapshot
    dry = run_drtool("capture", "prune", "--dry-run", config=cfg, home=home)
    assert dry.returncode == 0 and "no valid MinIO snapshot" in dry.stdout
    time.sleep(1.1)  # the snapshot's id has whole seconds
    kit.repository.backup(components=("minio",))
    new_key, _ = add_attachment(kit)
    with kit.connect() as conn:
        capturer.run_round(conn)  # record 3: after it
    dry = run_drtool("capture", "prune", "--dry-run", config=cfg, home=home)
    assert dry.returncode == 0 and "would remove chain records up to 2" in dry.stdout
    assert (root / capture_chain.chain_key(2)).exists()
    done = run_drtool("capture", "prune", config=cfg, home=home)
    assert done.returncode == 0 and "removed chain records up to 2" in done.stdout
    assert not (root / capture_chain.chain_key(2)).exists()
    assert not (root / capture_chain.journal_key(2)).exists()
    ok = run_drtool("capture", "verify", "--read-data", config=kit.operator, home=home)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    add_attachment(kit)
    appended = run_drtool("capture", "run", "--once", config=cfg, home=home)
    assert appended.returncode == 0, appended.stderr
    assert (root / capture_chain.chain_key(4)).exists()
    state = bucket_at(kit.repo(), kit.identities(), kit.bucket, datetime.now(UTC))
    keys_now = {e.key for e in state.entries}
    assert {old_key, new_key} <= keys_now  # the old one from the snapshot, the new captured
    (root / capture_chain.PRUNED_KEY).write_bytes(b'{"body": {}, "signature": "x"}')
    forged = run_drtool("capture", "verify", config=cfg, home=home)
    assert forged.returncode == 5 and "pruned.json" in forged.stdout


def test_a_cache_line_torn_by_a_kill_is_cut_off_before_the_next_append(tmp_path: Path) -> None:
    path = tmp_path / "b.captured.jsonl"

    def entry(key: str) -> IndexEntry:
        return IndexEntry(key, 1, "etag", "0" * 64, "image/png", {}, "ab" * 16, 2, "1" * 64)

    append_captured(path, [entry("a")])
    with open(path, "ab") as f:
        f.write(b'{"key": "torn-by-a-kill')
    assert set(read_tail(path, 0)) == {"a"}
    append_captured(path, [entry("b")])
    assert set(read_captured(path)) == {"a", "b"}  # what the next MinIO backup reads


@pytest.mark.slow
def test_a_key_rotation_rewraps_the_captured_journal_and_blobs(kit: Kit) -> None:
    """The capture's journals and the blobs only its chain names are rotated too, and the
    chain still verifies key-less (its records keep naming the bytes they were written with)."""
    capturer = kit.capturer()
    with kit.connect() as conn:
        capturer.run_round(conn)
        add_attachment(kit)
        capturer.run_round(conn)
    repo = kit.repo()
    chained = capture_chain.load_chain(repo.storage, repo.verify_keys, repo.info.repo_id)
    objects = [s.key for _, r in chained.records for s in (r.journal, *r.blobs)]
    assert objects, "the round captured nothing"
    new_key = kit.tmp / "new.key"
    new_recipient = keys.write_identity(new_key, passphrase=None)
    backup = tomllib.loads(kit.repository.backup_config.read_text())
    both = tomllib.loads(kit.operator.read_text())
    both["keys"]["signing_key_file"] = backup["keys"]["signing_key_file"]
    rotating = kit.tmp / "rotate.toml"
    rotating.write_text(tomli_w.dumps(both))
    rotating.chmod(0o600)
    (old_recipient,) = backup["keys"]["recipients"]
    done = run_drtool(
        "keys", "rotate", "--add-recipient", new_recipient, "--remove-recipient", old_recipient,
        config=rotating,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    for key in objects:
        raw = repo.storage.get_bytes(key)
        assert b"".join(decrypt([raw], keys.load_identities(new_key, None), name=key)), key
        with pytest.raises(WrongKey):
            b"".join(decrypt([raw], kit.identities(), name=key))
    verified = run_drtool("capture", "verify", config=kit.repository.backup_config)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    both["keys"]["identity_file"] = str(new_key)
    rotating.write_text(tomli_w.dumps(both))
    read = run_drtool("capture", "verify", "--read-data", config=rotating)
    assert read.returncode == 0, read.stdout + read.stderr
