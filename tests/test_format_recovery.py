"""docs/FORMAT.md's recovery procedure, with stock tools only: age, zstd, pg_restore, redis."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.compare import bucket_objects, table_rows
from support.stacks import Repository, make_repository, source_stack

from drtool.endpoints import PostgresEndpoint, S3Endpoint


@pytest.fixture(scope="module")
def snapshot(
    tmp_path_factory: pytest.TempPathFactory, pg_server: PostgresEndpoint, s3_server: S3Endpoint
) -> Iterator[tuple[Repository, Path]]:
    """A repository with one snapshot of a seeded stack, and that snapshot's directory."""
    directory = tmp_path_factory.mktemp("format")
    with source_stack(directory, pg_server, s3_server) as source:
        repo = make_repository(directory / "repo", source)
        snapshot_id = repo.backup()
        yield repo, directory / "repo" / "repository" / "snapshots" / snapshot_id


def decrypt(repo: Repository, stored: Path, out: Path) -> Path:
    """``age -d -i operator.key STORED | zstd -d > OUT``."""
    subprocess.run(
        ["bash", "-c", 'set -o pipefail; age -d -i "$1" "$2" | zstd -d -q > "$3"', "-",
         str(repo.identity), str(stored), str(out)],
        check=True,
    )  # fmt: skip
    return out


def test_postgres_dump_restores_with_pg_restore(
    snapshot: tuple[Repository, Path], pg_database: PostgresEndpoint, tmp_path: Path
) -> None:
    repo, snap = snapshot
    globals_sql = decrypt(repo, snap / "postgres" / "globals.sql.zst.age", tmp_path / "g.sql")
    assert "CREATE ROLE postgres;" in globals_sql.read_text()
    dump = decrypt(repo, snap / "postgres" / "dump.pgdump.zst.age", tmp_path / "cotalk.pgdump")
    env = {"PATH": "/usr/bin:/bin", **pg_database.libpq_env()}
    subprocess.run(
        ["pg_restore", "-d", pg_database.dbname, "--exit-on-error", "-j", "2", str(dump)],
        check=True,
        env=env,
    )
    assert table_rows(pg_database) == table_rows(repo.source.postgres)


def test_minio_blobs_decrypt_to_the_objects(
    snapshot: tuple[Repository, Path], tmp_path: Path
) -> None:
    repo, snap = snapshot
    bucket = repo.source.buckets[0]
    index = decrypt(repo, snap / "minio" / f"{bucket}.index.zst.age", tmp_path / "index.jsonl")
    entries = [json.loads(line) for line in index.read_text().splitlines()]
    objects = bucket_objects(repo.source.minio, bucket)
    assert sorted(e["key"] for e in entries) == sorted(objects)
    blobs = repo.directory / "repository" / "blobs"
    for e in entries:
        out = decrypt(repo, blobs / e["blob"][:2] / f"{e['blob']}.zst.age", tmp_path / "obj")
        data, content_type, metadata = objects[e["key"]]
        assert out.read_bytes() == data
        assert (e["content_type"], e["metadata"]) == (content_type, metadata)


def test_redis_rdb_passes_redis_check_rdb(
    snapshot: tuple[Repository, Path], tmp_path: Path
) -> None:
    repo, snap = snapshot
    rdb = decrypt(repo, snap / "redis" / "dump.rdb.zst.age", tmp_path / "dump.rdb")
    done = subprocess.run(["redis-check-rdb", str(rdb)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout
    assert "RDB looks OK" in done.stdout
