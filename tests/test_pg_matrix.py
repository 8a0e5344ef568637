"""The PostgreSQL version matrix: the tests that prove backups of each major restore intact.

CI runs these on Debian's 15, production's 16 and the newest, 18 (16 and 18 from PyPI wheels,
unpacked by .ci/bootstrap; see docs/decisions/0010-postgres-majors.md). They are the small,
representative set — a dump → restore round trip with fingerprints, a fingerprint check, a
whole backup → restore of the three stores and a local drill — so that the matrix costs little
CI time; the rest of the suite runs on 15. A major that is not installed skips its tests (fails
them under DRTOOL_REQUIRE_SERVERS=1), never runs them on another major. The refusals below
check that a snapshot is never restored into, or drilled on, another major without saying so.
"""

from __future__ import annotations

import shutil
import tempfile
import tomllib
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import docker
import psycopg
import pytest
import tomli_w
from conftest import PG_MAJORS, PgUnderTest
from support.cli import run_drtool
from support.compare import table_rows
from support.docker_tier import POSTGRES16_IMAGE, REDIS_IMAGE, S3_IMAGE, require_image
from support.stacks import Repository, make_repository, source_stack

from drtool.config import load_config
from drtool.drills.definition import DockerImages, DrillDefinition, ReportSettings
from drtool.endpoints import PostgresEndpoint, RedisEndpoint, S3Endpoint, StackEndpoints
from drtool.repository import catalog
from drtool.repository.access import open_repo
from drtool.runtime import binaries
from drtool.runtime.local import LocalStack
from drtool.services.drill import run_drill
from drtool.services.restore.run import RestoreOptions, run_restore
from drtool.sources.pg_fingerprint import PgFingerprints, compare, compute_fingerprints
from drtool.sources.postgres import (
    create_database,
    database_is_empty,
    drop_database,
    dump,
    read_archive_header,
    restore_dump,
)
from drtool.stores.postgres.restore import fingerprints_of as restored_fingerprints

pytestmark = pytest.mark.slow  # three PostgreSQL majors, local drills on each (CI runs them all)

MAJORS = pytest.mark.parametrize("pg_major", PG_MAJORS, ids=[f"pg{m}" for m in PG_MAJORS])
SCHEMA = """
CREATE TABLE rooms (id bigint PRIMARY KEY, name text NOT NULL, created timestamptz,
                    meta jsonb, avatar bytea, ttl interval, score double precision);
CREATE TABLE messages (id bigserial, room_id bigint NOT NULL, body text,
                       sent_at timestamptz NOT NULL, PRIMARY KEY (room_id, id))
    PARTITION BY HASH (room_id);
CREATE TABLE messages_p0 PARTITION OF messages FOR VALUES WITH (MODULUS 2, REMAINDER 0);
CREATE TABLE messages_p1 PARTITION OF messages FOR VALUES WITH (MODULUS 2, REMAINDER 1);
INSERT INTO rooms SELECT i, 'room ' || i, '2026-01-01 12:00+02'::timestamptz + i * interval '1 h',
    jsonb_build_object('k', i), decode(md5(i::text), 'hex'), i * interval '90 min', i / 7.0
    FROM generate_series(1, 20) i;
INSERT INTO messages (room_id, body, sent_at)
    SELECT 1 + i % 20, repeat('msg ' || i || ' ', 1 + i % 5),
           '2026-01-02'::timestamptz + i * interval '1 s'
    FROM generate_series(1, 3000) i;
"""


def with_bin_dir(config: Path, bin_dir: Path) -> Path:
    """Point a drtool config's PostgreSQL client tools at ``bin_dir`` (the server's major)."""
    doc = tomllib.loads(config.read_text())
    doc["postgres"]["bin_dir"] = str(bin_dir)
    config.write_text(tomli_w.dumps(doc))
    return config


def fingerprints_of(endpoint: PostgresEndpoint, dbname: str) -> PgFingerprints:
    """Fingerprints computed on database ``dbname`` of the server."""
    with psycopg.connect(**endpoint.connect_kwargs(dbname)) as conn:
        return compute_fingerprints(conn)


