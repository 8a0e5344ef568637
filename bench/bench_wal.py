"""Benchmark ``drtool wal stream``: its cost under steady writes, and the sealing rate.

Usage: python bench/bench_wal.py [--seconds 60] [--segments 16] [--rate 200]

A PostgreSQL 15 and a ``file://`` repository are set up in a temp dir.

1. **steady**: ``drtool wal stream`` (flush_interval 30 s) runs while a writer commits
   ``--rate`` small rows per second for ``--seconds``; the streamer's CPU (user+sys from
   /proc, its pg_receivewal child separately) and peak RSS (VmHWM) are reported.
2. **seal rate**: ``--segments`` full segments of real WAL (a bulk insert received by a plain
   pg_receivewal) are copied into the spool and ``drtool wal stream --once`` seals them:
   segments per second, MiB/s of WAL, stored size, and its CPU and peak RSS (/usr/bin/time).

The machine may be shared: the load average is printed with the table.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import tomli_w

from drtool import keys
from drtool.config import load_config
from drtool.endpoints import PostgresEndpoint
from drtool.repository.access import open_repo
from drtool.runtime.pgserver import PostgresServer
from drtool.services import repo as repo_svc
from drtool.wal.index import load_index
from drtool.wal.names import DEFAULT_SEGMENT_SIZE, parse_lsn, segment_of_lsn

DRTOOL = str(Path(sys.executable).with_name("drtool"))
TICKS = os.sysconf("SC_CLK_TCK")
TIME = ["/usr/bin/time", "-f", "%e %U %S %M"]


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def hwm_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--segments", type=int, default=16)
    parser.add_argument("--rate", type=int, default=200, help="rows committed per second")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="drtool-bench-wal-"))
    root.chmod(0o711)
    server = PostgresServer(root / "pg", major=15, settings={"fsync": "off"})
    server.start()
    try:
        run(root, server, args)
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


def run(root: Path, server: PostgresServer, args: argparse.Namespace) -> None:
    ep = server.endpoint
    (root / "keys").mkdir(mode=0o700)
    recipient = keys.write_identity(root / "keys" / "id", passphrase=None)
    verify = keys.write_signing_key(root / "keys" / "sign")
    (root / "keys" / "pw").write_text(ep.password or "")
    (root / "keys" / "pw").chmod(0o600)
    (root / "repo").mkdir()
    config = root / "backup.toml"
    config.write_text(
        tomli_w.dumps(
            {
                "repository": {"url": (root / "repo").as_uri()},
                "keys": {
                    "recipients": [recipient],
                    "signing_key_file": str(root / "keys" / "sign"),
                    "verify_key": verify,
                },
                "postgres": {
                    "host": ep.host,
                    "port": ep.port,
                    "user": ep.user,
                    "dbname": ep.dbname,
                    "password_file": str(root / "keys" / "pw"),
                },
                "wal": {"spool_dir": str(root / "spool"), "slot": "bench"},
            }
        )
    )
    repo_svc.init_repo(load_config(config, {}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("DRTOOL_")}
    with psycopg.connect(**ep.connect_kwargs(), autocommit=True) as conn:
        conn.execute("CREATE TABLE msgs (id bigserial, body text)")

    steady(root, config, env, args)
    seal_rate(root, server, config, env, args)


def steady(root: Path, config: Path, env: dict[str, str], args: argparse.Namespace) -> None:
    """Phase 1: the streamer's own cost under steady small commits."""
    ep = load_config(config, {}).stack().postgres
    stop = threading.Event()

    def writer() -> None:
        with psycopg.connect(**ep.connect_kwargs(), autocommit=True) as conn:
            while not stop.is_set():
                conn.execute(
                    "INSERT INTO msgs (body) SELECT repeat(md5(random()::text), 4) "
                    "FROM generate_series(1, %s)",
                    (max(1, args.rate // 10),),
                )
                time.sleep(0.1)

    log = (root / "stream.log").open("wb")
    proc = subprocess.Popen(
        [DRTOOL, "--config", str(config), "wal", "stream"], env=env, stdout=log, stderr=log
    )
    thread = threading.Thread(target=writer)
    thread.start()
    probes = commit_probes(ep, args.seconds)
    stream_cpu, stream_rss = cpu_s(proc.pid), hwm_mib(proc.pid)
    kids = children(proc.pid)
    recv_cpu = sum(cpu_s(k) for k in kids)
    recv_rss = max((hwm_mib(k) for k in kids), default=0.0)
    stop.set()
    thread.join()
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(60)
    sealed = sum(1 for _ in (root / "repo" / "wal").glob("0*/0*.zst.age"))
    print(f"steady: {args.seconds} s at {args.rate} rows/s, exit {code}, {sealed} segments sealed")
    print_latency(config, probes)
    print("| process | CPU s | % of a core | peak RSS MiB |")
    print("|---|---|---|---|")
    print(
        f"| drtool wal stream | {stream_cpu:.2f} | {100 * stream_cpu / args.seconds:.1f} | "
        f"{stream_rss:.0f} |"
    )
    print(
        f"| pg_receivewal | {recv_cpu:.2f} | {100 * recv_cpu / args.seconds:.1f} | {recv_rss:.0f} |"
    )


def commit_probes(ep: PostgresEndpoint, seconds: int) -> list[tuple[datetime, int]]:
    """Every 5 s a committed probe row: its commit time and WAL position."""
    probes = []
    end = time.monotonic() + seconds
    with psycopg.connect(**ep.connect_kwargs(), autocommit=True) as conn:
        while time.monotonic() < end:
            conn.execute("INSERT INTO msgs (body) VALUES ('probe')")  # autocommit: committed
            row = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
            assert row is not None
            probes.append((datetime.now(UTC), parse_lsn(str(row[0]))))
            time.sleep(5)
    return probes


def print_latency(config: Path, probes: list[tuple[datetime, int]]) -> None:
    """Commit-to-sealed: when the segment holding each probe was committed to the index."""
    cfg = load_config(config, {})
    repo = open_repo(cfg)
    index = load_index(repo.storage, repo.verify_keys, repo.info.repo_id)
    size = index.segment_size or DEFAULT_SEGMENT_SIZE
    waits, unsealed = [], 0
    for committed, lsn in probes:
        entry = index.entries.get(segment_of_lsn(lsn, 1, size).name(size))
        if entry is None:
            unsealed += 1  # its segment was still open when the streamer stopped
            continue
        waits.append((datetime.fromisoformat(entry.sealed) - committed).total_seconds())
    waits.sort()
    if waits:
        p50, worst = waits[len(waits) // 2], waits[-1]
        print(
            f"commit-to-sealed (flush_interval {cfg.wal.flush_interval:g} s): "
            f"p50 {p50:.0f} s, max {worst:.0f} s over {len(waits)} probes "
            f"({unsealed} still open at the stop; sealed times have 1 s resolution)"
        )


def seal_rate(
    root: Path, server: PostgresServer, config: Path, env: dict[str, str], args: argparse.Namespace
) -> None:
    """Phase 2: ``wal stream --once`` over full segments of real WAL."""
    ep = server.endpoint
    ref = root / "ref"
    ref.mkdir()
    base = [str(server.bin_dir / "pg_receivewal"), "--no-password"]
    libpq = {**env, **ep.libpq_env()}
    subprocess.run([*base, "--create-slot", "--slot=ref"], env=libpq, check=True)
    receiver = subprocess.Popen([*base, "-D", str(ref), "--slot=ref"], env=libpq)
    with psycopg.connect(**ep.connect_kwargs(), autocommit=True) as conn:
        while len([p for p in ref.iterdir() if "." not in p.name]) < args.segments:
            conn.execute(
                "INSERT INTO msgs (body) SELECT repeat(md5(random()::text), 4) "
                "FROM generate_series(1, 50000)"
            )
            time.sleep(0.2)
    receiver.send_signal(signal.SIGINT)
    receiver.wait()
    subprocess.run([*base, "--drop-slot", "--slot=ref"], env=libpq, check=True)
    # fresh repository-side names: the steady run's index must not already hold them
    segments = sorted(p for p in ref.iterdir() if "." not in p.name)[: args.segments]
    spool = root / "spool"
    existing = {p.name for p in (root / "repo" / "wal").glob("*/*.zst.age")}
    copied = 0
    for seg in segments:
        if f"{seg.name}.zst.age" not in existing:
            shutil.copy(seg, spool / seg.name)
            copied += 1
    before = sum(p.stat().st_size for p in (root / "repo" / "wal").rglob("*.zst.age"))
    timed = subprocess.run(
        [*TIME, DRTOOL, "--config", str(config), "wal", "stream", "--once"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    wall, user, sys_, rss_kb = timed.stderr.strip().splitlines()[-1].split()
    after = sum(p.stat().st_size for p in (root / "repo" / "wal").rglob("*.zst.age"))
    plain_mib = copied * 16
    print(f"\nseal rate: {copied} full segments ({plain_mib} MiB of WAL) with `wal stream --once`")
    print("| segments/s | WAL MiB/s | stored MiB | CPU s | peak RSS MiB |")
    print("|---|---|---|---|---|")
    print(
        f"| {copied / float(wall):.2f} | {plain_mib / float(wall):.1f} | "
        f"{(after - before) / 2**20:.1f} | {float(user) + float(sys_):.2f} | "
        f"{int(rss_kb) / 1024:.0f} |"
    )
    print(f"load average: {os.getloadavg()}")


if __name__ == "__main__":
    main()
