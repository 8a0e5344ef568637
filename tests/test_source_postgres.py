"""PostgreSQL source against a real server: consistent dumps, fingerprints, restore primitives."""

from __future__ import annotations

import json
import logging
import os
import random
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import psycopg
import pytest

from drtool.endpoints import PostgresEndpoint
from drtool.errors import SourceError
from drtool.sources.pg_archive_stream import ArchiveError, ArchiveStream, write_offsets
from drtool.sources.pg_fingerprint import Fingerprint, PgFingerprints, compare, compute_fingerprints
from drtool.sources.postgres import (
    create_database,
    database_exists,
    database_is_empty,
    drop_database,
    dump,
    dump_globals,
    index_archive,
    pg_restore_version_check,
    preflight,
    read_archive_header,
    restore_copies,
    restore_dump,
    server_version,
    switch_databases,
)
from drtool.sources.process import CommandFailed
from drtool.stores.postgres.restore import OffsetsWhileStaging
from drtool.stores.postgres.restore import fingerprints_of as restored_fingerprints

SCHEMA = """
CREATE TABLE rooms (id bigint PRIMARY KEY, name text NOT NULL, r int, created timestamptz,
                    meta jsonb, avatar bytea, ttl interval, score double precision);
CREATE TABLE messages (id bigserial, room_id bigint NOT NULL, body text,
                       sent_at timestamptz NOT NULL, PRIMARY KEY (room_id, id))
    PARTITION BY HASH (room_id);
CREATE TABLE messages_p0 PARTITION OF messages FOR VALUES WITH (MODULUS 2, REMAINDER 0);
CREATE TABLE messages_p1 PARTITION OF messages FOR VALUES WITH (MODULUS 2, REMAINDER 1);
INSERT INTO rooms SELECT i, 'room ' || i, i % 3,
    '2026-01-01 12:00+02'::timestamptz + i * interval '1 h',
    jsonb_build_object('k', i, 'tags', jsonb_build_array('a', i)), decode(md5(i::text), 'hex'),
    i * interval '90 min', i / 7.0 FROM generate_series(1, 20) i;
INSERT INTO messages (room_id, body, sent_at)
    SELECT 1 + i % 20, repeat('msg ' || i || ' ', 1 + i % 5),
           '2026-01-02'::timestamptz + i * interval '1 s'
    FROM generate_series(1, 3000) i;
"""


def seed(endpoint: PostgresEndpoint) -> None:
    """Create the test schema: a hash-partitioned messages table and a plain table."""
    with psycopg.connect(**endpoint.connect_kwargs()) as conn:
        conn.execute(SCHEMA)


def fingerprints_of(
    endpoint: PostgresEndpoint, dbname: str | None = None, like: PgFingerprints | None = None
) -> PgFingerprints:
    """Fingerprints recomputed on a (restored) database: taken as ``like`` (a format-5 set: by
    COPY, as a restore proves it), else by the row-hash scan."""
    if like is not None and like.streamed:
        return restored_fingerprints(endpoint, dbname or endpoint.dbname, like, workers=2)
    with psycopg.connect(**endpoint.connect_kwargs(dbname)) as conn:
        return compute_fingerprints(conn, like=like)


def execute(endpoint: PostgresEndpoint, query: str, dbname: str | None = None) -> Any:
    """Run one autocommit statement and return its first row, if any."""
    kwargs = endpoint.connect_kwargs(dbname)
    with psycopg.connect(**kwargs, autocommit=True) as conn:
        cur = conn.execute(query)
        return cur.fetchone() if cur.description else None


