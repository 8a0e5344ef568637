"""Restore to a moment across a promotion: the WAL of two timelines in one repository.

The streamer follows a streaming standby (ADR 0015: it goes on streaming when that standby
is promoted, onto timeline 2, and seals ``00000002.history``). The base backup is taken on
the primary, on timeline 1. Rows A and B commit on timeline 1, the standby is promoted, C
and D commit on timeline 2. A restore to a moment after C must follow the switch (recovery
needs the history file and the timeline-2 copy of the segment holding the switch point, whose
first pages still carry timeline 1's header) and hold A, B, C but not D; a restore to a
moment between A and B must stop on timeline 1, before the switch point, holding A only.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import pytest
from support.cli import run_drtool
from support.wal_kit import (  # noqa: F401 (fixtures)
    SEG,
    WalKit,
    admin,
    kit_fixture,
    make_kit,
    one,
    restored_notes,
    start_standby,
    start_wal_server,
    stop_streamer,
    wait_for,
    wal_pg_fixture,
    write_rows,
)

from drtool.config import load_config
from drtool.endpoints import PostgresEndpoint
from drtool.runtime.pgserver import PostgresServer
from drtool.services.backup import run_backup
from drtool.wal import continuity
from drtool.wal.names import parse_lsn, parse_segment

pytestmark = pytest.mark.slow


def _switch_point(kit: WalKit) -> int:
    """Where timeline 2 branched off timeline 1, read from the sealed history file."""
    entry = kit.index().entries["00000002.history"]
    first = kit.decrypt(entry).decode().split("\n", 1)[0].split("\t")
    assert first[0] == "1", first
    return parse_lsn(first[1])


def _restorer(
    kit: WalKit, runtime_root: Path, base: str
) -> Callable[[datetime], tuple[list[str], dict[str, str]]]:
    """``restore --at`` into a new directory: the notes the copy holds and the result."""
    scratch = runtime_root / f"pitr-tl-{uuid.uuid4().hex[:6]}"  # the postgres user enters it
    scratch.mkdir(mode=0o711)

    def restore(at: datetime) -> tuple[list[str], dict[str, str]]:
        result = run_drtool(
            "restore",
            "--component",
            "postgres",
            "--yes",
            "--json",
            "--at",
            at.isoformat(),
            "--into",
            str(scratch / f"restored-{uuid.uuid4().hex[:6]}"),
            config=kit.operator,
        )
        assert result.returncode == 0, result.stderr
        out = json.loads(result.stdout)
        assert out["base_snapshot"] == base
        return restored_notes(result, kit.server.password), out

    return restore


def _commit_a_and_b(primary: PostgresEndpoint, standby: PostgresEndpoint) -> datetime:
    """A, the moment after it, B on timeline 1; returns once the standby replayed B. No
    switch after B: the promotion lands mid-segment, as a real failover does."""
    with admin(primary) as conn:
        conn.execute("INSERT INTO marks VALUES ('A')")
        at = datetime.fromisoformat(one(conn, "SELECT clock_timestamp()"))
        time.sleep(0.05)
        conn.execute("INSERT INTO marks VALUES ('B')")
    with admin(standby) as conn:
        wait_for("the standby to replay B", lambda: one(conn, "SELECT count(*) FROM marks") == "2")
    return at


def _promote_and_commit_c_and_d(standby: PostgresEndpoint) -> tuple[datetime, int]:
    """Promote (timeline 2), then C, the moment after it, D; returns it and D's end."""
    with admin(standby) as conn:
        conn.execute("SELECT pg_promote()")
        wait_for("the promotion", lambda: one(conn, "SELECT pg_is_in_recovery()") == "False")
        conn.execute("INSERT INTO marks VALUES ('C')")
        at = datetime.fromisoformat(one(conn, "SELECT clock_timestamp()"))
        time.sleep(0.05)
        conn.execute("INSERT INTO marks VALUES ('D')")
        return at, parse_lsn(one(conn, "SELECT pg_current_wal_insert_lsn()"))


def _wait_sealed_past(kit: WalKit, server: PostgresEndpoint, end: int) -> None:
    """More WAL, until D's segment and the one after it are sealed on timeline 2."""
    write_rows(server)
    needed = end // SEG + 1
    wait_for(
        "timeline 2 sealed past D",
        lambda: any(
            n.startswith("00000002") and parse_segment(n, SEG).segno >= needed
            for n in kit.segments()
        ),
    )


def _connected(kit: WalKit, server: PostgresEndpoint) -> None:
    with admin(server) as conn:
        wait_for(
            "the receiver to connect",
            lambda: conn.execute(
                "SELECT 1 FROM pg_stat_replication WHERE application_name = %s",
                (f"drtool-wal-{kit.slot}",),
            ).fetchone(),
        )


