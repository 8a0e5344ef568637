"""Storage faults U1-U7 (RELIABILITY.md): a real SeaweedFS behind the fault proxy.

The proxy (tests/support/fault_proxy.py) forwards the raw requests, so signatures stay valid;
it injects resets, error statuses, 200-with-``<Error>`` bodies, skewed ``Date`` headers, and
can make the server lose bytes right after a write. Storage-level cases check the stored
bytes directly (through a client that bypasses the proxy); the ``drtool backup``/``verify``/
``prune`` cases check what an operator sees — the exit code, one ``error:`` line naming the
cause — and "nothing lost" (support/backup_kit.assert_nothing_lost: only earlier snapshots
listed, they verify with the identity, no multipart upload left, the lock released).
"""

from __future__ import annotations

import json
import os
import secrets
import time
import tomllib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
import tomli_w
from support.backup_kit import (
    Baseline,
    assert_next_backup_succeeds,
    assert_nothing_lost,
    make_backup_kit,
)
from support.cli import one_error
from support.fault_proxy import COMPLETE, UPLOAD_PART, FaultProxy, Rule, fault_proxy

from drtool.endpoints import PostgresEndpoint, RedisEndpoint, S3Endpoint
from drtool.errors import IntegrityError, StorageError
from drtool.runtime.s3server import SeaweedServer
from drtool.runtime.server import Launch
from drtool.s3session import s3_client
from drtool.services.doctor import PROBE_KEY
from drtool.storage import Storage, StorageOptions, open_storage

MiB = 1 << 20
DATA = os.urandom(12 * MiB)  # three 5 MiB parts: a multipart upload
SKEW = timedelta(minutes=20)


@pytest.fixture
def proxy(s3_server: S3Endpoint) -> Iterator[FaultProxy]:
    with fault_proxy(s3_server.endpoint_url) as p:
        yield p


def _storage(proxy: FaultProxy, s3: S3Endpoint, bucket: str, **options: Any) -> Storage:
    opts = StorageOptions(
        endpoint_url=proxy.endpoint_url,
        access_key=s3.access_key,
        secret_key=s3.secret_key,
        part_size=5 * MiB,
        **options,
    )
    return open_storage(f"s3://{bucket}/repo", opts)


def _stored(s3: S3Endpoint, bucket: str, key: str) -> bytes | None:
    """The object's bytes as the server holds them (bypassing the proxy), None if absent."""
    client = s3_client(s3)
    try:
        return bytes(client.get_object(Bucket=bucket, Key=f"repo/{key}")["Body"].read())
    except client.exceptions.NoSuchKey:
        return None


def _uploads(s3: S3Endpoint, bucket: str) -> list[str]:
    page = s3_client(s3).list_multipart_uploads(Bucket=bucket)
    return [u["Key"] for u in page.get("Uploads", [])]


# -- U1: connection reset mid-part ----------------------------------------------------------


@pytest.mark.parametrize(
    "rule",
    [
        Rule("PUT", UPLOAD_PART, reset_request_after=MiB),  # the part never arrived
        Rule("PUT", UPLOAD_PART, reset_response_after=12),  # stored, the answer was lost
    ],
    ids=["request", "response"],
)
def test_u1_reset_mid_part_is_retried_and_the_object_is_intact(
    proxy: FaultProxy, s3_server: S3Endpoint, s3_bucket: str, rule: Rule
) -> None:
    proxy.add(rule)
    info = _storage(proxy, s3_server, s3_bucket).put("big", [DATA])
    assert rule.hits == 1
    assert info.size == len(DATA)
    assert _stored(s3_server, s3_bucket, "big") == DATA
    assert _uploads(s3_server, s3_bucket) == []


def test_u1_reset_mid_download_resumes_with_the_same_bytes(
    proxy: FaultProxy, s3_server: S3Endpoint, s3_bucket: str
) -> None:
    st = _storage(proxy, s3_server, s3_bucket)
    st.put("big", [DATA])
    proxy.add(Rule("GET", r"/repo/big$", reset_response_after=3 * MiB))
    assert b"".join(st.get("big")) == DATA
    gets = [t for m, t in proxy.seen if m == "GET" and "/repo/big" in t]
    assert len(gets) == 2  # the broken read, then one Range request for the rest


