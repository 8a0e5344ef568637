"""Benchmark the Redis Cluster backup against per-node ``redis-cli --rdb``.

Usage: python bench/bench_redis_cluster.py [--keys 1000000] [--value-bytes 100] [--repeat 3]

A local 3-master cluster (``redis-server --cluster-enabled yes`` on loopback ports,
:class:`drtool.runtime.rediscluster.LocalCluster`) is filled with ``--keys`` strings of
``--value-bytes`` random bytes (spread over every slot), then measured, each variant
``--repeat`` times (the median is shown):

- ``drtool``            ``drtool backup --component redis`` (``redis.cluster = true``) into a
                        file:// repository: discover the masters, fetch the RDBs two at a time,
                        validate and fingerprint each (loaded into a private redis-server),
                        zstd-3 + age, manifest, read-back.
- ``redis-cli x3 sum``  ``redis-cli --rdb`` of each master one after another (the three runs'
                        figures added: what a script doing it node by node costs)
- ``redis-cli x3 max``  the slowest single node (the ideal of a parallel fetch)
- ``redis-cli x3 par``  the three ``redis-cli --rdb`` at once in one shell (measured)

Each variant runs as a subprocess measured by ``/usr/bin/time`` (wall, user+sys CPU of the
whole waited-for tree, peak RSS of its largest process; bench_backup.measure). ``srv CPU s``
is what the three redis-servers spent meanwhile (their RDB forks, reaped into their cutime).
The machine may be shared: the load average is printed with the table.
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_backup import Run, measure  # noqa: E402
from redis.cluster import ClusterNode, RedisCluster  # noqa: E402
from repo_setup import DRTOOL  # noqa: E402

from drtool.runtime.procs import HOST, write_secret  # noqa: E402
from drtool.runtime.rediscluster import LocalCluster  # noqa: E402
from drtool.services.repo_setup import set_up_repository  # noqa: E402

THREE = [((0, 5460),), ((5461, 10922),), ((10923, 16383),)]
MB = 1e6


def fill(cluster: LocalCluster, password: str, keys: int, value_bytes: int) -> None:
    """``keys`` strings over every slot, pipelined (the cluster pipeline splits by node)."""
    entry = ClusterNode(HOST, cluster.nodes[0].port)
    client = RedisCluster(startup_nodes=[entry], password=password)
    try:
        batch = 10_000
        for start in range(0, keys, batch):
            pipe = client.pipeline()
            for i in range(start, min(start + batch, keys)):
                pipe.set(f"bench:{i}", os.urandom(value_bytes))
            pipe.execute()
    finally:
        client.close()


def servers_cpu(cluster: LocalCluster) -> float:
    """CPU seconds the nodes used so far, their reaped children (RDB forks) included."""
    total = 0
    for node in cluster.nodes:
        assert node.daemon is not None
        fields = Path(f"/proc/{node.daemon.pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += sum(int(v) for v in fields[11:15])
    return total / os.sysconf("SC_CLK_TCK")


def timed(cluster: LocalCluster, name: str, argv: list[str], env: dict[str, str]) -> Run:
    """One measured run, with the servers' CPU meanwhile."""
    before = servers_cpu(cluster)
    run, _ = measure(name, argv, env=env)
    run.extra["srv"] = servers_cpu(cluster) - before
    return run


def median(name: str, runs: list[Run]) -> Run:
    """The median of each figure over the repeats."""
    return Run(
        name,
        statistics.median(r.wall for r in runs),
        statistics.median(r.cpu for r in runs),
        statistics.median(r.peak_rss_mb for r in runs),
        int(statistics.median(r.stored for r in runs)),
        {"srv": statistics.median(r.extra["srv"] for r in runs)},
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keys", type=int, default=1_000_000)
    parser.add_argument("--value-bytes", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="drtool-bench-cluster-"))
    password = secrets.token_urlsafe(24)
    cluster = LocalCluster.up(work / "cluster", THREE, password=password)
    try:
        run_bench(args, work, cluster, password)
    finally:
        cluster.stop()
        subprocess.run(["rm", "-rf", str(work)], check=False)


