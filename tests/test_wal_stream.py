"""``drtool wal stream|status|verify`` against a real PostgreSQL 15 and a file repository.

The streamer runs as the real CLI in a subprocess (signals, kill -9, exit codes are the
point). A second, independent ``pg_receivewal`` on its own slot is the reference: every
segment drtool sealed must decrypt to exactly the bytes that receiver wrote.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest
from support.cli import run_drtool
from support.wal_kit import (  # noqa: F401 (fixtures)
    SEG,
    WAIT_S,
    WalKit,
    kit_fixture,
    start_standby,
    stop_streamer,
    wait_for,
    wal_pg_fixture,
    write_rows,
)
from support.wal_kit import admin as _admin

from drtool.config import load_config
from drtool.endpoints import PostgresEndpoint
from drtool.repository.access import open_repo
from drtool.runtime.pgserver import PostgresServer
from drtool.wal import continuity
from drtool.wal.index import IndexChunk, WalEntry, WalIndex
from drtool.wal.names import SegmentId, history_name


class Writer:
    """Commits rows in a loop until stopped: WAL advancing while the streamer works."""

    def __init__(self, ep: PostgresEndpoint) -> None:
        self.ep = ep
        self.stop = threading.Event()
        self.rows = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with _admin(self.ep) as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS walt (id bigserial, body text)")
            while not self.stop.is_set():
                conn.execute(
                    "INSERT INTO walt (body) SELECT md5(g::text) FROM generate_series(1, 200) g"
                )
                self.rows += 200
                time.sleep(0.02)

    def __enter__(self) -> Writer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(30)


class Reference:
    """An independent pg_receivewal on its own slot: the bytes the server sent."""

    def __init__(self, server: PostgresServer, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir()
        self.slot = f"ref_{uuid.uuid4().hex[:8]}"
        ep = server.endpoint
        self.env = {**os.environ, **ep.libpq_env()}
        self.binary = str(server.bin_dir / "pg_receivewal")
        subprocess.run(
            [self.binary, "--create-slot", f"--slot={self.slot}", "--no-password"],
            env=self.env,
            check=True,
            capture_output=True,
        )
        self.proc = subprocess.Popen(
            [self.binary, "-D", str(directory), f"--slot={self.slot}", "--no-password"],
            env=self.env,
            stderr=subprocess.DEVNULL,
        )

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(30)
        subprocess.run(
            [self.binary, "--drop-slot", f"--slot={self.slot}", "--no-password"],
            env=self.env,
            check=False,
            capture_output=True,
        )


def assert_byte_equal(kit: WalKit, reference: Path, minimum: int) -> int:
    """Every sealed segment the reference also holds decrypts to the reference's bytes."""
    compared = 0
    for entry in kit.index().segments():
        ref = reference / entry.name
        if ref.exists():
            assert kit.decrypt(entry) == ref.read_bytes(), entry.name
            compared += 1
    assert compared >= minimum, f"only {compared} segments compared"
    return compared


# --- streaming --------------------------------------------------------------------------