# -- U2: throttling and server errors --------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "code"), [(503, "SlowDown"), (500, "InternalError"), (429, "TooManyRequests")]
)
def test_u2_transient_errors_are_retried_to_success(
    proxy: FaultProxy, s3_server: S3Endpoint, s3_bucket: str, status: int, code: str
) -> None:
    parts = Rule("PUT", UPLOAD_PART, times=3, status=status, code=code)
    small = Rule("PUT", r"/repo/small$", times=3, status=status, code=code)
    proxy.add(parts, small)
    st = _storage(proxy, s3_server, s3_bucket)
    assert st.put("big", [DATA]).size == len(DATA)
    assert st.put_bytes("small", b"s" * 100).size == 100
    assert (parts.hits, small.hits) == (3, 3)
    assert _stored(s3_server, s3_bucket, "big") == DATA
    assert _stored(s3_server, s3_bucket, "small") == b"s" * 100
    assert _uploads(s3_server, s3_bucket) == []


def test_u2_beyond_the_retry_budget_is_a_clean_error(
    proxy: FaultProxy, s3_server: S3Endpoint, s3_bucket: str
) -> None:
    proxy.add(Rule("PUT", UPLOAD_PART, times=None, status=503, code="SlowDown"))
    st = _storage(proxy, s3_server, s3_bucket)
    with pytest.raises(StorageError) as caught:
        st.put("big", [DATA])
    assert str(caught.value) == (
        f"s3 {proxy.endpoint_url} bucket {s3_bucket} key repo/big: "
        "HTTP 503 SlowDown after 6 attempts"
    )
    assert _stored(s3_server, s3_bucket, "big") is None
    assert _uploads(s3_server, s3_bucket) == []  # aborted


@pytest.fixture
def base(
    tmp_path: Path,
    pg_database: PostgresEndpoint,
    redis_db: RedisEndpoint,
    s3_server: S3Endpoint,
    s3_bucket: str,
) -> Baseline:
    """A seeded stack with one committed snapshot."""
    kit = make_backup_kit(tmp_path, pg_database, redis_db, s3_server, s3_bucket)
    return Baseline(kit, kit.backup_ok())


def _via(b: Baseline, proxy: FaultProxy, name: str) -> Path:
    """The backup-host config with the repository endpoint pointed at the proxy."""
    return b.kit.write_config(name, repository={"endpoint_url": proxy.endpoint_url})


@pytest.mark.slow
def test_u2_backup_beyond_the_budget_exits_4_and_loses_nothing(
    base: Baseline, proxy: FaultProxy
) -> None:
    rule = Rule("PUT", r"/snapshots/[^/]+/postgres/", times=None, status=503, code="SlowDown")
    proxy.add(rule)
    message = one_error(base.kit.backup(config=_via(base, proxy, "u2")), 4)
    assert message.startswith(
        f"error: s3 {proxy.endpoint_url} bucket {base.kit.repo_bucket} key drtool/snapshots/"
    )
    assert message.endswith("/postgres/dump.pgdump.zst.age: HTTP 503 SlowDown after 6 attempts")
    assert rule.hits == 6
    assert_nothing_lost(base)
    proxy.clear()
    assert_next_backup_succeeds(base)


# -- U3: 200 OK with an <Error> body on CompleteMultipartUpload -----------------------------


def test_u3_complete_200_with_error_once_is_retried_to_success(
    proxy: FaultProxy, s3_server: S3Endpoint, s3_bucket: str
) -> None:
    """botocore turns the 200-with-Error into a 500 InternalError: retried, the upload completes."""
    rule = Rule("POST", COMPLETE, status=200, code="InternalError")
    proxy.add(rule)
    assert _storage(proxy, s3_server, s3_bucket).put("big", [DATA]).size == len(DATA)
    assert rule.hits == 1
    assert _stored(s3_server, s3_bucket, "big") == DATA


def test_u3_complete_done_but_answered_with_error_is_confirmed_by_head(
    proxy: FaultProxy, s3_server: S3Endpoint, s3_bucket: str
) -> None:
    """The server completed the upload; the answer was an error. The retry finds the upload
    gone (NoSuchUpload) and the HEAD check (size, multipart ETag) confirms the object."""
    proxy.add(Rule("POST", COMPLETE, status=200, code="InternalError", forward=True))
    assert _storage(proxy, s3_server, s3_bucket).put("big", [DATA]).size == len(DATA)
    assert _stored(s3_server, s3_bucket, "big") == DATA


