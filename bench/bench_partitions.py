"""Benchmark backup and restore of the partitioned ``messages`` table against the floors (16.4).

Usage: python bench/bench_partitions.py [--messages 1000000] [--months 24] [--growth 0.1]

A local co-talk stack is seeded with ``--messages`` over ``--months`` monthly partitions, each
month ``--growth`` larger than the one before, and backed up into a ``file://`` repository.
Every variant runs as a subprocess under ``/usr/bin/time`` (bench_backup.measure): wall,
client CPU (user+sys of the process tree), peak RSS of its largest process, and ``srv`` = the
CPU the PostgreSQL server spent meanwhile. Variants:

- ``floor backup``   ``pg_dump -Fc -Z0 > /dev/null``
- ``scan serial``    the row-hash scan through the parents, one backend (formats 1-4)
- ``scan parallel``  one unit per partition, 2 connections on one exported snapshot (what
                     proves a restored format 1-4 snapshot now)
- ``drtool backup (before)`` with ``--before DRTOOL``: that drtool's backup
- ``drtool backup 1st`` ``drtool backup --component postgres``: fingerprints read off the
                     dump stream (format 5, ADR 0033), no scan
- ``drtool backup 2nd`` the same, nothing changed
- ``drtool backup 3rd`` after one row of an old month was updated
- ``pg_dump x2 subsets`` two ``pg_dump --snapshot`` of halves of the partitions, in parallel,
                     vs the one pg_dump of the floor (ADR 0029, decision 3)
- ``floor restore``  ``pg_restore -j2`` of a local ``-Fc -Z0`` file into an empty database
- ``pg_restore -j1`` the same with one job: whether ``-j`` already runs partitions in parallel
- ``drtool restore`` ``drtool restore --component postgres`` (verified: fingerprints compared)

The machine may be shared: the load average is printed with the table.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import bench_backup  # noqa: E402
from bench_backup import Run, measure, shell  # noqa: E402
from repo_setup import DRTOOL  # noqa: E402

from chat_stack.seed import SeedSizes, seed  # noqa: E402
from drtool.runtime.local import LocalStack  # noqa: E402
from drtool.services.repo_setup import set_up_repository  # noqa: E402
from drtool.services.stack import stack_config, stack_up  # noqa: E402

# argv: conninfo, workers (0: the serial scan)
SCAN = """
import sys, psycopg
from drtool.sources.pg_fingerprint import compute_fingerprints
from drtool.sources.pg_scan import PartitionScan
conninfo, workers = sys.argv[1], int(sys.argv[2])
with psycopg.connect(conninfo) as conn:
    conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
    snapshot = conn.execute("SELECT pg_export_snapshot()").fetchone()[0]
    conn.execute("SET LOCAL max_parallel_workers_per_gather = 0")
    if workers == 0:
        prints = compute_fingerprints(conn)
    else:
        result = PartitionScan(lambda: psycopg.connect(conninfo), snapshot, workers=workers).run()
        prints = result.fingerprints
        print(f"{result.scanned} units hashed")
print(prints.tables["public.messages"].rows)
"""

# two pg_dumps of halves of the data on one exported snapshot (the other tables in the first)
SUBSETS = """
import subprocess, sys, psycopg
conninfo, db = sys.argv[1], sys.argv[2]
with psycopg.connect(conninfo) as conn:
    conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
    snapshot = conn.execute("SELECT pg_export_snapshot()").fetchone()[0]
    parts = conn.execute(
        "SELECT c.relname, pg_relation_size(c.oid) FROM pg_inherits i "
        "JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = 'messages'::regclass "
        "ORDER BY 2 DESC").fetchall()
    halves = [[], []]
    sizes = [0, 0]
    for name, size in parts:
        k = sizes.index(min(sizes))
        halves[k].append(name)
        sizes[k] += size
    base = ["pg_dump", "-Fc", "-Z0", f"--snapshot={snapshot}", "-d", db]
    first = base + sum((["--exclude-table-data", t] for t in halves[1]), [])
    second = base + ["--data-only"] + sum((["-t", t] for t in halves[1]), [])
    procs = [subprocess.Popen(argv, stdout=subprocess.DEVNULL) for argv in (first, second)]
    sys.exit(max(p.wait() for p in procs))
