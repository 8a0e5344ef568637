"""Start-up: a command imports what it uses, not every store's client (issue 14.2).

Every scheduled backup pays Python's start and drtool's imports before its first byte; boto3,
redis and docker together cost more than the rest of the command. The wall time is measured by
bench/bench_startup.py; these tests pin the cause (what is imported), never a duration.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psycopg
from support.cli import drtool_env
from support.stacks import make_repository

from drtool.endpoints import PostgresEndpoint, RedisEndpoint, S3Endpoint, StackEndpoints
from drtool.stores import registry

#: clients of the stores a PostgreSQL backup to a file:// repository does not touch
NOT_NEEDED = ("boto3", "botocore", "s3transfer", "redis", "docker")

# runs drtool's entry point in this interpreter and prints what it imported when it exits
PROBE = (
    "import atexit, json, sys\n"
    "report = lambda: print('MODULES ' + json.dumps(sorted(sys.modules)), file=sys.stderr)\n"
    "atexit.register(report)\n"
    "from drtool.cli import main\n"
    "main(sys.argv[1:])\n"
)


def imported_by(*args: str) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """Run ``drtool args...`` to its end; the run and the top-level packages it imported."""
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *args],
        capture_output=True,
        text=True,
        env=drtool_env(),
        stdin=subprocess.DEVNULL,
        timeout=300,
        check=False,
    )
    line = next(x for x in done.stderr.splitlines() if x.startswith("MODULES "))
    return done, {name.split(".")[0] for name in json.loads(line.removeprefix("MODULES "))}


def test_a_postgres_backup_to_a_file_repository_imports_no_s3_redis_or_docker_client(
    tmp_path: Path,
    pg_database: PostgresEndpoint,
    redis_server: RedisEndpoint,
    s3_server: S3Endpoint,
) -> None:
    with psycopg.connect(**pg_database.connect_kwargs(), autocommit=True) as conn:
        conn.execute("CREATE TABLE notes (id int PRIMARY KEY, body text)")
        conn.execute("INSERT INTO notes SELECT g, md5(g::text) FROM generate_series(1, 500) g")
    stack = StackEndpoints(pg_database, redis_server, s3_server, ("unused",))
    repo = make_repository(tmp_path / "kit", stack)

    done, modules = imported_by(
        "--config", str(repo.backup_config), "backup", "--component", "postgres"
    )

    assert done.returncode == 0, done.stderr[-2000:]
    assert "snapshot" in done.stdout
    assert "psycopg" in modules  # the probe saw the backup's own imports
    assert sorted(modules & set(NOT_NEEDED)) == []


def test_the_component_names_import_no_store() -> None:
    """``--component``'s default and help come from the names; a store loads when used."""
    probe = (
        "import sys\n"
        "from drtool.stores import registry\n"
        "names = registry.all_components()\n"
        "print(names, [m for m in sys.modules if m.startswith('drtool.stores.')])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == (
        "('postgres', 'postgres-base', 'redis', 'minio') "
        "['drtool.stores.base', 'drtool.stores.registry']"
    )
    assert [s.name for s in registry.backup_order(("minio", "postgres"))] == ["postgres", "minio"]
