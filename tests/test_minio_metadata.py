"""Metadata-only changes and the incremental MinIO snapshot (issue 18 item 1).

``copy_object(..., MetadataDirective="REPLACE")`` changes an object's content type and user
metadata and keeps its ETag and size. The old code reused the whole previous index entry, so
the snapshot (and a restore, which then reported PASS) kept the old ones. Real SeaweedFS,
behind the recording proxy of tests/fault_proxy.py, which counts the HEAD requests: none for
an unchanged bucket, one per changed object.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import replace
from pathlib import Path

import pytest
from support.cli import run_drtool
from support.compare import bucket_objects
from support.fault_proxy import fault_proxy
from support.stacks import make_repository

from drtool.endpoints import PostgresEndpoint, RedisEndpoint, S3Endpoint, StackEndpoints
from drtool.s3session import s3_client
from drtool.stores.minio.backup import MTIME_SLACK

pytestmark = pytest.mark.slow  # a stack, two backups and a restore through the CLI

OBJECTS = 30


def _heads(seen: list[tuple[str, str]], bucket: str) -> list[str]:
    prefix = f"/{bucket}/"
    return [t[len(prefix) :] for m, t in seen if m == "HEAD" and t.startswith(prefix)]


def test_a_metadata_only_change_is_backed_up_and_restored(
    pg_database: PostgresEndpoint,
    redis_server: RedisEndpoint,
    s3_server: S3Endpoint,
    s3_bucket: str,
    tmp_path: Path,
) -> None:
    client = s3_client(s3_server)
    for i in range(OBJECTS):
        client.put_object(Bucket=s3_bucket, Key=f"rooms/{i}/note.txt", Body=f"note {i}".encode(),
                          ContentType="text/plain", Metadata={"uploader": str(i)})  # fmt: skip
    # a LastModified this close to the listing is not trusted (one-second precision)
    time.sleep(MTIME_SLACK.total_seconds() + 1)
    changed = "rooms/7/note.txt"
    with fault_proxy(s3_server.endpoint_url) as proxy:
        minio = replace(s3_server, endpoint_url=proxy.endpoint_url)
        repo = make_repository(
            tmp_path / "repo", StackEndpoints(pg_database, redis_server, minio, (s3_bucket,))
        )
        repo.backup(components=("minio",))
        proxy.seen.clear()
        repo.backup(components=("minio",))
        assert _heads(proxy.seen, s3_bucket) == []  # unchanged: the listing is enough

        etag = client.head_object(Bucket=s3_bucket, Key=changed)["ETag"]
        client.copy_object(Bucket=s3_bucket, Key=changed,
                           CopySource={"Bucket": s3_bucket, "Key": changed},
                           MetadataDirective="REPLACE", ContentType="application/x-changed",
                           Metadata={"uploader": "changed", "reviewed": "yes"})  # fmt: skip
        assert client.head_object(Bucket=s3_bucket, Key=changed)["ETag"] == etag  # the premise
        proxy.seen.clear()
        repo.backup(components=("minio",))
        assert _heads(proxy.seen, s3_bucket) == [changed]
        assert not [t for m, t in proxy.seen if m == "GET" and t.startswith(f"/{s3_bucket}/")]
        # and once more: the changed object is trusted again (no HEAD on every run after)
        time.sleep(MTIME_SLACK.total_seconds() + 1)
        repo.backup(components=("minio",))  # the copy was within the slack of that listing
        proxy.seen.clear()
        repo.backup(components=("minio",))
        assert _heads(proxy.seen, s3_bucket) == []

    target_bucket = f"target-{uuid.uuid4().hex[:10]}"
    client.create_bucket(Bucket=target_bucket)
    target = StackEndpoints(pg_database, redis_server, s3_server, (target_bucket,))
    config = repo.operator_config(tmp_path / "op.toml", {"t": target})
    run = run_drtool(
        "restore", "latest", "--target", "t", "--component", "minio", "--yes", "--json",
        config=config,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["ok"]
    restored = bucket_objects(s3_server, target_bucket)
    assert restored == bucket_objects(s3_server, s3_bucket)
    assert restored[changed][1:] == ("application/x-changed", {"uploader": "changed",
                                                                "reviewed": "yes"})  # fmt: skip