@pytest.mark.slow
def test_stream_with_writes_seals_segments_byte_equal_and_sigterm_exits_0(kit: WalKit) -> None:
    reference = Reference(kit.server, kit.root / "reference")
    proc = kit.start()
    try:
        with Writer(kit.server.endpoint):
            wait_for("4 sealed segments", lambda: len(kit.segments()) >= 4)
        code = stop_streamer(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
        reference.stop()
    assert code == 0, kit.log.read_text()
    assert kit.spool.closed() == []  # SIGTERM sealed every closed segment before exiting
    assert_byte_equal(kit, reference.dir, minimum=3)
    # docs/FORMAT.md: stock `age -d | zstd -d` gives exactly the bytes PostgreSQL sent
    entry = next(e for e in kit.index().segments() if (reference.dir / e.name).exists())
    stock = subprocess.run(
        f"age -d -i {kit.identity} {kit.repo_dir / entry.key} | zstd -d",
        shell=True,
        capture_output=True,
        check=True,
    )
    assert stock.stdout == (reference.dir / entry.name).read_bytes()
    assert run_drtool("wal", "verify", config=kit.operator).returncode == 0
    read = run_drtool("wal", "verify", "--read-data", config=kit.operator)
    assert read.returncode == 0, read.stderr
    status = run_drtool("wal", "status", "--json", config=kit.operator)
    assert status.returncode == 0, status.stderr
    assert '"gaps": []' in status.stdout
    assert kit.segments()[-1] in status.stdout


@pytest.mark.slow
def test_kill_9_mid_segment_and_crashes_around_the_commit_leave_no_gap_no_duplicate(
    kit: WalKit,
) -> None:
    with Writer(kit.server.endpoint):
        # killed right after an upload (index not committed), then right after a commit
        # (files still in the spool): exactly what a kill -9 at those points leaves
        for point in ("wal-after-upload", "wal-after-index"):
            proc = kit.start(env={"DRTOOL_CRASH_AT": point})
            assert proc.wait(WAIT_S) == 137, kit.log.read_text()
        proc = kit.start()
        before = len(kit.segments())
        wait_for("new segments", lambda: len(kit.segments()) >= before + 2)
        time.sleep(0.5)  # somewhere inside the next segment
        proc.kill()  # kill -9: its pg_receivewal dies with it (PR_SET_PDEATHSIG)
        proc.wait(30)
        with _admin(kit.server.endpoint) as conn:
            wait_for(
                "the slot to be released",
                lambda: (
                    conn.execute(
                        "SELECT NOT active FROM pg_replication_slots WHERE slot_name = %s",
                        (kit.slot,),
                    ).fetchone()
                    == (True,)
                ),
            )
        proc = kit.start()
        after = len(kit.segments())
        wait_for("segments after the restart", lambda: len(kit.segments()) >= after + 2)
    assert stop_streamer(proc) == 0
    index = kit.index()
    assert index.problems == []
    names = [e.name for e in index.entries.values()]
    chunks = _all_entry_names(kit)
    assert len(chunks) == len(set(chunks)) == len(names)  # nothing recorded twice
    cont = continuity.check(index)
    assert cont.gaps == [] and cont.first == cont.oldest
    result = run_drtool("wal", "verify", "--read-data", config=kit.operator)
    assert result.returncode == 0, result.stdout + result.stderr


def _all_entry_names(kit: WalKit) -> list[str]:
    import json

    names = []
    for path in sorted((kit.repo_dir / "wal" / "index").iterdir()):
        body = json.loads(path.read_bytes())["body"]
        names += [e.name for e in IndexChunk.from_dict(body, name=path.name).entries]
    return names


@pytest.mark.slow
def test_a_spool_file_contradicting_the_index_is_refused_with_exit_5(kit: WalKit) -> None:
    write_rows(kit.server.endpoint)
    proc = kit.start("--until-idle")
    assert proc.wait(WAIT_S) == 0, kit.log.read_text()
    entry = kit.index().segments()[0]
    forged = bytearray(kit.decrypt(entry))
    forged[100] ^= 0xFF
    (kit.spool.dir / entry.name).write_bytes(bytes(forged))
    result = run_drtool("wal", "stream", "--once", config=kit.config)
    assert result.returncode == 5, result.stderr
    assert entry.name in result.stderr and "other bytes" in result.stderr
    assert (kit.spool.dir / entry.name).exists()  # kept for the operator to look at
    # the same bytes again are recognised as stored, not duplicated
    (kit.spool.dir / entry.name).write_bytes(kit.decrypt(entry))
    again = run_drtool("wal", "stream", "--once", config=kit.config)
    assert again.returncode == 0, again.stderr
    assert not (kit.spool.dir / entry.name).exists()
    assert _all_entry_names(kit).count(entry.name) == 1


# --- verify -----------------------------------------------------------------------------


@pytest.mark.slow
def test_verify_names_a_deleted_and_a_bit_flipped_segment(kit: WalKit) -> None:
    for _ in range(3):
        write_rows(kit.server.endpoint)
        proc = kit.start("--until-idle")
        assert proc.wait(WAIT_S) == 0, kit.log.read_text()
    segments = kit.index().segments()
    assert len(segments) >= 3
    assert run_drtool("wal", "verify", config=kit.operator).returncode == 0
    deleted, flipped = segments[1], segments[2]
    moved = kit.root / "moved"
    shutil.move(kit.repo_dir / deleted.key, moved)
    result = run_drtool("wal", "verify", config=kit.operator)
    assert result.returncode == 5
    assert deleted.name in result.stderr and "missing" in result.stderr
    shutil.move(moved, kit.repo_dir / deleted.key)
    path = kit.repo_dir / flipped.key
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    result = run_drtool("wal", "verify", config=kit.operator)
    assert result.returncode == 5
    assert flipped.key in result.stderr and "sha256" in result.stderr


def test_continuity_names_a_gap_and_a_missing_history_file() -> None:
    def entry(name: str) -> WalEntry:
        kind = "history" if name.endswith(".history") else "segment"
        return WalEntry(name, kind, int(name[:8], 16), f"wal/{name}", 1, "", 1, "", "")

    index = WalIndex("r", segment_size=SEG)
    names = [SegmentId(n, 1).name(SEG) for n in (254, 255, 256, 259)]
    names += [SegmentId(260, 2).name(SEG), SegmentId(261, 3).name(SEG), history_name(3)]
    index.entries = {n: entry(n) for n in names}
    cont = continuity.check(index)
    assert names[2] == "000000010000000100000000"  # 256 = the next "log id" at 16 MiB
    assert [g.describe() for g in cont.gaps] == [
        "missing WAL segment 000000010000000100000001 and 1 more (after 000000010000000100000000)"
    ]
    assert cont.first is not None and cont.first.name == names[3]
    assert cont.last is not None and cont.last.name == names[5]
    assert cont.problems == [
        "timeline 2: history file 00000002.history is not in the WAL index "
        f"(needed to follow the switch at {names[4]})"
    ]


# --- outages ----------------------------------------------------------------------------


@pytest.mark.slow
def test_repository_outage_and_full_spool_lose_nothing(kit: WalKit) -> None:
    cfg = kit.config.read_text() + ""
    kit.config.write_text(
        cfg.replace("restart_max_s = 2.0", f"restart_max_s = 2.0\nspool_max_bytes = {3 * SEG}")
    )
    reference = Reference(kit.server, kit.root / "reference")
    proc = kit.start()
    away = kit.root / "repository.away"
    try:
        with Writer(kit.server.endpoint):
            wait_for("a sealed segment", lambda: len(kit.segments()) >= 1)
            kit.repo_dir.rename(away)  # the repository becomes unreachable
            wait_for("the spool to fill", lambda: "ALARM: the spool holds" in kit.log.read_text())
            assert "ALARM: the repository is unreachable" in kit.log.read_text()
            assert len(kit.spool.closed()) >= 2  # kept, not deleted
            away.rename(kit.repo_dir)
            wait_for("the spool to drain", lambda: "receiving resumes" in kit.log.read_text())
            count = len(kit.segments())
            wait_for("streaming after the outage", lambda: len(kit.segments()) >= count + 2)
        assert stop_streamer(proc) == 0, kit.log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
        reference.stop()
    cont = continuity.check(kit.index())
    assert cont.gaps == [], [g.describe() for g in cont.gaps]
    assert_byte_equal(kit, reference.dir, minimum=4)


@pytest.mark.slow
def test_server_restart_restarts_the_receiver_without_a_gap(kit: WalKit) -> None:
    proc = kit.start()
    try:
        with Writer(kit.server.endpoint):
            wait_for("a sealed segment", lambda: len(kit.segments()) >= 1)
        kit.server.stop()
        kit.server.start()
        wait_for("the restart to be logged", lambda: "restarting in" in kit.log.read_text())
        with Writer(kit.server.endpoint):
            count = len(kit.segments())
            wait_for("streaming after the restart", lambda: len(kit.segments()) >= count + 2)
        assert stop_streamer(proc) == 0, kit.log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
    cont = continuity.check(kit.index())
    assert cont.gaps == [], [g.describe() for g in cont.gaps]


@pytest.mark.slow
def test_a_dropped_slot_is_an_alarm_and_the_gap_is_named(kit: WalKit) -> None:
    write_rows(kit.server.endpoint)
    assert kit.start("--until-idle").wait(WAIT_S) == 0, kit.log.read_text()
    last = kit.segments()[-1]
    with _admin(kit.server.endpoint) as conn:
        conn.execute("SELECT pg_drop_replication_slot(%s)", (kit.slot,))
        for _ in range(2):  # WAL no slot retained and no receiver saw
            conn.execute("INSERT INTO walt (body) SELECT 'lost' FROM generate_series(1, 100)")
            conn.execute("SELECT pg_switch_wal()")
    write_rows(kit.server.endpoint)
    assert kit.start("--until-idle").wait(WAIT_S) == 0, kit.log.read_text()
    assert f"ALARM: replication slot {kit.slot} is missing" in kit.log.read_text()
    assert last in kit.log.read_text()
    result = run_drtool("wal", "verify", config=kit.operator)
    assert result.returncode == 5
    assert "missing WAL segment" in result.stderr and last in result.stderr
    status = run_drtool("wal", "status", config=kit.operator)
    assert status.returncode == 0 and "gap: missing WAL segment" in status.stdout


# --- the physical base backup (issue 12 item 2) -----------------------------------------


def _base_backup(kit: WalKit) -> str:
    from drtool.services.backup import run_backup

    cfg = load_config(kit.config, {})
    return run_backup(cfg, home=kit.root, env={}, components=("postgres-base",)).snapshot_id


@pytest.mark.slow
def test_base_backup_plus_streamed_wal_recovers_a_commit_made_after_the_base(
    kit: WalKit, runtime_root: Path
) -> None:
    from drtool.repository import catalog
    from drtool.wal.names import parse_lsn, segment_of_lsn

    write_rows(kit.server.endpoint)
    proc = kit.start()
    try:
        wait_for("the streamer to seal", lambda: len(kit.segments()) >= 1)
        snapshot = _base_backup(kit)
        with _admin(kit.server.endpoint) as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS marker (note text)")
            conn.execute("INSERT INTO marker VALUES ('after the base backup')")
            row = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
            assert row is not None
            lsn = row[0]
        needed = segment_of_lsn(parse_lsn(lsn), 1, SEG).name(SEG)
        wait_for(f"{needed} sealed", lambda: any(n[8:] >= needed[8:] for n in kit.segments()))
        assert stop_streamer(proc) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    repo = open_repo(load_config(kit.operator, {}))
    records = catalog.list_snapshots(repo.storage, repo.verify_keys, repo.info.repo_id)
    manifest = next(r.manifest for r in records if r.snapshot_id == snapshot)
    assert manifest is not None
    base = manifest.component("postgres-base")
    assert base is not None and base.source_version.startswith("15")
    details = base.details
    assert details["timeline"] == 1 and parse_lsn(details["stop_lsn"]) >= parse_lsn(
        details["start_lsn"]
    )
    assert details["start_segment"] in kit.segments()  # the streamed WAL covers the base
    # recover with stock tools, as docs/FORMAT.md says: untar, decrypted WAL, restore_command
    scratch = runtime_root / f"pitr-{uuid.uuid4().hex[:6]}"  # the postgres user can enter it
    scratch.mkdir(mode=0o711)
    target = scratch / "restored"
    data, wal = target / "data", scratch / "wal-plain"
    data.mkdir(parents=True, mode=0o700)
    wal.mkdir()
    obj = base.objects[0]
    subprocess.run(
        f"age -d -i {kit.identity} {kit.repo_dir / obj.key} | zstd -d | tar -x -C {data}",
        shell=True,
        check=True,
    )
    for entry in kit.index().entries.values():
        (wal / entry.name).write_bytes(kit.decrypt(entry))
    (data / "recovery.signal").touch()
    with (data / "postgresql.auto.conf").open("a") as conf:
        conf.write(f"restore_command = 'cp {wal}/%f %p'\nrecovery_target_action = 'promote'\n")
    subprocess.run(["chown", "-R", "postgres:postgres", str(target), str(wal)], check=True)
    restored = PostgresServer(target, password=kit.server.password, major=15)
    restored.start(timeout=120)
    try:
        with _admin(restored.endpoint) as conn:
            notes = conn.execute("SELECT note FROM marker").fetchall()
        assert notes == [("after the base backup",)]
    finally:
        restored.stop()


@pytest.mark.slow
def test_base_backup_of_a_cluster_with_a_tablespace_is_refused(
    kit: WalKit, runtime_root: Path
) -> None:
    space = runtime_root / f"space-{uuid.uuid4().hex[:6]}"
    space.mkdir()
    shutil.chown(space, "postgres", "postgres")
    name = f"ts_{uuid.uuid4().hex[:6]}"
    with _admin(kit.server.endpoint) as conn:
        conn.execute(f"CREATE TABLESPACE {name} LOCATION '{space}'")
    try:
        result = run_drtool("backup", "--component", "postgres-base", config=kit.config)
        assert result.returncode == 3, result.stderr
        assert "tablespaces" in result.stderr and name in result.stderr
        assert not list((kit.repo_dir / "snapshots").glob("*/manifest.json"))
    finally:
        with _admin(kit.server.endpoint) as conn:
            conn.execute(f"DROP TABLESPACE {name}")


def test_client_tools_are_found_in_a_client_only_install_of_the_major(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from drtool.runtime.binaries import MissingBinary, pg_client_tool

    real = Path("/usr/lib/postgresql/15/bin/pg_receivewal")
    if not real.exists():
        pytest.skip("Debian's PostgreSQL 15 client is not installed")
    # like the drtool image: postgresql-client-N has pg_receivewal but no postgres/initdb
    client_only = tmp_path / "77" / "bin"
    client_only.mkdir(parents=True)
    (client_only / "pg_receivewal").symlink_to(real)
    monkeypatch.setenv("DRTOOL_PG_ROOT", str(tmp_path))
    assert pg_client_tool("pg_receivewal", 77) == client_only / "pg_receivewal"
    assert pg_client_tool("pg_receivewal", 15) == real
    with pytest.raises(MissingBinary, match="pg_basebackup of PostgreSQL 77 not found"):
        pg_client_tool("pg_basebackup", 77)  # PATH has another major's only: not taken
    with pytest.raises(MissingBinary, match=r"postgres\.bin_dir"):
        pg_client_tool("pg_receivewal", 15, tmp_path)


@pytest.mark.slow
def test_promotion_of_the_streamed_server_follows_the_new_timeline(
    kit: WalKit, runtime_root: Path
) -> None:
    """Streaming from a standby that is then promoted: its WAL moves to timeline 2; the
    history file is sealed and the index stays continuous across the switch."""
    primary = kit.server
    standby = start_standby(runtime_root, primary)
    text = kit.config.read_text().replace(f"port = {primary.port}", f"port = {standby.port}")
    kit.config.write_text(text)
    proc = kit.start()
    try:
        with _admin(standby.endpoint) as conn:  # a new slot reserves WAL once it is used
            wait_for(
                "the receiver to connect",
                lambda: conn.execute(
                    "SELECT 1 FROM pg_stat_replication WHERE application_name = %s",
                    (f"drtool-wal-{kit.slot}",),
                ).fetchone(),
            )
        with _admin(primary.endpoint) as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS walt (id bigserial, body text)")
            for _ in range(3):  # the standby's segments close when the primary switches
                conn.execute("INSERT INTO walt (body) SELECT 'tl1' FROM generate_series(1, 100)")
                conn.execute("SELECT pg_switch_wal()")
        wait_for("timeline 1 segments", lambda: len(kit.segments()) >= 2)
        with _admin(standby.endpoint) as conn:
            conn.execute("SELECT pg_promote()")
            wait_for(
                "the promotion",
                lambda: conn.execute("SELECT NOT pg_is_in_recovery()").fetchone() == (True,),
            )
            conn.execute("INSERT INTO walt (body) SELECT 'tl2' FROM generate_series(1, 100)")
        wait_for(
            "timeline 2 segments",
            lambda: sum(n.startswith("00000002") for n in kit.segments()) >= 2,
        )
        assert stop_streamer(proc) == 0, kit.log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
        standby.stop()
    index = kit.index()
    assert "00000002.history" in index.entries
    cont = continuity.check(index)
    assert cont.gaps == [] and cont.problems == [], [g.describe() for g in cont.gaps]
    assert cont.last is not None and cont.last.timeline == 2
    result = run_drtool("wal", "verify", "--read-data", config=kit.operator)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("fmt", ["ustar", "pax", "gnu"])
def test_the_tar_watcher_reads_label_and_manifest_as_the_stream_passes(fmt: str) -> None:
    import io
    import tarfile

    from drtool.errors import SourceError
    from drtool.sources.pg_basebackup import TarWatcher, parse_label_and_manifest

    label = (
        b"START WAL LOCATION: 0/5000028 (file 000000010000000000000005)\n"
        b"CHECKPOINT LOCATION: 0/5000060\nSTART TIMELINE: 1\n"
    )
    manifest = (
        b'{"Files": [], "WAL-Ranges": [\n{ "Timeline": 1, "Start-LSN": "0/5000028", '
        b'"End-LSN": "0/5000100" }\n], "Manifest-Checksum": "x"}'
    )
    members = [("backup_label", label), (f"base/{'x' * 90}/{'y' * 90}", os.urandom(5000))]
    members += [("backup_manifest", manifest)]
    buf = io.BytesIO()
    tar_format = {"ustar": tarfile.USTAR_FORMAT, "pax": tarfile.PAX_FORMAT}.get(
        fmt, tarfile.GNU_FORMAT
    )
    with tarfile.open(fileobj=buf, mode="w", format=tar_format) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    raw = buf.getvalue()
    watcher = TarWatcher()
    passed = b"".join(watcher.wrap(raw[i : i + 777] for i in range(0, len(raw), 777)))
    assert passed == raw and watcher.ended
    found = parse_label_and_manifest(
        bytes(watcher.members["backup_label"]), bytes(watcher.members["backup_manifest"])
    )
    assert found == {
        "start_lsn": "0/5000028",
        "start_segment": "000000010000000000000005",
        "checkpoint_lsn": "0/5000060",
        "timeline": 1,
        "stop_lsn": "0/5000100",
        "backup_from": "primary",  # a label without BACKUP FROM (older servers): a primary's
    }
    truncated = TarWatcher()
    b"".join(truncated.wrap([raw[: len(raw) // 2]]))
    assert not truncated.ended
    with pytest.raises(SourceError, match="WAL-Ranges"):
        parse_label_and_manifest(label, b"{}")
