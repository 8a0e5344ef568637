"""A PostgreSQL streaming standby as the source (issue 16.3), with a real primary and standby.

The primary (PostgreSQL 15 of the module's own) gets rows; a standby is made with
``pg_basebackup -R`` and started; ``drtool backup --component postgres`` reads from the standby
only: the manifest says which server it was and the primary's WAL position the standby had
replayed, and the dump holds the primary's rows. With the standby's replay paused while the
primary writes, its lag grows past ``postgres.max_standby_lag_s`` and the backup is refused in
one line with nothing stored.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from support.cli import run_drtool
from support.wal_kit import admin, make_kit, start_standby, start_wal_server, wait_for

from drtool.config import load_config
from drtool.repository import catalog
from drtool.repository.access import open_repo
from drtool.runtime.pgserver import PostgresServer
from drtool.sources import postgres as pg
from drtool.sources.pg_fingerprint import compare
from drtool.stores.postgres.restore import fingerprints_of
from drtool.wal.names import parse_lsn

pytestmark = pytest.mark.slow  # a primary, a base backup and a standby


@pytest.fixture(scope="module")
def primary(runtime_root: Path) -> Iterator[PostgresServer]:
    server = start_wal_server(runtime_root, 15)
    with admin(server.endpoint) as conn:
        conn.execute("CREATE TABLE rows_on_primary (id bigserial PRIMARY KEY, note text)")
        conn.execute("INSERT INTO rows_on_primary (note) SELECT 'p' FROM generate_series(1, 500)")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def standby(runtime_root: Path, primary: PostgresServer) -> Iterator[PostgresServer]:
    server = start_standby(runtime_root, primary)
    yield server
    server.stop()


def _caught_up(primary: PostgresServer, standby: PostgresServer) -> bool:
    with admin(primary.endpoint) as p, admin(standby.endpoint) as s:
        sent = p.execute("SELECT pg_current_wal_lsn()::text").fetchone()
        replayed = s.execute("SELECT pg_last_wal_replay_lsn()::text").fetchone()
    assert sent is not None and replayed is not None
    return parse_lsn(str(replayed[0])) >= parse_lsn(str(sent[0]))


def test_a_standby_is_the_source_and_the_manifest_says_so(
    tmp_path: Path, primary: PostgresServer, standby: PostgresServer
) -> None:
    kit = next(make_kit(tmp_path, standby))
    wait_for("the standby to catch up", lambda: _caught_up(primary, standby))
    done = run_drtool("backup", "--component", "postgres", "--json", config=kit.config)
    assert done.returncode == 0, done.stderr
    snapshot_id = json.loads(done.stdout)["snapshot_id"]
    cfg = load_config(kit.operator, {})
    repo = open_repo(cfg)
    record = catalog.find(repo.storage, repo.verify_keys, repo.info.repo_id, snapshot_id)
    assert record.manifest is not None
    comp = record.manifest.component("postgres")
    assert comp is not None
    details = comp.details
    assert details["source_role"] == "standby"
    assert details["source"] == f"{standby.endpoint.host}:{standby.endpoint.port}"
    assert details["standby_lag_s_before"] == 0.0 and details["standby_lag_s_after"] == 0.0
    with admin(primary.endpoint) as conn:
        now = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
    assert now is not None
    assert 0 < parse_lsn(details["replayed_lsn_before"]) <= parse_lsn(str(now[0]))
    # the primary never served the dump: no drtool session there
    with admin(primary.endpoint) as conn:
        seen = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'drtool'"
        ).fetchone()
    assert seen == (0,)


def test_a_standby_lagging_past_the_limit_is_refused_and_nothing_is_stored(
    tmp_path: Path, primary: PostgresServer, standby: PostgresServer
) -> None:
    kit = next(make_kit(tmp_path, standby))
    strict = kit.config.read_text().replace("[postgres]\n", "[postgres]\nmax_standby_lag_s = 1\n")
    kit.config.write_text(strict)
    with psycopg.connect(**standby.endpoint.connect_kwargs(), autocommit=True) as conn:
        conn.execute("SELECT pg_wal_replay_pause()")
    try:
        with admin(primary.endpoint) as conn:
            conn.execute("INSERT INTO rows_on_primary (note) VALUES ('after the pause')")
        time.sleep(2.5)  # the standby's last replayed transaction is now older than 1 s
        done = run_drtool("backup", "--component", "postgres", config=kit.config)
    finally:
        with psycopg.connect(**standby.endpoint.connect_kwargs(), autocommit=True) as conn:
            conn.execute("SELECT pg_wal_replay_resume()")
    assert done.returncode == 3, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert "is a standby whose replay lags" in last and "max_standby_lag_s = 1" in last
    assert "Traceback" not in done.stderr
    repo = open_repo(load_config(kit.operator, {}))
    assert catalog.list_snapshots(repo.storage, repo.verify_keys, repo.info.repo_id) == []


def test_an_unlogged_table_dumped_from_a_standby_is_recorded_and_its_restore_verifies(
    tmp_path: Path, primary: PostgresServer, standby: PostgresServer
) -> None:
    """On a standby pg_dump writes no data of an unlogged table (no TABLE DATA entry): the
    fingerprints record it as not dumped, expected empty, and the restored copy (which has
    the table, empty) verifies; before, every restore was refused ("unexpected table")."""
    with admin(primary.endpoint) as conn:
        conn.execute("CREATE UNLOGGED TABLE scratch_u (a int)")
        conn.execute("INSERT INTO scratch_u SELECT generate_series(1, 10)")
    name = f"from_standby_{os.getpid()}"
    try:
        wait_for("the standby to catch up", lambda: _caught_up(primary, standby))
        archive = tmp_path / "db.pgdump"
        with pg.dump(standby.endpoint, pg_bin_dir=standby.bin_dir, timeout=120) as pgd:
            with open(archive, "wb") as fh:
                for chunk in pgd.stream:
                    fh.write(chunk)
            prints = pgd.fingerprints
        assert prints.not_dumped == {"public.scratch_u": "not dumped: unlogged on a standby"}
        assert prints.tables["public.scratch_u"].rows == 0
        assert prints.tables["public.rows_on_primary"].rows >= 500
        assert prints.database is not None
        pg.create_database(primary.endpoint, name, prints.database)
        pg.restore_dump(archive, primary.endpoint, name, pg_bin_dir=primary.bin_dir, timeout=120)
        pg.apply_database_props(primary.endpoint, name, prints.database)
        proved = fingerprints_of(primary.endpoint, name, prints, pg_bin_dir=primary.bin_dir)
        assert compare(prints, proved) == []
    finally:
        pg.drop_database(primary.endpoint, name)
        with admin(primary.endpoint) as conn:
            conn.execute("DROP TABLE scratch_u")
