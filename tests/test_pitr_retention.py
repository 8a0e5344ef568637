"""WAL retention in ``drtool prune`` (issue 12 item 5), against a real streaming PostgreSQL 15.

Two base backups with WAL streamed around them; a policy keeping only the newer one removes
exactly the WAL before its start segment, never opening a gap, and records the removal in a
signed record so a key-less ``wal verify`` still passes. Deleting that record shows the
removed segments as missing (a removal cannot be hidden). With no base backup kept, all WAL
stays and prune says so.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from support.cli import run_drtool
from support.wal_kit import (  # noqa: F401 (fixtures)
    SEG,
    WalKit,
    kit_fixture,
    stop_streamer,
    wait_for,
    wal_pg_fixture,
    write_rows,
)

from drtool import keys
from drtool.config import load_config
from drtool.repository import catalog
from drtool.repository.access import open_repo
from drtool.repository.retention import Policy
from drtool.services import prune as prune_svc
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


def test_prune_removes_wal_before_the_oldest_kept_base_and_never_opens_a_gap(kit: WalKit) -> None:
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
        assert stop_streamer(proc) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
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
