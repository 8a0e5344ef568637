"""Measure how often an LSN recorded with a logical dump fails to match it exactly, under load.

Usage: python bench/bench_snapshot_lsn.py [--major 15] [--runs 10] [--method all]

Methods: ``slot`` (drtool's: the consistent point of a temporary logical slot, ADR 0018),
``after`` (``pg_current_wal_lsn()`` in the statement that calls ``pg_export_snapshot()``),
``after-insert`` (the same with ``pg_current_wal_insert_lsn()``) and ``before`` (the insert LSN
read just before the export). Each run is the proof of tests/test_consistent_lsn.py: 8 writer
threads commit one-row transactions while the dump runs; ``pg_waldump`` gives every writer
transaction's commit LSN; the run mismatches when the restored dump does not hold exactly the
transactions whose commit record starts before the recorded LSN. It reuses that test's
helpers (tests/ on sys.path).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import test_consistent_lsn as proof

from drtool.endpoints import PostgresEndpoint
from drtool.runtime.pgserver import PostgresServer
from drtool.sources import postgres as pg
from drtool.sources.pg_snapshot_lsn import ExportedSnapshot, export_snapshot

NAIVE = {
    "after": "SELECT pg_export_snapshot(), pg_current_wal_lsn()::text",
    "after-insert": "SELECT pg_export_snapshot(), pg_current_wal_insert_lsn()::text",
}


def naive(method: str) -> Any:
    """An ``export_snapshot`` replacement recording the naive LSN of ``method``."""

    def export(
        conn: psycopg.Connection[Any], endpoint: PostgresEndpoint, major: int, *, wait: float
    ) -> ExportedSnapshot:
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        conn.read_only = True
        if method == "before":
            lsn = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
            snap = conn.execute("SELECT pg_export_snapshot()").fetchone()
            assert lsn is not None and snap is not None
            return ExportedSnapshot(str(snap[0]), str(lsn[0]), 1, "naive")
        row = conn.execute(NAIVE[method]).fetchone()
        assert row is not None
        return ExportedSnapshot(str(row[0]), str(row[1]), 1, "naive")

    return export


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--major", type=int, default=15)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--method", default="all", choices=["all", "slot", "before", *NAIVE])
    args = ap.parse_args()
    methods = ["slot", "before", *NAIVE] if args.method == "all" else [args.method]
    root = Path(tempfile.mkdtemp(prefix="bench-lsn-"))
    root.chmod(0o711)
    server = PostgresServer(
        root / "pg",
        major=args.major,
        settings={"wal_level": "logical", "fsync": "off", "synchronous_commit": "off"},
    )
    server.start()
    print("| method | PostgreSQL | runs mismatched | commits per run |\n|---|---|---|---|")
    try:
        for method in methods:
            pg.export_snapshot = export_snapshot if method == "slot" else naive(method)
            bad, commits = 0, []
            for _ in range(args.runs):
                name = f"b{uuid.uuid4().hex[:8]}"
                with psycopg.connect(
                    **server.endpoint.connect_kwargs("postgres"), autocommit=True
                ) as c:
                    c.execute(f"CREATE DATABASE {name}")
                db = dataclasses.replace(server.endpoint, dbname=name)
                work = root / name
                work.mkdir()
                p = proof.dump_under_writers(server, db, work)
                assert p.consistent_lsn is not None
                bad += bool(proof.mismatches(p.consistent_lsn, p.in_dump, p.commits, p.all_xids))
                commits.append(len(p.all_xids))
            print(
                f"| {method} | {args.major} | {bad} / {args.runs} | {min(commits)}–{max(commits)} |"
            )
    finally:
        pg.export_snapshot = export_snapshot
        server.stop()


if __name__ == "__main__":
    main()
