"""Fingerprint format 5 (ADR 0033) against real servers: read off the pg_dump stream, proved
on a restored copy by COPY, no second scan of the source, across majors; and the archive
reader's refusals (truncated, unknown block, compressed)."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import PgUnderTest
from psycopg import sql

from drtool.endpoints import PostgresEndpoint
from drtool.errors import IntegrityError
from drtool.repository.manifest import ObjectEntry
from drtool.sources.pg_archive_stream import ArchiveError, ArchiveStream, index_archive
from drtool.sources.pg_copy_proof import (
    CopyUnit,
    copy_env,
    copy_units,
    prove_by_copy,
    streamed_fingerprints,
)
from drtool.sources.pg_fingerprint import (
    DatabaseProps,
    PgFingerprints,
    compare,
    compute_fingerprints,
)
from drtool.sources.postgres import (
    apply_database_props,
    create_database,
    drop_database,
    dump,
    restore_dump,
)
from drtool.sources.process import CommandFailed, command_stream
from drtool.stores.postgres import restore as pg_restore
from drtool.stores.postgres.restore import fingerprints_of
from drtool.stores.stage import Plain

# the partitioned messages table of test_pg_partitions (sub-partitions, a partition attached
# with another column order, a dropped column), and the types whose text is most at risk
SCHEMA = """
CREATE TABLE messages (id bigint NOT NULL, room_id bigint, body text, gone int,
                       sent_at timestamptz NOT NULL) PARTITION BY RANGE (sent_at);
ALTER TABLE messages DROP COLUMN gone;
CREATE TABLE messages_m1 PARTITION OF messages
    FOR VALUES FROM ('2026-01-01') TO ('2026-02-01');
CREATE TABLE messages_m2 PARTITION OF messages
    FOR VALUES FROM ('2026-02-01') TO ('2026-03-01') PARTITION BY HASH (room_id);
CREATE TABLE messages_m2a PARTITION OF messages_m2 FOR VALUES WITH (MODULUS 2, REMAINDER 0);
CREATE TABLE messages_m2b PARTITION OF messages_m2 FOR VALUES WITH (MODULUS 2, REMAINDER 1);
CREATE TABLE messages_m3 (sent_at timestamptz NOT NULL, body text, room_id bigint,
                          id bigint NOT NULL);
ALTER TABLE messages ATTACH PARTITION messages_m3
    FOR VALUES FROM ('2026-03-01') TO ('2026-04-01');
CREATE TABLE messages_rest PARTITION OF messages DEFAULT;
INSERT INTO messages (id, room_id, body, sent_at)
    SELECT i, CASE WHEN i % 50 = 0 THEN NULL ELSE 1 + i % 9 END,
           CASE WHEN i % 70 = 0 THEN NULL ELSE E'msg\\t' || i || E'\\n' || repeat('é', i % 4) END,
           '2026-01-01'::timestamptz + i * interval '1 h'
    FROM generate_series(1, 2400) i;
CREATE TABLE "Odd Name" (id int PRIMARY KEY, doc json, at point, raw bytea, ts timestamptz,
                         d date, iv interval, f float8, r real, n numeric,
                         g text GENERATED ALWAYS AS (id::text || '!') STORED);
INSERT INTO "Odd Name" (id, doc, at, raw, ts, d, iv, f, r, n)
    SELECT i, json_build_object('i', i, 's', 'a "q" \\ b'), point(i / 3.0, -i),
           CASE WHEN i % 5 = 0 THEN NULL ELSE decode(md5(i::text), 'hex') END,
           '2026-06-30 23:30:00+02'::timestamptz + i * interval '7 h 3 s',
           '2026-01-01'::date + i, i * interval '1 day 90 min', i / 7.0, i / 3.0, i / 11.0
    FROM generate_series(1, 300) i;
