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
    one,
    restored_notes,
    start_standby,
    stop_streamer,
    wait_for,
    wal_pg_fixture,
    write_rows,
)

from drtool.config import load_config
from drtool.services.backup import run_backup
from drtool.wal.names import parse_lsn, parse_segment

pytestmark = pytest.mark.slow


def _switch_point(kit: WalKit) -> int:
    """Where timeline 2 branched off timeline 1, read from the sealed history file."""
    entry = kit.index().entries["00000002.history"]
    first = kit.decrypt(entry).decode().split("\n", 1)[0].split("\t")
    assert first[0] == "1", first
    return parse_lsn(first[1])


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
        with admin(standby.endpoint) as conn:
            wait_for(
                "the receiver to connect",
                lambda: conn.execute(
                    "SELECT 1 FROM pg_stat_replication WHERE application_name = %s",
                    (f"drtool-wal-{kit.slot}",),
                ).fetchone(),
            )
        with admin(primary.endpoint) as conn:
            conn.execute("CREATE TABLE marks (note text)")
            conn.execute("SELECT pg_switch_wal()")
        # the base backup on the primary (timeline 1), its WAL streamed through the standby
        base = run_backup(
            load_config(kit.config, {}), home=kit.root, env={}, components=("postgres-base",)
        ).snapshot_id
        with admin(primary.endpoint) as conn:
            conn.execute("INSERT INTO marks VALUES ('A')")
            at_tl1 = datetime.fromisoformat(one(conn, "SELECT clock_timestamp()"))
            time.sleep(0.05)
            conn.execute("INSERT INTO marks VALUES ('B')")
            # no switch after B: the promotion lands mid-segment, as a real failover does
        with admin(standby.endpoint) as conn:
            wait_for(
                "the standby to replay B",
                lambda: one(conn, "SELECT count(*) FROM marks") == "2",
            )
            conn.execute("SELECT pg_promote()")
            wait_for(
                "the promotion",
                lambda: one(conn, "SELECT pg_is_in_recovery()") == "False",
            )
            conn.execute("INSERT INTO marks VALUES ('C')")
            at_tl2 = datetime.fromisoformat(one(conn, "SELECT clock_timestamp()"))
            time.sleep(0.05)
            conn.execute("INSERT INTO marks VALUES ('D')")
            end = parse_lsn(one(conn, "SELECT pg_current_wal_insert_lsn()"))
        write_rows(standby.endpoint)
        needed = end // SEG + 1  # D's segment and one after it, sealed on timeline 2
        wait_for(
            "timeline 2 sealed past D",
            lambda: any(
                n.startswith("00000002") and parse_segment(n, SEG).segno >= needed
                for n in kit.segments()
            ),
        )
        assert stop_streamer(proc) == 0, kit.log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
        standby.stop()
    switch = _switch_point(kit)
    assert switch % SEG, "the switch point must lie inside a segment"
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
        return restored_notes(result, primary.password), out

    notes, out = restore(at_tl2)  # (a) after the promotion: timeline 2
    assert notes == ["A", "B", "C"]
    assert parse_lsn(out["reached_lsn"]) > switch
    notes, out = restore(at_tl1)  # (b) before it: timeline 1, short of the switch point
    assert notes == ["A"]
    assert parse_lsn(out["reached_lsn"]) < switch
