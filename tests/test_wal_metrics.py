"""What ``drtool wal stream --metrics-port`` exports, scraped from the real streamer.

Against the WAL test kit of tests/test_wal_stream.py (a PostgreSQL 15 of its own, a file
repository): the spool and its bound from the start, the newest segment once one is sealed,
the lag back to 0 when the server is idle, no window before a base backup and one after it,
the window gone after the slot was lost (a gap after the base), and the slot loss kept across
a restart. promtool lints the exposition.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import urllib.request
from datetime import datetime

import pytest
from prometheus_client.parser import text_string_to_metric_families
from support.wal_kit import (  # noqa: F401  (kit_fixture and wal_pg_fixture are fixtures)
    WalKit,
    kit_fixture,
    stop_streamer,
    wait_for,
    wal_pg_fixture,
    write_rows,
)
from support.wal_kit import admin as _admin
from test_wal_stream import _base_backup

from drtool.config import load_config
from drtool.repository import catalog
from drtool.repository.access import open_repo
from drtool.wal import continuity


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape_text(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return str(r.read().decode())


def scrape(port: int) -> dict[str, float]:
    """name -> value of the streamer's ``drtool_*`` series (one slot per streamer)."""
    try:
        text = scrape_text(port)
    except OSError:
        return {}
    return {
        s.name: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.startswith("drtool_")
    }


def newest_sealed(wal: WalKit) -> float:
    newest = max(wal.index().segments(), key=lambda e: (e.name[8:], e.name[:8]))
    return datetime.fromisoformat(newest.sealed).timestamp()


@pytest.mark.slow
def test_the_streamer_exports_lag_window_spool_and_a_lost_slot(  # noqa: PLR0915
    kit: WalKit,
) -> None:
    write_rows(kit.server.endpoint)
    port = free_port()
    proc = kit.start("--metrics-port", str(port))
    try:
        wait_for("a first scrape", lambda: "drtool_wal_spool_bytes" in scrape(port))
        m = scrape(port)
        assert m["drtool_wal_spool_max_bytes"] == 4 << 30  # wal.spool_max_bytes default
        assert m["drtool_pitr_window_policy_seconds"] == 7 * 86400
        wait_for("a sealed segment", kit.segments)
        wait_for(
            "the newest segment exported",
            lambda: (
                scrape(port).get("drtool_wal_last_segment_timestamp_seconds") == newest_sealed(kit)
            ),
        )
        # idle server, everything sealed: nothing is waiting, whatever the machine's speed
        wait_for("lag 0 on an idle server", lambda: scrape(port).get("drtool_wal_lag_seconds") == 0)
        m = scrape(port)
        assert "drtool_pitr_window_start_timestamp_seconds" not in m  # no base backup yet
        assert "drtool_wal_slot_lost_timestamp_seconds" not in m
        promtool = shutil.which("promtool")
        if promtool is not None:
            lint = subprocess.run(
                [promtool, "check", "metrics"],
                input=scrape_text(port),
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert lint.returncode == 0, lint.stdout + lint.stderr
        snapshot = _base_backup(kit)
        write_rows(kit.server.endpoint)
        repo = open_repo(load_config(kit.operator, {}))
        base = catalog.load_snapshot(repo.storage, snapshot, repo.verify_keys, repo.info.repo_id)
        manifest = base[0]
        assert manifest is not None
        details = manifest.component("postgres-base").details  # type: ignore[union-attr]
        stop_lsn = details["stop_lsn"]

        def past_the_base() -> bool:
            with _admin(kit.server.endpoint) as conn:
                row = conn.execute("SELECT pg_walfile_name(%s::pg_lsn)", (stop_lsn,)).fetchone()
            return row is not None and any(n[8:] >= row[0][8:] for n in kit.segments())

        wait_for("the base's WAL sealed", past_the_base)
        assert stop_streamer(proc) == 0
        # the snapshots are read at start (then every few minutes): a restart shows the window
        proc = kit.start("--metrics-port", str(port))
        wait_for(
            "the window",
            lambda: "drtool_pitr_window_start_timestamp_seconds" in scrape(port),
        )
        finished = datetime.fromisoformat(manifest.finished).timestamp()
        assert scrape(port)["drtool_pitr_window_start_timestamp_seconds"] == finished
        wait_for(  # the restart closes one more segment: settle on the newest
            "the window's end at the newest segment",
            lambda: (
                scrape(port).get("drtool_pitr_window_end_timestamp_seconds") == newest_sealed(kit)
            ),
        )
        assert stop_streamer(proc) == 0
        # the slot dropped while WAL was written: a gap after the base, the window is gone
        with _admin(kit.server.endpoint) as conn:
            conn.execute("SELECT pg_drop_replication_slot(%s)", (kit.slot,))
            for _ in range(2):
                conn.execute("INSERT INTO walt (body) SELECT 'lost' FROM generate_series(1, 100)")
                conn.execute("SELECT pg_switch_wal()")
        write_rows(kit.server.endpoint)
        proc = kit.start("--metrics-port", str(port))
        lost = wait_for(
            "the slot loss",
            lambda: scrape(port).get("drtool_wal_slot_lost_timestamp_seconds"),
        )
        wait_for("WAL after the gap sealed", lambda: continuity.check(kit.index()).gaps)
        wait_for(
            "the window closed by the gap",
            lambda: (
                "drtool_pitr_window_start_timestamp_seconds" not in scrape(port)
                and "drtool_wal_spool_bytes" in scrape(port)
            ),
        )
        assert stop_streamer(proc) == 0
        proc = kit.start("--metrics-port", str(port))  # a restart keeps the loss (ADR 0012)
        wait_for("a scrape", lambda: "drtool_wal_spool_bytes" in scrape(port))
        assert scrape(port)["drtool_wal_slot_lost_timestamp_seconds"] == lost
        assert stop_streamer(proc) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