CREATE TABLE empty_one (a int);
-- pg_dump writes these under search_path = '': schema-qualified; so must the proof's COPY
CREATE TYPE mood AS ENUM ('ok', 'sad');
CREATE TABLE audit (id int, rel regclass, typ regtype, m money, mo mood);
INSERT INTO audit VALUES (1, 'public.empty_one', 'public.mood', 12.5, 'ok'),
                         (2, '"Odd Name"', 'int4', -3, 'sad');
"""


def _run(ep: PostgresEndpoint, statement: str, dbname: str | None = None) -> Any:
    with psycopg.connect(**ep.connect_kwargs(dbname), autocommit=True) as conn:
        cur = conn.execute(statement)
        return cur.fetchall() if cur.description else None


def _seed(ep: PostgresEndpoint) -> None:
    # a server time zone that is not UTC: timestamptz text depends on it
    _run(ep, sql.SQL("ALTER DATABASE {} SET timezone = 'Asia/Kolkata'")
         .format(sql.Identifier(ep.dbname)).as_string())  # fmt: skip
    with psycopg.connect(**ep.connect_kwargs()) as conn:
        conn.execute(SCHEMA)


def _dump(ep: PostgresEndpoint, path: Path, bin_dir: Path | None = None) -> PgFingerprints:
    with dump(ep, pg_bin_dir=bin_dir, timeout=120) as pgd, open(path, "wb") as fh:
        for chunk in pgd.stream:
            fh.write(chunk)
        return pgd.fingerprints


@pytest.fixture
def seeded(pg_database: PostgresEndpoint) -> PostgresEndpoint:
    _seed(pg_database)
    return pg_database


@pytest.fixture
def copies(pg_server: PostgresEndpoint) -> Any:
    made: list[str] = []

    def copy_of(archive: Path, name: str, recorded: PgFingerprints) -> str:
        """A restored copy, as a restore makes it (the database's settings included)."""
        create_database(pg_server, name, recorded.database)
        made.append(name)
        restore_dump(archive, pg_server, name, jobs=2, timeout=120)
        assert recorded.database is not None
        apply_database_props(pg_server, name, recorded.database)
        return name

    yield copy_of
    for name in made:
        drop_database(pg_server, name)


def test_a_dump_verifies_on_its_restored_copy(
    seeded: PostgresEndpoint, copies: Any, tmp_path: Path
) -> None:
    archive = tmp_path / "db.pgdump"
    recorded = _dump(seeded, archive)
    assert recorded.format == 5 and recorded.rooms == {}
    assert set(recorded.tables) == {
        "public.messages_m1", "public.messages_m2a", "public.messages_m2b", "public.messages_m3",
        "public.messages_rest", 'public."Odd Name"', "public.empty_one", "public.audit",
    }  # fmt: skip
    assert sum(fp.rows for n, fp in recorded.tables.items() if "messages" in n) == 2400
    assert recorded.tables['public."Odd Name"'].rows == 300
    assert recorded.tables["public.empty_one"].rows == 0
    assert recorded.tables["public.messages_m3"].columns == ("sent_at", "body", "room_id", "id")
    assert "g" not in (recorded.tables['public."Odd Name"'].columns or ())  # generated: not copied
    assert recorded.partitions["public.messages_m2a"].table == "public.messages"
    assert recorded.copy_settings["TimeZone"] == "UTC"
    assert PgFingerprints.from_dict(recorded.to_dict()) == recorded

    copy = copies(archive, seeded.dbname + "_copy", recorded)
    for workers in (1, 3):
        assert compare(recorded, fingerprints_of(seeded, copy, recorded, workers=workers)) == []
    # the restore's offset indexing reads the same archive with the same reader
    assert index_archive(archive) == len(recorded.tables)  # every TABLE DATA block indexed


def test_one_row_changed_deleted_or_duplicated_is_named(
    seeded: PostgresEndpoint, copies: Any, tmp_path: Path
) -> None:
    archive = tmp_path / "db.pgdump"
    recorded = _dump(seeded, archive)
    copy = copies(archive, seeded.dbname + "_copy", recorded)
    _run(seeded, """UPDATE "Odd Name" SET at = point(0, 0) WHERE id = 7""", copy)
    _run(seeded, "DELETE FROM messages WHERE id = 30", copy)  # in January
    _run(seeded, "INSERT INTO messages_m3 SELECT * FROM messages_m3 WHERE id = 1500", copy)
    problems = compare(recorded, fingerprints_of(seeded, copy, recorded, workers=2))
    assert problems == [
        'public."Odd Name": content digest differs (300 rows)',
        f"public.messages_m1: {recorded.tables['public.messages_m1'].rows - 1} rows, "
        f"expected {recorded.tables['public.messages_m1'].rows}",
        f"public.messages_m3: {recorded.tables['public.messages_m3'].rows + 1} rows, "
        f"expected {recorded.tables['public.messages_m3'].rows}",
    ]
    _run(seeded, "CREATE TABLE extra (a int)", copy)
    _run(seeded, "DROP TABLE empty_one", copy)
    problems = compare(recorded, fingerprints_of(seeded, copy, recorded, workers=2))
    assert "public.empty_one: table missing (expected 0 rows)" in problems
    assert "public.extra: unexpected table (0 rows)" in problems


def _seq_scans(ep: PostgresEndpoint) -> dict[str, int]:
    """Sequential scans so far of every table and leaf partition."""
    rows = _run(
        ep,
        "SELECT s.relname::text, s.seq_scan FROM pg_stat_user_tables s "
        "JOIN pg_class c ON c.oid = s.relid WHERE c.relkind = 'r'",
    )
    return {str(name): int(n) for name, n in rows}


def _settled(ep: PostgresEndpoint, before: dict[str, int]) -> dict[str, int]:
    """The counts once every table's has moved (a backend flushes its counts as it ends)."""
    deadline = time.monotonic() + 30
    while True:
        now = _seq_scans(ep)
        if all(now[n] > before[n] for n in before) or time.monotonic() > deadline:
            time.sleep(0.5)  # anything still to come from the ended backends
            return _seq_scans(ep)
        time.sleep(0.1)


def test_the_backup_reads_each_table_once_pg_dumps_read(
    seeded: PostgresEndpoint, tmp_path: Path
) -> None:
    """No fingerprint scan of the source: each table's sequential scans go up by one, pg_dump's
    COPY (formats 1-4 scanned every table or partition a second time, in the same snapshot)."""
    for table in ("messages_m1", "messages_m2a", "messages_m2b", "messages_m3", "messages_rest"):
        _run(seeded, f"ALTER TABLE {table} SET (autovacuum_enabled = off)")
    _run(seeded, """ALTER TABLE "Odd Name" SET (autovacuum_enabled = off)""")
    before = _seq_scans(seeded)
    _dump(seeded, tmp_path / "db.pgdump")
    after = _settled(seeded, before)
    assert {name: after[name] - before[name] for name in before} == dict.fromkeys(before, 1)


def test_a_format_4_snapshot_still_verifies_by_the_row_hash_scan(
    seeded: PostgresEndpoint, copies: Any, tmp_path: Path
) -> None:
    """Formats 1-4 recorded row-hash sums: a copy of such a snapshot is scanned as before."""
    archive = tmp_path / "db.pgdump"
    _dump(seeded, archive)
    with psycopg.connect(**seeded.connect_kwargs()) as conn:
        old = PgFingerprints.from_dict(compute_fingerprints(conn).to_dict())  # as stored
    assert old.format == 4 and not old.streamed and old.rooms
    copy = copies(archive, seeded.dbname + "_copy", old)
    restored = fingerprints_of(seeded, copy, old, workers=2)
    assert {fp.row_hash for fp in restored.tables.values()} <= {"record", "text"}
    assert compare(old, restored) == []
    _run(seeded, "DELETE FROM messages WHERE id = 30", copy)
    assert compare(old, fingerprints_of(seeded, copy, old, workers=2))


@pytest.mark.slow
@pytest.mark.parametrize("target_major", [16, 18])
def test_a_pg15_dump_verifies_in_a_newer_major(
    pg_servers: Callable[[int], PgUnderTest], tmp_path: Path, target_major: int
) -> None:
    """The COPY text of a 15 dump equals a 16 or 18 copy's (the restore of an upgrade)."""
    old, new = pg_servers(15), pg_servers(target_major)
    name = f"cross_{target_major}_{os.getpid()}"
    source = replace(old.endpoint, dbname=name)
    _run(old.endpoint, f"CREATE DATABASE {name}", "postgres")
    try:
        _seed(source)
        archive = tmp_path / "db.pgdump"
        recorded = _dump(source, archive, old.bin_dir)
        assert recorded.database is not None
        create_database(new.endpoint, name, recorded.database)
        try:
            restore_dump(archive, new.endpoint, name, jobs=2, pg_bin_dir=new.bin_dir, timeout=120)
            apply_database_props(new.endpoint, name, recorded.database)
            proved = fingerprints_of(
                new.endpoint, name, recorded, workers=2, pg_bin_dir=new.bin_dir
            )
            assert compare(recorded, proved) == []
        finally:
            drop_database(new.endpoint, name)
    finally:
        drop_database(old.endpoint, name)


def _latin1(ep: PostgresEndpoint, name: str) -> PostgresEndpoint:
    _run(ep, f"CREATE DATABASE {name} ENCODING 'LATIN1' TEMPLATE template0 LOCALE 'C'",
         "postgres")  # fmt: skip
    return replace(ep, dbname=name)


def test_a_latin1_database_with_non_ascii_names_verifies(
    pg_server: PostgresEndpoint, copies: Any, tmp_path: Path
) -> None:
    """TOC names are in pg_dump's client encoding: entries are matched to tables by oid, and
    dump and proof run in UTF8, so "café" gets its figure and its COPY finds it."""
    source = _latin1(pg_server, f"latin_{os.getpid()}")
    try:
        _run(source, """CREATE TABLE "café" ("prénom" text, n int);
                        INSERT INTO "café" SELECT 'é' || i, i FROM generate_series(1, 50) i;
                        CREATE TABLE plain (a int); INSERT INTO plain VALUES (1)""")  # fmt: skip
        archive = tmp_path / "db.pgdump"
        recorded = _dump(source, archive)
        assert recorded.copy_settings["client_encoding"] == "UTF8"
        assert recorded.tables['public."café"'].rows == 50
        assert recorded.tables['public."café"'].columns == ("prénom", "n")
        copy = copies(archive, source.dbname + "_copy", recorded)
        assert compare(recorded, fingerprints_of(pg_server, copy, recorded, workers=2)) == []
        _run(pg_server, """UPDATE "café" SET n = 0 WHERE n = 7""", copy)
        assert compare(recorded, fingerprints_of(pg_server, copy, recorded, workers=2)) == [
            'public."café": content digest differs (50 rows)'
        ]
    finally:
        drop_database(pg_server, source.dbname)


def _units(ep: PostgresEndpoint) -> dict[tuple[str, str], CopyUnit]:
    with psycopg.connect(**ep.connect_kwargs()) as conn, conn.cursor() as cur:
        return copy_units(cur)


def test_a_table_with_no_data_block_fails_the_backup_unless_unlogged_on_a_standby(
    seeded: PostgresEndpoint,
) -> None:
    """A catalog table the dump has no TABLE DATA for would have no figure, and a restore
    that lost it would pass: refused, but for an unlogged table dumped from a standby
    (pg_dump dumps none of their data there), recorded as not dumped, expected empty."""
    _run(seeded, "CREATE UNLOGGED TABLE scratch (a int); INSERT INTO scratch VALUES (1)")
    reader = _read(_pg_dump(seeded, "--compress=0", "--exclude-table-data=scratch"), 1 << 20)
    units = _units(seeded)
    props = DatabaseProps("UTF8", "C", "C")
    with pytest.raises(ArchiveError, match=r"the dump has no data for table public\.scratch"):
        streamed_fingerprints(reader, units, props)
    prints = streamed_fingerprints(reader, units, props, standby=True)
    assert prints.not_dumped == {"public.scratch": "not dumped: unlogged on a standby"}
    assert prints.tables["public.scratch"].rows == 0
    assert PgFingerprints.from_dict(prints.to_dict()).not_dumped == prints.not_dumped
    _run(seeded, "ALTER TABLE scratch SET LOGGED")
    with pytest.raises(ArchiveError, match=r"public\.scratch"):  # a logged one: never excused
        streamed_fingerprints(reader, _units(seeded), props, standby=True)


def test_hash_partitions_on_an_enum_are_proved_at_their_root(
    pg_database: PostgresEndpoint, copies: Any, tmp_path: Path
) -> None:
    """pg_dump (15.3+) loads such leaves via their root (the enum's oids, hence the hashes,
    differ in the copy): the rows land in other leaves, so the tree is recorded and proved
    at the root, order-independent; before, a correct restore was refused per leaf."""
    _run(pg_database, """CREATE TYPE mood AS ENUM ('ok', 'sad', 'meh');
        CREATE TABLE feel (id int, m mood, note text) PARTITION BY HASH (m);
        CREATE TABLE feel_p0 PARTITION OF feel FOR VALUES WITH (MODULUS 2, REMAINDER 0);
        CREATE TABLE feel_p1 PARTITION OF feel FOR VALUES WITH (MODULUS 2, REMAINDER 1);
        INSERT INTO feel SELECT i, (ARRAY['ok', 'sad', 'meh'])[1 + i % 3]::mood, 'n' || i
            FROM generate_series(1, 300) i;
        CREATE TABLE plain (a int); INSERT INTO plain VALUES (1)""")  # fmt: skip
    archive = tmp_path / "db.pgdump"
    recorded = _dump(pg_database, archive)
    assert set(recorded.tables) == {"public.feel", "public.plain"}
    assert recorded.tables["public.feel"].rows == 300
    assert recorded.tables["public.feel"].row_hash == "copy-lines"
    assert PgFingerprints.from_dict(recorded.to_dict()) == recorded
    copy = copies(archive, pg_database.dbname + "_copy", recorded)
    assert compare(recorded, fingerprints_of(pg_database, copy, recorded, workers=2)) == []
    _run(pg_database, "UPDATE feel SET note = 'changed' WHERE id = 7", copy)
    assert compare(recorded, fingerprints_of(pg_database, copy, recorded, workers=2)) == [
        "public.feel: content digest differs (300 rows)"
    ]
    _run(pg_database, "DELETE FROM feel WHERE id = 8", copy)
    assert compare(recorded, fingerprints_of(pg_database, copy, recorded)) == [
        "public.feel: 299 rows, expected 300"
    ]


def test_a_failed_copy_fails_the_proof_without_running_the_queued_ones(
    seeded: PostgresEndpoint, copies: Any, tmp_path: Path
) -> None:
    """The first COPY that fails ends the proof: before, the pool ran every queued COPY (each
    psql in its own session) before the failure was raised."""
    archive = tmp_path / "db.pgdump"
    recorded = _dump(seeded, archive)
    copy = copies(archive, seeded.dbname + "_copy", recorded)
    target = replace(seeded, dbname=copy)
    largest = _run(target, "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c "
                           "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind = 'r' "
                           "AND n.nspname = 'public' ORDER BY pg_relation_size(c.oid) DESC "
                           "LIMIT 1")[0][0]  # fmt: skip
    doc = recorded.to_dict()
    doc["tables"][largest]["columns"] = ["no_such_column"]  # its COPY fails, and runs first
    like = PgFingerprints.from_dict(doc)
    started: list[str] = []
    env = {**os.environ, **target.libpq_env(), **copy_env(like.copy_settings)}

    def run_copy(statement: str) -> Any:
        started.append(statement)
        argv = ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", copy, "-c", statement]
        return command_stream(argv, env=env, timeout=60, name="psql COPY")

    with (
        psycopg.connect(**target.connect_kwargs()) as conn,
        pytest.raises(CommandFailed, match="no_such_column"),
    ):
        prove_by_copy(conn, like, run_copy, workers=1)
    assert len(started) == 1 and "no_such_column" in started[0]


# -- the archive reader ----------------------------------------------------------------------


def _pg_dump(ep: PostgresEndpoint, *extra: str) -> bytes:
    env = {**os.environ, **ep.libpq_env()}
    argv = ["pg_dump", "--format=custom", *extra, f"--dbname={ep.dbname}"]
    return subprocess.run(argv, env=env, check=True, capture_output=True).stdout


def _read(data: bytes, piece: int) -> ArchiveStream:
    reader = ArchiveStream()
    for i in range(0, len(data), piece):
        reader.feed(data[i : i + piece])
    reader.finish()
    return reader


def test_the_reader_gives_the_same_figures_whatever_the_pieces(seeded: PostgresEndpoint) -> None:
    data = _pg_dump(seeded, "--compress=0")
    whole = _read(data, len(data)).tables
    assert sum(t.rows for t in whole.values()) == 2400 + 300 + 2
    # every field and header split across feeds; the TOC parsed once it has doubled
    for piece in (1, 2, 3, 5, 7, 4096, 65536):
        assert _read(data, piece).tables == whole


def test_the_toc_is_parsed_a_logarithmic_number_of_times(
    seeded: PostgresEndpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each parse attempt reads the whole buffered TOC: one per feed was quadratic (2.2 CPU-s
    for an 8 MB TOC fed in 64 KiB pieces); one each time the buffer doubled is linear."""
    data = _pg_dump(seeded, "--compress=0")
    attempts = 0
    parse = ArchiveStream._parse_toc

    def counted(self: ArchiveStream) -> int | None:
        nonlocal attempts
        attempts += 1
        return parse(self)

    monkeypatch.setattr(ArchiveStream, "_parse_toc", counted)
    reader = _read(data, 1)
    toc_end = min(reader.blocks.values())
    assert toc_end > 4096  # a TOC of some size: fed one byte at a time
    assert attempts <= toc_end.bit_length() + 2


@pytest.mark.slow
def test_a_thousand_tables_back_up_and_verify(
    pg_database: PostgresEndpoint, copies: Any, tmp_path: Path
) -> None:
    """A TOC of a thousand entries (issue: parsed again on each feed, capped at 64 MiB); a
    thousand, not more: the proof starts one psql per table, ~0.05 s each here."""
    _run(pg_database, """DO $$ BEGIN FOR i IN 1..1000 LOOP
        EXECUTE format('CREATE TABLE t%s (a int, b text)', i);
        EXECUTE format('INSERT INTO t%s VALUES (%s, ''x'')', i, i);
    END LOOP; END $$""")  # fmt: skip
    archive = tmp_path / "db.pgdump"
    recorded = _dump(pg_database, archive)
    assert len(recorded.tables) == 1000
    assert {fp.rows for fp in recorded.tables.values()} == {1}
    copy = copies(archive, pg_database.dbname + "_copy", recorded)
    assert compare(recorded, fingerprints_of(pg_database, copy, recorded, workers=2)) == []


def test_the_reader_refuses_what_it_cannot_read(seeded: PostgresEndpoint) -> None:
    data = _pg_dump(seeded, "--compress=0")
    reader = _read(data, 1 << 20)
    for cut in (3, 200, len(data) // 2, len(data) - 1):  # header, TOC, a block, the end marker
        with pytest.raises(ArchiveError, match="truncated"):
            _read(data[:cut], 1 << 20)
    first = min(reader.blocks.values())
    assert data[first] == 1  # a data block
    with pytest.raises(ArchiveError, match="unknown block type 9"):
        _read(data[:first] + b"\x09" + data[first + 1 :], 1 << 20)
    with pytest.raises(ArchiveError, match="compressed archive"):
        _read(_pg_dump(seeded, "--compress=1"), 1 << 20)
    with pytest.raises(ArchiveError, match="no PGDMP header"):
        _read(b"NOTPG" + data[5:], 1 << 20)


# -- through the store's restore -------------------------------------------------------------


def _restore(
    archive: Path, prints: PgFingerprints, target: PostgresEndpoint, stamp: str
) -> pg_restore.PgOutcome:
    """The store's restore (copy beside, proof, switch) of a staged dump and its fingerprints."""
    snap = pg_restore.PgSnapshot(
        ObjectEntry("dump", "pg_dump", 0, ""), None, prints, Plain(archive.stat().st_size)
    )
    staged = pg_restore.PgStaged(archive, None)
    return pg_restore.restore(
        staged,
        snap,
        pg_restore.inspect(target, snap),
        stamp=stamp,
        jobs=2,
        drop_old=True,
        pg_bin_dir=None,
        timeout=120,
    )


def test_the_restore_proves_format_5_and_4_and_refuses_a_difference(
    seeded: PostgresEndpoint, pg_server: PostgresEndpoint, tmp_path: Path
) -> None:
    archive = tmp_path / "db.pgdump"
    streamed = _dump(seeded, archive)
    with psycopg.connect(**seeded.connect_kwargs()) as conn:
        scanned = PgFingerprints.from_dict(compute_fingerprints(conn).to_dict())  # format 4
    target = replace(pg_server, dbname=seeded.dbname + "_t")
    try:
        assert _restore(archive, streamed, target, "s1").database == target.dbname
        assert _restore(archive, scanned, target, "s2").database == target.dbname  # drop_old
        doc = streamed.to_dict()
        doc["tables"]["public.messages_m3"]["digest"] = "0" * 64
        with pytest.raises(IntegrityError, match=r"public\.messages_m3: content digest differs"):
            _restore(archive, PgFingerprints.from_dict(doc), target, "s3")
        left = _run(pg_server, f"SELECT datname FROM pg_database WHERE datname LIKE "
                               f"'{target.dbname}_%'", "postgres")  # fmt: skip
        assert left == []  # the copy dropped; the live database untouched
        assert compare(streamed, fingerprints_of(pg_server, target.dbname, streamed)) == []
    finally:
        drop_database(pg_server, target.dbname)


def test_a_digest_difference_after_a_major_upgrade_says_so(
    seeded: PostgresEndpoint, tmp_path: Path
) -> None:
    """Equal rows, other COPY text, restored into another major: the refusal names the
    possible cause (a type's text output changed) instead of calling it damage outright."""
    prints = _dump(seeded, tmp_path / "db.pgdump")
    snap = pg_restore.PgSnapshot(ObjectEntry("d", "pg_dump", 0, ""), None, prints, Plain(), "15.4")
    upgraded = pg_restore.PgTarget(seeded, True, False, 16)
    digest = ["public.rooms: content digest differs (20 rows)"]
    note = pg_restore._across_majors(snap, upgraded, digest)
    assert "restored from PostgreSQL 15 into 16" in note
    assert pg_restore._across_majors(snap, upgraded, ["public.rooms: 19 rows, expected 20"]) == ""
    same = pg_restore.PgTarget(seeded, True, False, 15)
    assert pg_restore._across_majors(snap, same, digest) == ""