@pytest.mark.slow
def test_u3_backup_whose_complete_always_errors_exits_4_and_loses_nothing(
    base: Baseline, proxy: FaultProxy
) -> None:
    """A new 12 MiB attachment makes its blob a multipart upload (5 MiB parts)."""
    s3_client(base.kit.endpoints.minio).put_object(
        Bucket=base.kit.bucket, Key="rooms/1/video.bin", Body=DATA
    )
    rule = Rule("POST", COMPLETE, times=None, status=200, code="InternalError")
    proxy.add(rule)
    message = one_error(base.kit.backup(config=_via(base, proxy, "u3")), 4)
    assert rule.hits == 6
    assert message.startswith(f"error: s3 {proxy.endpoint_url} bucket {base.kit.repo_bucket}")
    assert " key drtool/blobs/" in message  # the 12 MiB attachment's blob
    assert "HTTP 500 InternalError after 6 attempts" in message
    assert_nothing_lost(base)


# -- U4: the server stores something other than what was sent -------------------------------


def _overwrite(s3: S3Endpoint, change: Any) -> Any:
    """A hook that replaces the object just written with ``change(its bytes)``, behind
    drtool's back: a server that stores something other than what it acknowledged."""

    def run(target: str) -> None:
        bucket, key = unquote(target.split("?")[0]).lstrip("/").split("/", 1)
        client = s3_client(s3)
        data = client.get_object(Bucket=bucket, Key=key)["Body"].read()
        client.put_object(Bucket=bucket, Key=key, Body=change(data))

    return run


@pytest.mark.slow
@pytest.mark.parametrize(
    ("size", "change"),
    [
        (100, lambda b: b[:-10]),  # PutObject, stored shorter
        (100, lambda b: b[::-1]),  # PutObject, same size, other bytes
        (len(DATA), lambda b: b[: 6 * MiB]),  # multipart, stored shorter
        (len(DATA), lambda b: b[::-1]),  # multipart, same size, other bytes
    ],
    ids=["put-short", "put-different", "multipart-short", "multipart-different"],
)
def test_u4_stored_object_differing_from_what_was_sent_fails_the_put(
    proxy: FaultProxy, s3_server: S3Endpoint, s3_bucket: str, size: int, change: Any
) -> None:
    method, path = ("PUT", r"/repo/obj$") if size == 100 else ("POST", COMPLETE)
    proxy.add(Rule(method, path, after_forward=_overwrite(s3_server, change)))
    with pytest.raises(IntegrityError, match=r"stored object \(\d+ bytes, ETag .*\) differs from"):
        _storage(proxy, s3_server, s3_bucket).put("obj", [DATA[:size]])
    assert _stored(s3_server, s3_bucket, "obj") is None  # the bad object was removed


