"""The backup's fingerprint scan per partition (issue 16.4, ADR 0029), against real servers.

Parallel units on one exported snapshot must give the serial scan's figures exactly; a
partition is reused only when it is proved unchanged, and every way a row can change since the
baseline (an update, a delete, a transaction still open when the baseline was taken, an
update whose new row version was frozen since) is caught by the next scan.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import psycopg
import pytest
from conftest import servers_required
from support.wal_kit import start_standby, start_wal_server, wait_for

from drtool.endpoints import PostgresEndpoint
from drtool.runtime.pgserver import PostgresServer
from drtool.sources.pg_fingerprint import PgFingerprints, compute_fingerprints
from drtool.sources.pg_scan import Baseline, PartitionScan, ScanResult
from drtool.stores.postgres.restore import fingerprints_of

MONTHS = """
CREATE TABLE rooms (id bigint PRIMARY KEY, name text NOT NULL, meta jsonb);
CREATE TABLE messages (id bigint NOT NULL, room_id bigint, body text, gone int,
                       sent_at timestamptz NOT NULL) PARTITION BY RANGE (sent_at);
ALTER TABLE messages DROP COLUMN gone;
CREATE TABLE messages_m1 PARTITION OF messages
    FOR VALUES FROM ('2026-01-01') TO ('2026-02-01');
CREATE TABLE messages_m2 PARTITION OF messages
    FOR VALUES FROM ('2026-02-01') TO ('2026-03-01') PARTITION BY HASH (room_id);
CREATE TABLE messages_m2a PARTITION OF messages_m2 FOR VALUES WITH (MODULUS 2, REMAINDER 0);
CREATE TABLE messages_m2b PARTITION OF messages_m2 FOR VALUES WITH (MODULUS 2, REMAINDER 1);
-- created on its own, columns in another order, then attached
CREATE TABLE messages_m3 (sent_at timestamptz NOT NULL, body text, room_id bigint,
                          id bigint NOT NULL);
ALTER TABLE messages ATTACH PARTITION messages_m3
    FOR VALUES FROM ('2026-03-01') TO ('2026-04-01');
CREATE TABLE messages_rest PARTITION OF messages DEFAULT;
-- a partitioned table whose rows have no hash function (json): hashed as text
CREATE TABLE events (at date NOT NULL, doc json) PARTITION BY RANGE (at);
CREATE TABLE events_a PARTITION OF events FOR VALUES FROM ('2026-01-01') TO ('2026-02-01');
CREATE TABLE events_b PARTITION OF events FOR VALUES FROM ('2026-02-01') TO ('2026-03-01');
INSERT INTO rooms SELECT i, 'room ' || i, jsonb_build_object('k', i) FROM generate_series(1, 9) i;
INSERT INTO messages (id, room_id, body, sent_at)
    SELECT i, CASE WHEN i % 50 = 0 THEN NULL ELSE 1 + i % 9 END, 'msg ' || i,
           '2026-01-01'::timestamptz + i * interval '1 h'
    FROM generate_series(1, 2400) i;  -- January to the end of April: four months and the rest
INSERT INTO events SELECT '2026-01-01'::date + i % 50, json_build_object('i', i)
    FROM generate_series(1, 300) i;
