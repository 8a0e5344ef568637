"""``drtool restore --at|--lsn --component postgres --into DIR`` and WAL retention, for real.

One history per PostgreSQL major (Debian's 15, the PyPI wheel's 16): a streamer runs, a base
backup is taken, transaction A commits, the target (a moment and a WAL position) is read,
transaction B commits, and the WAL holding B is sealed. A restore to the target must hold A and
not B, exactly, on both targets; the source keeps running untouched. Then the refusals: a
target before the oldest base and after the newest WAL (exit 10, the window named, nothing
created), a deleted and a bit-flipped segment (exit 5 before anything is created, naming it).
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from support.cli import run_drtool
from support.wal_kit import (
    SEG,
    History,
    admin,
    make_kit,
    one,
    record_history,
    restored_notes,
    start_wal_server,
)

from drtool.errors import IntegrityError
from drtool.wal.history import Branch, Followed, parse_history
from drtool.wal.names import parse_lsn, segment_of_lsn


@pytest.fixture(scope="module", params=[15, 16], ids=["pg15", "pg16"])
def history(
    request: pytest.FixtureRequest, runtime_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[History]:
    server = start_wal_server(runtime_root, request.param)
    kits = make_kit(tmp_path_factory.mktemp(f"pitr{request.param}"), server)
    kit = next(kits)
    scratch = runtime_root / f"pitr-{uuid.uuid4().hex[:6]}"  # the postgres user can enter it
    scratch.mkdir(mode=0o711)
    try:
        yield record_history(kit, scratch)
    finally:
        next(kits, None)
        server.stop()


@pytest.mark.slow
def test_restore_at_a_moment_lands_between_two_transactions(history: History) -> None:
    into = history.new_dir()
    dry = history.restore("--at", history.at.isoformat(), "--into", str(into), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert history.base in dry.stdout and "stored size and sha256 match" in dry.stdout
    assert not into.exists()
    result = history.restore("--at", history.at.isoformat(), "--into", str(into), "--json")
    assert restored_notes(result, history.kit.server.password) == ["A"]
    out = json.loads(result.stdout)
    assert out["base_snapshot"] == history.base
    reached = datetime.fromisoformat(out["reached_time"])
    assert reached <= history.at  # A's commit, the last one replayed
    assert into.stat().st_mode & 0o777 == 0o700
    assert not list(history.scratch.glob(".*staging*")), "the staged WAL is removed"
    # the source kept running, untouched: both transactions, still writable, not in recovery
    with admin(history.kit.server.endpoint) as conn:
        assert [r[0] for r in conn.execute("SELECT note FROM marks ORDER BY note")] == ["A", "B"]
        assert one(conn, "SELECT pg_is_in_recovery()") == "False"
        conn.execute("INSERT INTO walt (body) VALUES ('still writable')")


@pytest.mark.slow
def test_restore_to_an_lsn_lands_between_two_transactions(history: History) -> None:
    into = history.new_dir()
    result = history.restore("--lsn", history.lsn, "--into", str(into), "--json")
    assert restored_notes(result, history.kit.server.password, restart=True) == ["A"]
    assert "recovery_target" not in (into / "postgresql.auto.conf").read_text()
    out = json.loads(result.stdout)
    assert parse_lsn(out["reached_lsn"]) <= parse_lsn(history.lsn)


@pytest.mark.slow
def test_a_moment_outside_the_window_is_refused_naming_it_and_nothing_is_created(
    history: History,
) -> None:
    for moment in (history.before_base, datetime.now(UTC) + timedelta(hours=1)):
        into = history.new_dir()
        result = history.restore("--at", moment.isoformat(), "--into", str(into))
        assert result.returncode == 10, result.stderr
        assert "the window is" in result.stderr and "Traceback" not in result.stderr
        assert not into.exists()
        assert not list(history.scratch.glob(f".{into.name}*"))
    naive = history.at.replace(tzinfo=None).isoformat()
    result = history.restore("--at", naive, "--into", str(history.new_dir()))
    assert result.returncode == 2 and "zone" in result.stderr


def _first_needed_segment(history: History) -> str:
    segments = history.kit.segments()
    needed = segment_of_lsn(parse_lsn(history.lsn), 1, SEG).name(SEG)
    return next(n for n in segments if n[8:] >= needed[8:])


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["deleted", "bit-flipped"])
def test_a_damaged_segment_is_refused_before_anything_is_created(
    history: History, damage: str
) -> None:
    name = _first_needed_segment(history)
    stored = history.kit.repo_dir / f"wal/{name[:8]}/{name}.zst.age"
    saved = history.kit.root / "saved-segment"
    shutil.copy2(stored, saved)
    try:
        if damage == "deleted":
            stored.unlink()
        else:
            raw = bytearray(stored.read_bytes())
            raw[len(raw) // 2] ^= 0x04
            stored.write_bytes(bytes(raw))
        into = history.new_dir()
        result = history.restore("--at", history.at.isoformat(), "--into", str(into))
        assert result.returncode == 5, result.stderr
        assert name in result.stderr and "Traceback" not in result.stderr
        assert not into.exists()
        assert not list(history.scratch.glob(f".{into.name}*"))
    finally:
        shutil.copy2(saved, stored)


@pytest.mark.slow
def test_a_gap_before_the_target_names_the_missing_segment_and_the_latest_moment(
    history: History,
) -> None:
    """A gap the index itself shows (as a dropped slot leaves): made here by a signed removal
    record for the segment holding the target, which the index then lacks."""
    kit = history.kit
    name = _first_needed_segment(history)
    record = kit.forget(name, history.base)
    try:
        into = history.new_dir()
        result = history.restore("--at", history.at.isoformat(), "--into", str(into))
        assert result.returncode == 10, (result.stderr, name, kit.segments(), history.lsn)
        assert f"WAL segment {name} is missing" in result.stderr
        assert "the latest reachable moment is" in result.stderr
        assert not into.exists()
    finally:
        record.unlink()


@pytest.mark.slow
def test_restore_into_a_non_empty_directory_is_refused(history: History) -> None:
    into = history.new_dir()
    into.mkdir()
    (into / "keep-me").write_text("x")
    result = history.restore("--at", history.at.isoformat(), "--into", str(into))
    assert result.returncode == 2 and "not an empty directory" in result.stderr
    assert [p.name for p in into.iterdir()] == ["keep-me"]


def test_a_restore_to_a_moment_refuses_target_and_force_before_reading_anything(
    tmp_path: Path,
) -> None:
    """--into is the only place it goes: --target/--force (a running database) are refused."""
    for extra in (["--target", "staging"], ["--force"]):
        result = run_drtool(
            "restore",
            "--component",
            "postgres",
            "--at",
            "2026-12-05T10:00:00Z",
            "--into",
            str(tmp_path / "new"),
            *extra,
            config=tmp_path / "absent.toml",
        )
        assert result.returncode == 2 and "new data directory (--into DIR) only" in result.stderr
        assert not (tmp_path / "new").exists()
    result = run_drtool(
        "restore",
        "--component",
        "postgres",
        "--at",
        "2026-12-05T10:00:00Z",
        config=tmp_path / "absent.toml",
    )
    assert result.returncode == 2 and "add --into DIR" in result.stderr


def test_a_history_file_whose_timelines_or_switch_points_go_back_is_refused() -> None:
    """As PostgreSQL's readTimeLineHistory: increasing timelines below the file's own, and
    switch points that never go back; anything else is not a history (exit 5), never a
    wrong run."""
    good = "1\t0/5000000\tno recovery target specified\n2\t0/7000000\tx\n"
    assert parse_history(good, name="00000003.history") == [
        Branch(1, 0x5000000),
        Branch(2, 0x7000000),
    ]
    for bad in (
        "2\t0/5000000\tx\n1\t0/7000000\tx\n",  # timelines go back
        "1\t0/7000000\tx\n2\t0/5000000\tx\n",  # switch points go back
        "1\t0/5000000\tx\n3\t0/7000000\tx\n",  # not below the file's own timeline
    ):
        with pytest.raises(IntegrityError):
            parse_history(bad, name="00000003.history")
    followed = Followed(3, (Branch(1, 0x5000000 + 10), Branch(2, 0x7000000)))
    size = 0x1000000
    assert [followed.timeline_for(n, size) for n in (4, 5, 6, 7, 8)] == [1, 2, 2, 3, 3]
    assert followed.end_of(1) == 0x500000A and followed.end_of(3) is None
