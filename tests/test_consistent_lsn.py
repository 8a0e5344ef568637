"""The LSN recorded with a logical ``postgres`` snapshot matches the dump exactly (issue 12.7).

The proof, under many writers committing in threads while the dump runs: every writer
transaction stores its own xid in its row; afterwards ``pg_waldump`` reads the commit record
of each of those xids from the server's WAL. The dump (restored, and its snapshot imported)
must hold exactly the transactions whose commit record starts before ``consistent_lsn`` — not
one more, not one less. An LSN read next to ``pg_export_snapshot()`` fails this check under
the same load (measured, see docs/decisions/0018-consistent-lsn-of-logical-snapshot.md); the
slot's consistent point must pass it every time.
"""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import servers_required
from psycopg import sql
from support.backup_kit import make_backup_kit

from drtool.endpoints import PostgresEndpoint, RedisEndpoint, S3Endpoint
from drtool.runtime import binaries
from drtool.runtime.pgserver import PostgresServer
from drtool.sources import postgres as pg
from drtool.wal.names import parse_lsn

WRITERS = 8
KEEP_SLOT = "lsn_proof_keep"
_COMMIT = re.compile(r"tx:\s+(\d+), lsn: ([0-9A-F]+/[0-9A-F]+), .*desc: COMMIT\b")


@pytest.fixture(scope="module", params=[15, pytest.param(16, marks=pytest.mark.slow)])
def logical_pg(request: pytest.FixtureRequest, runtime_root: Path) -> Iterator[PostgresServer]:
    """A server with ``wal_level = logical`` (a restart-only setting: a server of its own)."""
    with servers_required():
        server = PostgresServer(
            runtime_root / f"pglogical{request.param}-{uuid.uuid4().hex[:6]}",
            major=request.param,
            settings={"wal_level": "logical", "fsync": "off", "synchronous_commit": "off"},
        )
    server.start()
    yield server
    server.stop()


