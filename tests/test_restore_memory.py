"""``drtool restore`` keeps its resident memory flat whatever the size of the dump.

The peak RSS (the kernel's, of the process and its children: wait4's ru_maxrss) of a real
restore is compared with that of a dry run of the same snapshot — the same interpreter, the
same imports, the same small objects read — so the test measures what restoring the data
adds, not how heavy the imports are this week. A memory bound, not a timing: the machine's
load cannot change it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from support.cli import drtool_argv, drtool_env
from support.compare import execute
from support.stacks import make_repository, source_stack

from drtool.endpoints import PostgresEndpoint, RedisEndpoint, S3Endpoint, StackEndpoints

BLOCK_ROWS = 800_000  # rows of one table: its COPY data is one ~85 MB data block of the dump
ADDED_MAX_MIB = 40  # what the restore may add to the dry run's peak: buffers, not the data


# Runs the command and writes its peak RSS (KiB) to argv[1]. An interpreter of its own, not
# a child of pytest: a child's ru_maxrss includes the memory of the process it was forked
# from (pytest's, larger than drtool's), this small one's only.
MEASURE = """
import resource, subprocess, sys
code = subprocess.call(sys.argv[2:], stdin=subprocess.DEVNULL)
with open(sys.argv[1], "w") as fh:
    fh.write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))
sys.exit(code)
"""


def peak_rss_mib(argv: list[str], out: Path) -> tuple[float, subprocess.CompletedProcess[str]]:
    """Run ``argv`` to the end; its peak RSS in MiB (the largest of it and its children, the
    kernel's figure) and its exit code and output."""
    out.mkdir()
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, str(out / "maxrss"), *argv],
        capture_output=True,
        text=True,
        env=drtool_env(),
        timeout=600,
        check=False,
    )
    return int((out / "maxrss").read_text()) / 1024, done


@pytest.mark.slow
def test_restore_peak_memory_does_not_grow_with_the_largest_table(
    tmp_path: Path,
    pg_server: PostgresEndpoint,
    s3_server: S3Endpoint,
    pg_database: PostgresEndpoint,
    redis_db: RedisEndpoint,
    s3_bucket: str,
) -> None:
    """An ~85 MB table restores with the memory of a dry run plus bounded buffers.

    The old restore found the dump's data offsets in a second pass through a memory map of
    the staged file: the pages of the block being walked counted in its RSS until the block
    ended, so the peak grew by the size of the largest table (129 MB at 3 M messages, 194 MB
    at 10 M). The offsets are now found as the dump is staged, from the bytes written.
    """
    with source_stack(tmp_path, pg_server, s3_server) as source:
        execute(
            source.postgres,
            "CREATE TABLE bulk AS SELECT g AS id, repeat(md5(g::text), 3) AS pad "
            f"FROM generate_series(1, {BLOCK_ROWS}) g",
        )
        repo = make_repository(tmp_path / "repo", source)
        repo.backup(components=("postgres",))
        target = StackEndpoints(pg_database, redis_db, s3_server, (s3_bucket,))
        config = repo.operator_config(tmp_path / "op.toml", {"t": target}, scratch=tmp_path)
        args = ("restore", "--target", "t", "--component", "postgres", "--yes", "--json")
        dry_peak, dry = peak_rss_mib(drtool_argv(*args, "--dry-run", config=config), tmp_path / "d")
        assert dry.returncode == 0, dry.stderr
        peak, run = peak_rss_mib(drtool_argv(*args, config=config), tmp_path / "r")
        assert run.returncode == 0, run.stderr
        assert json.loads(run.stdout)["ok"]
        assert execute(target.postgres, "SELECT count(*) FROM bulk") == (BLOCK_ROWS,)
    dump = json.loads(dry.stdout)["plan"][0]["plain_bytes"]
    assert dump > 80 * 1024 * 1024  # the block really is larger than the bound below
    assert peak - dry_peak < ADDED_MAX_MIB, (
        f"restore peak {peak:.0f} MiB vs dry run {dry_peak:.0f} MiB: the restore added "
        f"{peak - dry_peak:.0f} MiB for a {dump / 2**20:.0f} MiB dump"
    )
