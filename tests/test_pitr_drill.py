"""Drills of the physical chain: ``pitr:lsn-of-latest`` and ``pitr:random-within``, for real.

A PostgreSQL 15 with ``wal_level = logical`` streams its WAL into a repository; a base backup
is taken; writers commit in threads while a logical snapshot is taken (it records the
consistent LSN of ADR 0018); more WAL is sealed. The ``pitr:lsn-of-latest`` drill restores
base + WAL to that LSN and must reproduce the logical snapshot's fingerprints exactly, and the
same check fails when the copy is taken at a later position (so it can fail). A
``pitr:random-within`` drill restores a random moment of the window and reads it.
"""

from __future__ import annotations

import shutil
import threading
import uuid
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from support.servers import servers_required
from support.stacks import SMALL
from support.wal_kit import SEG, WalKit, make_kit, stop_streamer, wait_for, write_rows

from chat_stack.seed import seed
from drtool.config import load_config
from drtool.drills.definition import DrillDefinition, ReportSettings
from drtool.drills.report import DrillReport
from drtool.endpoints import RedisEndpoint, S3Endpoint, StackEndpoints
from drtool.repository import drill_log
from drtool.repository.access import open_repo
from drtool.runtime.pgserver import PostgresServer
from drtool.services.backup import run_backup
from drtool.services.drill import run_drill
from drtool.services.pitr_drill import PitrChoice, run_pitr_drill
from drtool.stores import canary
from drtool.wal.names import parse_lsn, parse_segment, segment_of_lsn

pytestmark = pytest.mark.slow  # streaming, base backups and physical restores


@pytest.fixture
def home(runtime_root: Path) -> Iterator[Path]:
    """A work directory the postgres user can enter (the restored copy runs as it)."""
    directory = runtime_root / f"pitr-drill-{uuid.uuid4().hex[:6]}"
    directory.mkdir(mode=0o711)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def logical_pg(runtime_root: Path) -> Iterator[PostgresServer]:
    with servers_required():
        server = PostgresServer(
            runtime_root / f"pgdrill-{uuid.uuid4().hex[:6]}",
            major=15,
            settings={"wal_level": "logical", "fsync": "off", "synchronous_commit": "off"},
        )
    server.start()
    yield server
    server.stop()


def _insert_until(stop: threading.Event, conninfo: dict[str, object]) -> None:
    with psycopg.connect(**conninfo, autocommit=True) as conn:  # type: ignore[arg-type]
        while not stop.is_set():
            conn.execute("INSERT INTO busy (note) VALUES ('x')")


def _history(kit: WalKit, stack: StackEndpoints) -> tuple[str, str]:
    """Stream; a base backup; a canary; a logical snapshot under three committing writers;
    more WAL sealed. Returns the logical snapshot's id and a WAL position after it."""
    ep = stack.postgres
    write_rows(ep)
    proc = kit.start()
    try:
        wait_for("the streamer to seal", lambda: len(kit.segments()) >= 1)
        cfg = load_config(kit.config, {})
        run_backup(cfg, home=kit.root, env={}, components=("postgres-base",))
        assert canary.write_canaries(stack, stack.buckets).failed == {}
        with psycopg.connect(**ep.connect_kwargs(), autocommit=True) as conn:
            conn.execute("CREATE TABLE busy (id bigserial, note text)")  # once, not per writer
        stop = threading.Event()
        writers = [
            threading.Thread(target=_insert_until, args=(stop, ep.connect_kwargs()))
            for _ in range(3)
        ]
        for w in writers:
            w.start()
        try:
            logical = run_backup(cfg, home=kit.root, env={}, components=("postgres",))
        finally:
            stop.set()
            for w in writers:
                w.join()
        write_rows(ep)
        with psycopg.connect(**ep.connect_kwargs()) as conn:
            row = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
        assert row is not None
        later = str(row[0])
        needed = segment_of_lsn(parse_lsn(later), 1, SEG).segno
        wait_for(
            "the WAL past the later position sealed",
            lambda: any(parse_segment(n, SEG).segno > needed for n in kit.segments()),
        )
        assert stop_streamer(proc) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    return logical.snapshot_id, later


def test_pitr_drills_check_the_physical_chain_against_the_logical_snapshot(
    tmp_path: Path,
    home: Path,
    logical_pg: PostgresServer,
    redis_db: RedisEndpoint,
    s3_server: S3Endpoint,
    s3_bucket: str,
) -> None:
    kit = next(make_kit(tmp_path, logical_pg))
    stack = StackEndpoints(logical_pg.endpoint, redis_db, s3_server, (s3_bucket,))
    seed(stack, SMALL, 7, progress=False)  # co-talk's schema and messages to read back
    logical_id, later = _history(kit, stack)

    operator = load_config(kit.operator, {})
    spec = DrillDefinition(
        name="pitr", snapshot="pitr:lsn-of-latest", report=ReportSettings(dir=str(tmp_path / "r"))
    )
    report = run_drill(operator, home=home, spec=spec)
    assert report.error == "" and report.passed, [c for c in report.checks if not c.passed]
    (equal,) = [c for c in report.checks if "equals its fingerprints" in c.name]
    assert equal.passed and logical_id in equal.name
    assert "rows equal at LSN" in equal.detail

    # the same check at a later position differs: it can fail
    wrong = DrillReport("x", "pitr", "local", "", "", "")
    at_later = PitrChoice(datetime.now(UTC), lsn=later, snapshot_id=logical_id)
    run_pitr_drill(operator, home, at_later, wrong)
    (differs,) = [c for c in wrong.checks if "equals its fingerprints" in c.name]
    assert not differs.passed and not wrong.passed
    assert "difference" in differs.detail

    # PostgreSQL alone (with more stores a moment drills the whole stack: tests/test_moment.py)
    spec = replace(spec, snapshot="pitr:random-within:1d", components=("postgres",))
    report = run_drill(operator, home=home, spec=spec)
    assert report.passed, [c for c in report.checks if not c.passed]
    assert [c.name for c in report.checks] == [
        "restored to the moment",
        "messages readable at the moment",
        "nothing past the moment",
        "RTO within threshold",
        "RPO within threshold",
    ]
    # a physical-chain drill proves base + WAL, not a snapshot: it never counts as one's drill
    repo = open_repo(operator)
    assert report.snapshot_id == "pitr:random-within:1d"
    assert logical_id not in drill_log.drilled(repo.storage)
    assert set(report.measured_rpo_s) == {"postgres"}
    assert not list(home.iterdir())  # the copies were stopped and removed

    # a copy holding a canary stamped past the moment (a clock an hour ahead) fails the drill
    assert canary.write_canaries(stack, (), now=datetime.now(UTC) + timedelta(hours=1)).written
    moment = datetime.now(UTC)
    assert kit.start("--until-idle").wait(120) == 0
    spec = replace(spec, snapshot=f"pitr:at:{moment.isoformat()}")
    report = run_drill(operator, home=home, spec=spec)
    (past,) = [c for c in report.checks if c.name == "nothing past the moment"]
    assert not past.passed and not report.passed
    assert past.detail.startswith("postgres: its newest canary is 3")
    assert past.detail.endswith(" s past the moment")
    assert -3660 < past.figures["measured_rpo_s"] < -3540  # an hour ahead, less the seconds between
