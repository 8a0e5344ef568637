"""WAL retention in ``drtool prune`` (issue 12 item 5), against a real streaming PostgreSQL 15.

Two base backups with WAL streamed around them; a policy keeping only the newer one removes
exactly the WAL before its start segment, never opening a gap, and records the removal in a
signed record so a key-less ``wal verify`` still passes. Deleting that record shows the
removed segments as missing (a removal cannot be hidden). With no base backup kept, all WAL
stays and prune says so.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from support.cli import run_drtool
from support.wal_kit import (  # noqa: F401 (fixtures)
    SEG,
    WalKit,
    kit_fixture,
    make_kit,
    stop_streamer,
    wait_for,
    wal_pg_fixture,
    write_rows,
)

from drtool import keys
from drtool.config import load_config
from drtool.endpoints import S3Endpoint
from drtool.repository import catalog
from drtool.repository.access import open_repo
from drtool.repository.retention import Policy
from drtool.runtime.pgserver import PostgresServer
from drtool.s3session import s3_client
from drtool.services import prune as prune_svc
from drtool.services import wal_prune
from drtool.wal import continuity
from drtool.wal.names import parse_segment
from drtool.wal.pruned import PRUNED_PREFIX, append_pruned, load_pruned

pytestmark = pytest.mark.slow


def _base(kit: WalKit) -> str:
    from drtool.services.backup import run_backup

    cfg = load_config(kit.config, {})
    return run_backup(cfg, home=kit.root, env={}, components=("postgres-base",)).snapshot_id


def _start_segment(kit: WalKit, snapshot: str) -> str:
    repo = open_repo(load_config(kit.operator, {}))
    records = catalog.list_snapshots(repo.storage, repo.verify_keys, repo.info.repo_id)
    m = next(r.manifest for r in records if r.snapshot_id == snapshot)
    assert m is not None
    comp = m.component("postgres-base")
    assert comp is not None
    return str(comp.details["start_segment"])


def _segno(name: str) -> int:
    return parse_segment(name, SEG).segno


def _two_bases(kit: WalKit) -> tuple[str, str, str]:
    """Stream while two base backups are taken; the second's start segment (the floor a
    policy keeping one sets) and WAL after it are sealed. Returns (first, second, floor)."""
    proc = kit.start()
    try:
        write_rows(kit.server.endpoint)
        wait_for("a sealed segment", lambda: len(kit.segments()) >= 1)
        first = _base(kit)
        for _ in range(3):
            write_rows(kit.server.endpoint)
        time.sleep(1.1)  # snapshot ids have one-second steps
        second = _base(kit)
        floor = _start_segment(kit, second)
        write_rows(kit.server.endpoint)
        wait_for(f"WAL after {floor}", lambda: any(n > floor for n in kit.segments()))
        assert stop_streamer(proc) == 0, kit.log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
    return first, second, floor


def test_prune_removes_wal_before_the_oldest_kept_base_and_never_opens_a_gap(kit: WalKit) -> None:
    first, second, floor = _two_bases(kit)
    before = kit.segments()
    older = [n for n in before if _segno(n) < _segno(floor)]
    assert older, f"the first base's WAL precedes {floor}: {before}"
    assert _start_segment(kit, first) in older

    dry = run_drtool(
        "prune", "--keep-last", "1", "--count-unverified", "--dry-run", config=kit.config
    )
    assert dry.returncode == 0, dry.stderr
    assert f"WAL: WAL from {floor} on kept" in dry.stdout
    assert kit.segments() == before  # a dry run deletes nothing

    plan = prune_svc.prune(
        load_config(kit.config, {}), Policy(last=1), dry_run=False, count_unverified=True
    )
    assert plan.forget == [first]
    assert plan.wal.floor_segment == floor and sorted(plan.wal.remove) == older
    after = kit.segments()
    assert after == [n for n in before if n not in older]  # exactly the older ones went
    assert min(after) == floor or _segno(min(after)) == _segno(floor)
    for name in older:
        assert not (kit.repo_dir / f"wal/{name[:8]}/{name}.zst.age").exists()
    index = kit.index()
    assert continuity.check(index).gaps == [] and index.problems == []
    assert set(index.removed) == set(older)
    verify = run_drtool("wal", "verify", config=kit.operator)
    assert verify.returncode == 0, verify.stderr

    # the removal record is what makes the removal legitimate: without it, segments are missing
    records = sorted((kit.repo_dir / PRUNED_PREFIX).iterdir())
    assert len(records) == 1
    # a record signed by a key nobody pinned cannot make a deletion look planned
    forged = kit.root / "keys" / "forger.key"
    keys.write_signing_key(forged)
    repo = open_repo(load_config(kit.operator, {}))
    append_pruned(
        repo.storage,
        load_pruned(repo.storage, repo.verify_keys, repo.info.repo_id),
        repo_id=repo.info.repo_id,
        signing_key=keys.load_signing_key(forged),
        host="forger",
        created="2026-12-05T00:00:00+00:00",
        floor_segment=after[-1],
        base_snapshot=second,
        removed=[after[0]],
    )
    verify = run_drtool("wal", "verify", config=kit.operator)
    assert verify.returncode == 5 and "signature does not verify" in verify.stderr + verify.stdout
    (kit.repo_dir / PRUNED_PREFIX / "0000000002.json").unlink()
    records[0].unlink()
    verify = run_drtool("wal", "verify", config=kit.operator)
    assert verify.returncode == 5
    assert older[0] in verify.stderr + verify.stdout


def test_prune_with_no_base_backup_keeps_all_wal_and_says_so(kit: WalKit, tmp_path: Path) -> None:
    write_rows(kit.server.endpoint)
    assert kit.start("--until-idle").wait(120) == 0, kit.log.read_text()
    before = kit.segments()
    assert before
    result = run_drtool("backup", "--component", "postgres", config=kit.config)
    assert result.returncode == 0, result.stderr
    result = run_drtool("prune", "--keep-last", "1", "--count-unverified", config=kit.config)
    assert result.returncode == 0, result.stderr
    assert "WAL: no base backup is kept: all WAL kept" in result.stdout
    assert kit.segments() == before


def _locked_kit(tmp_path: Path, wal_pg: PostgresServer, s3_server: S3Endpoint) -> Iterator[WalKit]:
    """A WAL kit whose repository is a bucket with Object Lock (GOVERNANCE, 1 day)."""
    bucket = f"walock-{uuid.uuid4().hex[:10]}"
    s3_client(s3_server).create_bucket(Bucket=bucket, ObjectLockEnabledForBucket=True)
    secrets = tmp_path / "s3"
    secrets.mkdir(mode=0o700)
    for name, value in (("ak", s3_server.access_key), ("sk", s3_server.secret_key)):
        (secrets / name).write_text(value)
        (secrets / name).chmod(0o600)
    repository = {
        "url": f"s3://{bucket}/drtool",
        "endpoint_url": s3_server.endpoint_url,
        "access_key_file": str(secrets / "ak"),
        "secret_key_file": str(secrets / "sk"),
        "object_lock_mode": "GOVERNANCE",
        "retain_days": 1,
    }
    yield from make_kit(tmp_path, wal_pg, repository)


def test_prune_defers_wal_that_object_lock_retains_and_removes_it_once_expired(
    tmp_path: Path, wal_pg: PostgresServer, s3_server: S3Endpoint
) -> None:
    """ADR 0007 for WAL: the streamer locks what it stores; prune never claims, records or
    makes a deletion Object Lock refuses, never opens a gap, and removes the WAL later."""
    kits = _locked_kit(tmp_path, wal_pg, s3_server)
    kit = next(kits)
    cfg = load_config(kit.operator, {})
    bucket, prefix = cfg.repository.url.removeprefix("s3://").split("/", 1)
    admin = s3_client(s3_server)

    def stored(under: str) -> list[str]:
        page = admin.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/{under}")
        return [o["Key"] for o in page.get("Contents", [])]

    def wal_key(name: str) -> str:
        return f"{prefix}/wal/{name[:8]}/{name}.zst.age"

    def expire(keys: list[str]) -> None:  # the admin shortens them (governance bypass)
        soon = datetime.now(UTC) + timedelta(seconds=2)
        for key in keys:
            admin.put_object_retention(
                Bucket=bucket,
                Key=key,
                Retention={"Mode": "GOVERNANCE", "RetainUntilDate": soon},
                BypassGovernanceRetention=True,
            )
        time.sleep(3)

    def prune() -> str:
        result = run_drtool("prune", "--keep-last", "1", "--count-unverified", config=kit.config)
        assert result.returncode == 0, result.stderr
        return result.stdout

    try:
        first, _second, floor = _two_bases(kit)
        before = kit.segments()
        older = [n for n in before if _segno(n) < _segno(floor)]
        below_first = [n for n in older if _segno(n) < _segno(_start_segment(kit, first))]
        assert below_first, before
        # the streamer stored every WAL file and index chunk under the repository's lock
        now = datetime.now(UTC)
        for key in stored("wal/"):
            until = admin.get_object_retention(Bucket=bucket, Key=key)["Retention"]
            assert timedelta(hours=23) < until["RetainUntilDate"] - now <= timedelta(days=1), key

        # 1. everything retained: the forgotten base is deferred whole, so its WAL stays too
        out = prune()
        assert "deleted 0 snapshots" in out and "deferred 1 snapshots" in out, out
        assert f"WAL from {_start_segment(kit, first)} on kept" in out, out
        assert f"{len(below_first)} deferred that Object Lock retains" in out, out
        assert kit.segments() == before and stored("wal/pruned/") == []

        # 2. the base and all older WAL expired but the oldest segment: nothing of the WAL
        # goes (removing the newer ones would open a gap behind the one still locked)
        expire(stored(f"snapshots/{first}/") + [wal_key(n) for n in older[1:]])
        out = prune()
        assert "deleted 1 snapshots" in out, out
        assert f"WAL from {floor} on kept" in out, out
        assert f"1 deferred that Object Lock retains, and the {len(older) - 1} after them" in out
        assert kit.segments() == before and stored("wal/pruned/") == []
        assert run_drtool("wal", "verify", config=kit.operator).returncode == 0

        # 3. the oldest expired too: exactly the older WAL goes, recorded, no gap
        expire([wal_key(older[0])])
        out = prune()
        assert f"{len(older)} older WAL objects to remove" in out, out
        assert kit.segments() == [n for n in before if n not in older]
        assert not set(map(wal_key, older)) & set(stored("wal/"))
        assert len(stored("wal/pruned/")) == 1  # the signed record names what went, only
        repo = open_repo(cfg)
        assert sorted(load_pruned(repo.storage, repo.verify_keys, repo.info.repo_id).removed) == (
            older
        )
        index = kit.index()
        assert continuity.check(index).gaps == [] and index.problems == []
        verify = run_drtool("wal", "verify", config=kit.operator)
        assert verify.returncode == 0, verify.stdout + verify.stderr
    finally:
        next(kits, None)


def test_deferring_keeps_the_note_of_a_plan_that_removes_nothing() -> None:
    """plan_wal's early notes (no base kept, the index has problems) plan no removal; a base
    deferred under Object Lock used to set a floor and overwrite them with "WAL from … on
    kept; 0 older WAL objects to remove", hiding why nothing goes."""
    for note in (
        "no base backup is kept: all WAL kept (a restore to a moment needs one)",
        "the WAL index has problems (x): all WAL kept",
    ):
        plan = wal_prune.WalPrunePlan(note=note, starts={"s1": "000000010000000000000003"})
        assert wal_prune.defer_locked(plan, {}, {"s1"}) == {}
        assert plan.note == note and plan.floor_segment is None and plan.keys == []