@pytest.fixture
def database(request: pytest.FixtureRequest) -> Iterator[Callable[[PgUnderTest], str]]:
    """A factory of fresh empty databases on a matrix server, dropped afterwards."""
    made: list[tuple[PgUnderTest, str]] = []

    def make(pg: PgUnderTest) -> str:
        name = f"m_{uuid.uuid4().hex[:12]}"
        create_database(pg.endpoint, name)
        made.append((pg, name))
        return name

    yield make
    for pg, name in made:
        drop_database(pg.endpoint, name)


@dataclass(frozen=True)
class World:
    """A seeded source stack on one major, and a repository with one snapshot of it."""

    pg: PgUnderTest
    repo: Repository
    snapshot_id: str


@pytest.fixture(scope="module")
def worlds(
    tmp_path_factory: pytest.TempPathFactory,
    pg_servers: Callable[[int], PgUnderTest],
    s3_server: S3Endpoint,
) -> Iterator[Callable[[int], World]]:
    """Per major, made on first use: a seeded source stack and a snapshot taken with that
    major's pg_dump."""
    made: dict[int, World] = {}
    with ExitStack() as stack:

        def world_of(major: int) -> World:
            if major not in made:
                pg = pg_servers(major)
                directory = tmp_path_factory.mktemp(f"pg{major}")
                source = stack.enter_context(source_stack(directory, pg.endpoint, s3_server))
                repo = make_repository(directory / "repo", source)
                with_bin_dir(repo.backup_config, pg.bin_dir)
                made[major] = World(pg, repo, repo.backup())
            return made[major]

        yield world_of


@pytest.fixture
def home() -> Iterator[Path]:
    """A short drtool home the postgres user can enter (the local drill stack lives there)."""
    directory = Path(tempfile.mkdtemp(prefix="pgm-"))
    directory.chmod(0o711)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@contextmanager
def local_stack_of(state_dir: Path, major: int) -> Iterator[StackEndpoints]:
    """A whole local stack whose PostgreSQL is ``major`` (a drill runtime of that major)."""
    with LocalStack.up(state_dir, "scratch", pg_major=major) as stack:
        yield stack.endpoints


def operator_config(world: World, path: Path, targets: dict[str, StackEndpoints]) -> Path:
    """The restore side's config, with the client tools of the snapshot's major."""
    return with_bin_dir(world.repo.operator_config(path, targets), world.pg.bin_dir)


@MAJORS
def test_dump_restores_with_equal_fingerprints(
    pg_servers: Callable[[int], PgUnderTest],
    database: Callable[[PgUnderTest], str],
    tmp_path: Path,
    pg_major: int,
) -> None:
    """pg_dump of the major, streamed as a backup does; pg_restore -j2; equal fingerprints."""
    pg = pg_servers(pg_major)
    source = replace(pg.endpoint, dbname=database(pg))
    with psycopg.connect(**source.connect_kwargs()) as conn:
        conn.execute(SCHEMA)
    archive = tmp_path / "db.dump"
    with dump(source, pg_bin_dir=pg.bin_dir, timeout=120) as pgd, open(archive, "wb") as fh:
        for chunk in pgd.stream:
            fh.write(chunk)
        recorded = pgd.fingerprints
    assert pgd.server_version.startswith(f"{pg_major}.")
    assert read_archive_header(archive).dump_version.startswith(f"{pg_major}.")
    assert recorded.format == 5  # read off the stream, proved by COPY on the copy (ADR 0033)
    assert sum(recorded.tables[f"public.messages_p{i}"].rows for i in (0, 1)) == 3000
    target = database(pg)
    restore_dump(archive, source, target, jobs=2, pg_bin_dir=pg.bin_dir, timeout=120)
    proved = restored_fingerprints(source, target, recorded, workers=2, pg_bin_dir=pg.bin_dir)
    assert compare(recorded, proved) == []


@MAJORS
def test_fingerprints_catch_one_changed_row(
    pg_servers: Callable[[int], PgUnderTest],
    database: Callable[[PgUnderTest], str],
    pg_major: int,
) -> None:
    """The record hash (fingerprint format 2) is computed by the server: check it per major."""
    pg = pg_servers(pg_major)
    source = replace(pg.endpoint, dbname=database(pg))
    with psycopg.connect(**source.connect_kwargs(), autocommit=True) as conn:
        conn.execute(SCHEMA)
    before = fingerprints_of(source, source.dbname)
    assert {fp.row_hash for fp in before.tables.values()} == {"record"}
    assert compare(before, fingerprints_of(source, source.dbname)) == []
    with psycopg.connect(**source.connect_kwargs(), autocommit=True) as conn:
        conn.execute("UPDATE rooms SET meta = meta || '{\"x\": 1}' WHERE id = 5")
    assert compare(before, fingerprints_of(source, source.dbname)) == [
        "public.rooms: content digest differs (20 rows)"
    ]


