"""Point-in-time recovery with a streaming standby as the source (issue 16.3 with issue 12).

A PostgreSQL 15 primary of the module's own and a standby of it (``pg_basebackup -R``). The
base backup is taken from the standby while the primary writes; the manifest names the
standby, the primary's position it had replayed and the timeline; a restore to a moment
between two transactions A and B committed on the primary afterwards holds A and not B.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import pytest
from psycopg import sql
from support.cli import run_drtool
from support.wal_kit import (
    SEG,
    WalKit,
    admin,
    make_kit,
    start_standby,
    start_wal_server,
    stop_streamer,
    wait_for,
    write_rows,
)
from test_pitr import one, restored_notes

from drtool.config import load_config
from drtool.repository import catalog
from drtool.repository.access import open_repo
from drtool.runtime.pgserver import PostgresServer
from drtool.services.backup import run_backup
from drtool.wal import continuity
from drtool.wal.names import parse_lsn, parse_segment, segment_of_lsn

pytestmark = pytest.mark.slow  # a primary, a standby, streamers and restores


@pytest.fixture(scope="module")
def primary(runtime_root: Path) -> Iterator[PostgresServer]:
    server = start_wal_server(runtime_root, 15)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def standby(runtime_root: Path, primary: PostgresServer) -> Iterator[PostgresServer]:
    server = start_standby(runtime_root, primary)
    yield server
    server.stop()


@pytest.fixture
def scratch(runtime_root: Path, tmp_path: Path) -> Path:
    """A directory the postgres user can enter, for restored data directories."""
    path = runtime_root / f"restored-{tmp_path.name}"
    path.mkdir(mode=0o711)
    return path


def caught_up(primary: PostgresServer, standby: PostgresServer) -> bool:
    """The standby has replayed everything the primary has written so far."""
    with admin(primary.endpoint) as p, admin(standby.endpoint) as s:
        sent = parse_lsn(one(p, "SELECT pg_current_wal_lsn()"))
        replayed = parse_lsn(one(s, "SELECT pg_last_wal_replay_lsn()"))
    return replayed >= sent


def pointed_at(kit: WalKit, server: PostgresServer, name: str) -> Path:
    """A copy of the kit's backup-host config whose ``[postgres]`` is ``server``."""
    text = kit.config.read_text().replace(f"port = {kit.server.port}", f"port = {server.port}")
    path = kit.root / name
    path.write_text(text)
    path.chmod(0o600)
    return path


class Writer:
    """Commits rows on the primary in a thread until stopped: traffic during the base."""

    def __init__(self, server: PostgresServer) -> None:
        self.server = server
        self.count = 0
        self.stop = threading.Event()
        with admin(server.endpoint) as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS traffic (id bigserial, body text)")
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with admin(self.server.endpoint) as conn:
            while not self.stop.is_set():
                conn.execute(
                    "INSERT INTO traffic (body) SELECT md5(g::text) FROM generate_series(1, 50) g"
                )
                self.count += 1

    def __enter__(self) -> Writer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(30)


def base_from(config: Path, kit: WalKit) -> str:
    """A ``postgres-base`` snapshot taken through ``config``."""
    cfg = load_config(config, {})
    return run_backup(cfg, home=kit.root, env={}, components=("postgres-base",)).snapshot_id


def base_details(kit: WalKit, snapshot_id: str) -> dict[str, object]:
    repo = open_repo(load_config(kit.operator, {}))
    record = catalog.find(repo.storage, repo.verify_keys, repo.info.repo_id, snapshot_id)
    assert record.manifest is not None
    comp = record.manifest.component("postgres-base")
    assert comp is not None
    return dict(comp.details)


def commit_a_and_b(primary: PostgresServer) -> tuple[datetime, int]:
    """A, the target moment, B (all on the primary); the target and the LSN after B."""
    with admin(primary.endpoint) as conn:
        conn.execute("DROP TABLE IF EXISTS marks")  # an earlier test's, on the same primary
        conn.execute("CREATE TABLE marks (note text)")
        conn.execute("INSERT INTO marks VALUES ('A')")
        at = datetime.fromisoformat(one(conn, "SELECT clock_timestamp()"))
        time.sleep(0.05)  # B's commit time is strictly after the target
        conn.execute("INSERT INTO marks VALUES ('B')")
        end = parse_lsn(one(conn, "SELECT pg_current_wal_insert_lsn()"))
    return at, end


def wait_sealed_past(kit: WalKit, lsn: int) -> None:
    needed = segment_of_lsn(lsn, 1, SEG).segno
    wait_for(
        "the segment holding B sealed",
        lambda: any(parse_segment(n, SEG).segno > needed for n in kit.segments()),
    )