def test_restore_follows_a_promotion_onto_timeline_2_and_stops_on_timeline_1_before_it(
    kit: WalKit, runtime_root: Path
) -> None:
    primary = kit.server
    standby = start_standby(runtime_root, primary)
    stream_config = kit.root / "stream-from-standby.toml"
    stream_config.write_text(
        kit.config.read_text().replace(f"port = {primary.port}", f"port = {standby.port}")
    )
    streamer = replace(kit, config=stream_config)
    proc = streamer.start()
    try:
        _connected(kit, standby.endpoint)
        with admin(primary.endpoint) as conn:
            conn.execute("CREATE TABLE marks (note text)")
            conn.execute("SELECT pg_switch_wal()")
        # the base backup on the primary (timeline 1), its WAL streamed through the standby
        base = run_backup(
            load_config(kit.config, {}), home=kit.root, env={}, components=("postgres-base",)
        ).snapshot_id
        at_tl1 = _commit_a_and_b(primary.endpoint, standby.endpoint)
        at_tl2, end = _promote_and_commit_c_and_d(standby.endpoint)
        _wait_sealed_past(kit, standby.endpoint, end)
        assert stop_streamer(proc) == 0, kit.log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
        standby.stop()
    switch = _switch_point(kit)
    assert switch % SEG, "the switch point must lie inside a segment"
    restore = _restorer(kit, runtime_root, base)
    notes, out = restore(at_tl2)  # (a) after the promotion: timeline 2
    assert notes == ["A", "B", "C"]
    assert parse_lsn(out["reached_lsn"]) > switch
    notes, out = restore(at_tl1)  # (b) before it: timeline 1, short of the switch point
    assert notes == ["A"]
    assert parse_lsn(out["reached_lsn"]) < switch


def test_restore_across_a_failover_after_the_streamer_was_pointed_at_the_new_primary(
    tmp_path: Path, runtime_root: Path
) -> None:
    """The production shape: the streamer follows the primary; the primary stops, the standby
    is promoted, and the streamer's configuration is pointed at it (its slot is created
    there, with an ALARM: the slot it used is gone). pg_receivewal resumes timeline 1 from
    the spool's last segment, follows the switch, and the restore works across it."""
    primary = start_wal_server(runtime_root, 15)
    kits = make_kit(tmp_path, primary)
    kit = next(kits)
    standby = start_standby(runtime_root, primary)
    try:
        proc = kit.start()
        try:
            _connected(kit, primary.endpoint)
            with admin(primary.endpoint) as conn:
                conn.execute("CREATE TABLE marks (note text)")
            write_rows(primary.endpoint)
            wait_for("a sealed segment", lambda: kit.segments())
            base = run_backup(
                load_config(kit.config, {}), home=kit.root, env={}, components=("postgres-base",)
            ).snapshot_id
            at_tl1 = _commit_a_and_b(primary.endpoint, standby.endpoint)
            primary.stop()  # the primary is lost (a clean stop: both receivers got its WAL)
            at_tl2, end = _promote_and_commit_c_and_d(standby.endpoint)
            assert stop_streamer(proc) == 0, kit.log.read_text()
            text = kit.config.read_text()
            kit.config.write_text(text.replace(f"port = {primary.port}", f"port = {standby.port}"))
            proc = kit.start()
            _wait_sealed_past(kit, standby.endpoint, end)
            assert stop_streamer(proc) == 0, kit.log.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
    finally:
        standby.stop()
        primary.stop()
    assert f"ALARM: replication slot {kit.slot} is missing" in kit.log.read_text()
    index = kit.index()
    cont = continuity.check(index)
    assert cont.gaps == [] and cont.problems == [], [g.describe() for g in cont.gaps]
    switch = _switch_point(kit)
    restore = _restorer(kit, runtime_root, base)
    notes, out = restore(at_tl2)
    assert notes == ["A", "B", "C"]
    assert parse_lsn(out["reached_lsn"]) > switch
    notes, out = restore(at_tl1)
    assert notes == ["A"]
    assert parse_lsn(out["reached_lsn"]) < switch


def _switch_segments(ep: PostgresEndpoint, count: int) -> None:
    """``count`` segment switches, each after a commit: whole segments on ``ep``'s timeline."""
    with admin(ep) as conn:
        for _ in range(count):
            conn.execute("INSERT INTO marks VALUES ('filler')")
            conn.execute("SELECT pg_switch_wal()")


def _abandoned_tail(primary: PostgresServer, switch_seg: int) -> list[Path]:
    """The old primary's timeline-1 segments after the switch segment, complete ones only
    (not the one being written, nor recycled files renamed ahead of it)."""
    with admin(primary.endpoint) as conn:
        current = one(conn, "SELECT pg_walfile_name(pg_current_wal_insert_lsn())")
    now = parse_segment(current, SEG).segno
    return sorted(
        p
        for p in (primary.data_dir / "pg_wal").iterdir()
        if p.name.startswith("00000001")
        and len(p.name) == 24
        and switch_seg < parse_segment(p.name, SEG).segno < now
    )