@pytest.mark.slow
def test_u4_backup_whose_dump_is_stored_short_exits_5_without_manifest(
    base: Baseline, proxy: FaultProxy, s3_server: S3Endpoint
) -> None:
    kit = base.kit
    before = kit.stored_keys()
    rule = Rule(
        "PUT",
        r"/postgres/dump\.pgdump\.zst\.age$",
        after_forward=_overwrite(s3_server, lambda b: b[: len(b) // 2]),
    )
    proxy.add(rule)
    message = one_error(kit.backup(config=_via(base, proxy, "u4")), 5)
    assert rule.hits == 1
    assert message.startswith(f"error: s3 {proxy.endpoint_url} bucket {kit.repo_bucket} key ")
    assert "/postgres/dump.pgdump.zst.age: stored object (" in message
    assert "differs from what was sent" in message
    new = {k for k in kit.stored_keys() - before if not k.startswith("locks/")}
    assert not any(k.endswith("manifest.json") for k in new)
    assert not any(k.endswith("dump.pgdump.zst.age") for k in new)  # the bad object removed
    assert_nothing_lost(base)


# -- U5: listing errors during verify and prune ----------------------------------------------

LIST = r"[?&]list-type=2"


@pytest.mark.slow
@pytest.mark.parametrize(
    "rule",
    [
        Rule("GET", LIST, times=None, status=500, code="InternalError"),
        Rule("GET", LIST, times=None, reset_response_after=200),
    ],
    ids=["status-500", "reset"],
)
def test_u5_listing_errors_in_verify_and_prune_delete_nothing(
    base: Baseline, proxy: FaultProxy, rule: Rule
) -> None:
    kit = base.kit
    doc = tomllib.loads(kit.operator_config.read_text())
    doc["repository"]["endpoint_url"] = proxy.endpoint_url
    operator = kit.tmp / "operator-proxy.toml"
    operator.write_text(tomli_w.dumps(doc))
    before = kit.stored_keys()
    proxy.add(rule)
    verify = kit.drtool("verify", "--all", config=operator)
    message = one_error(verify, 4)
    assert message.startswith(f"error: s3 {proxy.endpoint_url} bucket {kit.repo_bucket}: ")
    assert "no snapshots" not in verify.stderr + verify.stdout
    listing = kit.drtool("list", "--json", config=operator)
    one_error(listing, 4)
    assert listing.stdout == ""  # never an empty list
    prune = kit.drtool("prune", "--keep-last", "1", config=_via(base, proxy, "u5"))
    one_error(prune, 4)
    proxy.clear()
    assert kit.stored_keys() == before  # nothing deleted
    assert_nothing_lost(base)


# -- U6: clock skew --------------------------------------------------------------------------


@pytest.mark.slow
def test_u6_request_time_too_skewed_names_the_clock(base: Baseline, proxy: FaultProxy) -> None:
    proxy.add(Rule("GET", r".", times=None, status=403, code="RequestTimeTooSkewed"))
    message = one_error(base.kit.backup(config=_via(base, proxy, "u6")), 4)
    assert message.endswith(": clock skew against the S3 server; check NTP")
    assert proxy.endpoint_url in message
    assert_nothing_lost(base)


@pytest.mark.slow
def test_u6_bare_403_with_a_far_date_is_named_clock_skew(
    proxy: FaultProxy, s3_server: S3Endpoint, s3_bucket: str
) -> None:
    """HEAD answers carry no body: a 403 whose Date is 20 min off is read as clock skew."""
    st = _storage(proxy, s3_server, s3_bucket)
    st.put_bytes("k", b"v")
    proxy.add(Rule("HEAD", r"/repo/k$", status=403, code="AccessDenied", date_offset=SKEW))
    with pytest.raises(StorageError, match="clock skew against the S3 server; check NTP"):
        st.head("k")


@pytest.mark.slow
def test_u6_doctor_reports_a_skewed_server_clock(base: Baseline, proxy: FaultProxy) -> None:
    proxy.add(Rule("GET", LIST, times=None, date_offset=SKEW))
    done = base.kit.drtool("doctor", "--json", config=_via(base, proxy, "u6-doctor"))
    rows = {r["name"]: r for r in json.loads(done.stdout)}
    assert rows["clock skew"]["status"] == "fail"
    assert rows["clock skew"]["detail"] == "clock skew 20 min against the S3 server; check NTP"
    assert done.returncode == 7


# -- U7: Object Lock, and a backup credential that cannot delete ----------------------------


class PolicyServer(SeaweedServer):
    """SeaweedFS with an ``-s3.config`` of two identities: admin, and backup (read/list/write)."""

    def __init__(self, base_dir: Path) -> None:
        super().__init__(base_dir)
        self.backup_key = f"backup{secrets.token_hex(6)}"
        self.backup_secret = secrets.token_urlsafe(24)
        base_dir.mkdir(parents=True, exist_ok=True)
        self.config_file = base_dir / "s3.json"
        identities = [
            (
                self.access_key,
                self.secret_key,
                "admin",
                ["Admin", "Read", "List", "Tagging", "Write"],
            ),
            (self.backup_key, self.backup_secret, "backup", ["Read", "List", "Write"]),
        ]
        self.config_file.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": name,
                            "credentials": [{"accessKey": ak, "secretKey": sk}],
                            "actions": actions,
                        }
                        for ak, sk, name, actions in identities
                    ]
                }
            )
        )
        self.config_file.chmod(0o600)

    def _prepare(self) -> Launch:
        launch = super()._prepare()
        return Launch(
            [*launch.argv, f"-s3.config={self.config_file}"], cwd=launch.cwd, env=launch.env
        )

    @property
    def backup_endpoint(self) -> S3Endpoint:
        return S3Endpoint(self.endpoint.endpoint_url, self.backup_key, self.backup_secret)


