"""Benchmark ``drtool backup`` against plain pg_dump pipelines, and the incremental MinIO snapshot.

Usage: python bench/bench_backup.py [--messages 1000000] [--attachments 2000] [--keep]

A local co-talk stack (PostgreSQL, Redis, SeaweedFS as MinIO) and a dedicated SeaweedFS as
the off-site S3 repository are started in a temp dir, seeded, measured and torn down. Every
variant runs as a subprocess (a shell for the pipelines) and is measured by ``/usr/bin/time``:
wall time, user+sys CPU of the process and all its waited-for descendants, peak RSS (the
largest single process of the tree), and the bytes it stored; ``srv CPU s`` is what the
servers under the temp dir (PostgreSQL backends, both SeaweedFS) spent meanwhile, so that
``cores`` = (CPU + srv CPU) / wall shows how busy the machine was. PostgreSQL variants:

- ``drtool``       ``drtool backup --component postgres`` into the S3 repository (fingerprint
                   scan, pg_dump -Fc -Z0, zstd-3, age, multipart upload, manifest, read-back)
- ``floor``        ``pg_dump -Fc -Z0 > /dev/null``: what the source alone costs
- ``zstd|age``     ``pg_dump -Fc -Z0 | zstd -3 | age -r KEY > file``: the stock-tool pipeline
- ``pg_dump -Fc``  ``pg_dump -Fc > file`` (default gzip-6)

``fingerprint scan`` is the integrity query alone (as the backup runs it beside pg_dump:
no parallel workers), for the CPU it adds. Then the MinIO bucket: a full snapshot, one after
adding 1 % new objects, and one after adding a few large objects (memory must stay bounded
whatever the object sizes).
The machine may be shared: the load average is printed with the table.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from repo_setup import DRTOOL  # noqa: E402

from chat_stack.seed import SeedSizes, seed  # noqa: E402
from drtool.runtime import binaries  # noqa: E402
from drtool.runtime.local import LocalStack  # noqa: E402
from drtool.runtime.s3server import SeaweedServer  # noqa: E402
from drtool.s3session import s3_client  # noqa: E402
from drtool.services.repo_setup import set_up_repository  # noqa: E402
from drtool.services.stack import stack_config  # noqa: E402

MB = 1e6


@dataclass
class Run:
    """One measured subprocess."""

    name: str
    wall: float
    cpu: float
    peak_rss_mb: float
    stored: int
    extra: dict[str, Any]


_SERVERS = ""  # set by main(): processes whose command line holds this path are servers


def server_cpu() -> float:
    """CPU seconds the servers have used so far, their exited children (backends) included."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if _SERVERS not in (stat.parent / "cmdline").read_bytes().decode(errors="replace"):
                continue
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        total += sum(int(v) for v in fields[11:15])  # utime stime cutime cstime
    return total / os.sysconf("SC_CLK_TCK")


def measure(name: str, argv: list[str], *, env: dict[str, str] | None = None) -> tuple[Run, str]:
    """Run ``argv`` under ``/usr/bin/time``; return its figures and stdout.

    time(1) reports the wait4 rusage of its child: user+sys CPU of the whole waited-for tree
    and the peak RSS of its largest process. (wait4 on a child of this Python process would
    count the RSS of the forked interpreter before exec.) Stored bytes are filled by the caller.
    """
    with tempfile.TemporaryDirectory() as tmp:
        usage_file = Path(tmp) / "usage"
        timed = ["/usr/bin/time", "-o", str(usage_file), "-f", "%e %U %S %M", *argv]
        servers, started = server_cpu(), time.perf_counter()
        done = subprocess.run(timed, capture_output=True, text=True, env=env, check=False)
        wall = time.perf_counter() - started
        time.sleep(0.2)  # let the postmaster reap the run's backends into its cutime
        servers = server_cpu() - servers
        if done.returncode != 0:
            raise SystemExit(f"{name} failed ({done.returncode}): {done.stderr[-2000:]}")
        _elapsed, user, system, max_kb = usage_file.read_text().split()[-4:]
    run = Run(name, wall, float(user) + float(system), int(max_kb) / 1024, 0, {"srv": servers})
    return run, done.stdout


