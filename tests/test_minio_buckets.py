"""Buckets left out of the backup (issue 18 item 3), on a SeaweedFS of its own.

The old code backed up the configured buckets only and said nothing of the others the
credential can see. Now ``backup`` logs and ``doctor`` warns about every visible bucket not
protected, and ``buckets = ["*"]`` protects all of them (and restores each under its name).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import tomli_w
from prometheus_client import generate_latest
from support.cli import run_drtool
from support.compare import bucket_objects
from support.stacks import make_repository

from drtool.endpoints import PostgresEndpoint, RedisEndpoint, S3Endpoint, StackEndpoints
from drtool.runtime.s3server import SeaweedServer
from drtool.s3session import s3_client
from drtool.services.scheduling.metrics import Metrics

pytestmark = pytest.mark.slow  # a SeaweedFS of its own and a backup/restore through the CLI


@pytest.fixture
def own_s3(tmp_path: Path) -> Iterator[S3Endpoint]:
    """A SeaweedFS whose only buckets are this test's: attachments, avatars, exports."""
    server = SeaweedServer(tmp_path / "s3")
    server.start()
    try:
        client = s3_client(server.endpoint)
        for bucket in ("attachments", "avatars", "exports"):
            client.create_bucket(Bucket=bucket)
            client.put_object(Bucket=bucket, Key=f"{bucket}/one.txt", Body=bucket.encode(),
                              ContentType="text/plain")  # fmt: skip
        yield server.endpoint
    finally:
        server.stop()


def _with_buckets(config: Path, buckets: list[str]) -> Path:
    import tomllib

    doc = tomllib.loads(config.read_text())
    doc["minio"]["buckets"] = buckets
    out = config.with_name(f"{config.stem}-{len(buckets)}.toml")
    out.write_text(tomli_w.dumps(doc))
    return out


def test_buckets_left_out_are_named_and_star_protects_all(
    own_s3: S3Endpoint,
    pg_database: PostgresEndpoint,
    redis_server: RedisEndpoint,
    s3_server: S3Endpoint,
    tmp_path: Path,
) -> None:
    source = StackEndpoints(pg_database, redis_server, own_s3, ("attachments",))
    repo = make_repository(tmp_path / "repo", source)

    backup = run_drtool("backup", "--component", "minio", "--json", config=repo.backup_config)
    assert backup.returncode == 0, backup.stderr
    assert "2 MinIO bucket(s) not protected (not in minio.buckets): avatars, exports" in (
        backup.stderr
    )
    assert json.loads(backup.stdout)["figures"] == {"unprotected_buckets": 2}  # the metric's
    doctor = run_drtool("doctor", "--json", config=repo.backup_config)
    row = next(r for r in json.loads(doctor.stdout) if r["name"] == "minio reachable")
    assert row["status"] == "warn" and "avatars, exports" in row["detail"], row

    star = _with_buckets(repo.backup_config, ["*"])
    backup = run_drtool("backup", "--component", "minio", "--json", config=star)
    assert backup.returncode == 0, backup.stderr
    assert "not protected" not in backup.stderr
    assert json.loads(backup.stdout)["figures"] == {"unprotected_buckets": 0}
    doctor = run_drtool("doctor", "--json", config=star)
    row = next(r for r in json.loads(doctor.stdout) if r["name"] == "minio reachable")
    assert row["status"] == "pass" and "attachments, avatars, exports listed" in row["detail"]

    # the ["*"] snapshot restores every bucket under its own name onto an empty server
    target_s3 = SeaweedServer(tmp_path / "target-s3")
    target_s3.start()
    try:
        target = StackEndpoints(pg_database, redis_server, target_s3.endpoint, ("*",))
        config = repo.operator_config(tmp_path / "op.toml", {"t": target})
        run = run_drtool("restore", "latest", "--target", "t", "--component", "minio", "--yes",
                         config=config)  # fmt: skip
        assert run.returncode == 0, run.stderr
        for bucket in ("attachments", "avatars", "exports"):
            assert bucket_objects(target_s3.endpoint, bucket) == bucket_objects(own_s3, bucket)
    finally:
        target_s3.stop()


def test_the_unprotected_bucket_metric_exists_only_once_a_backup_counted_them() -> None:
    """Issue 18.3: the metric counts them; before a MinIO backup it claims nothing (ADR 0012)."""
    metrics = Metrics()
    assert "drtool_unprotected_buckets" not in generate_latest(metrics.registry).decode()
    metrics.record_figures({})  # a backup without MinIO
    assert "drtool_unprotected_buckets" not in generate_latest(metrics.registry).decode()
    metrics.record_figures({"unprotected_buckets": 2})
    assert "drtool_unprotected_buckets 2.0" in generate_latest(metrics.registry).decode()
    metrics.record_figures({"unprotected_buckets": 0})
    assert "drtool_unprotected_buckets 0.0" in generate_latest(metrics.registry).decode()
