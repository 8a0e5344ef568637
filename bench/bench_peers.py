"""drtool side by side with what a user would use instead: borg, restic, rclone, the stock pipe.

Usage: python bench/bench_peers.py [--messages 1000000] [--attachments 2000] [--rounds 3]
       [--minio-only] [--drtool PATH]

Issue 14.6: is drtool slower than the tools it replaces, on the same work and machine? A source
stack (PostgreSQL, Redis, SeaweedFS as MinIO), a restore target stack and a second SeaweedFS
(the off-site S3 server) are started in a temp dir and seeded; then ``--rounds`` interleaved
rounds run every variant once each (a burst of load hits every variant), and the table shows
the median and the min of the rounds.

PostgreSQL backup (every peer writes to a local file or directory, drtool to a ``file://``
repository; each round into a fresh repository, so every run is a first, full one):

- floor: ``pg_dump -Fc -Z0 > /dev/null``; stock pipe: ``pg_dump -Fc -Z0 | zstd -3 | age``;
- ``borg create --compression zstd,3`` and ``restic backup --stdin`` of ``pg_dump -Fc -Z0``
  (encrypted repositories: borg ``repokey-blake2``, restic's own);
- ``pg_dump -Fc`` (gzip-6) to a file; ``drtool backup --component postgres`` (fingerprints,
  zstd, age, manifest, read-back).

Restore, each into a new empty database of the target server (created untimed); drtool
restores beside the target's database, emptied the same way untimed, switches it in and drops
the old one (``--force --drop-old``: the safe swap it always does, without the cost of dropping
a full database the peers do not pay either) and proves the fingerprints:
``pg_restore -j2`` of the local ``-Fc`` file, ``age -d | zstd -d | pg_restore``,
``borg extract --stdout | pg_restore``, ``restic dump | pg_restore``, ``drtool restore``.

Then a day-like change (0.9 % new messages, 0.1 % of the most recent edited) and a second run
of each tool that keeps history: the bytes each stores for it, as a share of its first run.

MinIO: ``drtool backup --component minio`` (a fresh repository each round: a full snapshot)
against ``rclone copy`` of the bucket to a ``crypt`` remote on the same off-site server; then
the restore of the bucket into the (emptied, untimed) bucket of the target stack: ``drtool
restore --component minio`` (every blob checked before the first put, every object read back)
against ``rclone copy`` from the crypt remote. After the rounds, 1 % new objects (of the
bucket's mean size) and a second run of each: drtool's incremental snapshot, rclone's copy
(which lists both sides and sends only what is missing). ``--minio-only`` runs this part alone;
``--drtool PATH`` measures another drtool build (e.g. the one before a change) with this script.

Figures per run, from ``/usr/bin/time`` and /proc (bench/bench_backup.py's ``measure``): wall,
client CPU (the command and all its descendants), server CPU (every server under the temp dir:
the PostgreSQL backends, the SeaweedFS processes) and the peak RSS of the largest process.
The peers are baselines only: they are installed here from Debian when missing
(``apt-get install -y borgbackup restic rclone age zstd``), never drtool dependencies.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import bench_backup  # noqa: E402
from bench_backup import Run, measure, shell  # noqa: E402
from repo_setup import DRTOOL  # noqa: E402

from chat_stack.seed import SeedSizes, seed  # noqa: E402
from drtool.endpoints import PostgresEndpoint  # noqa: E402
from drtool.runtime import binaries  # noqa: E402
from drtool.runtime.local import LocalStack  # noqa: E402
from drtool.runtime.s3server import SeaweedServer  # noqa: E402
from drtool.s3session import s3_client  # noqa: E402
from drtool.services.repo_setup import set_up_repository  # noqa: E402
from drtool.services.stack import stack_config, stack_up  # noqa: E402

MB = 1e6
#: Debian package of each peer binary (installed when missing)
PEERS = {"borg": "borgbackup", "restic": "restic", "rclone": "rclone", "age": "age", "zstd": "zstd"}
PASSWORD = "bench-only-password"  # the peers' repositories live and die in the temp dir


def ensure_peers() -> None:
    """Install the peer tools that are missing, from Debian (baselines, not dependencies)."""
    missing = sorted({pkg for tool, pkg in PEERS.items() if shutil.which(tool) is None})
    if missing:
        print(f"installing {' '.join(missing)} from Debian ...", flush=True)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "install", "-y", "-q", *missing], check=True, env=env)


def dir_bytes(path: Path) -> int:
    """Bytes of every file under ``path`` (a repository's stored size)."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@dataclass
class Table:
    """Runs per variant, in first-seen order, and the load average at each run's start."""

    runs: dict[str, list[Run]] = field(default_factory=dict)
    loads: list[float] = field(default_factory=list)

    def add(self, run: Run) -> Run:
        self.runs.setdefault(run.name, []).append(run)
        return run

    def median(self, name: str) -> float:
        return statistics.median(r.wall for r in self.runs[name])

    def print(self, title: str, names: list[str]) -> None:
        header = (
            f"{'variant':46} {'median s':>8} {'min s':>6} {'CPU s':>6} {'srv CPU':>7} "
            f"{'RSS MB':>7} {'stored MB':>9}"
        )
        print(f"\n{title}\n{header}\n{'-' * len(header)}")
        for name in names:
            runs = self.runs[name]
            stored = statistics.median(r.stored for r in runs)
            print(
                f"{name:46} {statistics.median(r.wall for r in runs):8.2f} "
                f"{min(r.wall for r in runs):6.2f} "
                f"{statistics.median(r.cpu for r in runs):6.2f} "
                f"{statistics.median(float(r.extra['srv']) for r in runs):7.2f} "
                f"{max(r.peak_rss_mb for r in runs):7.0f} "
                + (f"{stored / MB:9.1f}" if stored else f"{'-':>9}")
            )


@dataclass
class Bench:
    """The stacks, servers, tools and environments of one benchmark run."""

    args: argparse.Namespace
    work: Path
    src: LocalStack
    dst: LocalStack
    offsite: SeaweedServer
    table: Table = field(default_factory=Table)

    def __post_init__(self) -> None:
        bin_dir = binaries.pg_bin_dir()
        self.pg_dump = str(bin_dir / "pg_dump")
        self.pg_restore = str(bin_dir / "pg_restore")
        base = {k: v for k, v in os.environ.items() if not k.startswith("DRTOOL_")}
        self.src_env = {**base, **self.src.endpoints.postgres.libpq_env()}
        self.dst_env = {**base, **self.dst.endpoints.postgres.libpq_env()}
        self.drtool_env = {**base, "DRTOOL_HOME": str(self.work)}
        self.db = shlex.quote(self.src.endpoints.postgres.dbname)
        self.peer_env = {
            **self.src_env,
            "BORG_PASSPHRASE": PASSWORD,
            "BORG_BASE_DIR": str(self.work / "borg-home"),
            "BORG_DISPLAY_PASSPHRASE": "no",
            "RESTIC_PASSWORD": PASSWORD,
            "RESTIC_CACHE_DIR": str(self.work / "restic-cache"),
        }
        self.out = self.work / "out"
        self.out.mkdir()
        keys = self.work / "age"
        keys.mkdir(mode=0o700)
        subprocess.run(["age-keygen", "-o", str(keys / "id")], check=True, capture_output=True)
        self.age_identity = keys / "id"
        self.age_recipient = subprocess.run(
            ["age-keygen", "-y", str(keys / "id")], check=True, capture_output=True, text=True
        ).stdout.strip()
        offsite_keys = self.work / "offsite-keys"
        offsite_keys.mkdir(mode=0o700)
        (offsite_keys / "ak").write_text(self.offsite.endpoint.access_key)
        (offsite_keys / "sk").write_text(self.offsite.endpoint.secret_key)
        self.offsite_keys = offsite_keys
        s3_client(self.offsite.endpoint).create_bucket(Bucket="offsite")

    # -- set-up of one round (untimed) -----------------------------------------------------

    def drtool_repository(self, name: str, url: str, extra: dict[str, str]) -> tuple[Path, Path]:
        """A new drtool repository: (backup config, operator config)."""
        setup = set_up_repository(
            self.work / name,
            {"url": url, **extra},
            stores=stack_config(self.src),
            state_dir=self.work / name / "state",
            operator_stores=True,
            operator_extra={"backup": {"scratch_dir": str(self.work)}},
            label="bench",
        )
        return setup.backup_config, setup.operator_config

    def fresh_database(self, name: str) -> None:
        """An empty database ``name`` on the target server (dropped first if it exists)."""
        for argv in (
            ["dropdb", "--if-exists", "--maintenance-db=postgres", name],
            ["createdb", "--maintenance-db=postgres", name],
        ):
            subprocess.run(argv, check=True, env=self.dst_env, capture_output=True)

    # -- the measured variants ---------------------------------------------------------------

    def drtool(
        self, name: str, config: Path, *args: str, env: dict[str, str] | None = None
    ) -> tuple[Run, dict[str, Any]]:
        """``drtool --config C --home WORK args... --json``: the run and its JSON result
        (``env``: settings added to drtool's environment for this run)."""
        argv = [
            self.args.drtool,
            "--config",
            str(config),
            "--home",
            str(self.work),
            *args,
            "--json",
        ]
        self.table.loads.append(os.getloadavg()[0])
        run, stdout = measure(name, argv, env={**self.drtool_env, **(env or {})})
        return self.table.add(run), json.loads(stdout)

    def sh(self, name: str, script: str, env: dict[str, str]) -> Run:
        self.table.loads.append(os.getloadavg()[0])
        return self.table.add(shell(name, script, env))

    def backups(self, n: int) -> dict[str, Any]:
        """Round ``n`` of the PostgreSQL backups; what the restores of the round read."""
        dump = f"{self.pg_dump} -Fc -Z0 -d {self.db}"
        self.sh("floor: pg_dump -Fc -Z0 > /dev/null", f"{dump} > /dev/null", self.src_env)
        piped = self.out / f"pipe-{n}.zst.age"
        run = self.sh(
            "pg_dump -Fc -Z0 | zstd -3 | age > file",
            f"{dump} | zstd -3 -q -c | age -r {self.age_recipient} > {piped}",
            self.src_env,
        )
        run.stored = piped.stat().st_size
        borg = self.work / f"borg-{n}"
        subprocess.run(
            ["borg", "init", "--encryption=repokey-blake2", str(borg)],
            check=True,
            env=self.peer_env,
            capture_output=True,
        )
        run = self.sh(
            "borg create --compression zstd,3 (stdin)",
            f"{dump} | borg create --compression zstd,3 --stdin-name dump.pgdump {borg}::day1 -",
            self.peer_env,
        )
        run.stored = dir_bytes(borg)
        restic = self.work / f"restic-{n}"
        subprocess.run(
            ["restic", "init", "-q", "--repository-version", "2", "--repo", str(restic)],
            check=True,
            env=self.peer_env,
        )
        run = self.sh(
            "restic backup --stdin",
            f"{dump} | restic -q --repo {restic} backup --stdin --stdin-filename dump.pgdump",
            self.peer_env,
        )
        run.stored = dir_bytes(restic)
        gz = self.out / f"gzip-{n}.pgdump"
        run = self.sh(
            "pg_dump -Fc (gzip-6) > file", f"{self.pg_dump} -Fc -d {self.db} > {gz}", self.src_env
        )
        run.stored = gz.stat().st_size
        backup_cfg, operator_cfg = self.drtool_repository(
            f"pg-repo-{n}", (self.work / f"pg-repo-{n}" / "repository").as_uri(), {}
        )
        run, result = self.drtool(
            "drtool backup --component postgres", backup_cfg, "backup", "--component", "postgres"
        )
        run.stored = result["components"][0]["stored_bytes"]
        run.extra["plain"] = result["components"][0]["plain_bytes"]
        snapshot_id = result["snapshot_id"]
        # the same with zstd compressing in its own thread (C, no GIL): on two cores the
        # Python thread then only reads the archive, encrypts and hashes (not the default)
        threaded_cfg, _ = self.drtool_repository(
            f"pg-repo-{n}-mt", (self.work / f"pg-repo-{n}-mt" / "repository").as_uri(), {}
        )
        run, threaded = self.drtool(
            THREADED,
            threaded_cfg,
            "backup",
            "--component",
            "postgres",
            env={"DRTOOL_BACKUP_COMPRESSION_THREADS": "1"},
        )
        run.stored = threaded["components"][0]["stored_bytes"]
        return {
            "piped": piped,
            "borg": borg,
            "restic": restic,
            "gz": gz,
            "drtool": (backup_cfg, operator_cfg, snapshot_id),
        }

    def restores(self, made: dict[str, Any]) -> None:
        """One round of the restores, each from what this round's backups made."""
        into = f"{self.pg_restore} --exit-on-error -d peer"
        variants: list[tuple[str, str]] = [
            ("restore: pg_restore -j2 local -Fc file", f"{into} -j 2 {made['gz']}"),
            (
                "restore: age -d | zstd -d | pg_restore",
                f"age -d -i {self.age_identity} {made['piped']} | zstd -d -q -c | {into}",
            ),
            (
                "restore: borg extract | pg_restore",
                f"borg extract --stdout {made['borg']}::day1 | {into}",
            ),
            (
                "restore: restic dump | pg_restore",
                f"restic -q --repo {made['restic']} dump latest dump.pgdump | {into}",
            ),
        ]
        env = {**self.peer_env, **self.dst.endpoints.postgres.libpq_env()}
        for name, script in variants:
            self.fresh_database("peer")
            self.sh(name, script, env)
        _, operator_cfg, snapshot = made["drtool"]
        self.fresh_database(self.dst.endpoints.postgres.dbname)
        run, result = self.drtool(
            "drtool restore --component postgres (verified)",
            operator_cfg,
            "restore",
            snapshot,
            "--target",
            self.dst.name,
            "--component",
            "postgres",
            "--yes",
            "--force",
            "--drop-old",
        )
        problems = result["components"][0]["problems"]
        if problems:
            raise SystemExit(f"drtool restore: the fingerprints differ: {problems}")
        run.extra["verified"] = True

    def minio(self, n: int) -> None:
        """Round ``n``: a full drtool snapshot of the bucket, and rclone to a crypt remote."""
        offsite = {
            "endpoint_url": self.offsite.endpoint.endpoint_url,
            "access_key_file": str(self.offsite_keys / "ak"),
            "secret_key_file": str(self.offsite_keys / "sk"),
        }
        backup_cfg, operator_cfg = self.drtool_repository(
            f"minio-repo-{n}", f"s3://offsite/drtool-minio-{n}", offsite
        )
        run, result = self.drtool(
            "drtool backup --component minio (full)", backup_cfg, "backup", "--component", "minio"
        )
        run.stored = result["components"][0]["stored_bytes"]
        src, off = self.src.endpoints.minio, self.offsite.endpoint
        obscured = subprocess.run(
            ["rclone", "obscure", PASSWORD], check=True, capture_output=True, text=True
        ).stdout.strip()
        # loopback http: a CA bundle from the environment only makes rclone's S3 client fail
        env = {k: v for k, v in self.peer_env.items() if k != "AWS_CA_BUNDLE"}
        env["RCLONE_CONFIG"] = "/dev/null"
        for remote, ep in (("SRC", src), ("OFF", off)):
            env.update(
                {
                    f"RCLONE_CONFIG_{remote}_TYPE": "s3",
                    f"RCLONE_CONFIG_{remote}_PROVIDER": "Other",
                    f"RCLONE_CONFIG_{remote}_ACCESS_KEY_ID": ep.access_key or "",
                    f"RCLONE_CONFIG_{remote}_SECRET_ACCESS_KEY": ep.secret_key or "",
                    f"RCLONE_CONFIG_{remote}_ENDPOINT": ep.endpoint_url,
                    f"RCLONE_CONFIG_{remote}_REGION": ep.region,
                    f"RCLONE_CONFIG_{remote}_FORCE_PATH_STYLE": "true",
                }
            )
        env.update(
            {
                "RCLONE_CONFIG_CRYPT_TYPE": "crypt",
                "RCLONE_CONFIG_CRYPT_REMOTE": f"off:offsite/rclone-{n}",
                "RCLONE_CONFIG_CRYPT_PASSWORD": obscured,
            }
        )
        bucket = self.src.endpoints.buckets[0]
        run = self.sh("rclone copy to a crypt remote", f"rclone copy src:{bucket} crypt:", env)
        run.stored = _stored(off, "offsite", f"rclone-{n}/")

        dst = self.dst.endpoints.minio
        target = self.dst.endpoints.buckets[0]
        _empty_bucket(dst, target)
        _, result = self.drtool(
            "drtool restore --component minio (verified)",
            operator_cfg,
            "restore",
            "latest",
            "--target",
            self.dst.name,
            "--component",
            "minio",
            "--yes",
        )
        if not result.get("ok"):
            raise SystemExit(f"drtool restore of the bucket failed: {result}")
        _empty_bucket(dst, target)
        env.update(
            {
                "RCLONE_CONFIG_DST_TYPE": "s3",
                "RCLONE_CONFIG_DST_PROVIDER": "Other",
                "RCLONE_CONFIG_DST_ACCESS_KEY_ID": dst.access_key or "",
                "RCLONE_CONFIG_DST_SECRET_ACCESS_KEY": dst.secret_key or "",
                "RCLONE_CONFIG_DST_ENDPOINT": dst.endpoint_url,
                "RCLONE_CONFIG_DST_REGION": dst.region,
                "RCLONE_CONFIG_DST_FORCE_PATH_STYLE": "true",
            }
        )
        self.sh("rclone copy from the crypt remote", f"rclone copy crypt: dst:{target}", env)
        self.minio_last = (backup_cfg, env)


def _empty_bucket(endpoint: Any, bucket: str) -> None:
    """Remove every object of ``bucket`` (created when missing): a restore's empty target."""
    client = s3_client(endpoint)
    with contextlib.suppress(client.exceptions.ClientError):  # it exists
        client.create_bucket(Bucket=bucket)
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=bucket, Delete={"Objects": keys})