def shell(name: str, script: str, env: dict[str, str]) -> Run:
    run, _ = measure(name, ["bash", "-o", "pipefail", "-c", script], env=env)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--attachments", type=int, default=2000)
    parser.add_argument("--keep", action="store_true", help="leave the temp dir (stack is stopped)")
    parser.add_argument("--skip-gzip", action="store_true", help="skip the slow pg_dump -Fc run")
    parser.add_argument("--large-objects", type=int, default=6, help="added for the last run")
    parser.add_argument("--large-mb", type=int, default=64, help="size of each large object")
    parser.add_argument(
        "--py-spy",
        metavar="BINARY",
        help="also profile the drtool runs with this py-spy (collapsed stacks in the work dir)",
    )
    args = parser.parse_args()

    global _SERVERS
    work = Path(tempfile.mkdtemp(prefix="drtool-bench-"))
    work.chmod(0o711)
    _SERVERS = str(work)
    stack = LocalStack.up(work / "stack", "bench")
    repo_server = SeaweedServer(work / "repo-s3")
    try:
        repo_server.start()
        run_bench(args, work, stack, repo_server)
    finally:
        repo_server.stop()
        stack.down()
        if not args.keep:
            subprocess.run(["rm", "-rf", str(work)], check=False)


def run_bench(
    args: argparse.Namespace, work: Path, stack: LocalStack, repo_server: SeaweedServer
) -> None:
    ep = stack.endpoints
    users, rooms = max(50, args.messages // 500), max(10, args.messages // 5000)
    sizes = SeedSizes(
        users=users, rooms=rooms, messages=args.messages, attachments=args.attachments
    )
    print(f"seeding {sizes} ...", flush=True)
    seeded = seed(ep, sizes, 1, progress=False)
    print(f"seeded in {seeded.seconds:.0f} s: {seeded.objects} objects", flush=True)

    key_dir = work / "keys"
    key_dir.mkdir(mode=0o700)
    (key_dir / "ak").write_text(repo_server.endpoint.access_key)
    (key_dir / "sk").write_text(repo_server.endpoint.secret_key)
    s3_client(repo_server.endpoint).create_bucket(Bucket="offsite")
    setup = set_up_repository(
        work,
        {
            "url": "s3://offsite/drtool",
            "endpoint_url": repo_server.endpoint.endpoint_url,
            "access_key_file": str(key_dir / "ak"),
            "secret_key_file": str(key_dir / "sk"),
        },
        stores=stack_config(stack),
        state_dir=work / "state",
        label="bench",
    )
    config, recipient = setup.backup_config, setup.keys.recipient
    drtool_env = {k: v for k, v in os.environ.items() if not k.startswith("DRTOOL_")}
    drtool_env["DRTOOL_HOME"] = str(work / "home")

    pg_dump = str(binaries.pg_bin_dir() / "pg_dump")
    pg_env = {**drtool_env, **ep.postgres.libpq_env()}
    db = shlex.quote(ep.postgres.dbname)
    out = work / "out"
    out.mkdir()
    runs: list[Run] = []

    def drtool_backup(name: str, component: str) -> Run:
        argv = [str(DRTOOL), "--config", str(config), "backup", "--component", component, "--json"]
        if args.py_spy:
            profile = work / f"profile-{component}-{time.monotonic_ns()}.txt"
            spy = [args.py_spy, "record", "--format", "raw", "--rate", "200", "--subprocesses"]
            argv = [*spy, "--output", str(profile), "--", *argv]
            print(f"profiling {name} into {profile}", flush=True)
        run, stdout = measure(name, argv, env=drtool_env)
        start = 0 if stdout.startswith("{") else stdout.index("\n{") + 1  # py-spy talks first
        result, _ = json.JSONDecoder().raw_decode(stdout[start:])
        comp = result["components"][0]
        run.stored = comp["stored_bytes"]
        run.extra.update(plain=comp["plain_bytes"], seconds=comp["seconds"])
        return run

    # warm the page cache once, so that no variant pays for cold reads
    shell("warm-up", f"{pg_dump} -Fc -Z0 -d {db} > /dev/null", pg_env)
    floor = shell(
        "floor: pg_dump -Fc -Z0 > /dev/null", f"{pg_dump} -Fc -Z0 -d {db} > /dev/null", pg_env
    )
    runs.append(floor)
    pipe_file = out / "pipeline.zst.age"
    pipeline = shell(
        "pg_dump -Fc -Z0 | zstd -3 | age",
        f"{pg_dump} -Fc -Z0 -d {db} | zstd -3 -q -c | age -r {recipient} > {pipe_file}",
        pg_env,
    )
    pipeline.stored = pipe_file.stat().st_size
    runs.append(pipeline)
    scan = (
        "import psycopg; from drtool.sources.pg_fingerprint import compute_fingerprints; "
        "c = psycopg.connect(''); c.execute('SET max_parallel_workers_per_gather = 0'); "
        "compute_fingerprints(c)"
    )
    fp_env = {**pg_env, "PGDATABASE": ep.postgres.dbname}
    fp_run, _ = measure("fingerprint scan (SQL, alone)", [sys.executable, "-c", scan], env=fp_env)
    runs.append(fp_run)
    dr = drtool_backup("drtool backup --component postgres", "postgres")
    runs.append(dr)
    gz = None
    if not args.skip_gzip:
        gz_file = out / "dump.gz.pgdump"
        gz = shell("pg_dump -Fc (gzip-6) > file", f"{pg_dump} -Fc -d {db} > {gz_file}", pg_env)
        gz.stored = gz_file.stat().st_size
        runs.append(gz)

    # MinIO: full, then after 1 % new objects
    full = drtool_backup("drtool backup minio (full)", "minio")
    client = s3_client(ep.minio)
    bucket = ep.buckets[0]
    listed = client.list_objects_v2(Bucket=bucket, MaxKeys=1000)
    sizes_seen = [o["Size"] for o in listed.get("Contents", [])] or [100_000]
    rng = random.Random(5)
    new = max(1, seeded.objects // 100)
    for i in range(new):
        body = rng.randbytes(rng.choice(sizes_seen))
        client.put_object(Bucket=bucket, Key=f"bench/new-{i}.bin", Body=body)
    incr = drtool_backup(f"drtool backup minio (+{new} new objects)", "minio")
    for i in range(args.large_objects):
        body = rng.randbytes(args.large_mb * 1024 * 1024)
        client.put_object(Bucket=bucket, Key=f"bench/large-{i}.mp4", Body=body)
    large = drtool_backup(
        f"drtool backup minio (+{args.large_objects} x {args.large_mb} MiB)", "minio"
    )
    runs += [full, incr, large]

    load = os.getloadavg()
    plain = dr.extra["plain"]
    print()
    print(
        f"messages {args.messages:,}, dump {plain / MB:.0f} MB plain; load average "
        f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; {os.cpu_count()} CPUs"
    )
    header = (
        f"{'variant':44} {'wall s':>8} {'CPU s':>8} {'srv CPU s':>9} {'cores':>6} {'RSS MB':>8} "
        f"{'stored MB':>10} {'MB/s':>7}"
    )
    print(header)
    print("-" * len(header))
    for r in runs:
        rate = (r.extra.get("plain", plain) / MB / r.wall) if r.wall else 0.0
        stored = f"{r.stored / MB:10.1f}" if r.stored else f"{'-':>10}"
        srv = r.extra["srv"]
        print(
            f"{r.name:44} {r.wall:8.2f} {r.cpu:8.2f} {srv:9.2f} {(r.cpu + srv) / r.wall:6.2f} "
            f"{r.peak_rss_mb:8.1f} {stored} {rate:7.1f}"
        )
    print()
    peak = max(r.peak_rss_mb for r in runs if r.name.startswith("drtool"))
    checks = [
        ("drtool <= 1.25 x source floor", dr.wall / floor.wall, 1.25, "le"),
        ("drtool <= 1.1 x zstd|age pipeline", dr.wall / pipeline.wall, 1.1, "le"),
        ("every drtool run: peak RSS <= 128 MB", peak, 128, "le"),
        ("incremental MinIO <= 5 % of full", incr.wall / full.wall, 0.05, "le"),
    ]
    if gz is not None:
        checks.insert(2, ("drtool >= 4 x faster than pg_dump -Fc", gz.wall / dr.wall, 4, "ge"))
    for text, value, target, how in checks:
        ok = value <= target if how == "le" else value >= target
        print(f"{'PASS' if ok else 'MISS'}  {text}: {value:.2f}")


if __name__ == "__main__":
    main()
