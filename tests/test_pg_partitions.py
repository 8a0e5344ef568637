"""The row-hash fingerprint scan per partition (issue 16.4, ADR 0029), against real servers.

Backups read format-5 fingerprints off the dump (ADR 0033); this scan proves restored copies
of format 1-4 snapshots. Parallel units on one exported snapshot must give the serial scan's
figures exactly.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import psycopg
import pytest

from drtool.endpoints import PostgresEndpoint
from drtool.sources.pg_fingerprint import PgFingerprints, compute_fingerprints
from drtool.sources.pg_scan import PartitionScan, ScanResult
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


def scan(ep: PostgresEndpoint, workers: int = 2) -> ScanResult:
    with exported(ep) as snapshot:
        return PartitionScan(lambda: _connect(ep), snapshot, workers=workers).run()


def run(ep: PostgresEndpoint, statement: str) -> None:
    with _connect(ep, autocommit=True) as conn:
        conn.execute(statement)


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
    assert got.scanned == 8  # rooms and the seven partitions


def test_fingerprints_of_format_3_still_compare_and_format_4_round_trips(
    months: PostgresEndpoint,
) -> None:
    got = scan(months).fingerprints
    doc = json.loads(json.dumps(got.to_dict()))
    assert doc["format"] == 4 and "partitions" in doc
    assert PgFingerprints.from_dict(doc).partitions == got.partitions
    old = {k: v for k, v in doc.items() if k != "partitions"} | {"format": 3}
    assert PgFingerprints.from_dict(old) == serial(months)  # a snapshot written before


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