def minio_incremental(bench: Bench) -> list[tuple[str, float, float]]:
    """1 % new objects, then the second run of drtool and rclone: (tool, full s, second s)."""
    src = bench.src.endpoints.minio
    bucket = bench.src.endpoints.buckets[0]
    client = s3_client(src)
    listed = [o for p in client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
              for o in p.get("Contents", [])]  # fmt: skip
    mean = sum(o["Size"] for o in listed) // max(1, len(listed))
    rng = random.Random(14)
    for i in range(max(1, len(listed) // 100)):
        client.put_object(Bucket=bucket, Key=f"rooms/new/{i}.jpg", Body=rng.randbytes(mean),
                          ContentType="image/jpeg")  # fmt: skip
    backup_cfg, env = bench.minio_last
    rows = []
    run, _ = bench.drtool(
        "drtool backup --component minio, 1 % new", backup_cfg, "backup", "--component", "minio"
    )
    rows.append(("drtool", bench.table.median(MINIO[0]), run.wall))
    run = bench.sh(
        "rclone copy to a crypt remote, 1 % new", f"rclone copy src:{bucket} crypt:", env
    )
    rows.append(("rclone-crypt", bench.table.median(MINIO[1]), run.wall))
    return rows


def _stored(endpoint: Any, bucket: str, prefix: str) -> int:
    """Bytes of the objects under ``prefix`` of ``bucket``."""
    pages = s3_client(endpoint).get_paginator("list_objects_v2")
    return sum(
        o["Size"]
        for page in pages.paginate(Bucket=bucket, Prefix=prefix)
        for o in page.get("Contents", [])
    )


def day_like_change(ep: PostgresEndpoint) -> tuple[int, int]:
    """0.1 % of the most recent messages edited, then 0.9 % new ones: (edited, new).

    bench_dedup.py makes the same change."""
    import psycopg

    with psycopg.connect(**ep.connect_kwargs(), autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM messages").fetchone()
        total = int(row[0]) if row else 0
        edited, new = max(1, total // 1000), max(1, total * 9 // 1000)
        conn.execute(
            "UPDATE messages SET content = left(content, 3900) || ' (edited)', "
            "edited_at = created_at + interval '1 minute' WHERE (id, created_at) IN "
            "(SELECT id, created_at FROM messages ORDER BY created_at DESC LIMIT %s)",
            (edited,),
        )
        conn.execute("SELECT setseed(%s)", (random.Random(14).random(),))
        conn.execute(
            "INSERT INTO messages (room_id, sender_id, kind, content, created_at) "
            "SELECT s.room_id, s.sender_id, 'text', md5(s.id::text) || ' ' || left(s.content, "
            "3000), top.t + s.n * interval '1 second' FROM (SELECT room_id, sender_id, id, "
            "content, row_number() OVER () AS n FROM (SELECT * FROM messages "
            "ORDER BY random() LIMIT %s) picked) s, "
            "(SELECT max(created_at) AS t FROM messages) top",
            (new,),
        )
    return edited, new


def incremental(bench: Bench, made: dict[str, Any]) -> list[tuple[str, int, int, float]]:
    """The second run of each tool after the change: (tool, first bytes, second bytes, s)."""
    dump = f"{bench.pg_dump} -Fc -Z0 -d {bench.db}"
    rows = []
    borg, restic = made["borg"], made["restic"]
    first = dir_bytes(borg)
    run = bench.sh(
        "borg create, second day",
        f"{dump} | borg create --compression zstd,3 --stdin-name dump.pgdump {borg}::day2 -",
        bench.peer_env,
    )
    rows.append(("borg", first, dir_bytes(borg) - first, run.wall))
    first = dir_bytes(restic)
    run = bench.sh(
        "restic backup --stdin, second day",
        f"{dump} | restic -q --repo {restic} backup --stdin --stdin-filename dump.pgdump",
        bench.peer_env,
    )
    rows.append(("restic", first, dir_bytes(restic) - first, run.wall))
    backup_cfg, _, _ = made["drtool"]
    before = bench.table.runs["drtool backup --component postgres"][-1].stored
    run, result = bench.drtool(
        "drtool backup, second day", backup_cfg, "backup", "--component", "postgres"
    )
    rows.append(("drtool", before, result["components"][0]["stored_bytes"], run.wall))
    piped = made["piped"]
    again = bench.out / "pipe-day2.zst.age"
    run = bench.sh(
        "stock pipe, second day",
        f"{dump} | zstd -3 -q -c | age -r {bench.age_recipient} > {again}",
        bench.src_env,
    )
    rows.append(("zstd | age (a new file)", piped.stat().st_size, again.stat().st_size, run.wall))
    return rows


THREADED = "drtool backup, backup.compression_threads = 1"
BACKUPS = [
    "floor: pg_dump -Fc -Z0 > /dev/null",
    "pg_dump -Fc -Z0 | zstd -3 | age > file",
    "borg create --compression zstd,3 (stdin)",
    "drtool backup --component postgres",
    THREADED,
    "restic backup --stdin",
    "pg_dump -Fc (gzip-6) > file",
]
RESTORES = [
    "restore: pg_restore -j2 local -Fc file",
    "restore: age -d | zstd -d | pg_restore",
    "restore: borg extract | pg_restore",
    "drtool restore --component postgres (verified)",
    "restore: restic dump | pg_restore",
]
MINIO = ["drtool backup --component minio (full)", "rclone copy to a crypt remote"]
MINIO_RESTORES = [
    "drtool restore --component minio (verified)",
    "rclone copy from the crypt remote",
]


def run_bench(bench: Bench) -> None:
    args = bench.args
    users, rooms = max(50, args.messages // 500), max(10, args.messages // 5000)
    sizes = SeedSizes(
        users=users, rooms=rooms, messages=args.messages, attachments=args.attachments
    )
    print(f"seeding {sizes} ...", flush=True)
    seeded = seed(bench.src.endpoints, sizes, 1, progress=False)
    print(f"seeded in {seeded.seconds:.0f} s: {seeded.objects} objects", flush=True)
    shell("warm-up", f"{bench.pg_dump} -Fc -Z0 -d {bench.db} > /dev/null", bench.src_env)

    made: dict[str, Any] = {}
    for n in range(1, args.rounds + 1):
        print(f"round {n} of {args.rounds} (load {os.getloadavg()[0]:.2f})", flush=True)
        if not args.minio_only:
            made = bench.backups(n)
            bench.restores(made)
        if not args.skip_minio:
            bench.minio(n)
        if n < args.rounds and not args.minio_only:  # the last round's take the second day
            for name in ("piped", "gz"):
                made[name].unlink()
    minio_second = [] if args.skip_minio else minio_incremental(bench)
    if args.minio_only:
        report_load(bench, seeded.objects)
        report_minio(bench, minio_second)
        return
    edited, new = day_like_change(bench.src.endpoints.postgres)
    second = incremental(bench, made)
    report(bench, seeded.objects, edited, new, second)
    if not args.skip_minio:
        report_minio(bench, minio_second)


def report_load(bench: Bench, objects: int) -> None:
    """The size, the load average and what the columns mean."""
    table, args = bench.table, bench.args
    loads = table.loads
    now = os.getloadavg()
    print(
        f"\n{args.messages:,} messages, {objects} objects; {args.rounds} interleaved rounds; "
        f"load average at the runs' start: median {statistics.median(loads):.2f}, "
        f"min {min(loads):.2f}, max {max(loads):.2f} (now {now[0]:.2f} {now[1]:.2f} "
        f"{now[2]:.2f}); {os.cpu_count()} CPUs"
    )
    print(
        "CPU s: the command and its descendants; srv CPU: every server of the bench (PostgreSQL "
        "backends, SeaweedFS); RSS: the largest process, max of the rounds; stored: median"
    )


def report_minio(bench: Bench, second: list[tuple[str, float, float]]) -> None:
    """The bucket's snapshot and restore against rclone-crypt, and the 1 % incremental."""
    table = bench.table
    table.print("MinIO bucket to the off-site S3 server", MINIO)
    drt, rcl = (table.median(n) for n in MINIO)
    stored = statistics.median(r.stored for r in table.runs[MINIO[0]])
    print(
        f"drtool {stored / MB / drt:.1f} MB/s stored, rclone-crypt "
        f"{statistics.median(r.stored for r in table.runs[MINIO[1]]) / MB / rcl:.1f} MB/s; "
        f"drtool / rclone wall = {drt / rcl:.2f} (target <= 1.0)"
    )
    table.print("MinIO bucket restored into the target stack's (emptied) bucket", MINIO_RESTORES)
    drt, rcl = (table.median(n) for n in MINIO_RESTORES)
    print(f"drtool / rclone wall = {drt / rcl:.2f} (target <= 1.0)")
    print(f"\n1 % new objects, second run{'':14} {'full s':>7} {'second s':>9} {'share':>7}")
    for tool, full, more in second:
        print(f"{tool:40} {full:7.2f} {more:9.2f} {more / full:7.1%}")
    print("drtool's share target: <= 5 % of the full")


def report(
    bench: Bench, objects: int, edited: int, new: int, second: list[tuple[str, int, int, float]]
) -> None:
    table = bench.table
    plain = table.runs["drtool backup --component postgres"][0]
    report_load(bench, objects)
    table.print("PostgreSQL backup", BACKUPS)
    table.print("PostgreSQL restore", RESTORES)
    print(
        f"\nsecond day ({new:,} new messages = 0.9 %, {edited:,} recent ones edited = 0.1 %): "
        f"bytes stored by the second run"
    )
    print(f"{'tool':26} {'first MB':>9} {'second MB':>10} {'share':>7} {'wall s':>7}")
    for tool, first, more, wall in second:
        print(f"{tool:26} {first / MB:9.1f} {more / MB:10.1f} {more / first:7.1%} {wall:7.2f}")
    borg = table.median(BACKUPS[2])
    dr, restores = table.median(BACKUPS[3]), [table.median(n) for n in RESTORES]
    best_pipe = min(restores[1], restores[2], restores[4])  # the streams: age, borg, restic
    print(
        f"\ndrtool backup / borg = {dr / borg:.2f} (target <= 0.9); drtool restore / best peer "
        f"pipeline = {restores[3] / best_pipe:.2f} (target <= 0.9), / pg_restore -j2 of a "
        f"local file = {restores[3] / restores[0]:.2f}; plain dump "
        f"{plain.extra.get('plain', 0) / MB:.0f} MB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--attachments", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-minio", action="store_true", help="PostgreSQL only")
    parser.add_argument("--minio-only", action="store_true", help="the MinIO part only")
    parser.add_argument("--drtool", default=str(DRTOOL), help="the drtool to measure")
    args = parser.parse_args()
    ensure_peers()
    work = Path(tempfile.mkdtemp(prefix="drtool-bench-peers-"))
    work.chmod(0o711)  # PostgreSQL runs as its own user and must enter it
    bench_backup._SERVERS = str(work)  # measure(): servers are the processes under work
    src = stack_up(work, "peerssrc").stack
    dst: LocalStack | None = None
    offsite = SeaweedServer(work / "offsite-s3")
    try:
        dst = stack_up(work, "peersdst").stack
        offsite.start()
        run_bench(Bench(args, work, src, dst, offsite))
    finally:
        cleanups: list[Callable[[], None]] = [offsite.stop, src.down]
        if dst is not None:
            cleanups.insert(0, dst.down)
        for cleanup in cleanups:
            cleanup()
        subprocess.run(["rm", "-rf", str(work)], check=False)


if __name__ == "__main__":
    main()