@MAJORS
def test_backup_restore_round_trip_of_the_major(
    worlds: Callable[[int], World],
    database: Callable[[PgUnderTest], str],
    redis_db: RedisEndpoint,
    s3_server: S3Endpoint,
    s3_bucket: str,
    tmp_path: Path,
    pg_major: int,
) -> None:
    """The manifest records the server's version; the snapshot restores into the same major,
    every component verified against its fingerprints, every row equal to the source's."""
    world = worlds(pg_major)
    pg = world.pg
    target = StackEndpoints(
        replace(pg.endpoint, dbname=database(pg)), redis_db, s3_server, (s3_bucket,)
    )
    config = operator_config(world, tmp_path / "op.toml", {"t": target})
    cfg = load_config(config, {})
    repo = open_repo(cfg)
    records = catalog.list_snapshots(repo.storage, repo.verify_keys, repo.info.repo_id)
    (record,) = [r for r in records if r.snapshot_id == world.snapshot_id]
    assert record.manifest is not None
    pg_entry = record.manifest.component("postgres")
    assert pg_entry is not None and pg_entry.source_version.startswith(f"{pg_major}.")
    result = run_restore(
        cfg,
        home=tmp_path,
        options=RestoreOptions(target="t", yes=True),
        confirm=lambda r: False,
    )
    assert result.ok and [c.name for c in result.components] == ["postgres", "redis", "minio"]
    assert table_rows(target.postgres) == table_rows(world.repo.source.postgres)


@MAJORS
def test_local_drill_runs_on_the_snapshot_major(
    worlds: Callable[[int], World], tmp_path: Path, home: Path, pg_major: int
) -> None:
    world = worlds(pg_major)
    config = operator_config(world, tmp_path / "op.toml", {})
    report = run_drill(
        load_config(config, {}),
        home=home,
        spec=DrillDefinition(report=ReportSettings(dir=str(tmp_path / "reports"))),
    )
    assert report.error == "" and report.passed, [c for c in report.checks if not c.passed]
    assert report.snapshot_id == world.snapshot_id
    assert report.pg_major == pg_major
    assert f"runtime: `local`, PostgreSQL {pg_major}\n" in report.to_markdown()
    assert not any((home / "drills").iterdir())


def test_a_drill_without_the_snapshot_major_fails_saying_so(
    worlds: Callable[[int], World], tmp_path: Path, home: Path
) -> None:
    """A 16 snapshot on a machine without PostgreSQL 16: exit 6 with one line naming the
    missing major, nothing started, never a drill on another major."""
    debian = binaries.pg_major_dirs(16)[0]
    if (debian / "postgres").exists():
        pytest.skip("Debian's PostgreSQL 16 is installed here: cannot hide it")
    world = worlds(16)
    config = operator_config(world, tmp_path / "op.toml", {})
    definition = tmp_path / "drill.toml"
    definition.write_text(f'name = "m"\n[report]\ndir = "{tmp_path / "reports"}"\n')
    empty = tmp_path / "no-wheels"
    empty.mkdir()
    run = run_drtool(
        "drill", "run", "--definition", str(definition), config=config, home=home,
        extra_env={binaries.PG_ROOT_ENV: str(empty)},
    )  # fmt: skip
    assert run.returncode == 6, run.stderr
    (line,) = [x for x in run.stderr.splitlines() if not x.startswith("{")]  # JSON: the logs
    assert line.startswith("error: drill ")
    assert "failed: PostgreSQL 16 server binaries not found" in line
    assert "this machine has: 15)" in line
    assert not (home / "drills").exists() or not any((home / "drills").iterdir())