def _deny_delete_outside_locks(endpoint: S3Endpoint, bucket: str, prefix: str) -> None:
    """A bucket policy: the backup identity may delete only its lock objects."""
    principal = {"AWS": "arn:aws:iam::000000000000:user/backup"}
    policy = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Deny",
                "Principal": principal,
                "Action": ["s3:DeleteObject", "s3:DeleteObjectVersion"],
                "NotResource": [f"arn:aws:s3:::{bucket}/{prefix}/locks/*"],
            },
            {
                "Effect": "Allow",
                "Principal": principal,
                "Action": [  # as docs/OPERATIONS.md §2 grants
                    "s3:GetBucketObjectLockConfiguration",
                    "s3:PutObjectRetention",
                    "s3:GetObjectRetention",
                ],
                "Resource": [f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"],
            },
        ],
    }
    s3_client(endpoint).put_bucket_policy(Bucket=bucket, Policy=json.dumps(policy))


@pytest.mark.slow
def test_u8_reused_blobs_are_locked_as_long_as_the_snapshot_that_needs_them(
    tmp_path: Path,
    pg_database: PostgresEndpoint,
    redis_db: RedisEndpoint,
    s3_server: S3Endpoint,
    s3_bucket: str,
) -> None:
    """Issue 19 item 1: a backup retained 30 days extends the blobs it reuses to 30 days.

    Without it, blobs written by a 1-day backup stay locked for a day while a later snapshot
    that needs them is locked for a month. `verify` reads the real dates and names an object
    locked for less than its snapshot (shortened here with the admin's governance bypass).
    """
    server = PolicyServer(tmp_path / "lock-s3")
    server.start()
    try:
        kit = make_backup_kit(
            tmp_path, pg_database, redis_db, s3_server, s3_bucket, repo_s3=server.endpoint
        )
        admin = s3_client(server.endpoint)
        bucket = f"locked-{secrets.token_hex(5)}"
        admin.create_bucket(Bucket=bucket, ObjectLockEnabledForBucket=True)
        _deny_delete_outside_locks(server.endpoint, bucket, "drtool")
        keydir = kit.tmp / "keys"
        (keydir / "backup-ak").write_text(server.backup_key)
        (keydir / "backup-sk").write_text(server.backup_secret)
        repository = {
            "url": f"s3://{bucket}/drtool",
            "access_key_file": str(keydir / "backup-ak"),
            "secret_key_file": str(keydir / "backup-sk"),
            "object_lock_mode": "GOVERNANCE",
            "retain_days": 1,
        }
        short = kit.write_config("short", repository=repository)
        assert kit.drtool("init", config=short).returncode == 0
        first = kit.backup("minio", config=short)
        assert first.returncode == 0, first.stderr
        blobs = [
            o["Key"]
            for o in admin.list_objects_v2(Bucket=bucket, Prefix="drtool/blobs/")["Contents"]
        ]
        assert blobs

        def retained(key: str) -> timedelta:
            found = admin.get_object_retention(Bucket=bucket, Key=key)["Retention"]
            return found["RetainUntilDate"] - datetime.now(UTC)

        assert all(retained(k) <= timedelta(days=1) for k in blobs)

        long = kit.write_config("long", repository={**repository, "retain_days": 30})
        second = kit.backup("minio", config=long)
        assert second.returncode == 0, second.stderr
        snapshot_id = json.loads(second.stdout)["snapshot_id"]
        manifest_key = f"drtool/snapshots/{snapshot_id}/manifest.json"
        assert timedelta(days=29) < retained(manifest_key) <= timedelta(days=30)
        assert not set(blobs) - {
            o["Key"]
            for o in admin.list_objects_v2(Bucket=bucket, Prefix="drtool/blobs/")["Contents"]
        }
        for key in blobs:  # reused, not re-uploaded: now locked past the new snapshot's date
            assert retained(key) >= retained(manifest_key), key
        assert "object lock:" in second.stderr

        # a third backup finds every date in the host's cache: no retention request at all
        third = kit.backup("minio", config=long)
        assert third.returncode == 0, third.stderr
        assert "0 extended, 0 requests" in third.stderr, third.stderr[-2000:]

        # key-less verify reads the real dates: an object locked for less than its snapshot
        verified = kit.drtool("verify", snapshot_id, "--json", config=long)
        assert verified.returncode == 0, verified.stderr
        admin.put_object_retention(
            Bucket=bucket,
            Key=blobs[0],
            Retention={
                "Mode": "GOVERNANCE",
                "RetainUntilDate": datetime.now(UTC) + timedelta(hours=2),
            },
            BypassGovernanceRetention=True,
        )
        verified = kit.drtool("verify", snapshot_id, "--json", config=long)
        assert verified.returncode == 5, verified.stderr[-2000:]
        assert blobs[0].removeprefix("drtool/") in verified.stdout + verified.stderr
        assert "locked for less than" in verified.stdout + verified.stderr
        doctor = kit.drtool("doctor", "--json", config=long)
        rows = {r["name"]: r for r in json.loads(doctor.stdout)}
        assert rows["snapshots locked whole"]["status"] == "fail", rows
        assert snapshot_id in rows["snapshots locked whole"]["detail"]
        assert doctor.returncode == 7
    finally:
        server.stop()