def stub(tmp_path: Path, name: str, body: str) -> Path:
    """A bin dir holding a shell script ``name``; ``--version`` prints version 99.0."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    script = bindir / name
    script.write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = --version ]; then echo "{name} (PostgreSQL) 99.0"; exit 0; fi\n{body}\n'
    )
    script.chmod(0o755)
    return bindir


@pytest.fixture
def seeded(pg_database: PostgresEndpoint) -> PostgresEndpoint:
    """A fresh database holding the test schema."""
    seed(pg_database)
    return pg_database


@pytest.fixture
def target(pg_server: PostgresEndpoint, pg_database: PostgresEndpoint) -> Iterator[str]:
    """The name of an empty database to restore into (dropped afterwards)."""
    name = pg_database.dbname + "_restored"
    create_database(pg_server, name)
    yield name
    drop_database(pg_server, name)


def dump_to_file(endpoint: PostgresEndpoint, path: Path) -> PgFingerprints:
    """Stream a dump into ``path`` (as a backup writes it through a pipe)."""
    with dump(endpoint, timeout=120) as pgd, open(path, "wb") as fh:
        for chunk in pgd.stream:
            fh.write(chunk)
        return pgd.fingerprints


@pytest.mark.parametrize("jobs", [1, 2])
def test_dump_restores_with_equal_fingerprints(
    seeded: PostgresEndpoint, target: str, tmp_path: Path, jobs: int
) -> None:
    archive = tmp_path / "db.dump"
    recorded = dump_to_file(seeded, archive)
    # format 5: per table and leaf partition, read off the stream
    assert recorded.format == 5
    assert sorted(recorded.tables) == ["public.messages_p0", "public.messages_p1", "public.rooms"]
    assert sum(recorded.tables[f"public.messages_p{i}"].rows for i in (0, 1)) == 3000
    assert recorded.tables["public.rooms"].rows == 20
    assert {p.table for p in recorded.partitions.values()} == {"public.messages"}
    assert recorded.copy_settings["TimeZone"] == "UTC"
    assert read_archive_header(archive).dbname == seeded.dbname

    assert database_is_empty(seeded, target)
    restore_dump(archive, seeded, target, jobs=jobs, timeout=120)
    assert not database_is_empty(seeded, target)
    restored = fingerprints_of(seeded, target, like=recorded)
    assert compare(recorded, restored) == []
    assert PgFingerprints.from_dict(json.loads(json.dumps(recorded.to_dict()))) == recorded


def test_dump_is_consistent_under_concurrent_writes(
    seeded: PostgresEndpoint, target: str, tmp_path: Path
) -> None:
    stop = threading.Event()

    def writer() -> None:
        with psycopg.connect(**seeded.connect_kwargs(), autocommit=True) as conn:
            while not stop.is_set():
                conn.execute("INSERT INTO messages (room_id, body, sent_at) VALUES (3, 'x', now())")
                conn.execute("UPDATE rooms SET score = score + 1 WHERE id = 5")

    thread = threading.Thread(target=writer)
    thread.start()
    archive = tmp_path / "db.dump"
    try:
        with dump(seeded, timeout=120) as pgd, open(archive, "wb") as fh:
            execute(
                seeded, "INSERT INTO messages (room_id, body, sent_at) VALUES (4, 'late', now())"
            )
            for chunk in pgd.stream:
                execute(seeded, "DELETE FROM messages WHERE id = 1")
                fh.write(chunk)
            recorded = pgd.fingerprints
    finally:
        stop.set()
        thread.join()
    restore_dump(archive, seeded, target, timeout=120)
    assert compare(recorded, fingerprints_of(seeded, target, like=recorded)) == []
    live = compare(recorded, fingerprints_of(seeded, like=recorded))
    assert any(line.startswith("public.messages_p") for line in live)  # rows inserted, deleted
    assert any(line.startswith("public.rooms:") for line in live)  # a score updated


def test_fingerprints_detect_a_changed_row(seeded: PostgresEndpoint) -> None:
    before = fingerprints_of(seeded)
    execute(seeded, "UPDATE messages SET body = body || '!' WHERE id = 42")
    assert compare(before, fingerprints_of(seeded)) == [
        "public.messages: content digest differs (3000 rows)",
        "public.messages room 3: content digest differs (150 rows)",
    ]


def test_record_hash_binds_columns_to_their_row(seeded: PostgresEndpoint) -> None:
    """Swapping two rows' bodies keeps every column's multiset; the digest still changes."""
    before = fingerprints_of(seeded)
    assert {fp.row_hash for fp in before.tables.values()} == {"record"}
    execute(
        seeded,
        "UPDATE messages m SET body = o.body FROM messages o "
        "WHERE m.room_id = 1 AND o.room_id = 1 AND {m.id, o.id} <@ ARRAY[20, 40]::bigint[] "
        "AND m.id <> o.id".replace("{m.id, o.id}", "ARRAY[m.id, o.id]"),
    )
    assert compare(before, fingerprints_of(seeded)) == [
        "public.messages: content digest differs (3000 rows)",
        "public.messages room 1: content digest differs (150 rows)",
    ]


def test_unhashable_column_types_fall_back_to_the_row_text(seeded: PostgresEndpoint) -> None:
    execute(seeded, "CREATE TABLE docs (id int PRIMARY KEY, body json, at point)")
    execute(seeded, """INSERT INTO docs VALUES (1, '{"a": 1}', '(1,2)'), (2, '[]', '(3,4)')""")
    before = fingerprints_of(seeded)
    assert before.tables["public.docs"].row_hash == "text"
    assert before.tables["public.rooms"].row_hash == "record"
    execute(seeded, """UPDATE docs SET body = '{"a": 2}' WHERE id = 1""")
    assert compare(before, fingerprints_of(seeded)) == [
        "public.docs: content digest differs (2 rows)"
    ]


def test_format_1_fingerprints_are_checked_with_the_row_text(seeded: PostgresEndpoint) -> None:
    """A snapshot taken before format 2 recorded text hashes only; a copy is hashed the same."""
    current = fingerprints_of(seeded)
    as_text = PgFingerprints({n: replace(fp, row_hash="text") for n, fp in current.tables.items()})
    old = json.loads(json.dumps(fingerprints_of(seeded, like=as_text).to_dict()))
    old["format"] = 1
    for fp in [*old["tables"].values(), *old["rooms"]["public.messages"].values()]:
        del fp["row_hash"]
    loaded = PgFingerprints.from_dict(old)
    assert {fp.row_hash for fp in loaded.tables.values()} == {"text"}
    assert loaded.tables["public.messages"].digest != current.tables["public.messages"].digest
    assert compare(loaded, fingerprints_of(seeded, like=loaded)) == []
    assert compare(loaded, current)[:2] == [
        "public.messages: hashed by record, the snapshot by text",
        "public.rooms: hashed by record, the snapshot by text",
    ]


def test_compare_reports_missing_extra_and_capped_rooms() -> None:
    fp = Fingerprint(1, "00000000000000aa", 9)
    rooms = {str(i): fp for i in range(15)}
    expected = PgFingerprints({"public.a": fp, "public.messages": fp}, {"public.messages": rooms})
    actual = PgFingerprints({"public.b": fp, "public.messages": replace(fp, rows=2, max_id=8)})
    diffs = compare(expected, actual)
    assert diffs[:5] == [
        "public.a: table missing (expected 1 rows)",
        "public.b: unexpected table (1 rows)",
        "public.messages: 2 rows, expected 1",
        "public.messages: max(id) 8, expected 9",
        "public.messages room 0: missing (expected 1 rows)",
    ]
    assert diffs[-1] == "public.messages: ... and 5 more room differences"
    with pytest.raises(ValueError, match="unsupported fingerprint format"):
        PgFingerprints.from_dict({"tables": {}})


def test_pg_dump_dying_mid_stream_fails(seeded: PostgresEndpoint, tmp_path: Path) -> None:
    bindir = stub(
        tmp_path,
        "pg_dump",
        "printf PGDMP; head -c 5000000 /dev/urandom\n"
        'echo "pg_dump: error: query failed: server closed the connection" >&2; exit 1',
    )
    received = 0
    failure = r"^pg_dump exited 1: .*server closed the connection"
    with (
        pytest.raises(CommandFailed, match=failure),
        dump(seeded, pg_bin_dir=bindir, timeout=60) as pgd,
    ):
        for chunk in pgd.stream:
            received += len(chunk)
    assert received == 5_000_005


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("exit 0", "pg_dump produced 0 bytes: implausibly small output"),
        ("head -c 100000 /dev/zero", "not a custom-format archive"),
    ],
)
def test_empty_or_garbage_dump_is_refused(
    seeded: PostgresEndpoint, tmp_path: Path, body: str, message: str
) -> None:
    bindir = stub(tmp_path, "pg_dump", body)
    with (
        pytest.raises(SourceError, match=message),
        dump(seeded, pg_bin_dir=bindir, timeout=60) as pgd,
    ):
        list(pgd.stream)


def test_stream_outside_the_block_is_refused(seeded: PostgresEndpoint) -> None:
    with dump(seeded, timeout=60) as pgd:
        stream = pgd.stream
    with pytest.raises(SourceError, match="read after its dump\\(\\) block"):
        next(stream)


def test_leaving_the_block_early_stops_pg_dump(seeded: PostgresEndpoint) -> None:
    with dump(seeded, timeout=60, read_size=16) as pgd:
        assert next(pgd.stream).startswith(b"PGDMP")
    with pytest.raises(StopIteration):
        next(pgd.stream)


def test_wrong_password_is_not_revealed(seeded: PostgresEndpoint, tmp_path: Path) -> None:
    wrong = replace(seeded, password="Wrong-Canary-91f2")
    for call in (
        lambda: server_version(wrong),
        lambda: dump(wrong, timeout=30).__enter__(),
        lambda: dump_globals(wrong, timeout=30),
    ):
        with pytest.raises(SourceError, match="password authentication failed") as info:
            call()
        assert "Wrong-Canary-91f2" not in str(info.value)
    archive = tmp_path / "db.dump"
    dump_to_file(seeded, archive)
    with pytest.raises(
        SourceError, match=r"^pg_restore exited 1: .*password authentication"
    ) as info:
        restore_dump(archive, wrong, seeded.dbname, timeout=60)
    assert "Wrong-Canary-91f2" not in str(info.value)


def test_old_pg_dump_is_refused(seeded: PostgresEndpoint, tmp_path: Path) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "pg_dump").write_text("#!/bin/sh\necho 'pg_dump (PostgreSQL) 14.0'\n")
    (bindir / "pg_dump").chmod(0o755)
    major = server_version(seeded)
    refusal = (
        f"^pg_dump 14 is older than the server \\({major}\\); install a PostgreSQL {major} client$"
    )
    with pytest.raises(SourceError, match=refusal):
        preflight(seeded, bindir)
    with pytest.raises(SourceError, match=refusal):
        dump(seeded, pg_bin_dir=bindir, timeout=30).__enter__()
    preflight(seeded)


def test_old_pg_restore_is_refused(seeded: PostgresEndpoint, tmp_path: Path) -> None:
    archive = tmp_path / "db.dump"
    dump_to_file(seeded, archive)
    header = pg_restore_version_check(archive)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "pg_restore").write_text("#!/bin/sh\necho 'pg_restore (PostgreSQL) 14.2'\n")
    (bindir / "pg_restore").chmod(0o755)
    major = header.dump_version.split(".")[0]
    with pytest.raises(SourceError) as info:
        pg_restore_version_check(archive, bindir)
    assert str(info.value) == (
        f"pg_restore 14 is older than the dump (pg_dump {header.dump_version}); "
        f"install a PostgreSQL {major} client"
    )


def test_corrupt_archive_fails_with_pg_restore_stderr(
    seeded: PostgresEndpoint, target: str, tmp_path: Path
) -> None:
    archive = tmp_path / "db.dump"
    dump_to_file(seeded, archive)
    data = archive.read_bytes()
    archive.write_bytes(data[: len(data) // 2])
    with pytest.raises(SourceError, match=r"^pg_restore exited 1: pg_restore: error: .+"):
        restore_dump(archive, seeded, target, timeout=60)
    archive.write_bytes(b"not an archive")
    with pytest.raises(SourceError, match="not a pg_dump custom-format archive"):
        restore_dump(archive, seeded, target, timeout=60)


def test_globals(
    pg_server: PostgresEndpoint, pg_database: PostgresEndpoint, caplog: pytest.LogCaptureFixture
) -> None:
    out = dump_globals(pg_server, timeout=60)
    assert out is not None and b"CREATE ROLE postgres;" in out and b"SCRAM-SHA-256$" in out
    execute(pg_server, "DROP ROLE IF EXISTS drtool_lowly")
    execute(pg_server, "CREATE ROLE drtool_lowly LOGIN PASSWORD 'lowly-pw'")
    try:
        lowly = replace(pg_server, user="drtool_lowly", password="lowly-pw")
        with caplog.at_level(logging.WARNING):
            out = dump_globals(lowly, timeout=60)
        assert out is not None and b"CREATE ROLE drtool_lowly;" in out
        assert b"SCRAM-SHA-256$" not in out
        assert "without role passwords" in caplog.text
        assert "lowly-pw" not in caplog.text
        execute(pg_server, "REVOKE SELECT ON pg_catalog.pg_roles FROM PUBLIC", pg_database.dbname)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            assert dump_globals(replace(lowly, dbname=pg_database.dbname), timeout=60) is None
        assert "globals not dumped: drtool_lowly may not read the roles" in caplog.text
    finally:
        execute(pg_server, "DROP ROLE drtool_lowly")


def test_database_admin(pg_server: PostgresEndpoint, pg_database: PostgresEndpoint) -> None:
    old, new = pg_database.dbname, pg_database.dbname + "_moved"
    assert database_exists(pg_server, old) and not database_exists(pg_server, new)
    assert database_is_empty(pg_server, old)
    execute(pg_server, "CREATE TYPE mood AS ENUM ('ok')", old)
    assert not database_is_empty(pg_server, old)
    with psycopg.connect(**pg_database.connect_kwargs()) as held:
        switch_databases(pg_server, old, new, None)  # a plain rename: no database `new` yet
        with pytest.raises(psycopg.OperationalError):
            held.execute("SELECT 1")
    assert database_exists(pg_server, new) and not database_exists(pg_server, old)
    assert execute(pg_server, "SELECT 1", new) == (1,)
    with pytest.raises(SourceError, match=f"create database {new}: .*already exists"):
        create_database(pg_server, new)
    copy = f"{new}_restore_1"
    create_database(pg_server, copy)
    assert restore_copies(pg_server, new) == [copy]
    execute(pg_server, "CREATE TABLE marker (v int)", copy)
    switch_databases(pg_server, copy, new, old)  # both renames in one transaction
    assert execute(pg_server, "SELECT count(*) FROM marker", new) == (0,)
    assert not database_is_empty(pg_server, old)  # the previous one, with its type
    assert restore_copies(pg_server, new) == []
    drop_database(pg_server, new)  # the fixture's database is `old` again
    spare = old + "_spare"
    create_database(pg_server, spare)
    assert database_is_empty(pg_server, spare)
    drop_database(pg_server, spare)
    assert not database_exists(pg_server, spare)


def test_index_archive_gives_a_piped_dump_the_offsets_of_a_file_dump(
    seeded: PostgresEndpoint, tmp_path: Path
) -> None:
    """A dump written through a pipe lacks data offsets (pg_restore -j then rescans the file
    per table); indexed, it equals what pg_dump writes to a file, creation time aside."""
    piped, direct = tmp_path / "piped.dump", tmp_path / "direct.dump"
    dump_to_file(seeded, piped)
    env = {**os.environ, **seeded.libpq_env()}
    subprocess.run(["pg_dump", "-Fc", "-Z0", "-f", str(direct), seeded.dbname], env=env, check=True)
    before = piped.read_bytes()
    assert index_archive(piped) > 0
    indexed, wanted = piped.read_bytes(), direct.read_bytes()
    assert len(indexed) == len(before) == len(wanted) and before != wanted
    differing = [i for i, (a, b) in enumerate(zip(indexed, wanted, strict=True)) if a != b]
    assert max(differing, default=0) < 64, "only the header's creation time may differ"
    # already indexed: left exactly as it was; not an archive at all: refused, untouched
    assert index_archive(direct) == 0 and direct.read_bytes() == wanted
    garbage = tmp_path / "garbage.dump"
    garbage.write_bytes(b"PGDMP" + bytes(200))
    with pytest.raises(SourceError, match="unsupported archive"):
        index_archive(garbage)
    assert garbage.read_bytes() == b"PGDMP" + bytes(200)


def test_offsets_found_while_streaming_equal_those_of_the_file_in_any_piece_sizes(
    seeded: PostgresEndpoint, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A restore finds the offsets with the one archive reader fed the pieces staging writes;
    framing that straddles two pieces (a chunk length split, a chunk running on) must not
    change them, and an archive cut short is reported (a warning, nothing written), never
    given offsets past its end nor a failed staging."""
    piped, whole = tmp_path / "piped.dump", tmp_path / "whole.dump"
    dump_to_file(seeded, piped)
    data = piped.read_bytes()
    whole.write_bytes(data)
    assert index_archive(whole) > 0
    wanted = whole.read_bytes()
    for seed in range(3):
        pick, reader, at = random.Random(seed), ArchiveStream(digest=False), 0
        while at < len(data):
            size = pick.choice((1, 2, 3, 5, 6, 7, 64, 4096, 65_536))
            reader.feed(data[at : at + size])
            at += size
        reader.finish()
        streamed = tmp_path / f"streamed{seed}.dump"
        streamed.write_bytes(data)
        assert write_offsets(streamed, reader) > 0 and streamed.read_bytes() == wanted
    cut_reader = ArchiveStream(digest=False)
    cut_reader.feed(data[:-3])
    with pytest.raises(ArchiveError, match="truncated"):
        cut_reader.finish()
    # staging's tap: the same cut stream is remembered and warned about, nothing is written
    cut = tmp_path / "cut.dump"
    cut.write_bytes(data[:-3])
    tap = OffsetsWhileStaging()
    tap.feed(data[:-3])
    with caplog.at_level(logging.WARNING):
        assert tap.write_into(cut) == 0
    assert cut.read_bytes() == data[:-3] and "truncated" in tap.problem
    assert "data offsets not indexed" in caplog.text
    # and an error mid-stream stops the feeding instead of failing it
    tap = OffsetsWhileStaging()
    tap.feed(b"PGDMP" + bytes(200))
    tap.feed(data)
    assert tap.write_into(cut) == 0 and tap.problem and cut.read_bytes() == data[:-3]