@pytest.fixture
def logical_db(logical_pg: PostgresServer) -> Iterator[PostgresEndpoint]:
    """A fresh database on the logical server."""
    ep = logical_pg.endpoint
    name = f"lsn_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(**ep.connect_kwargs("postgres"), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield dataclasses.replace(ep, dbname=name)
    with psycopg.connect(**ep.connect_kwargs("postgres"), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


def _one(ep: PostgresEndpoint, query: str, dbname: str | None = None) -> Any:
    with psycopg.connect(**ep.connect_kwargs(dbname), autocommit=True) as conn:
        row = conn.execute(query).fetchone()
    assert row is not None
    return row[0]


class Writers:
    """``WRITERS`` threads, each committing one-row transactions that record their xid."""

    def __init__(self, ep: PostgresEndpoint) -> None:
        self.ep = ep
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.threads = [threading.Thread(target=self._run, args=(n,)) for n in range(WRITERS)]

    def _run(self, n: int) -> None:
        try:
            with psycopg.connect(**self.ep.connect_kwargs(), autocommit=True) as conn:
                while not self.stop.is_set():
                    conn.execute("INSERT INTO commits (writer) VALUES (%s)", (n,))
        except BaseException as exc:  # reported by the test, not lost in a thread
            self.errors.append(exc)

    def __enter__(self) -> Writers:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()


def rows(ep: PostgresEndpoint) -> int:
    """Rows committed so far."""
    return int(_one(ep, "SELECT count(*) FROM commits"))


def wait_rows(ep: PostgresEndpoint, at_least: int, writers: Writers) -> None:
    """Until the writers have committed ``at_least`` rows (they run until told to stop)."""
    while rows(ep) < at_least:
        assert not writers.errors, writers.errors
        writers.stop.wait(0.05)


def xids_in(conn: psycopg.Connection[Any]) -> set[int]:
    """The writer xids (32-bit, as the WAL names them) visible to ``conn``."""
    return {int(r[0]) % 2**32 for r in conn.execute("SELECT xid FROM commits").fetchall()}


def commit_lsns(server: PostgresServer, start: str, end: str) -> dict[int, int]:
    """xid -> start LSN of its commit record, from the server's own WAL via ``pg_waldump``."""
    waldump, wal_dir = str(server.bin_dir / "pg_waldump"), str(server.data_dir / "pg_wal")
    out = subprocess.run(
        [waldump, "--rmgr=Transaction", "-s", start, "-e", end, "-p", wal_dir],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {int(m.group(1)): parse_lsn(m.group(2)) for m in _COMMIT.finditer(out)}


def mismatches(lsn: str, visible: set[int], commits: dict[int, int], all_xids: set[int]) -> str:
    """Empty when ``visible`` is exactly the xids whose commit starts before ``lsn``."""
    point = parse_lsn(lsn)
    before = {x for x in all_xids if commits[x] < point}
    missing, extra = before - visible, visible - before
    if not missing and not extra:
        return ""
    return f"{len(missing)} committed before {lsn} but not seen, {len(extra)} seen but after it"


@dataclasses.dataclass
class Proof:
    """One dump taken under writers, and what the WAL says about every writer commit."""

    consistent_lsn: str | None
    in_snapshot: set[int]
    in_dump: set[int]
    all_xids: set[int]
    commits: dict[int, int]


def dump_under_writers(
    server: PostgresServer,
    ep: PostgresEndpoint,
    tmp: Path,
    extra_in_block: Callable[[PostgresEndpoint], None] | None = None,
) -> Proof:
    """Dump ``ep`` while ``WRITERS`` threads commit, restore the dump, read the WAL."""
    with psycopg.connect(**ep.connect_kwargs(), autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE commits (id bigserial PRIMARY KEY, writer int NOT NULL, "
            "xid bigint NOT NULL DEFAULT txid_current())"
        )
        # keeps every WAL segment from here on for pg_waldump (dropped below)
        conn.execute("SELECT pg_create_physical_replication_slot(%s, true)", (KEEP_SLOT,))
        start = str(conn.execute("SELECT pg_current_wal_insert_lsn()").fetchone()[0])  # type: ignore[index]
    archive = tmp / "proof.pgdump"
    try:
        with Writers(ep) as writers:
            wait_rows(ep, 300, writers)
            with pg.dump(ep, pg_bin_dir=server.bin_dir, timeout=300) as dump:
                with psycopg.connect(**ep.connect_kwargs()) as reader:
                    reader.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
                    reader.execute(
                        sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(dump.snapshot))
                    )
                    in_snapshot = xids_in(reader)
                with archive.open("wb") as fh:
                    for chunk in dump.stream:
                        fh.write(chunk)
                assert dump.fingerprints.tables  # the scan ran in the same snapshot, to its end
                exported = dump.exported
            # commits after the point too: the check must see both sides of it
            wait_rows(ep, rows(ep) + 300, writers)
        assert not writers.errors, writers.errors
        with psycopg.connect(**ep.connect_kwargs(), autocommit=True) as conn:
            all_xids = xids_in(conn)
            conn.execute("SELECT pg_switch_wal()")  # every commit record written to pg_wal
            end = str(conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0])  # type: ignore[index]
        commits = commit_lsns(server, start, end)
    finally:
        with psycopg.connect(**ep.connect_kwargs(), autocommit=True) as conn:
            conn.execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                "WHERE slot_name = %s",
                (KEEP_SLOT,),
            )
    copy = f"{ep.dbname}_copy"
    pg.create_database(ep, copy)
    try:
        pg.restore_dump(archive, ep, copy, pg_bin_dir=server.bin_dir, timeout=300)
        with psycopg.connect(**ep.connect_kwargs(copy)) as conn:
            in_dump = xids_in(conn)
    finally:
        pg.drop_database(ep, copy)
    assert all_xids <= commits.keys(), "a writer commit is missing from pg_waldump's output"
    return Proof(exported.consistent_lsn, in_snapshot, in_dump, all_xids, commits)


@pytest.mark.slow
def test_the_recorded_lsn_is_exactly_what_the_dump_holds_under_concurrent_commits(
    logical_pg: PostgresServer, logical_db: PostgresEndpoint, tmp_path: Path
) -> None:
    proof = dump_under_writers(logical_pg, logical_db, tmp_path)
    assert proof.consistent_lsn is not None
    assert proof.in_dump == proof.in_snapshot  # pg_dump read the snapshot the slot exported
    point = parse_lsn(proof.consistent_lsn)
    before = {x for x in proof.all_xids if proof.commits[x] < point}
    # not vacuous: writers committed on both sides of the point
    assert before and proof.all_xids - before
    assert mismatches(proof.consistent_lsn, proof.in_dump, proof.commits, proof.all_xids) == ""