"""


def row(run: Run) -> str:
    srv = run.extra.get("srv", 0.0)
    return (
        f"{run.name:<26}{run.wall:>8.2f}{run.cpu:>9.2f}{srv:>9.2f}{run.peak_rss_mb:>9.0f}"
        f"  {run.extra.get('note', '')}"
    )


def drtool_run(name: str, argv: list[str]) -> tuple[Run, dict[str, object]]:
    run, out = measure(name, [str(DRTOOL), *argv])
    return run, json.loads(out) if out.strip().startswith("{") else {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--months", type=int, default=24)
    parser.add_argument("--growth", type=float, default=0.1)
    parser.add_argument("--keep", action="store_true", help="leave the temp dir")
    parser.add_argument(
        "--before",
        metavar="DRTOOL",
        help="also time this drtool's backup first (e.g. main's: the serial scan)",
    )
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="drtool-bench-part-"))
    home.chmod(0o711)
    bench_backup._SERVERS = str(home)
    stack = stack_up(home, "benchpart").stack
    try:
        runs, dump_mb = run_bench(args, home, stack)
        report(args, runs, dump_mb)
    finally:
        stack.down()
        if not args.keep:
            shutil.rmtree(home, ignore_errors=True)


def run_bench(args: argparse.Namespace, home: Path, stack: LocalStack) -> tuple[list[Run], float]:
    """Seed, then every variant in turn; the runs and the dump's size (MB)."""
    runs: list[Run] = []
    ep = stack.endpoints.postgres
    users = max(100, args.messages // 500)
    rooms = max(10, args.messages // 5000)
    sizes = SeedSizes(users, rooms, args.messages, 0, args.months, args.growth)
    t = time.perf_counter()
    seed(stack.endpoints, sizes, 1, progress=False)
    print(f"seeded {args.messages:,} messages in {time.perf_counter() - t:.0f} s", flush=True)
    setup = set_up_repository(
        home,
        {"url": f"file://{home / 'repo'}"},
        stores=stack_config(stack),
        state_dir=home / "state",
        operator_stores=True,
        operator_extra={"backup": {"scratch_dir": str(home)}},
        label="bench",
    )
    env = {"PATH": f"{stack.postgres.bin_dir}:/usr/bin:/bin", **ep.libpq_env()}
    env["PGDATABASE"] = ep.dbname
    conninfo = ep.conninfo(ep.dbname)  # the password goes by PGPASSWORD, not argv

    runs.append(shell("floor backup", "pg_dump -Fc -Z0 > /dev/null", env))
    scans = (("scan serial", 0), ("scan parallel (2)", 2))
    for name, workers in scans:
        argv = [sys.executable, "-c", SCAN, conninfo, str(workers)]
        run, text = measure(name, argv, env={**os.environ, **env})
        run.extra["note"] = text.splitlines()[0] if workers else ""
        runs.append(run)
    backup = ["--config", str(setup.backup_config), "--home", str(home), "backup"]
    backup += ["--component", "postgres", "--json"]
    if args.before:
        run, _ = measure("drtool backup (before)", [args.before, *backup])
        run.extra["note"] = f"{args.before}: the serial scan"
        runs.append(run)
    for label in ("1st", "2nd"):
        run, _ = drtool_run(f"drtool backup {label}", backup)
        runs.append(run)
    subprocess.run(
        ["psql", "-qc", "UPDATE messages SET content = 'edited' WHERE id = 1"],
        check=True,
        env=env,
    )
    run, _ = drtool_run("drtool backup 3rd", backup)
    run.extra["note"] = "one row of the oldest month updated"
    runs.append(run)
    detail = scan_details(setup.operator_config, home)
    runs[-1].extra["note"] += f"; {detail}"

    run, _ = measure("pg_dump x2 subsets", [sys.executable, "-c", SUBSETS, conninfo,
                                            ep.dbname], env={**os.environ, **env})  # fmt: skip
    runs.append(run)

    dump = home / "plain.pgdump"
    subprocess.run(["pg_dump", "-Fc", "-Z0", "-f", str(dump)], check=True, env=env)
    for name, jobs in (("floor restore (-j2)", 2), ("pg_restore -j1", 1)):
        for cmd in (["dropdb", "--if-exists", "plain"], ["createdb", "plain"]):
            subprocess.run([*cmd, "--maintenance-db=postgres"], check=True, env=env)
        script = f"pg_restore -j{jobs} --exit-on-error -d plain {shlex.quote(str(dump))}"
        runs.append(shell(name, script, env))
    subprocess.run(["dropdb", "plain", "--maintenance-db=postgres"], check=True, env=env)

    restore = ["--config", str(setup.operator_config), "--home", str(home), "restore"]
    restore += ["--target", "benchpart", "--yes", "--json", "--force", "--drop-old"]
    run, out = drtool_run("drtool restore", [*restore, "--component", "postgres"])
    comps = out.get("components", [{}])
    assert isinstance(comps, list)
    run.extra["note"] = "fingerprints " + ("PASS" if comps[0].get("problems") == [] else "FAIL")
    runs.append(run)

    dump_mb = dump.stat().st_size / 1e6
    return runs, dump_mb


def report(args: argparse.Namespace, runs: list[Run], dump_mb: float) -> None:
    """The table, and the ratios to the floors."""
    print(f"\n{args.messages:,} messages over {args.months} months (growth {args.growth}), "
          f"dump {dump_mb:.0f} MB; load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    print(f"{'variant':<26}{'wall s':>8}{'CPU s':>9}{'srv s':>9}{'RSS MB':>9}")
    for r in runs:
        print(row(r))
    by = {r.name: r for r in runs}
    b, f = by["drtool backup 1st"], by["floor backup"]
    print(f"\nbackup 1st / floor {b.wall / f.wall:.2f}; 2nd / floor "
          f"{by['drtool backup 2nd'].wall / f.wall:.2f}; restore / floor "
          f"{by['drtool restore'].wall / by['floor restore (-j2)'].wall:.2f}")  # fmt: skip


def scan_details(operator_config: Path, home: Path) -> str:
    """How the newest snapshot's fingerprints were made, as ``drtool show`` prints them."""
    done = subprocess.run(
        [str(DRTOOL), "--config", str(operator_config), "--home", str(home), "show", "latest",
         "--json"], capture_output=True, text=True, check=False)  # fmt: skip
    try:
        doc = json.loads(done.stdout)
        comp = next(c for c in doc["manifest"]["components"] if c["name"] == "postgres")
        if "fingerprint_scan" not in comp["details"]:  # format 5 (ADR 0033): no scan at all
            return f"fingerprints format {comp['details'].get('fingerprint_format')}: off the dump"
        scan = comp["details"]["fingerprint_scan"]
        return f"{scan['partitions_reused']} partitions reused, {scan['units_hashed']} hashed"
    except (ValueError, KeyError, StopIteration, TypeError):
        return f"(show: {done.stderr.strip()[:120]})"


if __name__ == "__main__":
    main()