def run_bench(args: argparse.Namespace, work: Path, cluster: LocalCluster, password: str) -> None:
    print(f"filling {args.keys:,} keys of {args.value_bytes} bytes ...", flush=True)
    fill(cluster, password, args.keys, args.value_bytes)
    secret = work / "redis_password"
    write_secret(secret, password)
    (work / "repo").mkdir()
    setup = set_up_repository(
        work,
        {"url": (work / "repo").as_uri()},
        stores={
            "redis": {
                "host": HOST,
                "port": cluster.nodes[0].port,
                "password_file": str(secret),
                "cluster": True,
            }
        },
        state_dir=work / "state",
        label="bench",
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("DRTOOL_")}
    env["DRTOOL_HOME"] = str(work / "home")
    cli_env = {**env, "REDISCLI_AUTH": password}
    out = work / "out"
    out.mkdir()

    def cli(i: int) -> list[str]:
        port = cluster.nodes[i].port
        return ["redis-cli", "-h", HOST, "-p", str(port), "--rdb", str(out / f"node{i}.rdb")]

    variants: dict[str, list[Run]] = {"drtool": [], "sum": [], "max": [], "par": []}
    sizes = [0, 0, 0]
    stored = 0
    backup = [str(DRTOOL), "--config", str(setup.backup_config), "backup", "--component", "redis"]
    parallel = " & ".join(" ".join(cli(i)) for i in range(3)) + " & wait"

    def one_round() -> None:
        nonlocal stored
        variants["drtool"].append(timed(cluster, "drtool", backup, env))
        stored = sum(f.stat().st_size for f in (work / "repo").rglob("*") if f.is_file())
        singles = []
        for i in range(3):
            singles.append(timed(cluster, f"node{i}", cli(i), cli_env))
            sizes[i] = (out / f"node{i}.rdb").stat().st_size
        variants["sum"].append(
            Run(
                "sum",
                sum(r.wall for r in singles),
                sum(r.cpu for r in singles),
                max(r.peak_rss_mb for r in singles),
                0,
                {"srv": sum(r.extra["srv"] for r in singles)},
            )
        )
        slowest = max(singles, key=lambda r: r.wall)
        variants["max"].append(slowest)
        variants["par"].append(timed(cluster, "par", ["bash", "-c", parallel], cli_env))

    for i in range(1, args.repeat + 1):
        print(f"round {i} of {args.repeat} ...", flush=True)
        one_round()
    rdb_mb = sum(sizes) / MB
    names = {
        "drtool": "drtool backup (cluster)",
        "sum": "redis-cli --rdb x3, sum",
        "max": "redis-cli --rdb x3, max",
        "par": "redis-cli --rdb x3, parallel",
    }
    print()
    print(
        f"{args.keys:,} keys x {args.value_bytes} B in 3 masters; RDBs {rdb_mb:.1f} MB "
        f"({', '.join(f'{s / MB:.1f}' for s in sizes)}); repository after {args.repeat} "
        f"backups {stored / MB:.1f} MB; median of {args.repeat}; "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    print(f"| {'variant':30} | wall s | CPU s | srv CPU s | peak RSS MB | MB/s |")
    print(f"|{'-' * 32}|--------|-------|-----------|-------------|------|")
    base = median("sum", variants["sum"])
    for key, label in names.items():
        m = median(label, variants[key])
        rate = f"{rdb_mb / m.wall:4.0f}" if key != "max" else "   -"
        print(
            f"| {label:30} | {m.wall:6.2f} | {m.cpu:5.2f} | {m.extra['srv']:9.2f} | "
            f"{m.peak_rss_mb:11.1f} | {rate} |"
        )
    d = median("drtool", variants["drtool"])
    print(f"\ndrtool / sum: wall {d.wall / base.wall:.2f}x, CPU {d.cpu / max(base.cpu, 0.01):.2f}x")


if __name__ == "__main__":
    main()
