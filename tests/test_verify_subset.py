"""Issue 18.9: ``verify --read-data-subset`` rotates through every object with a bounded cost per
run, and a blob it finds damaged is named with every snapshot referencing it and recorded, so
the next backup uploads that object again instead of reusing the blob (healing).

Real repositories (a directory; a SeaweedFS bucket) and, for healing, a real stack backed up
through the CLI. See docs/decisions/0016-verify-subset.md.
"""

from __future__ import annotations

import json
import math
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from support.backup_kit import BackupKit, make_backup_kit
from support.cli import run_drtool
from support.repo_kit import T0, RepoKit, blob_id

from drtool.endpoints import PostgresEndpoint, RedisEndpoint, S3Endpoint
from drtool.errors import IntegrityError
from drtool.repository import layout
from drtool.repository.subset import parse_budget
from drtool.services import repo as svc
from drtool.services.scheduling import jobs as jobs_svc

DAY0 = datetime(2026, 12, 1, 6, 0, tzinfo=UTC)


def drtool(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_drtool(*args, config=config, home=config.parent / "home")


def flip(storage: Any, key: str) -> None:
    """Flip one byte in the middle of a stored object (same size: only a read notices)."""
    data = bytearray(storage.get_bytes(key))
    data[len(data) // 2] ^= 0x01
    storage.put_bytes(key, bytes(data))


def reads(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Record the keys each subset run really reads (the real reader still does the work)."""
    runs: list[list[str]] = []
    real = svc._verify_object

    def spy(repo: Any, m: Any, component: str, obj: Any, identities: list[str]) -> str | None:
        runs[-1].append(obj.key)
        return real(repo, m, component, obj, identities)

    monkeypatch.setattr(svc, "_verify_object", spy)
    return runs


def repository_of(kit: RepoKit, count: int) -> set[str]:
    """``count`` snapshots sharing blobs; every distinct object key they name."""
    blobs = [blob_id() for _ in range(12)]
    for i in range(count):
        kit.snapshot(T0 + timedelta(hours=i), blobs=tuple(blobs[i : i + 6]))
    return {o.key for s in kit.snaps for o in s.manifest.objects()}


def test_subset_reads_every_object_within_the_period_and_no_more_than_the_budget(
    any_repo_kit: RepoKit, monkeypatch: pytest.MonkeyPatch
) -> None:
    every = repository_of(any_repo_kit, 5)  # 5 dumps + 10 distinct blobs
    cfg = any_repo_kit.config(identity_file=None)  # key-less: stored sha256
    runs = reads(monkeypatch)
    budget = parse_budget("20%")
    limit = math.ceil(len(every) * 0.20)
    for day in range(5):  # period: 100/20 = 5 days
        runs.append([])
        out = svc.verify_subset(cfg, budget, now=DAY0 + timedelta(days=day))
        assert out.mode == "hashes" and out.period_days == 5 and not out.damaged
        assert len(runs[-1]) == out.objects_read <= limit
        assert len(set(runs[-1])) == len(runs[-1])  # each object once per run
    assert set().union(*map(set, runs)) == every
    # deterministic: the same day reads the same objects again
    runs.append([])
    svc.verify_subset(cfg, budget, now=DAY0 + timedelta(days=2, hours=5))
    assert runs[-1] == runs[2]
    # a SIZE budget: at most the budget plus the rest of the last object begun
    sizes = {o.key: o.size for s in any_repo_kit.snaps for o in s.manifest.objects()}
    size_budget = sum(sizes.values()) // 4
    read_bytes: set[str] = set()
    for day in range(4):
        runs.append([])
        out = svc.verify_subset(cfg, parse_budget(str(size_budget)), now=DAY0 + timedelta(day))
        assert out.bytes_read <= size_budget + max(sizes.values())
        read_bytes |= set(runs[-1])
    assert read_bytes == every


def test_subset_names_a_damaged_blob_with_every_snapshot_referencing_it(
    any_repo_kit: RepoKit,
) -> None:
    shared = blob_id()
    snaps = [any_repo_kit.snapshot(T0 + timedelta(hours=h), blobs=(shared,)) for h in range(3)]
    own = any_repo_kit.snapshot(T0 + timedelta(hours=3))  # does not name the blob
    key = layout.blob_key(shared)
    flip(any_repo_kit.storage, key)
    keyless = any_repo_kit.write_config("keyless", identity_file=None)
    ids = ", ".join(s.snapshot_id for s in snaps)
    for config, mode in ((keyless, "hashes"), (any_repo_kit.config_file, "read-data")):
        run = drtool(config, "verify", "--read-data-subset", "100%")
        assert run.returncode == 5, (run.stdout, run.stderr)
        assert "Traceback" not in run.stderr
        assert f"verify subset ({mode}:" in run.stdout
        assert f"DAMAGED {key}:" in run.stdout and f"referenced by: {ids}" in run.stdout
        assert f"error: verify: 1 damaged: {key} (snapshots {ids})" in run.stderr
    rows = {r["id"]: r for r in json.loads(drtool(keyless, "list", "--json").stdout)}
    assert [rows[s.snapshot_id]["status"] for s in snaps] == ["DAMAGED"] * 3
    assert rows[own.snapshot_id]["status"] == "VALID"
    # a bad budget is one line, exit 2
    bad = drtool(keyless, "verify", "--read-data-subset", "0%")
    assert bad.returncode == 2 and "error: --read-data-subset: expected" in bad.stderr
    assert "Traceback" not in bad.stderr


@pytest.mark.slow
def test_next_backup_heals_a_blob_the_subset_found_damaged(
    tmp_path: Path,
    pg_database: PostgresEndpoint,
    redis_db: RedisEndpoint,
    s3_server: S3Endpoint,
    s3_bucket: str,
) -> None:
    """Fails on the old code: the second backup reused the damaged blob."""
    kit: BackupKit = make_backup_kit(tmp_path, pg_database, redis_db, s3_server, s3_bucket)
    first = kit.backup_ok("minio")
    index1 = kit.index(first)
    victim = sorted(index1)[0]
    damaged = layout.blob_key(index1[victim].blob)
    flip(kit.storage(), damaged)
    # the backup host's scheduled check: key-less, signed record of the damage
    run = kit.drtool("verify", "--read-data-subset", "100%")
    assert run.returncode == 5 and f"{damaged} (snapshots {first})" in run.stderr

    done = kit.backup("minio")
    assert done.returncode == 0, done.stderr
    second = json.loads(done.stdout)["snapshot_id"]
    assert f"{damaged} was found damaged" in done.stderr and first in done.stderr
    index2 = kit.index(second)
    assert index2[victim].blob != index1[victim].blob  # uploaded again from the source
    assert index2[victim].sha256 == index1[victim].sha256
    details = next(c for c in kit.manifest(second).components if c.name == "minio").details
    assert details[kit.bucket]["healed"] == [damaged]
    assert damaged not in {o.key for o in kit.manifest(second).objects()}
    # the summary says what was checked, not more
    summary = json.loads(done.stdout)["verified"]
    assert summary.startswith("committed; manifest read back and its signature verified; ")
    assert summary.endswith(f"; {len(index1) - 1} reused blobs not re-read")
    verified = kit.drtool("verify", "--read-data", second, config=kit.operator_config)
    assert verified.returncode == 0, verified.stderr
    assert kit.listed()[first] == "DAMAGED"


def test_scheduled_verify_job_reads_the_subset_and_fails_naming_the_snapshots(
    repo_kit: RepoKit, tmp_path: Path
) -> None:
    (tmp_path / "schedules").mkdir()
    (tmp_path / "schedules" / "v.toml").write_text(
        '[jobs.verify]\nkind = "verify"\nat = "06:00"\nsnapshot = "unverified"\n'
        'read_data_subset = "100%"\n'
    )
    (spec,) = jobs_svc.load_schedules(tmp_path / "schedules")
    shared = blob_id()
    snaps = [repo_kit.snapshot(T0 + timedelta(hours=h), blobs=(shared,)) for h in range(2)]
    cfg = repo_kit.config(identity_file=None)
    done = jobs_svc.execute(spec, cfg, home=tmp_path, env={})
    assert "; subset (hashes) read 3 of 3 objects" in done.message
    key = layout.blob_key(shared)
    flip(repo_kit.storage, key)
    with pytest.raises(IntegrityError) as caught:
        jobs_svc.execute(spec, cfg, home=tmp_path, env={})
    ids = ", ".join(s.snapshot_id for s in snaps)
    assert caught.value.message == f"verify subset: damaged: {key} (snapshots {ids})"