def test_without_wal_level_logical_no_lsn_is_recorded_and_the_reason_is(
    pg_database: PostgresEndpoint,
) -> None:
    assert _one(pg_database, "SHOW wal_level") == "replica"
    with pg.dump(pg_database, timeout=60) as dump:
        b"".join(dump.stream)
        exported = dump.exported
    assert exported.details() == {
        "consistent_lsn": None,
        "consistent_lsn_unavailable": "wal_level is replica, not logical",
    }


def test_a_role_without_replication_gets_a_dump_and_no_lsn(
    logical_pg: PostgresServer, logical_db: PostgresEndpoint
) -> None:
    role, password = f"nolsn_{uuid.uuid4().hex[:6]}", uuid.uuid4().hex
    with psycopg.connect(**logical_db.connect_kwargs(), autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                sql.Identifier(role), sql.Literal(password)
            )
        )
        conn.execute("CREATE TABLE t (n int); INSERT INTO t VALUES (1)")
        conn.execute(sql.SQL("GRANT SELECT ON t TO {}").format(sql.Identifier(role)))
    limited = dataclasses.replace(logical_db, user=role, password=password)
    try:
        with pg.dump(limited, pg_bin_dir=logical_pg.bin_dir, timeout=60) as dump:
            assert b"".join(dump.stream).startswith(pg.DUMP_MAGIC)
            exported = dump.exported
            assert dump.fingerprints.tables["public.t"].rows == 1
    finally:
        with psycopg.connect(**logical_db.connect_kwargs(), autocommit=True) as conn:
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
    assert exported.consistent_lsn is None
    assert exported.lsn_unavailable is not None
    assert exported.lsn_unavailable.startswith("no replication connection")
    assert password not in exported.lsn_unavailable


def test_an_open_transaction_delays_the_slot_only_until_its_wait_then_no_lsn(
    logical_pg: PostgresServer, logical_db: PostgresEndpoint
) -> None:
    with psycopg.connect(**logical_db.connect_kwargs()) as holder:
        holder.execute("SELECT txid_current()")  # an xid, left open: the slot must wait for it
        with pg.dump(logical_db, pg_bin_dir=logical_pg.bin_dir, timeout=60, slot_wait=1.0) as dump:
            b"".join(dump.stream)
            exported = dump.exported
        holder.rollback()
    assert exported.consistent_lsn is None
    assert exported.lsn_unavailable is not None and "waited over 1 s" in exported.lsn_unavailable
    with psycopg.connect(**logical_db.connect_kwargs(), autocommit=True) as conn:
        left = conn.execute(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 'drtool_snapshot_%'"
        ).fetchone()
    assert left == (0,), "the cancelled temporary slot was left behind"


@pytest.mark.slow
def test_a_backup_records_the_consistent_lsn_in_the_manifest(
    logical_pg: PostgresServer,
    logical_db: PostgresEndpoint,
    redis_db: RedisEndpoint,
    s3_server: S3Endpoint,
    s3_bucket: str,
    tmp_path: Path,
) -> None:
    kit = make_backup_kit(tmp_path, logical_db, redis_db, s3_server, s3_bucket)
    # pg_dump of the server's major (the kit's default is the host's, which may be older)
    bin_dir = str(binaries.pg_bin_dir(major=logical_pg.major))
    config = kit.write_config(f"pg{logical_pg.major}", postgres={"bin_dir": bin_dir})
    before = parse_lsn(_one(logical_db, "SELECT pg_current_wal_lsn()::text"))
    done = kit.backup("postgres", config=config)
    assert done.returncode == 0, done.stderr
    snapshot_id = json.loads(done.stdout)["snapshot_id"]
    details = kit.manifest(snapshot_id).component("postgres").details  # type: ignore[union-attr]
    after = parse_lsn(_one(logical_db, "SELECT pg_current_wal_lsn()::text"))
    assert before <= parse_lsn(details["consistent_lsn"]) <= after
    assert details["timeline"] == 1
    sysid = _one(logical_db, "SELECT system_identifier::text FROM pg_control_system()")
    assert details["system_identifier"] == sysid
    assert "consistent_lsn_unavailable" not in details
