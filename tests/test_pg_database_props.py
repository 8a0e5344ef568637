"""Database-level properties (issue 18 item 2): settings, comment, locale, privileges.

A dump without ``--create`` carries none of them; the restore used to create the database with
the server's defaults and the fingerprints did not notice (timestamps then rendered in another
time zone). Real PostgreSQL: a source database with each property set, backed up, restored
through the CLI, and the restored database read back.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from support.cli import run_drtool
from support.compare import execute
from support.stacks import make_repository

from drtool.endpoints import PostgresEndpoint, RedisEndpoint, S3Endpoint, StackEndpoints
from drtool.sources.pg_fingerprint import PgFingerprints, compare, compute_fingerprints


@pytest.fixture
def source_db(pg_server: PostgresEndpoint) -> Iterator[PostgresEndpoint]:
    """A database with a non-default locale, settings, a comment and its own privileges."""
    name, role = f"props_{uuid.uuid4().hex[:10]}", f"reader_{uuid.uuid4().hex[:8]}"
    admin = replace(pg_server, dbname="postgres")
    db, r = sql.Identifier(name), sql.Identifier(role)
    execute(admin, sql.SQL("CREATE ROLE {} NOLOGIN").format(r))
    execute(
        admin,
        sql.SQL(
            "CREATE DATABASE {} TEMPLATE template0 ENCODING 'UTF8' LC_COLLATE 'C.utf8' "
            "LC_CTYPE 'C.utf8' CONNECTION LIMIT 40"
        ).format(db),
    )
    for statement in (
        "ALTER DATABASE {db} SET timezone TO 'Asia/Tokyo'",
        """ALTER DATABASE {db} SET search_path TO "$user", public, "Odd Schema\"""",
        "ALTER ROLE {r} IN DATABASE {db} SET work_mem TO '8MB'",
        "COMMENT ON DATABASE {db} IS 'co-talk chat data, it''s here'",
        "REVOKE ALL ON DATABASE {db} FROM PUBLIC",
        "GRANT CONNECT ON DATABASE {db} TO {r}",
        "GRANT TEMPORARY ON DATABASE {db} TO {r} WITH GRANT OPTION",
    ):
        execute(admin, sql.SQL(statement).format(db=db, r=r))
    endpoint = replace(pg_server, dbname=name)
    execute(endpoint, "CREATE TABLE events (id int PRIMARY KEY, at timestamptz NOT NULL)")
    execute(endpoint, "INSERT INTO events VALUES (1, '2025-06-01 12:00:00+00')")
    yield endpoint
    execute(admin, sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(db))
    execute(admin, sql.SQL("DROP OWNED BY {}").format(r))
    execute(admin, sql.SQL("DROP ROLE {}").format(r))


def _fingerprints(endpoint: PostgresEndpoint) -> PgFingerprints:
    with psycopg.connect(**endpoint.connect_kwargs()) as conn:
        return compute_fingerprints(conn)


def test_database_properties_come_back_after_a_restore(
    source_db: PostgresEndpoint,
    pg_database: PostgresEndpoint,
    redis_server: RedisEndpoint,
    s3_server: S3Endpoint,
    s3_bucket: str,
    tmp_path: Path,
) -> None:
    source = StackEndpoints(source_db, redis_server, s3_server, (s3_bucket,))
    repo = make_repository(tmp_path / "repo", source)
    repo.backup(components=("postgres",))
    target = StackEndpoints(pg_database, redis_server, s3_server, (s3_bucket,))
    config = repo.operator_config(tmp_path / "op.toml", {"t": target})
    run = run_drtool(
        "restore", "latest", "--target", "t", "--component", "postgres", "--yes", "--json",
        config=config,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["ok"]
    want, got = _fingerprints(source_db).database, _fingerprints(pg_database).database
    assert want is not None and got == want
    assert got.collate == "C.utf8" and got.connlimit == 40
    assert ("", "TimeZone=Asia/Tokyo") in got.settings
    assert got.acl is not None and ("PUBLIC", "CONNECT", False) not in got.acl
    with psycopg.connect(**pg_database.connect_kwargs()) as conn:
        assert conn.execute("SELECT at::text FROM events").fetchone() == ("2025-06-01 21:00:00+09",)
        assert conn.execute("SHOW search_path").fetchone() == ('"$user", public, "Odd Schema"',)


def test_fingerprints_notice_a_lost_database_setting_and_comment(
    source_db: PostgresEndpoint,
) -> None:
    before = _fingerprints(source_db)
    admin = replace(source_db, dbname="postgres")
    db = sql.Identifier(source_db.dbname)
    execute(admin, sql.SQL("ALTER DATABASE {} RESET timezone").format(db))
    execute(admin, sql.SQL("COMMENT ON DATABASE {} IS NULL").format(db))
    execute(admin, sql.SQL("GRANT CONNECT ON DATABASE {} TO PUBLIC").format(db))
    problems = compare(before, _fingerprints(source_db))
    assert "database setting TimeZone=Asia/Tokyo missing" in problems
    assert "database comment differs" in problems
    assert any(p.startswith("database privileges PUBLIC:CONNECT") for p in problems)


def test_snapshots_of_format_2_still_verify(source_db: PostgresEndpoint) -> None:
    """A format 2 snapshot recorded no database properties: compared on its tables only."""
    doc = _fingerprints(source_db).to_dict()
    assert doc["format"] >= 3 and "database" in doc
    doc["format"] = 2
    del doc["database"]
    old = PgFingerprints.from_dict(doc)
    assert old.database is None
    assert compare(old, _fingerprints(source_db)) == []


def test_an_icu_database_comes_back_with_its_provider(
    pg_server: PostgresEndpoint,
    pg_database: PostgresEndpoint,
    redis_server: RedisEndpoint,
    s3_server: S3Endpoint,
    s3_bucket: str,
    tmp_path: Path,
) -> None:
    name = f"icu_{uuid.uuid4().hex[:10]}"
    admin = replace(pg_server, dbname="postgres")
    create = (
        "CREATE DATABASE {} TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'de-DE' "
        "LOCALE 'C.utf8'"
    )
    execute(admin, sql.SQL(create).format(sql.Identifier(name)))
    source_db = replace(pg_server, dbname=name)
    try:
        execute(source_db, "CREATE TABLE words (w text)")
        execute(source_db, "INSERT INTO words VALUES ('a'), ('B'), ('ä')")
        source = StackEndpoints(source_db, redis_server, s3_server, (s3_bucket,))
        repo = make_repository(tmp_path / "repo", source)
        repo.backup(components=("postgres",))
        target = StackEndpoints(pg_database, redis_server, s3_server, (s3_bucket,))
        config = repo.operator_config(tmp_path / "op.toml", {"t": target})
        run = run_drtool("restore", "latest", "--target", "t", "--component", "postgres",
                         "--yes", config=config)  # fmt: skip
        assert run.returncode == 0, run.stderr
        got = _fingerprints(pg_database).database
        assert got is not None and got == _fingerprints(source_db).database
        assert (got.locale_provider, got.icu_locale) == ("icu", "de-DE")
        with psycopg.connect(**pg_database.connect_kwargs()) as conn:
            rows = conn.execute("SELECT w FROM words ORDER BY w").fetchall()
        assert [r[0] for r in rows] == ["a", "ä", "B"]  # German order, not the byte order
    finally:
        execute(admin, sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
            sql.Identifier(name)))  # fmt: skip
