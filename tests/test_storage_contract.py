"""One contract for every storage backend: the file backend and S3 (a real SeaweedFS).

S3-only cases (credentials, reachability, versioning, Object Lock) follow the shared contract.
"""

from __future__ import annotations

import os
import secrets
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from drtool.endpoints import S3Endpoint
from drtool.errors import ConfigError, NotFound, StorageError
from drtool.s3session import s3_client
from drtool.storage import Storage, StorageOptions, open_storage
from drtool.storage.base import TEMP_PREFIX, MiB
from drtool.storage.retry import Backoff, retry_call
from drtool.storage.s3 import MAX_PARTS, S3Storage, part_size_for

PART = 5 * MiB


# -- helpers (s3_server and s3_bucket come from tests/conftest.py) ---------------------------


def _options(ep: S3Endpoint, **kw: Any) -> StorageOptions:
    base = StorageOptions(
        endpoint_url=ep.endpoint_url,
        access_key=ep.access_key,
        secret_key=ep.secret_key,
        part_size=PART,
    )
    return replace(base, **kw)


@dataclass
class Backend:
    """A storage under test plus backend-specific probes for what it leaves behind."""

    storage: Storage
    leftovers: Callable[[], list[str]]  # unfinished uploads / temp files, raw
    make_stale: Callable[[str], None]  # leave an unfinished upload of a key behind
    missing: Storage  # same kind, but its bucket/directory does not exist


def _file_backend(tmp_path: Path) -> Backend:
    root = tmp_path / "repo"
    root.mkdir()

    def leftovers() -> list[str]:
        return [str(p) for p in root.rglob(f"{TEMP_PREFIX}*")]

    def make_stale(key: str) -> None:
        path = root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{TEMP_PREFIX}0123456789ab-{path.name}")
        tmp.write_bytes(b"partial")
        old = time.time() - 7200
        os.utime(tmp, (old, old))

    opts = StorageOptions(part_size=PART)
    return Backend(
        open_storage(root.as_uri(), opts),
        leftovers,
        make_stale,
        open_storage((tmp_path / "absent").as_uri(), opts),
    )


def _s3_backend(ep: S3Endpoint, bucket: str) -> Backend:
    client = s3_client(ep)

    def leftovers() -> list[str]:
        return [u["Key"] for u in client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])]

    def make_stale(key: str) -> None:
        client.create_multipart_upload(Bucket=bucket, Key=f"repo/{key}")

    opts = _options(ep, list_page_size=7)
    return Backend(
        open_storage(f"s3://{bucket}/repo", opts),
        leftovers,
        make_stale,
        open_storage(f"s3://absent-{secrets.token_hex(6)}/repo", opts),
    )