@pytest.mark.slow
def test_u9_prune_on_a_locked_bucket_defers_what_it_cannot_delete_and_says_so(
    tmp_path: Path,
    pg_database: PostgresEndpoint,
    redis_db: RedisEndpoint,
    s3_server: S3Endpoint,
    s3_bucket: str,
) -> None:
    """Issue 19 item 3: prune never claims deletions Object Lock did not let it make.

    Before, a credential that may delete "deleted" the retained snapshot: its manifest went
    behind a delete marker (the snapshot vanished from the list) while every locked version
    stayed, and prune printed the count as deleted. Now the retained snapshot is deferred
    whole and stays listed; once its retention has passed, prune removes it and says that a
    versioned bucket frees the space only through its noncurrent-version expiry.
    """
    server = PolicyServer(tmp_path / "lock-s3")
    server.start()
    try:
        kit = make_backup_kit(
            tmp_path, pg_database, redis_db, s3_server, s3_bucket, repo_s3=server.endpoint
        )
        admin = s3_client(server.endpoint)
        bucket = f"locked-{secrets.token_hex(5)}"
        admin.create_bucket(Bucket=bucket, ObjectLockEnabledForBucket=True)
        repository = {
            "url": f"s3://{bucket}/drtool",
            "access_key_file": kit.sections["repository"]["access_key_file"],
            "secret_key_file": kit.sections["repository"]["secret_key_file"],
            "object_lock_mode": "GOVERNANCE",
            "retain_days": 1,
        }
        config = kit.write_config("locked-admin", repository=repository)
        assert kit.drtool("init", config=config).returncode == 0
        ids = []
        for _ in range(2):
            done = kit.backup("postgres", config=config)
            assert done.returncode == 0, done.stderr
            ids.append(json.loads(done.stdout)["snapshot_id"])

        pruned = kit.drtool("prune", "--keep-last", "1", "--count-unverified", config=config)
        assert pruned.returncode == 0, pruned.stderr
        assert "deleted 0 snapshots, 0 objects" in pruned.stdout, pruned.stdout
        assert "deferred 1 snapshots and 0 objects that Object Lock retains" in pruned.stdout
        listed = kit.drtool("list", "--json", config=config)
        assert [r["id"] for r in json.loads(listed.stdout)] == ids  # still there, whole

        # once the retention has passed (shortened with the admin's governance bypass)
        soon = datetime.now(UTC) + timedelta(seconds=2)
        old = admin.list_objects_v2(Bucket=bucket, Prefix=f"drtool/snapshots/{ids[0]}/")
        for obj in old["Contents"]:
            admin.put_object_retention(
                Bucket=bucket,
                Key=obj["Key"],
                Retention={"Mode": "GOVERNANCE", "RetainUntilDate": soon},
                BypassGovernanceRetention=True,
            )
        time.sleep(3)
        pruned = kit.drtool("prune", "--keep-last", "1", "--count-unverified", config=config)
        assert pruned.returncode == 0, pruned.stderr
        assert "deleted 1 snapshots, " in pruned.stdout, pruned.stdout[-600:]
        assert "versioned bucket: deleted objects stay as noncurrent versions" in pruned.stdout
        listed = kit.drtool("list", "--json", config=config)
        assert [r["id"] for r in json.loads(listed.stdout)] == ids[1:]
    finally:
        server.stop()