"""


def _connect(ep: PostgresEndpoint, **kw: Any) -> psycopg.Connection[Any]:
    return psycopg.connect(**ep.connect_kwargs(), **kw)


@pytest.fixture
def months(pg_database: PostgresEndpoint) -> PostgresEndpoint:
    with _connect(pg_database) as conn:
        conn.execute(MONTHS)
    return pg_database


def serial(ep: PostgresEndpoint) -> PgFingerprints:
    with _connect(ep) as conn:
        return compute_fingerprints(conn)


@contextmanager
def exported(ep: PostgresEndpoint) -> Iterator[str]:
    """An exported snapshot, valid while the block runs."""
    with _connect(ep) as conn:
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        row = conn.execute("SELECT pg_export_snapshot()").fetchone()
        assert row is not None
        yield str(row[0])


def scan(
    ep: PostgresEndpoint, baseline: Baseline | None = None, workers: int = 2, **kw: Any
) -> ScanResult:
    with exported(ep) as snapshot:
        return PartitionScan(
            lambda: _connect(ep), snapshot, workers=workers, baseline=baseline, **kw
        ).run()


def run(ep: PostgresEndpoint, statement: str) -> None:
    with _connect(ep, autocommit=True) as conn:
        conn.execute(statement)


def hashed(result: ScanResult) -> set[str]:
    """The partitions this scan hashed (not reused)."""
    return {n for n, p in result.fingerprints.partitions.items() if p.hashed_in is None}


def test_parallel_scan_equals_the_serial_scan(months: PostgresEndpoint) -> None:
    expected = serial(months)
    for workers in (1, 2, 3):
        got = scan(months, workers=workers)
        assert got.fingerprints.tables == expected.tables
        assert got.fingerprints.rooms == expected.rooms
        assert got.fingerprints.database == expected.database
    assert expected.tables["public.events"].row_hash == "text"  # json: the text fallback
    assert set(got.fingerprints.partitions) == {
        "public.messages_m1",
        "public.messages_m2a",
        "public.messages_m2b",
        "public.messages_m3",
        "public.messages_rest",
        "public.events_a",
        "public.events_b",
    }
    parts = got.fingerprints.partitions
    assert sum(p.rows for p in parts.values() if p.table == "public.messages") == 2400
    assert got.scanned == 8 and got.reused == 0  # rooms and the seven partitions
    assert got.details()["fingerprint_scan"]["partitions_reused"] == 0


def test_fingerprints_of_format_3_still_compare_and_format_4_round_trips(
    months: PostgresEndpoint,
) -> None:
    got = scan(months).fingerprints
    doc = json.loads(json.dumps(got.to_dict()))
    assert doc["format"] == 4 and "partitions" in doc
    assert PgFingerprints.from_dict(doc).partitions == got.partitions
    old = {k: v for k, v in doc.items() if k != "partitions"} | {"format": 3}
    assert PgFingerprints.from_dict(old) == serial(months)  # a snapshot written before


def test_unchanged_partitions_are_reused_and_one_changed_row_is_caught(
    months: PostgresEndpoint,
) -> None:
    first = scan(months)
    base = first.next_baseline("repo", "snap-1", time.time())
    assert base is not None
    second = scan(months, base)
    assert second.reused == 7 and hashed(second) == set()
    assert second.fingerprints == first.fingerprints
    reused = second.fingerprints.partitions["public.messages_m1"]
    assert (reused.hashed_in, reused.proved_since) == ("snap-1", "snap-1")

    base2 = second.next_baseline("repo", "snap-2", time.time())
    assert base2 is not None
    run(months, "UPDATE messages SET body = 'edited' WHERE id = 10")  # January
    third = scan(months, base2)
    assert hashed(third) == {"public.messages_m1"}
    assert third.fingerprints == serial(months)
    assert third.fingerprints.tables != first.fingerprints.tables
    assert third.fingerprints.partitions["public.messages_m2a"].hashed_in == "snap-1"
    assert third.fingerprints.partitions["public.messages_m2a"].proved_since == "snap-2"

    base3 = third.next_baseline("repo", "snap-3", time.time())
    assert base3 is not None
    run(months, "DELETE FROM messages WHERE id = 1000")  # February
    fourth = scan(months, base3)
    assert len(hashed(fourth)) == 1 and hashed(fourth) <= {
        "public.messages_m2a",
        "public.messages_m2b",
    }
    assert fourth.fingerprints == serial(months)
    assert fourth.not_reused[hashed(fourth).pop()] == "rows were deleted since"


def test_a_change_open_while_the_baseline_was_taken_is_caught(months: PostgresEndpoint) -> None:
    """Its rows were written before the baseline's snapshot, committed after it."""
    with _connect(months) as writer:
        writer.execute("UPDATE messages SET body = 'late' WHERE id = 20")
        writer.execute("DELETE FROM messages WHERE id = 1500")  # March: the attached one
        base = scan(months).next_baseline("repo", "snap-1", time.time())
        writer.commit()
    assert base is not None
    after = scan(months, base)
    assert {"public.messages_m1", "public.messages_m3"} <= hashed(after)
    assert after.fingerprints == serial(months)


