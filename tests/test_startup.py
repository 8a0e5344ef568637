"""Start-up: a command imports what it uses, not every store's client (issue 14.2).

Every scheduled backup pays Python's start and drtool's imports before its first byte; boto3,
redis and docker together cost more than the rest of the command. The wall time is measured by
bench/bench_startup.py; these tests pin the cause (what is imported), never a duration.
"""

from __future__ import annotations

import ast
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

#: what a PostgreSQL backup has no use for before ``pg_dump`` runs: the compressor is needed
#: by the first object sealed, rich by a terminal's progress bars, not before the first byte
NOT_BEFORE_THE_DUMP = ("zstandard", "backports", "rich")

# runs drtool's entry point in this interpreter and prints what it imported when it exits
# (MODULES) and when it started pg_dump (AT_PG_DUMP: the backup's first byte follows)
PROBE = (
    "import atexit, json, os, sys\n"
    "report = lambda: print('MODULES ' + json.dumps(sorted(sys.modules)), file=sys.stderr)\n"
    "atexit.register(report)\n"
    "def at_exec(event, args):\n"
    "    if event == 'subprocess.Popen' and os.path.basename(str(args[0])) == 'pg_dump':\n"
    "        print('AT_PG_DUMP ' + json.dumps(sorted(sys.modules)), file=sys.stderr)\n"
    "sys.addaudithook(at_exec)\n"
    "from drtool.cli import main\n"
    "main(sys.argv[1:])\n"
)


def imported_by(
    *args: str, when: str = "MODULES"
) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """Run ``drtool args...`` to its end; the run and the top-level packages it had imported
    at its end (``MODULES``) or when it first started pg_dump (``AT_PG_DUMP``)."""
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *args],
        capture_output=True,
        text=True,
        env=drtool_env(),
        stdin=subprocess.DEVNULL,
        timeout=300,
        check=False,
    )
    line = next(x for x in done.stderr.splitlines() if x.startswith(f"{when} "))
    return done, {name.split(".")[0] for name in json.loads(line.removeprefix(f"{when} "))}


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


def test_a_postgres_backup_starts_pg_dump_before_it_imports_the_compressor(
    tmp_path: Path,
    pg_database: PostgresEndpoint,
    redis_server: RedisEndpoint,
    s3_server: S3Endpoint,
) -> None:
    """Issue 14.2: what the first byte waits for is what it needs; zstd comes with the first
    object sealed (the dump), rich only with a terminal's bars."""
    stack = StackEndpoints(pg_database, redis_server, s3_server, ("unused",))
    repo = make_repository(tmp_path / "kit", stack)

    done, modules = imported_by(
        "--config", str(repo.backup_config), "backup", "--component", "postgres", when="AT_PG_DUMP"
    )

    assert done.returncode == 0, done.stderr[-2000:]
    assert {"psycopg", "cryptography"} <= modules  # the snapshot's connection, the signatures
    assert sorted(modules & {*NOT_NEEDED, *NOT_BEFORE_THE_DUMP}) == []
    _, at_end = imported_by(
        "--config", str(repo.backup_config), "backup", "--component", "postgres"
    )
    assert "zstandard" in at_end  # the dump was sealed: the probe sees later imports


def test_the_backup_command_module_imports_no_store_client() -> None:
    """``drtool backup``'s module and its service import no store's client: the store that is
    backed up brings its own (psycopg, boto3, redis), when the run reaches it."""
    probe = (
        "import sys\n"
        "import drtool.cli.backup\n"
        "print(sorted({m.split('.')[0] for m in sys.modules}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout
    loaded = set(ast.literal_eval(out))
    assert "click" in loaded
    assert sorted(loaded & {*NOT_NEEDED, *NOT_BEFORE_THE_DUMP, "psycopg"}) == []


def test_the_restore_command_module_loads_no_moment_seeder_or_s3_code() -> None:
    """``drtool restore`` of a snapshot does not pay for the restore-to-a-moment code (its
    planner, the capture journal, the PITR drill), the chat seeder or boto3: they cost
    ~0.7 CPU-s of imports before the first byte was read (a file:// PostgreSQL restore
    needs none of them; each loads when its path runs)."""
    probe = (
        "import sys\n"
        "import drtool.cli.restore\n"
        "print(sorted(m for m in sys.modules if m.startswith(('drtool', 'chat_stack', 'boto'))))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout
    loaded = set(ast.literal_eval(out))
    assert "drtool.services.restore.run" in loaded
    heavy = {
        "boto3",
        "botocore",
        "chat_stack.seed",
        "drtool.services.pitr_drill",
        "drtool.services.restore.moment",
        "drtool.services.restore.stack_at",
        "drtool.capture.at",
    }
    assert sorted(loaded & heavy) == []


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