def _two_histories(kit: WalKit, runtime_root: Path) -> tuple[str, datetime]:
    """The base, A and B on timeline 1, the promotion, C and D on timeline 2 (streamed through
    the standby); then both go on: whole segments on timeline 1 (the old primary, never
    streamed), and on timeline 2 a moment between E and F (returned, with the base)."""
    primary = kit.server
    standby = start_standby(runtime_root, primary)
    stream_config = kit.root / "stream-from-standby.toml"
    stream_config.write_text(
        kit.config.read_text().replace(f"port = {primary.port}", f"port = {standby.port}")
    )
    proc = replace(kit, config=stream_config).start()
    try:
        _connected(kit, standby.endpoint)
        with admin(primary.endpoint) as conn:
            conn.execute("DROP TABLE IF EXISTS marks")  # the module's server: another test's
            conn.execute("CREATE TABLE marks (note text)")
            conn.execute("SELECT pg_switch_wal()")
        base = run_backup(
            load_config(kit.config, {}), home=kit.root, env={}, components=("postgres-base",)
        ).snapshot_id
        _commit_a_and_b(primary.endpoint, standby.endpoint)
        _promote_and_commit_c_and_d(standby.endpoint)
        _switch_segments(primary.endpoint, 3)  # timeline 1 goes on: the abandoned tail
        _switch_segments(standby.endpoint, 2)
        with admin(standby.endpoint) as conn:
            conn.execute("INSERT INTO marks VALUES ('E')")
            at = datetime.fromisoformat(one(conn, "SELECT clock_timestamp()"))
            time.sleep(0.05)
            conn.execute("INSERT INTO marks VALUES ('F')")
            end = parse_lsn(one(conn, "SELECT pg_current_wal_insert_lsn()"))
        _switch_segments(standby.endpoint, 1)
        _wait_sealed_past(kit, standby.endpoint, end)
        assert stop_streamer(proc) == 0, kit.log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
        standby.stop()
    return base, at


def test_a_gap_on_the_followed_timeline_is_named_though_the_abandoned_one_holds_that_segment(
    kit: WalKit, runtime_root: Path
) -> None:
    """Recovery follows the newest timeline and never reads an older timeline's file after a
    newer one's. The old primary goes on writing timeline 1 after the standby's promotion (its
    segments past the switch are sealed into the repository: an abandoned tail), and the
    timeline-2 copy of the segment after the switch is gone: a moment after it is refused
    naming 00000002…, not served short (before: the timeline-1 copy counted as present, the
    plan showed no gap and recovery ended in the switch segment, exit 0). A moment only the
    abandoned tail reaches is refused naming timeline 1; with the segment back, the moment is
    restored along timeline 2."""
    primary = kit.server
    base, at = _two_histories(kit, runtime_root)
    switch_seg = _switch_point(kit) // SEG
    time.sleep(1.1)  # sealed times have 1 s steps: the tail is sealed after this moment
    with admin(primary.endpoint) as conn:
        after_tl2 = datetime.fromisoformat(one(conn, "SELECT clock_timestamp()"))
    time.sleep(1.1)
    tail = _abandoned_tail(primary, switch_seg)
    assert len(tail) >= 2, tail
    assert kit.seal(tail) == [p.name for p in tail]
    gone = f"00000002{tail[0].name[8:]}"  # timeline 2's copy of the segment after the switch
    assert gone in kit.segments() and tail[0].name in kit.segments()
    restore = _restorer(kit, runtime_root, base)
    scratch = runtime_root / f"pitr-gap-{uuid.uuid4().hex[:6]}"
    scratch.mkdir(mode=0o711)
    record = kit.forget(gone, base)
    try:
        into = scratch / "restored"
        result = run_drtool(
            "restore", "--component", "postgres", "--yes", "--at", at.isoformat(),
            "--into", str(into), config=kit.operator,
        )  # fmt: skip
        assert result.returncode == 10, result.stderr
        assert f"WAL segment {gone} is missing" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr and not into.exists()
    finally:
        record.unlink()
    result = run_drtool(
        "restore", "--component", "postgres", "--yes", "--at", after_tl2.isoformat(),
        "--into", str(scratch / "restored"), config=kit.operator,
    )  # fmt: skip
    assert result.returncode == 10, result.stderr
    assert "only WAL of timeline 1 after it was left" in result.stderr, result.stderr
    assert not (scratch / "restored").exists()
    notes, out = restore(at)
    assert [n for n in notes if n != "filler"] == ["A", "B", "C", "D", "E"]
    said = " ".join(out["notes"])  # both histories held the moment: which one was restored
    assert "timeline 1 also holds WAL after it was left" in said, out["notes"]