def restore_at(kit: WalKit, at: datetime, into: Path) -> list[str]:
    result = run_drtool(
        "restore",
        "--component",
        "postgres",
        "--yes",
        "--at",
        at.isoformat(),
        "--into",
        str(into),
        "--json",
        config=kit.operator,
    )
    notes = restored_notes(result, kit.server.password)
    assert json.loads(result.stdout)["reached_time"] is not None
    return notes


def test_a_base_taken_from_the_standby_while_the_primary_writes_restores_to_a_moment_exactly(
    tmp_path: Path, primary: PostgresServer, standby: PostgresServer, scratch: Path
) -> None:
    kits = make_kit(tmp_path, primary)  # the WAL streams from the primary here (see below)
    kit = next(kits)
    write_rows(primary.endpoint)
    proc = kit.start()
    try:
        wait_for("the streamer to seal", lambda: len(kit.segments()) >= 1)
        # a base from a standby starts at its last restartpoint, i.e. the primary's last
        # checkpoint replayed: make that one fall inside the streamed WAL
        with admin(primary.endpoint) as conn:
            conn.execute("CHECKPOINT")
        wait_for("the standby to catch up", lambda: caught_up(primary, standby))
        with Writer(primary) as writer:
            wait_for("the writer to commit", lambda: writer.count >= 3)
            base = base_from(pointed_at(kit, standby, "from-standby.toml"), kit)
        assert writer.count > 3
        at, end = commit_a_and_b(primary)
        write_rows(primary.endpoint)
        wait_sealed_past(kit, end)
        assert stop_streamer(proc) == 0, kit.log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
    details = base_details(kit, base)
    assert details["source"] == f"{standby.endpoint.host}:{standby.endpoint.port}"
    assert details["source_role"] == "standby" and details["backup_from"] == "standby"
    assert details["timeline"] == 1
    before, after = str(details["replayed_lsn_before"]), str(details["replayed_lsn_after"])
    assert 0 < parse_lsn(before) <= parse_lsn(after) <= end
    assert parse_lsn(str(details["stop_lsn"])) <= parse_lsn(after)
    assert restore_at(kit, at, scratch / "at") == ["A"]
    # the standby's connection to its primary (and the password in it) is not carried over
    settings = (scratch / "at" / "postgresql.auto.conf").read_text()
    conninfo = [line for line in settings.splitlines() if line.startswith("primary_conninfo")]
    assert conninfo == ["primary_conninfo = ''"] and primary.password not in settings
    next(kits, None)


def with_primary(kit: WalKit, primary: PostgresServer) -> None:
    """``wal.primary_host``: the standby's primary, used only for pg_switch_wal()."""
    text = kit.config.read_text().replace(
        "[wal]\n",
        f'[wal]\nprimary_host = "{primary.endpoint.host}"\nprimary_port = {primary.port}\n',
    )
    kit.config.write_text(text)


def receiver_connected(kit: WalKit, server: PostgresServer) -> bool:
    """pg_receivewal streams from ``server`` (a new slot reserves WAL once it is used)."""
    with admin(server.endpoint) as conn:
        row = conn.execute(
            "SELECT 1 FROM pg_stat_replication WHERE application_name = %s",
            (f"drtool-wal-{kit.slot}",),
        ).fetchone()
    return row is not None


def status(kit: WalKit) -> dict[str, object]:
    result = run_drtool("wal", "status", "--json", config=kit.config)
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout)["source"])


def test_a_wal_stream_and_a_base_both_from_the_standby_restore_to_a_moment_exactly(
    tmp_path: Path, primary: PostgresServer, standby: PostgresServer, scratch: Path
) -> None:
    """The primary serves neither the WAL nor the base; it is asked only to close segments
    (``wal.primary_host``): without that the standby's segments would not close at all here
    (1000 rows do not fill a segment), and the target would never be sealed."""
    kits = make_kit(tmp_path, standby)
    kit = next(kits)
    with_primary(kit, primary)
    proc = kit.start()
    try:
        wait_for("the receiver to connect", lambda: receiver_connected(kit, standby))
        with admin(primary.endpoint) as conn:
            conn.execute("CHECKPOINT")  # the standby's next restartpoint: the base's start
        wait_for("the standby to catch up", lambda: caught_up(primary, standby))
        with Writer(primary) as writer:
            wait_for("the writer to commit", lambda: writer.count >= 3)
            base = base_from(kit.config, kit)
        at, end = commit_a_and_b(primary)
        write_rows(primary.endpoint)
        wait_sealed_past(kit, end)
        source = status(kit)
        assert source["server"] == f"{standby.endpoint.host}:{standby.port}"
        assert source["role"] == "standby"
        assert source["segments_closed_by"] == (
            f"pg_switch_wal() on the primary {primary.endpoint.host}:{primary.port}"
        )
        assert stop_streamer(proc) == 0, kit.log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "ALARM" not in kit.log.read_text()
    with admin(primary.endpoint) as conn:  # no replication connection of drtool's there
        assert one(conn, "SELECT count(*) FROM pg_stat_replication") == "1"  # the standby's
    details = base_details(kit, base)
    assert details["source_role"] == "standby" and details["backup_from"] == "standby"
    assert restore_at(kit, at, scratch / "at") == ["A"]
    next(kits, None)