def test_a_frozen_new_row_version_is_still_caught(months: PostgresEndpoint) -> None:
    """Freezing keeps the raw xmin the proof reads (PostgreSQL >= 9.4)."""
    base = scan(months).next_baseline("repo", "snap-1", time.time())
    assert base is not None
    run(months, "DELETE FROM messages WHERE id = 5")
    run(months, "INSERT INTO messages (id, room_id, body, sent_at) "
                "VALUES (5, 1, 'replaced', '2026-01-01 05:00+00')")  # fmt: skip
    run(months, "VACUUM (FREEZE) messages_m1")
    after = scan(months, base)
    assert hashed(after) == {"public.messages_m1"}
    assert after.not_reused["public.messages_m1"] == "rows were written since"
    assert after.fingerprints == serial(months)


def test_no_reuse_past_its_age_or_across_a_rewrite_or_while_an_older_transaction_runs(
    months: PostgresEndpoint,
) -> None:
    base = scan(months).next_baseline("repo", "snap-1", time.time())
    assert base is not None
    aged = scan(months, base, max_reuse_age_s=0.0)
    assert aged.reused == 0 and set(aged.not_reused.values()) == {"last hashed too long ago"}

    with _connect(months) as old:
        old.execute("SELECT txid_current()")  # an xid, then a later one completes: the
        run(months, "SELECT txid_current()")  # baseline sees the later, not the open one
        base = scan(months).next_baseline("repo", "snap-1", time.time())
        assert base is not None
        held = scan(months, base)  # may not see all the baseline saw: no proof
        assert held.reused == 0
        assert set(held.not_reused.values()) == {"a transaction older than the baseline runs"}
    assert scan(months, base).reused == 7  # once it ended, nothing prevents the proof

    run(months, "VACUUM FULL messages_m1")  # the same rows in a new file: hashed again
    rewritten = scan(months, base)
    assert rewritten.not_reused == {
        "public.messages_m1": "the relation was rewritten or its columns changed"
    }
    run(months, "ALTER TABLE messages ADD COLUMN flag int DEFAULT 7")  # no rewrite, new values
    added = scan(months, base)
    assert added.reused == 2  # only the events partitions
    assert added.fingerprints == serial(months)


def test_a_restored_copy_is_fingerprinted_in_parallel_the_way_the_snapshot_recorded(
    months: PostgresEndpoint,
) -> None:
    """The restore's proof scan (jobs > 1) hashes each table as the snapshot did (format 1:
    every row's text) and gives the serial scan's figures."""
    doc = serial(months).to_dict()
    for fp in [*doc["tables"].values(), *(f for r in doc["rooms"].values() for f in r.values())]:
        del fp["row_hash"]  # format 1 had none: every row's text
    text_only = PgFingerprints.from_dict(
        {"format": 1, "tables": doc["tables"], "rooms": doc["rooms"]}
    )
    with _connect(months) as conn:
        expected = compute_fingerprints(conn, like=text_only)
    got = fingerprints_of(months, months.dbname, text_only, workers=2)
    assert {fp.row_hash for fp in got.tables.values()} == {"text"}
    assert got.tables == expected.tables and got.rooms == expected.rooms
    for workers in (1, 2):  # one path: a one-worker scan is the serial scan's figures
        assert fingerprints_of(months, months.dbname, serial(months), workers=workers) == serial(
            months
        )


