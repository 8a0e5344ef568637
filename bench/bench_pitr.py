"""Benchmark ``drtool restore --at`` (restore to a moment) against its floor on the same data.

Usage: python bench/bench_pitr.py [--rows 1000000] [--after-rows 300000] [--runs 2]

A PostgreSQL 15 and a ``file://`` repository are set up in a temp dir. ``--rows`` rows
(~150 bytes each) are loaded, ``drtool wal stream`` starts, a base backup is taken
(``drtool backup --component postgres-base``), ``--after-rows`` more rows are committed, the
target moment is read, one more row commits, and the streamer seals everything and stops.

- **drtool**: ``drtool restore --component postgres --at T --into DIR --yes``: fetch,
  authenticate, decrypt and check the base and the WAL into staging, extract, recover, promote.
- **floor**: the same base tar and WAL already decrypted on local disk (prepared untimed);
  timed: GNU tar into a new data dir, the same recovery settings (``restore_command = cp``
  from the local dir, the same target), ``pg_ctl start`` until promoted.

Both run alternately ``--runs`` times (the machine may be shared); medians are shown, with the
load average. Both restored copies are checked to hold the same number of rows.
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
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
import tomli_w

from drtool import keys
from drtool.config import load_config
from drtool.endpoints import PostgresEndpoint
from drtool.pipeline.seal import unseal
from drtool.repository import catalog
from drtool.repository.access import open_repo, snapshot_header
from drtool.runtime.binaries import pg_bin_dir
from drtool.runtime.pgserver import PostgresServer
from drtool.services import repo as repo_svc
from drtool.services.restore import pitr_recover
from drtool.wal.index import load_index
from drtool.wal.names import parse_lsn, parse_segment, segment_of_lsn
from drtool.wal.sealer import wal_header

DRTOOL = str(Path(sys.executable).with_name("drtool"))
SEG = 16 * 1024 * 1024


def _write(path: Path, doc: dict[str, Any]) -> Path:
    path.write_bytes(tomli_w.dumps(doc).encode())
    return path


def _configs(root: Path, server: PostgresServer) -> tuple[Path, Path, Path]:
    (root / "keys").mkdir(mode=0o700)
    identity = root / "keys" / "operator.key"
    recipient = keys.write_identity(identity, passphrase=None)
    verify_key = keys.write_signing_key(root / "keys" / "signing.key")
    password = root / "keys" / "pg-password"
    password.write_text(server.password)
    password.chmod(0o600)
    ep = server.endpoint
    pg = {
        "host": ep.host,
        "port": ep.port,
        "user": ep.user,
        "dbname": ep.dbname,
        "password_file": str(password),
    }
    url = (root / "repository").as_uri()
    backup = _write(
        root / "backup.toml",
        {
            "repository": {"url": url},
            "keys": {
                "recipients": [recipient],
                "signing_key_file": str(root / "keys" / "signing.key"),
                "verify_key": verify_key,
            },
            "postgres": pg,
            "backup": {"state_dir": str(root / "state")},
            "wal": {"spool_dir": str(root / "spool"), "slot": "bench", "flush_interval": 2.0},
        },
    )
    operator = _write(
        root / "operator.toml",
        {
            "repository": {"url": url},
            "keys": {"identity_file": str(identity), "verify_key": verify_key},
            "postgres": pg,
        },
    )
    repo_svc.init_repo(load_config(backup, {}))
    return backup, operator, identity


def _one(ep: PostgresEndpoint, query: str) -> str:
    with psycopg.connect(**ep.connect_kwargs(), autocommit=True) as conn:
        row = conn.execute(query).fetchone()
    assert row is not None
    return str(row[0])


def _load(ep: PostgresEndpoint, rows: int) -> None:
    with psycopg.connect(**ep.connect_kwargs(), autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS bench (id bigserial primary key, room int, body text)"
        )
        done = 0
        while done < rows:
            n = min(100_000, rows - done)
            conn.execute(
                "INSERT INTO bench (room, body) SELECT g %% 500, repeat(md5(g::text), 4) "
                "FROM generate_series(1, %s) g",
                (n,),
            )
            done += n


def _history(root: Path, server: PostgresServer, backup: Path, args: argparse.Namespace) -> str:
    """Load, stream, base backup, more writes; returns the target moment (ISO, with zone)."""
    ep = server.endpoint
    _load(ep, args.rows)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DRTOOL_")}
    log = (root / "stream.log").open("ab")
    proc = subprocess.Popen(
        [DRTOOL, "--config", str(backup), "wal", "stream"], env=env, stdout=log, stderr=log
    )
    try:
        time.sleep(3)
        subprocess.run(
            [DRTOOL, "--config", str(backup), "backup", "--component", "postgres-base"],
            env=env,
            check=True,
            capture_output=True,
        )
        _load(ep, args.after_rows)
        target = _one(ep, "SELECT clock_timestamp()")
        time.sleep(0.05)
        _load(ep, 1)
        end = parse_lsn(_one(ep, "SELECT pg_current_wal_insert_lsn()"))
        needed = segment_of_lsn(end, 1, SEG).segno
        cfg = load_config(backup, {})
        repo = open_repo(cfg)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            index = load_index(repo.storage, repo.verify_keys, repo.info.repo_id)
            if any(parse_segment(e.name, SEG).segno >= needed for e in index.segments()):
                break
            time.sleep(1)
        else:
            raise SystemExit("the streamer did not seal the WAL in time")
    finally:
        proc.terminate()
        proc.wait(60)
        log.close()
    return datetime.fromisoformat(target).isoformat()


def _prepare_floor(root: Path, operator: Path, identity: Path) -> tuple[Path, Path]:
    """The base tar and every WAL file, decrypted to local disk (untimed)."""
    cfg = load_config(operator, {})
    repo = open_repo(cfg)
    ids = keys.load_identities(identity, None)
    records = catalog.list_snapshots(repo.storage, repo.verify_keys, repo.info.repo_id)
    m = next(r.manifest for r in records if r.manifest and r.manifest.component("postgres-base"))
    assert m is not None
    comp = m.component("postgres-base")
    assert comp is not None
    obj = comp.objects[0]
    tar = root / "floor-base.tar"
    with tar.open("wb") as out:
        for piece in unseal(
            repo.storage.get(obj.key),
            identities=ids,
            expected=snapshot_header(m, "postgres-base", obj.kind),
            name=obj.key,
        ):
            out.write(piece)
    wal = root / "floor-wal"
    wal.mkdir()
    index = load_index(repo.storage, repo.verify_keys, repo.info.repo_id)
    for entry in index.entries.values():
        with (wal / entry.name).open("wb") as out:
            for piece in unseal(
                repo.storage.get(entry.key),
                identities=ids,
                expected=wal_header(repo.info.repo_id, entry.name),
                name=entry.key,
            ):
                out.write(piece)
    pitr_recover.chown_tree(wal)
    tar.chmod(0o644)
    return tar, wal


def _count(port: int, password: str) -> int:
    ep = PostgresEndpoint("127.0.0.1", port, "postgres", "cotalk", password)
    return int(_one(ep, "SELECT count(*) FROM bench"))


def _floor(root: Path, tar: Path, wal: Path, target: str, password: str) -> tuple[float, int]:
    bin_dir = pg_bin_dir(major=15)
    data = root / "floor-data"
    log = root / "floor.log"
    log.touch()
    pitr_recover.chown_tree(log)
    port = 0
    from drtool.runtime.procs import free_port_block

    port = free_port_block((0,), set())
    t = time.perf_counter()
    pitr_recover.extract(tar, data, timeout=3600)
    pitr_recover.write_settings(data, pitr_recover.RecoverySettings(wal, port, target_time=target))
    outcome = pitr_recover.start_and_wait(bin_dir, data, log, timeout=3600)
    seconds = time.perf_counter() - t
    if not outcome.promoted:
        raise SystemExit(f"floor recovery failed: {outcome.log_tail}")
    rows = _count(port, password)
    pitr_recover.stop(bin_dir, data)
    shutil.rmtree(data)
    log.unlink()
    return seconds, rows


def _drtool(root: Path, operator: Path, target: str, password: str) -> tuple[float, int]:
    into = root / "drtool-data"
    t = time.perf_counter()
    done = subprocess.run(
        [
            DRTOOL,
            "--config",
            str(operator),
            "restore",
            "--component",
            "postgres",
            "--at",
            target,
            "--into",
            str(into),
            "--yes",
            "--json",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    seconds = time.perf_counter() - t
    if done.returncode != 0:
        raise SystemExit(f"drtool restore failed ({done.returncode}): {done.stderr[-2000:]}")
    out = json.loads(done.stdout)
    print(
        f"drtool: {out['segments_staged']} segments staged, {out['recovery_starts']} recovery "
        f"start(s), reached {out['reached_time']}, phases {out['phases']}",
        file=sys.stderr,
    )
    rows = _count(int(out["port"]), password)
    pitr_recover.stop(Path(out["pg_ctl"]).parent, into)
    shutil.rmtree(into)
    Path(out["log"]).unlink(missing_ok=True)
    return seconds, rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--after-rows", type=int, default=300_000)
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="drtool-bench-pitr-", dir="/var/tmp"))
    root.chmod(0o711)
    server = PostgresServer(root / "pg", major=15, settings={"fsync": "off"})
    server.start()
    try:
        backup, operator, identity = _configs(root, server)
        target = _history(root, server, backup, args)
        tar, wal = _prepare_floor(root, operator, identity)
        results: dict[str, list[float]] = {"floor": [], "drtool": []}
        rows: dict[str, set[int]] = {"floor": set(), "drtool": set()}
        for _ in range(args.runs):
            for name in ("floor", "drtool"):
                if name == "floor":
                    s, n = _floor(root, tar, wal, target, server.password)
                else:
                    s, n = _drtool(root, operator, target, server.password)
                results[name].append(s)
                rows[name].add(n)
        base_mb = tar.stat().st_size / 2**20
        wal_files = len(list(wal.iterdir()))
        print(
            f"\nrestore to a moment, PostgreSQL 15: base tar {base_mb:.0f} MiB, {wal_files} WAL "
            f"files held, target {target}; load average {os.getloadavg()[0]:.1f}"
        )
        print(f"{'variant':<8} {'median s':>9} {'runs':>24} {'rows':>10} {'vs floor':>9}")
        floor = statistics.median(results["floor"])
        for name, runs in results.items():
            med = statistics.median(runs)
            shown = ", ".join(f"{r:.1f}" for r in runs)
            print(
                f"{name:<8} {med:>9.1f} {shown:>24} {','.join(map(str, rows[name])):>10} "
                f"{med / floor:>8.2f}x"
            )
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
