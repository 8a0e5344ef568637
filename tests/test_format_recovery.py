"""docs/FORMAT.md's recovery procedure, with stock tools only: age, zstd, pg_restore, redis.

MinIO: docs/recovery/minio-recover.sh (bash, age, zstd, jq, coreutils, the AWS CLI for --to-s3),
on a bucket that also holds awkward keys: one ending in "/", one with spaces and non-ASCII,
each with its own content type and metadata. S3 servers refuse a key with a ".." segment, but
an index may name one (a writer of the repository can add entries: the script checks no
signature), so one test re-encrypts the index with such an entry added.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.compare import bucket_objects, table_rows
from support.stacks import Repository, make_repository, source_stack

from drtool.endpoints import PostgresEndpoint, S3Endpoint
from drtool.s3session import s3_client

SCRIPT = Path(__file__).resolve().parent.parent / "docs" / "recovery" / "minio-recover.sh"
AWKWARD = {
    "folder/": (b"", "application/x-directory", {"kind": "marker"}),
    "rooms/2/Ünïcode name (1).txt": (b"caf\xc3\xa9", "text/plain; charset=utf-8", {"n": "1"}),
}


@pytest.fixture(scope="module")
def snapshot(
    tmp_path_factory: pytest.TempPathFactory, pg_server: PostgresEndpoint, s3_server: S3Endpoint
) -> Iterator[tuple[Repository, Path]]:
    """A repository with one snapshot of a seeded stack, and that snapshot's directory."""
    directory = tmp_path_factory.mktemp("format")
    with source_stack(directory, pg_server, s3_server) as source:
        client = s3_client(source.minio)
        for key, (body, content_type, metadata) in AWKWARD.items():
            client.put_object(Bucket=source.buckets[0], Key=key, Body=body,
                              ContentType=content_type, Metadata=metadata)  # fmt: skip
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


def _recover(
    repo: Repository,
    snap: Path,
    *args: str,
    env: dict[str, str] | None = None,
    root: Path | None = None,
) -> Any:
    argv = [str(SCRIPT), str(root or repo.directory / "repository"), snap.name,
            repo.source.buckets[0], str(repo.identity), *args]  # fmt: skip
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)


ESCAPE = "rooms/1/../../../escape.txt"


def _with_escaping_entry(repo: Repository, snap: Path, tmp_path: Path) -> Path:
    """A repository copy whose index gains an entry keyed ESCAPE (re-encrypted with age)."""
    bucket = repo.source.buckets[0]
    index = decrypt(repo, snap / "minio" / f"{bucket}.index.zst.age", tmp_path / "i.jsonl")
    lines = index.read_text().splitlines()
    forged = {**json.loads(lines[0]), "key": ESCAPE}
    index.write_text("\n".join([*lines, json.dumps(forged)]) + "\n")
    root = tmp_path / "forged"
    (root / "snapshots" / snap.name / "minio").mkdir(parents=True)
    (root / "blobs").symlink_to(repo.directory / "repository" / "blobs")
    shutil.copy(snap / "manifest.json", root / "snapshots" / snap.name / "manifest.json")
    out = root / "snapshots" / snap.name / "minio" / f"{bucket}.index.zst.age"
    subprocess.run(
        ["bash", "-c", 'set -o pipefail; zstd -q -c "$1" | age -r "$(age-keygen -y "$2")" > "$3"',
         "-", str(index), str(repo.identity), str(out)],
        check=True,
    )  # fmt: skip
    return root


def test_minio_recovery_script_to_a_directory_refuses_unsafe_keys(
    snapshot: tuple[Repository, Path], tmp_path: Path
) -> None:
    repo, snap = snapshot
    root = _with_escaping_entry(repo, snap, tmp_path)
    out = tmp_path / "a" / "b" / "out"
    done = _recover(repo, snap, "--to-dir", str(out), root=root)
    assert done.returncode == 3, done.stderr  # two keys refused, the rest recovered
    assert "refused unsafe key folder/" in done.stderr
    assert f"refused unsafe key {ESCAPE}" in done.stderr
    assert not list(tmp_path.rglob("escape.txt"))
    objects = bucket_objects(repo.source.minio, repo.source.buckets[0])
    meta = {
        d["key"]: (d["content_type"], d["metadata"])
        for d in map(json.loads, Path(f"{out}.metadata.jsonl").read_text().splitlines())
    }
    safe = {k: v for k, v in objects.items() if k != "folder/"}
    assert set(meta) == set(safe)
    for key, (data, content_type, metadata) in safe.items():
        assert (out / key).read_bytes() == data
        assert meta[key] == (content_type, metadata)


@pytest.mark.slow
def test_minio_recovery_script_to_s3_keeps_exact_keys_types_and_metadata(
    snapshot: tuple[Repository, Path], s3_server: S3Endpoint
) -> None:
    """The FORMAT.md procedure as documented: every object under its exact key."""
    if shutil.which("aws") is None:
        pytest.fail("the AWS CLI is needed (Debian: awscli)")
    repo, snap = snapshot
    target = f"recovered-{uuid.uuid4().hex[:10]}"
    s3_client(s3_server).create_bucket(Bucket=target)
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": s3_server.access_key,
        "AWS_SECRET_ACCESS_KEY": s3_server.secret_key,
        "AWS_DEFAULT_REGION": s3_server.region,
    }
    done = _recover(repo, snap, "--to-s3", target, "--endpoint-url", s3_server.endpoint_url,
                    env=env)  # fmt: skip
    assert done.returncode == 0, done.stderr
    source = bucket_objects(repo.source.minio, repo.source.buckets[0])
    assert bucket_objects(s3_server, target) == source
    assert set(AWKWARD) <= set(source)


def test_minio_recovery_script_names_a_missing_tool(
    snapshot: tuple[Repository, Path], tmp_path: Path
) -> None:
    repo, snap = snapshot
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "age", "zstd", "sha256sum", "base64", "mktemp", "dirname", "cut"):
        found = shutil.which(tool)
        assert found is not None
        (bin_dir / tool).symlink_to(found)
    done = _recover(repo, snap, "--to-dir", str(tmp_path / "out"),
                    env={"PATH": str(bin_dir)})  # fmt: skip
    assert done.returncode == 2 and "needs jq" in done.stderr


def test_signature_and_verify_key_are_unpadded_base64(
    snapshot: tuple[Repository, Path],
) -> None:
    """docs/FORMAT.md: pad with `=` to a multiple of 4, then stock `base64 -d` decodes them."""
    repo, snap = snapshot
    signature = json.loads((snap / "manifest.json").read_text())["signature"]
    key = repo.verify_key.removeprefix("drtool-verify-1:")
    for text, size in ((signature, 64), (key, 32)):
        assert "=" not in text and len(text) == (size * 4 + 2) // 3
        padded = text + "=" * (-len(text) % 4)
        raw = subprocess.run(["base64", "-d"], input=padded.encode(), capture_output=True,
                             check=True).stdout  # fmt: skip
        assert len(raw) == size