def test_a_type_altered_under_unchanged_rows_is_caught(pg_database: PostgresEndpoint) -> None:
    """``ALTER TYPE`` changes what a row hashes to with no new row version (same xmin, same
    relation file): a partition with a column of a type that is not built in is hashed again."""
    run(pg_database, """
        CREATE TYPE pair AS (a int, b text);
        CREATE TYPE mood AS ENUM ('sad', 'happy');
        CREATE TABLE notes (at date NOT NULL, p pair, m mood, doc json) PARTITION BY RANGE (at);
        CREATE TABLE notes_a PARTITION OF notes FOR VALUES FROM ('2026-01-01') TO ('2026-02-01');
        CREATE TABLE plain (at date NOT NULL, doc json) PARTITION BY RANGE (at);
        CREATE TABLE plain_a PARTITION OF plain FOR VALUES FROM ('2026-01-01') TO ('2026-02-01');
        INSERT INTO notes SELECT '2026-01-01'::date + i % 20, ROW(i, 'x' || i)::pair,
                                 'happy', json_build_object('i', i)
            FROM generate_series(1, 50) i;
        INSERT INTO plain SELECT '2026-01-01'::date + i % 20, json_build_object('i', i)
            FROM generate_series(1, 50) i;
    """)  # fmt: skip
    base = scan(pg_database).next_baseline("repo", "snap-1", time.time())
    assert base is not None
    assert serial(pg_database).tables["public.notes"].row_hash == "text"
    for change in (
        "ALTER TYPE pair ADD ATTRIBUTE c int",
        "ALTER TYPE mood RENAME VALUE 'happy' TO 'glad'",
    ):
        before = serial(pg_database)
        run(pg_database, change)
        assert serial(pg_database).tables["public.notes"] != before.tables["public.notes"]
        after = scan(pg_database, base)
        assert after.fingerprints == serial(pg_database), change
        assert hashed(after) == {"public.notes_a"}  # the built-in one is still reused
        assert after.not_reused["public.notes_a"].startswith("a column's type is not built in")


def _burn_xids(ep: PostgresEndpoint, n: int) -> None:
    with _connect(ep, autocommit=True) as conn:
        for _ in range(n):
            conn.execute("SELECT txid_current()")


@pytest.mark.slow
def test_a_rewound_server_with_the_same_count_is_caught(runtime_root: Path) -> None:
    """A server reverted to a copy of its files (a VM snapshot, a base restored without a new
    timeline) keeps its system id and timeline; a row rewritten there by a transaction older
    than the baseline's xmin, with as many rows as before, is caught by the digest of the row
    versions: the count and the xmin scan alone reused it."""
    with servers_required():
        server = PostgresServer(
            runtime_root / f"pgrewind-{uuid.uuid4().hex[:6]}",
            major=15,
            settings={"fsync": "off", "synchronous_commit": "off"},
        )
    server.start()
    saved = server.base_dir / "saved"
    try:
        ep = server.endpoint
        with _connect(ep) as conn:
            conn.execute(MONTHS)
        server.stop()
        subprocess.run(["cp", "-a", str(server.data_dir), str(saved)], check=True)
        server.start()
        _burn_xids(ep, 20)  # the baseline's xmin is past the xids the rewound server reuses
        first = scan(ep)
        base = first.next_baseline("repo", "snap-1", time.time())
        assert base is not None
        server.stop()
        shutil.rmtree(server.data_dir)
        subprocess.run(["cp", "-a", str(saved), str(server.data_dir)], check=True)
        server.start()  # the same system id, the same timeline, the xid counter rewound
        run(ep, "UPDATE messages SET body = 'another history' WHERE id = 10")  # January
        _burn_xids(ep, 40)  # past the baseline's xmax
        run(ep, "SELECT pg_switch_wal()")  # and its WAL position
        after = scan(ep, base)
        assert after.history is not None
        assert after.history.timeline == base.history.timeline
        assert after.history.xmin > base.history.xmax
        assert after.fingerprints == serial(ep)
        assert hashed(after) == {"public.messages_m1"}
        assert after.not_reused["public.messages_m1"].startswith("other row versions")
    finally:
        server.stop()


def test_a_baseline_hashed_in_the_future_is_not_trusted(months: PostgresEndpoint) -> None:
    base = scan(months).next_baseline("repo", "snap-1", time.time() + 86400)
    assert base is not None
    later = scan(months, base)
    assert later.reused == 0 and set(later.not_reused.values()) == {"last hashed too long ago"}


def test_the_leaves_are_the_exported_snapshots(months: PostgresEndpoint) -> None:
    """A partition detached after the snapshot was exported is still one of its leaves: the
    dump (its catalog read in the snapshot) holds it under its table, so must the scan."""
    expected = serial(months)
    with exported(months) as snapshot:
        run(months, "ALTER TABLE messages DETACH PARTITION messages_m1")
        got = PartitionScan(lambda: _connect(months), snapshot, workers=2).run()
    assert "public.messages_m1" in got.fingerprints.partitions
    assert got.fingerprints.tables == expected.tables
    assert got.fingerprints.rooms == expected.rooms