def _archive_int(value: int) -> bytes:
    return bytes([value < 0]) + abs(value).to_bytes(4, "little")


def test_the_staging_tap_gives_up_on_a_toc_that_never_parses_or_a_newer_format(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The tap buffers the header and TOC until they parse: a TOC whose first string claims
    100 MiB would be held up to the reader's 4 GiB cap. Beyond 64 MiB it gives up (no
    offsets, pg_restore scans) and lets the buffer go; an archive format newer than the
    reader knows is given up at its first bytes."""
    from drtool.stores.postgres.restore import TAP_TOC_LIMIT

    header = b"PGDMP" + bytes([1, 14, 0, 4, 8, 1]) + _archive_int(0)
    header += b"".join(_archive_int(0) for _ in range(7))  # creation time
    header += b"".join(_archive_int(-1) for _ in range(3))  # dbname, server, pg_dump: NULL
    header += _archive_int(1) + _archive_int(1) + _archive_int(0)  # 1 entry, dumpId, hadDumper
    header += _archive_int(100 << 20)  # its first string: 100 MiB
    tap = OffsetsWhileStaging()
    tap.feed(header)
    piece = bytes(1 << 20)
    for _ in range(TAP_TOC_LIMIT // len(piece) + 1):
        tap.feed(piece)
    assert "not parsed after 64 MiB" in tap.problem
    assert len(tap.reader._toc) == 0  # the buffered TOC let go
    staged = tmp_path / "staged.dump"
    staged.write_bytes(header)
    with caplog.at_level(logging.WARNING):
        assert tap.write_into(staged) == 0
    assert "data offsets not indexed" in caplog.text
    newer = OffsetsWhileStaging()
    newer.feed(b"PGDMP" + bytes([1, 17]))  # the version split across pieces
    newer.feed(bytes([0, 4, 8, 1]) + bytes(100))
    assert newer.problem == "archive format (1, 17, 0) is newer than the reader knows"