@pytest.fixture(params=["file", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """Each contract case runs once per backend."""
    if request.param == "file":
        return _file_backend(tmp_path)
    return _s3_backend(request.getfixturevalue("s3_server"), request.getfixturevalue("s3_bucket"))


def _pieces(data: bytes, size: int) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


# -- the contract ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size", [0, 1, 1000, PART - 1, PART, PART + 1, 2 * PART + 123], ids=lambda n: f"{n}B"
)
def test_round_trip(backend: Backend, size: int) -> None:
    st = backend.storage
    data = secrets.token_bytes(size)
    info = st.put("snapshots/a/data.bin", _pieces(data, 1 * MiB + 7))
    assert (info.key, info.size) == ("snapshots/a/data.bin", size)
    assert info.last_modified is not None and info.last_modified.tzinfo is not None
    pieces = list(st.get("snapshots/a/data.bin"))
    assert b"".join(pieces) == data
    assert all(len(p) <= MiB for p in pieces)
    assert st.head("snapshots/a/data.bin").size == size
    assert backend.leftovers() == []


def test_put_bytes_overwrites(backend: Backend) -> None:
    st = backend.storage
    st.put_bytes("drtool-repo.json", b"one")
    st.put_bytes("drtool-repo.json", b"second")
    assert st.get_bytes("drtool-repo.json") == b"second"


def test_list_is_complete_paged_and_prefix_filtered(backend: Backend) -> None:
    st = backend.storage
    keys = [f"blobs/{i % 3:02x}/{i:04d}" for i in range(25)] + ["blobs-x", "locks/l1"]
    for k in keys:
        st.put_bytes(k, k.encode())
    backend.make_stale("blobs/00/unfinished")
    assert sorted(o.key for o in st.list()) == sorted(keys)  # each once, order unspecified
    assert sorted(o.key for o in st.list("blobs/")) == sorted(k for k in keys if "blobs/" in k)
    assert sorted(o.key for o in st.list("blobs/01/")) == sorted(
        k for k in keys if k.startswith("blobs/01/")
    )
    assert [o.size for o in st.list("locks/")] == [len("locks/l1")]
    assert list(st.list("nothing/")) == []


def test_head_exists_delete_idempotent(backend: Backend) -> None:
    st = backend.storage
    st.put_bytes("locks/x", b"x")
    assert st.exists("locks/x")
    st.delete("locks/x")
    st.delete("locks/x")
    assert not st.exists("locks/x")
    with pytest.raises(NotFound):
        st.head("locks/x")


def test_missing_key_is_not_found(backend: Backend) -> None:
    with pytest.raises(NotFound, match="no/such"):
        backend.storage.get("no/such")
    with pytest.raises(NotFound):
        backend.storage.head("no/such")
    with pytest.raises(NotFound):
        backend.storage.get_bytes("no/such")


def test_missing_bucket_is_not_found(backend: Backend) -> None:
    st = backend.missing
    with pytest.raises(NotFound, match="does not exist"):
        st.check()
    with pytest.raises(NotFound):
        list(st.list())
    with pytest.raises(NotFound):  # conftest's SeaweedFS runs with -s3.autoCreateBucket=false
        st.put_bytes("a", b"a")


def test_check_passes(backend: Backend) -> None:
    backend.storage.check()


class Boom(Exception):
    """The producer failed."""


@pytest.mark.parametrize("fail_after", [0, 1, 3 * PART + 5], ids=["start", "early", "late"])
@pytest.mark.parametrize("error", [Boom, KeyboardInterrupt])
def test_failing_producer_leaves_nothing(
    backend: Backend, fail_after: int, error: type[BaseException]
) -> None:
    def produce() -> Iterator[bytes]:
        yield from _pieces(b"z" * fail_after, 3 * MiB)
        raise error("producer died")

    with pytest.raises(error):
        backend.storage.put("snapshots/b/dump", produce())
    assert not backend.storage.exists("snapshots/b/dump")
    assert backend.leftovers() == []
    assert list(backend.storage.list()) == []


def test_stale_uploads_found_and_aborted(backend: Backend) -> None:
    st = backend.storage
    backend.make_stale("snapshots/c/postgres/db.dump")
    st.put_bytes("snapshots/c/manifest.json", b"{}")
    future = datetime.now(UTC) + timedelta(hours=1)
    past = datetime.now(UTC) - timedelta(days=1)
    assert st.stale_uploads(past) == []
    assert st.stale_uploads(future) == ["snapshots/c/postgres/db.dump"]
    assert st.abort_stale_uploads(future) == 1
    assert st.stale_uploads(future) == []
    assert backend.leftovers() == []
    assert st.get_bytes("snapshots/c/manifest.json") == b"{}"


@pytest.mark.parametrize("key", ["", "/abs", "a//b", "a/../b", f"a/{TEMP_PREFIX}x", "a\\b"])
def test_bad_keys_are_refused(backend: Backend, key: str) -> None:
    with pytest.raises(ValueError):
        backend.storage.put_bytes(key, b"x")


# -- S3 only --------------------------------------------------------------------------------


def test_wrong_secret_is_rejected_without_leaking(s3_server: S3Endpoint, s3_bucket: str) -> None:
    secret = s3_server.secret_key
    wrong = "WRONG-" + secret
    st = open_storage(f"s3://{s3_bucket}/repo", _options(s3_server, secret_key=wrong))
    for action in (st.check, lambda: st.put_bytes("k", b"v"), lambda: st.head("k")):
        with pytest.raises(StorageError) as exc:
            action()
        msg = str(exc.value)
        assert s3_server.endpoint_url in msg and s3_bucket in msg
        assert wrong not in msg and secret not in msg and "\n" not in msg
    with pytest.raises(StorageError, match="credentials rejected"):
        st.check()
    assert wrong not in repr(_options(s3_server, secret_key=wrong))


def test_unknown_access_key_is_rejected(s3_server: S3Endpoint, s3_bucket: str) -> None:
    st = open_storage(f"s3://{s3_bucket}", _options(s3_server, access_key="nobody"))
    with pytest.raises(StorageError, match="credentials rejected"):
        st.check()


def test_unreachable_endpoint_fails_cleanly(s3_bucket: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    ep = S3Endpoint(f"http://127.0.0.1:{port}", "drtool", "not-a-secret")
    st = open_storage(f"s3://{s3_bucket}", _options(ep, retries=2, connect_timeout=1.0))
    with pytest.raises(StorageError, match=f"cannot reach http://127.0.0.1:{port}"):
        st.check()


def test_clock_skew_is_named(
    s3_server: S3Endpoint, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import botocore.auth

    def skewed_now() -> datetime:
        return datetime.now(UTC).replace(tzinfo=None) + timedelta(minutes=20)

    monkeypatch.setattr(botocore.auth, "get_current_datetime", skewed_now)
    st = open_storage(f"s3://{s3_bucket}", _options(s3_server))
    with pytest.raises(StorageError, match="clock skew against the S3 server; check NTP"):
        st.check()


def test_versioned_bucket_records_versions(s3_server: S3Endpoint, s3_bucket: str) -> None:
    s3_client(s3_server).put_bucket_versioning(
        Bucket=s3_bucket, VersioningConfiguration={"Status": "Enabled"}
    )
    st = open_storage(f"s3://{s3_bucket}/repo", _options(s3_server))
    v1 = st.put_bytes("drtool-repo.json", b"v1")
    v2 = st.put("drtool-repo.json", _pieces(b"v2" * PART, MiB))
    assert v1.version_id and v2.version_id and v1.version_id != v2.version_id
    assert b"".join(st.get("drtool-repo.json", version_id=v1.version_id)) == b"v1"
    assert st.head("drtool-repo.json").version_id == v2.version_id


@pytest.mark.parametrize("mode", ["GOVERNANCE", "COMPLIANCE"])
@pytest.mark.parametrize("size", [10, 2 * PART], ids=["single", "multipart"])
def test_object_lock_retention_is_enforced(s3_server: S3Endpoint, mode: str, size: int) -> None:
    bucket = f"lock-{secrets.token_hex(6)}"
    client = s3_client(s3_server)
    client.create_bucket(Bucket=bucket, ObjectLockEnabledForBucket=True)
    st = open_storage(f"s3://{bucket}/repo", _options(s3_server, object_lock_mode=mode))
    until = datetime.now(UTC) + timedelta(days=1)
    info = st.put("snapshots/d/manifest.json", [b"m" * size], retain_until=until)
    assert info.version_id
    retention = client.get_object_retention(
        Bucket=bucket, Key="repo/snapshots/d/manifest.json", VersionId=info.version_id
    )["Retention"]
    assert retention["Mode"] == mode
    assert abs(retention["RetainUntilDate"] - until) < timedelta(seconds=2)
    with pytest.raises(StorageError, match="access denied"):
        st.delete("snapshots/d/manifest.json", version_id=info.version_id)
    # Without a version, a delete only adds a delete marker: the locked version survives.
    st.delete("snapshots/d/manifest.json")
    assert not st.exists("snapshots/d/manifest.json")
    data = b"".join(st.get("snapshots/d/manifest.json", version_id=info.version_id))
    assert data == b"m" * size


def test_page_size_does_not_limit_listing(s3_server: S3Endpoint, s3_bucket: str) -> None:
    st = open_storage(f"s3://{s3_bucket}", _options(s3_server, list_page_size=2))
    for i in range(9):
        st.put_bytes(f"k{i}", b"")
    assert sorted(o.key for o in st.list()) == [f"k{i}" for i in range(9)]


# -- units: no server -----------------------------------------------------------------------


def test_open_storage_rejects_unknown_schemes() -> None:
    for url in ("ftp://host/x", "file://relative/x", "s3://user:pw@bucket/x", "/plain/path"):
        with pytest.raises(ConfigError):
            open_storage(url, StorageOptions())


def test_part_sizes_reach_s3_limits() -> None:
    base = 16 * MiB
    unhinted = sum(part_size_for(base, None, n) for n in range(1, MAX_PARTS + 1))
    assert unhinted > 5 * 1024**4  # any object up to S3's 5 TiB maximum fits
    assert part_size_for(base, None, 1000) == base  # the first 16 GiB use the configured size
    hint = 200 * 1024**3
    size = part_size_for(base, hint, 1)
    assert size % MiB == 0 and hint / size <= MAX_PARTS // 2
    assert part_size_for(base, hint, MAX_PARTS // 2) == size
    assert part_size_for(base, 10 * MiB, 1) == base


def test_put_buffer_is_what_one_upload_holds_in_memory() -> None:
    """The MinIO backup budgets its workers with it; no request is made."""
    options = StorageOptions(endpoint_url="http://127.0.0.1:9", part_size=8 * MiB)
    s3 = S3Storage("bucket", "", options)
    assert s3.put_buffer(3 * MiB) == 3 * MiB  # one PutObject of the whole object
    assert s3.put_buffer(100 * MiB) == 3 * 8 * MiB  # 2 parts in flight and 1 being filled
    assert s3.put_buffer(9 * 1024 * MiB) == 3 * 16 * MiB  # beyond 1,000 parts they double


def test_retry_call_retries_transient_errors_only() -> None:
    calls: list[int] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("reset")
        return "ok"

    fast = Backoff(attempts=3, base=0.0)
    assert retry_call(flaky, backoff=fast, retryable=lambda e: True) == "ok"
    assert len(calls) == 3
    calls.clear()
    with pytest.raises(ConnectionResetError):
        retry_call(flaky, backoff=Backoff(attempts=2, base=0.0), retryable=lambda e: True)
    calls.clear()
    with pytest.raises(ConnectionResetError):
        retry_call(flaky, backoff=fast, retryable=lambda e: False)
    assert len(calls) == 1