class _Counting(psycopg.Cursor[Any]):
    """Counts the hashing queries (``sum(...)`` over a relation) the scan sends."""

    hashed: ClassVar[list[str]] = []

    def execute(self, query: Any, *args: Any, **kw: Any) -> Any:
        text = query.as_string(self) if isinstance(query, psycopg.sql.Composable) else query
        if "count(*), sum(" in str(text):
            _Counting.hashed.append(str(text))
        return super().execute(query, *args, **kw)


def test_a_failed_unit_fails_the_scan_without_running_the_queued_ones(
    pg_database: PostgresEndpoint,
) -> None:
    """While the biggest unit runs, the next one fails (its table recorded as hashed in a way
    its rows cannot be): no queued unit starts and the running one is cancelled (before, the
    scan waited for the biggest, and the other worker ran every queued unit meanwhile)."""
    run(pg_database, """
        CREATE TABLE big (at date NOT NULL, doc json) PARTITION BY RANGE (at);
        CREATE TABLE big_a PARTITION OF big FOR VALUES FROM ('2026-01-01') TO ('2026-02-01');
        INSERT INTO big SELECT '2026-01-01'::date + i % 20,
                               json_build_object('i', i, 'pad', repeat('x', 100))
            FROM generate_series(1, 200000) i;
        CREATE TABLE bad (at date NOT NULL, doc json) PARTITION BY RANGE (at);
        CREATE TABLE bad_a PARTITION OF bad FOR VALUES FROM ('2026-01-01') TO ('2026-02-01');
        INSERT INTO bad SELECT '2026-01-01', json_build_object('i', i)
            FROM generate_series(1, 2000) i;
        CREATE TABLE small (at date NOT NULL, n int) PARTITION BY RANGE (at);
    """)  # fmt: skip
    for i in range(1, 7):
        run(pg_database, f"CREATE TABLE small_{i} PARTITION OF small FOR VALUES FROM "
                         f"('2026-0{i}-01') TO ('2026-0{i + 1}-01'); "
                         f"INSERT INTO small VALUES ('2026-0{i}-02', {i})")  # fmt: skip
    doc = serial(pg_database).to_dict()
    doc["tables"]["public.bad"]["row_hash"] = "record"  # json has no hash function
    like = PgFingerprints.from_dict(doc)
    _Counting.hashed = []
    with exported(pg_database) as snapshot, pytest.raises(psycopg.errors.UndefinedFunction):
        PartitionScan(
            lambda: _connect(pg_database, cursor_factory=_Counting), snapshot, workers=2, like=like
        ).run()
    started = sorted(q.rsplit(" FROM ONLY ", 1)[1] for q in _Counting.hashed)
    assert started == ["public.bad_a AS r", "public.big_a AS r"]


@pytest.mark.slow
def test_a_standby_reads_its_received_timeline_and_a_promotion_is_a_new_history(
    runtime_root: Path,
) -> None:
    """On a standby the timeline is the WAL receiver's; promoted, it is the one WAL is now
    written on (not the last checkpoint's): a baseline taken before is not reused after."""
    primary = start_wal_server(runtime_root, 15)
    standby: PostgresServer | None = None
    try:
        with _connect(primary.endpoint) as conn:
            conn.execute(MONTHS)
        standby = start_standby(runtime_root, primary)
        ep = standby.endpoint
        wait_for("the standby to replay the months", lambda: _rows(ep) == 2400)
        before = scan(ep)
        assert before.history is not None and before.history.timeline == 1
        base = before.next_baseline("repo", "snap-1", time.time())
        assert base is not None
        assert scan(ep, base).reused == 7  # the standby's own proof works
        run(ep, "SELECT pg_promote(true)")
        after = scan(ep, base)
        assert after.history is not None and after.history.timeline == 2
        assert after.reused == 0
        assert set(after.not_reused.values()) == {"another server, timeline or database"}
    finally:
        if standby is not None:
            standby.stop()
        primary.stop()


def _rows(ep: PostgresEndpoint) -> int:
    try:
        with _connect(ep) as conn:
            row = conn.execute("SELECT count(*) FROM messages").fetchone()
    except psycopg.errors.UndefinedTable:
        return 0
    return int(row[0]) if row else 0