def test_a_16_snapshot_is_refused_by_a_15_target_and_a_15_scratch(
    worlds: Callable[[int], World],
    pg_servers: Callable[[int], PgUnderTest],
    database: Callable[[PgUnderTest], str],
    redis_db: RedisEndpoint,
    s3_server: S3Endpoint,
    s3_bucket: str,
    tmp_path: Path,
    home: Path,
) -> None:
    """A dump restores into the same or a newer major only; a drill only into the same one."""
    world, pg15 = worlds(16), pg_servers(15)
    older = StackEndpoints(
        replace(pg15.endpoint, dbname=database(pg15)), redis_db, s3_server, (s3_bucket,)
    )
    config = operator_config(world, tmp_path / "op.toml", {"t": older})
    run = run_drtool("restore", "latest", "--target", "t", "--yes", config=config)
    assert run.returncode == 2, run.stderr
    (line,) = [x for x in run.stderr.splitlines() if not x.startswith("{")]  # JSON: the logs
    assert line.startswith("error: restore: the snapshot holds PostgreSQL 16 data")
    where = f"{older.postgres.host}:{older.postgres.port}/{older.postgres.dbname}"
    assert f"holds PostgreSQL 16 data but {where} runs PostgreSQL 15" in line
    assert "nothing changed" in line
    assert database_is_empty(older.postgres, older.postgres.dbname)

    report = run_drill(
        load_config(config, {}),
        home=home,
        spec=DrillDefinition(report=ReportSettings(dir=str(tmp_path / "reports"))),
        scratch=lambda home, drill_id, spec, pg_major: local_stack_of(home / "drills" / "s", 15),
    )
    assert report.passed is False and report.checks == []
    assert report.error == (
        "drill: the snapshot holds PostgreSQL 16 data but the scratch server runs PostgreSQL 15; "
        "a drill restores into the snapshot's major (for the docker runtime set "
        "docker.postgres_image to a PostgreSQL 16 image)"
    )
    assert not any((home / "drills").iterdir())  # the scratch stack was torn down


def test_stack_up_takes_a_major_and_refuses_a_missing_one(
    pg_servers: Callable[[int], PgUnderTest], home: Path
) -> None:
    """`drtool stack up --pg-major 16` runs 16 and names its pg_dump in the config; a major
    that is not installed is exit 3 with one line, and nothing is left behind."""
    pg_servers(16)  # skips (or fails) when 16 is not installed
    run = run_drtool("stack", "up", "--name", "m16", "--pg-major", "16", config=home / "none",
                     home=home)  # fmt: skip
    try:
        assert run.returncode == 0, run.stderr
        assert "(PostgreSQL 16)" in run.stdout
        config = load_config(home / "stacks" / "m16" / "drtool.toml", {})
        assert Path(config.postgres.bin_dir) == binaries.pg_bin_dir(major=16)
        endpoint = config.stack().postgres
        with psycopg.connect(**endpoint.connect_kwargs()) as conn:
            assert conn.info.server_version // 10000 == 16
    finally:
        assert run_drtool("stack", "down", "--name", "m16", config=home / "none",
                          home=home).returncode == 0  # fmt: skip
    missing = run_drtool("stack", "up", "--name", "m17", "--pg-major", "17", config=home / "none",
                         home=home)  # fmt: skip
    assert missing.returncode == 3, missing.stderr
    (line,) = [x for x in missing.stderr.splitlines() if not x.startswith("{")]
    assert line.startswith("error: PostgreSQL 17 server binaries not found (looked in ")
    assert not (home / "stacks" / "m17").exists()


@pytest.mark.docker
def test_a_docker_drill_of_a_16_snapshot_runs_on_the_postgres_16_image(
    worlds: Callable[[int], World], docker_client: docker.DockerClient, tmp_path: Path
) -> None:
    """The production major in the Docker tier: drtool-test/postgres:16, built from the
    wheel's binaries on the debootstrap base, is the drill's scratch server."""
    for image in (POSTGRES16_IMAGE, REDIS_IMAGE, S3_IMAGE):
        require_image(docker_client, image)
    world = worlds(16)
    config = operator_config(world, tmp_path / "op.toml", {})
    images = DockerImages(
        postgres_image=POSTGRES16_IMAGE, redis_image=REDIS_IMAGE, minio_image=S3_IMAGE
    )
    spec = DrillDefinition(
        runtime="docker", docker=images, report=ReportSettings(dir=str(tmp_path / "reports"))
    )
    report = run_drill(load_config(config, {}), home=tmp_path / "home", spec=spec)
    assert report.error == "" and report.passed, [c for c in report.checks if not c.passed]
    assert report.runtime == "docker" and report.pg_major == 16
    assert len(report.checks) == 8
