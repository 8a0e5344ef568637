"""Benchmark ``drtool restore`` against a plain ``pg_restore -j 2`` of a local, unencrypted dump.

Usage: python bench/bench_restore.py [--messages 1000000] [--attachments 500] [--runs 3]

Two local stacks (source and target) are started under a temp home; the source is seeded and
backed up into a repository on its SeaweedFS (a separate bucket). Then each variant runs in
its own subprocess: wall time and the peak RSS of its largest process (ru_maxrss of the
children). The PostgreSQL baseline is ``pg_dump -Fc`` to a local file (not timed) restored
with ``pg_restore -j 2`` into an empty database of the target server (created untimed). The
baseline and the drtool PostgreSQL restore run alternately ``--runs`` times (the machine may be
shared); medians are shown, with the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from repo_setup import DRTOOL, seed_and_back_up

from drtool.s3session import s3_client
from drtool.services.stack import stack_up

MEASURE = """
import json, resource, subprocess, sys, time
t = time.perf_counter()
done = subprocess.run(sys.argv[1:], stdout=subprocess.PIPE)
seconds = time.perf_counter() - t
rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({"rc": done.returncode, "seconds": seconds, "rss_kb": rss,
                  "out": done.stdout.decode(errors="replace")}))
"""


def measure(argv: list[str], env: dict[str, str] | None = None) -> dict[str, object]:
    """Run ``argv`` in a fresh wrapper process: exit code, seconds, peak RSS (KiB), stdout."""
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, *argv], capture_output=True, text=True, env=env, check=True
    )
    result: dict[str, object] = json.loads(out.stdout)
    if result["rc"] != 0:
        raise SystemExit(f"{argv[0]} failed ({result['rc']}): {out.stderr[-2000:]}")
    return result


def _median(runs: list[dict[str, object]]) -> dict[str, object]:
    """The run with the median wall time."""
    return sorted(runs, key=lambda r: float(str(r["seconds"])))[(len(runs) - 1) // 2]


def _note(run: dict[str, object]) -> str:
    """PASS/FAIL of the fingerprints and the component's RTO, from drtool's JSON output."""
    inner = json.loads(str(run["out"]))["components"][0]
    return ("PASS" if inner["problems"] == [] else "FAIL") + f", RTO {inner['seconds']:.1f} s"


def main() -> None:
    """Seed, back up, restore each way, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--attachments", type=int, default=500)
    parser.add_argument("--runs", type=int, default=3, help="alternate runs (medians shown)")
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="drtool-bench-"))
    home.chmod(0o711)
    drtool = str(DRTOOL)
    src = stack_up(home, "benchsrc").stack
    dst = stack_up(home, "benchdst").stack
    try:
        s3_client(src.endpoints.minio).create_bucket(Bucket="drtool-repo")
        secrets = src.state_dir / "secrets"
        repository = {
            "url": "s3://drtool-repo/bench",
            "endpoint_url": src.endpoints.minio.endpoint_url,
            "access_key_file": str(secrets / "s3_access_key"),
            "secret_key_file": str(secrets / "s3_secret_key"),
        }
        operator_cfg = seed_and_back_up(
            home,
            src,
            repository,
            messages=args.messages,
            attachments=args.attachments,
            operator_extra={"backup": {"scratch_dir": str(home)}},
        ).operator_config

        pg_src, pg_dst = src.endpoints.postgres, dst.endpoints.postgres
        env = {"PATH": "/usr/bin:/bin", **pg_src.libpq_env()}
        dump = home / "plain.pgdump"
        subprocess.run(
            ["pg_dump", "-Fc", "-f", str(dump), "-d", pg_src.dbname], check=True, env=env
        )
        dst_env = {"PATH": "/usr/bin:/bin", **pg_dst.libpq_env()}
        base = [drtool, "--config", str(operator_cfg), "--home", str(home), "restore"]
        base += ["--target", "benchdst", "--yes", "--json", "--force", "--drop-old"]
        plain_runs, pg_runs, loads = [], [], []
        for _ in range(max(1, args.runs)):
            loads.append(os.getloadavg()[0])
            subprocess.run(["dropdb", "--if-exists", "--maintenance-db=postgres", "plain"],
                           check=True, env=dst_env)  # fmt: skip
            subprocess.run(["createdb", "--maintenance-db=postgres", "plain"], check=True,
                           env=dst_env)  # fmt: skip
            plain_runs.append(measure(["pg_restore", "-j", "2", "--exit-on-error", "-d", "plain",
                                       str(dump)], dst_env))  # fmt: skip
            pg_runs.append(measure([*base, "--component", "postgres"]))
        plain, pg_run = _median(plain_runs), _median(pg_runs)
        rows = [("pg_restore -j 2 (local -Fc file)", plain, "")]
        rows.append(("drtool restore --component postgres", pg_run, _note(pg_run)))
        for component in ("redis", "minio"):
            run = measure([*base, "--component", component])
            rows.append((f"drtool restore --component {component}", run, _note(run)))
        print(f"\n{'variant':<42}{'seconds':>9}{'peak RSS MiB':>14}  fingerprints")
        for name, run, note in rows:
            rss = int(str(run["rss_kb"])) / 1024
            print(f"{name:<42}{float(str(run['seconds'])):>9.1f}{rss:>14.0f}  {note}")
        ratio = float(str(pg_run["seconds"])) / float(str(plain["seconds"]))
        each = ", ".join(
            f"{float(str(a['seconds'])):.1f}/{float(str(b['seconds'])):.1f}"
            for a, b in zip(pg_runs, plain_runs, strict=True)
        )
        print(
            f"\npostgres runs (drtool/plain): {each}; load average {statistics.median(loads):.1f}"
        )
        print(f"drtool PostgreSQL restore / plain pg_restore = {ratio:.2f} (target <= 1.2)")
    finally:
        dst.down()
        src.down()
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