def test_a_promoted_standby_keeps_the_stream_and_closes_its_own_segments(
    tmp_path: Path, runtime_root: Path, primary: PostgresServer
) -> None:
    """After a promotion the WAL goes on in timeline 2 without a gap, and the segments are
    closed on the promoted source itself (the configured primary is no longer switched)."""
    standby = start_standby(runtime_root, primary)  # its own: it is promoted
    kits = make_kit(tmp_path, standby)
    kit = next(kits)
    with_primary(kit, primary)
    proc = kit.start()
    try:
        wait_for("the receiver to connect", lambda: receiver_connected(kit, standby))
        write_rows(primary.endpoint)
        wait_for("a timeline 1 segment", lambda: len(kit.segments()) >= 1)
        with admin(standby.endpoint) as conn:
            conn.execute("SELECT pg_promote()")
            wait_for(
                "the promotion",
                lambda: conn.execute("SELECT NOT pg_is_in_recovery()").fetchone() == (True,),
            )

        def timeline_2() -> int:
            return sum(n.startswith("00000002") for n in kit.segments())

        def one_more_closed() -> None:
            before = timeline_2()
            write_rows(standby.endpoint)
            wait_for("a timeline 2 segment closed", lambda: timeline_2() > before)

        one_more_closed()  # no pg_switch_wal() by hand: the streamer closes them
        one_more_closed()
        source = status(kit)
        assert source["role"] == "primary"
        assert source["segments_closed_by"] == "pg_switch_wal() on the source"
        assert stop_streamer(proc) == 0, kit.log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
        next(kits, None)
        standby.stop()
    index = kit.index()
    assert "00000002.history" in index.entries
    cont = continuity.check(index)
    assert cont.gaps == [] and cont.problems == [], [g.describe() for g in cont.gaps]
    result = run_drtool("wal", "verify", config=kit.operator)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_base_from_a_standby_lagging_past_the_limit_is_refused_and_nothing_is_stored(
    tmp_path: Path, primary: PostgresServer, standby: PostgresServer
) -> None:
    kits = make_kit(tmp_path, standby)
    kit = next(kits)
    strict = kit.config.read_text().replace("[postgres]\n", "[postgres]\nmax_standby_lag_s = 1\n")
    kit.config.write_text(strict)
    with admin(standby.endpoint) as conn:
        conn.execute("SELECT pg_wal_replay_pause()")
    try:
        with admin(primary.endpoint) as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS paused (note text)")
            conn.execute("INSERT INTO paused VALUES ('after the pause')")
        time.sleep(2.5)  # the standby's last replayed transaction is now older than 1 s
        done = run_drtool("backup", "--component", "postgres-base", config=kit.config)
    finally:
        with admin(standby.endpoint) as conn:
            conn.execute("SELECT pg_wal_replay_resume()")
    assert done.returncode == 3, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert "is a standby whose replay lags" in last and "before the base backup" in last
    assert "Traceback" not in done.stderr
    repo = open_repo(load_config(kit.operator, {}))
    assert catalog.list_snapshots(repo.storage, repo.verify_keys, repo.info.repo_id) == []
    next(kits, None)


def test_a_primary_host_of_another_cluster_is_never_switched(
    tmp_path: Path, runtime_root: Path, primary: PostgresServer, standby: PostgresServer
) -> None:
    """A misconfigured ``wal.primary_host`` (another cluster) is named once and not used."""
    other = start_wal_server(runtime_root, 15)
    kits = make_kit(tmp_path, standby)
    kit = next(kits)
    try:
        with_primary(kit, other)
        with admin(other.endpoint) as conn:  # the same login, so only the cluster differs
            conn.execute(
                sql.SQL("ALTER ROLE postgres PASSWORD {}").format(sql.Literal(standby.password))
            )
            start = one(conn, "SELECT pg_current_wal_lsn()")
        proc = kit.start()
        try:
            wait_for("the receiver to connect", lambda: receiver_connected(kit, standby))
            write_rows(primary.endpoint)  # WAL advanced: a switch would be due every second
            wait_for("the refusal logged", lambda: "is another cluster" in kit.log.read_text())
            wait_for(
                "the status to say so",
                lambda: str(status(kit)["segments_closed_by"]).startswith("nothing now"),
            )
            assert stop_streamer(proc) == 0, kit.log.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
        other_ep = replace(other.endpoint, password=standby.password)
        with admin(other_ep) as conn:
            now = parse_lsn(one(conn, "SELECT pg_current_wal_lsn()"))
        assert now // SEG == parse_lsn(start) // SEG  # never switched: still the same segment
        assert kit.log.read_text().count("is another cluster") == 1  # named once
        next(kits, None)
    finally:
        other.stop()