@pytest.mark.slow
def test_u7_object_lock_backups_carry_retention_and_cannot_be_deleted(
    tmp_path: Path,
    pg_database: PostgresEndpoint,
    redis_db: RedisEndpoint,
    s3_server: S3Endpoint,
    s3_bucket: str,
) -> None:
    server = PolicyServer(tmp_path / "lock-s3")
    server.start()
    try:
        kit = make_backup_kit(
            tmp_path, pg_database, redis_db, s3_server, s3_bucket, repo_s3=server.endpoint
        )
        admin = s3_client(server.endpoint)
        bucket = f"locked-{secrets.token_hex(5)}"
        admin.create_bucket(Bucket=bucket, ObjectLockEnabledForBucket=True)
        _deny_delete_outside_locks(server.endpoint, bucket, "drtool")
        keydir = kit.tmp / "keys"
        (keydir / "backup-ak").write_text(server.backup_key)
        (keydir / "backup-sk").write_text(server.backup_secret)
        repository = {
            "url": f"s3://{bucket}/drtool",
            "access_key_file": str(keydir / "backup-ak"),
            "secret_key_file": str(keydir / "backup-sk"),
            "object_lock_mode": "GOVERNANCE",
            "retain_days": 7,
        }
        config = kit.write_config("locked", repository=repository)
        assert kit.drtool("init", config=config).returncode == 0

        done = kit.backup(config=config)
        assert done.returncode == 0, done.stderr
        snapshot_id = json.loads(done.stdout)["snapshot_id"]

        objects = admin.list_objects_v2(Bucket=bucket, Prefix=f"drtool/snapshots/{snapshot_id}/")
        keys = [o["Key"] for o in objects["Contents"]]
        blobs = admin.list_objects_v2(Bucket=bucket, Prefix="drtool/blobs/").get("Contents", [])
        keys += [o["Key"] for o in blobs]
        assert f"drtool/snapshots/{snapshot_id}/manifest.json" in keys
        now = datetime.now(UTC)
        for key in keys:
            retention = admin.get_object_retention(Bucket=bucket, Key=key)["Retention"]
            assert retention["Mode"] == "GOVERNANCE", key
            assert timedelta(days=6) < retention["RetainUntilDate"] - now <= timedelta(days=7)
        locks = admin.list_objects_v2(Bucket=bucket, Prefix="drtool/locks/").get("Contents", [])
        assert locks == []  # the backup credential may delete its own lock

        # the backup credential cannot delete a backup, not even by adding a delete marker
        backup_cfg_storage = open_storage(
            f"s3://{bucket}/drtool",
            StorageOptions(
                endpoint_url=server.endpoint.endpoint_url,
                access_key=server.backup_key,
                secret_key=server.backup_secret,
            ),
        )
        with pytest.raises(StorageError, match="access denied"):
            backup_cfg_storage.delete(f"snapshots/{snapshot_id}/manifest.json")
        assert kit.drtool("list", "--json", config=config).returncode == 0

        # doctor with the backup credential: delete refused (pass), Object Lock on (pass)
        doctor = kit.drtool("doctor", "--json", config=config)
        rows = {r["name"]: r for r in json.loads(doctor.stdout)}
        assert rows["credential cannot delete"] == {
            "name": "credential cannot delete",
            "status": "pass",
            "detail": "a delete was refused (access denied)",
        }
        assert rows["object lock"]["status"] == "pass"
        assert doctor.returncode == 0, doctor.stdout

        # doctor with the admin credential: it can delete, which is a failure
        admin_config = kit.write_config(
            "locked-admin",
            repository={
                **repository,
                **{
                    k: kit.sections["repository"][k] for k in ("access_key_file", "secret_key_file")
                },
            },
        )
        doctor = kit.drtool("doctor", "--json", config=admin_config)
        rows = {r["name"]: r for r in json.loads(doctor.stdout)}
        assert rows["credential cannot delete"]["status"] == "fail"
        assert rows["credential cannot delete"]["detail"].startswith(
            "this credential can delete backups"
        )
        message = one_error(doctor, 7)
        assert "credential cannot delete" in message
        assert PROBE_KEY.startswith("doctor/")
    finally:
        server.stop()
