"""The whole stack at one moment against the nightly snapshot: RTO of each restore, and the
RPO per store the canaries measure in each restored copy (issue 13, benchmark).

Usage: python bench/bench_stack_at.py [--messages 1000000] [--minutes 5] [--rate 50]
       [--canary-interval 60] [--capture-interval 60] [--json]

A local co-talk stack (PostgreSQL, Redis, SeaweedFS) is seeded with ``--messages``; a second
local stack is the restore target (``[targets.second]`` of the operator config). Then, as a
deployment runs them: ``drtool wal stream`` (bench/bench_rpo.py's config), a base backup
(``--component postgres-base``), canaries written to each store every
``--canary-interval`` seconds (``drtool.stores.canary``, as ``drtool schedule run`` does),
the "nightly" full snapshot (``drtool backup``), ``drtool capture run`` every
``--capture-interval`` seconds, and ``chat_stack.traffic`` (``--rate`` messages/s,
``--share`` with a small attachment) for ``--minutes``.

The loss moment T is the end of the traffic (the canaries stop there too). Once the WAL is
sealed past T and a capture round started after it:

(a) ``drtool restore --at T --into DIR --target second`` (PostgreSQL into a new data
    directory, Redis and the bucket into the second stack);
(b) the second stack's Redis and bucket emptied, ``drtool restore latest --target second``
    (the nightly snapshot: PostgreSQL by pg_restore into the second stack's server).

Each restore is measured the same way: wall time, the CPU and peak RSS of the drtool process
and the children it waited for (``os.wait4``), and the CPU of the PostgreSQL server that did
the work (the copy's postmaster with its reaped startup process for (a); the second stack's
server, before/after, for (b)). Redis's and SeaweedFS's own CPU are not counted. For each
restored copy: each store's **measured RPO** (T minus the newest canary it holds), and for
(a) the skew and effective moment the plan reported. The load average is printed at the
start and the end: the machine may be shared.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_capture import wait_round_after  # noqa: E402
from bench_rpo import with_wal  # noqa: E402
from procstat import cpu_tree_s, load_average  # noqa: E402
from repo_setup import DRTOOL  # noqa: E402

from chat_stack.seed import SeedSizes, seed  # noqa: E402
from chat_stack.traffic import AttachmentMix, run_traffic  # noqa: E402
from drtool.capture.state import state_path  # noqa: E402
from drtool.config import load_config  # noqa: E402
from drtool.endpoints import StackEndpoints  # noqa: E402
from drtool.repository.access import open_repo  # noqa: E402
from drtool.runtime.local import LocalStack  # noqa: E402
from drtool.s3session import s3_client  # noqa: E402
from drtool.services.repo_setup import set_up_repository  # noqa: E402
from drtool.services.restore.pitr_recover import stop as stop_copy  # noqa: E402
from drtool.services.stack import stack_config  # noqa: E402
from drtool.sources.redis_client import connect as connect_redis  # noqa: E402
from drtool.stores import canary  # noqa: E402
from drtool.wal.index import load_index  # noqa: E402

TARGET = "second"


@dataclass
class Measured:
    """One restore: what it cost and what its copy holds."""

    command: str
    wall_s: float = 0.0
    drtool_cpu_s: float = 0.0
    drtool_rss_mib: float = 0.0
    postgres_cpu_s: float = 0.0
    exit_code: int = 0
    error: str = ""
    store_seconds: dict[str, float] = field(default_factory=dict)  # as the restore reported
    newest_canary: dict[str, str | None] = field(default_factory=dict)
    measured_rpo_s: dict[str, float | None] = field(default_factory=dict)
    reported_rpo_s: dict[str, float | None] = field(default_factory=dict)  # (a): its own
    skew_s: dict[str, float | None] = field(default_factory=dict)  # (a): the plan's
    effective: dict[str, str | None] = field(default_factory=dict)  # (a): the plan's
    checks_passed: bool | None = None
    messages: int = 0  # rows of messages in the restored copy


@dataclass
class Run:
    """The parameters and figures of one benchmark run."""

    messages: int
    minutes: float
    rate: float
    canary_interval_s: float
    capture_interval_s: float
    load_start: str
    seed_s: float = 0.0
    base_backup_s: float = 0.0
    nightly_s: float = 0.0
    nightly_at: str = ""
    moment: str = ""
    traffic_messages: int = 0
    source_messages: int = 0  # rows of messages in the source at T
    canary_rounds: int = 0
    canary_failures: int = 0
    at: Measured | None = None
    nightly: Measured | None = None
    load_end: str = ""


def timed(argv: list[str], env: dict[str, str], out: Path) -> tuple[int, float, float, float]:
    """Run ``argv`` (stdout to ``out``): exit code, wall s, CPU s and peak RSS MiB of it and
    the children it waited for (``wait4``: this process only, not the bench's others)."""
    started = time.perf_counter()
    with open(out, "w") as stdout, open(out.with_suffix(".err"), "w") as stderr:
        proc = subprocess.Popen(argv, env=env, stdout=stdout, stderr=stderr)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    return proc.returncode, wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


def postmaster_pid(data_dir: Path) -> int:
    return int((data_dir / "postmaster.pid").read_text().splitlines()[0])


def canary_loop(ep: StackEndpoints, every: float, stop: threading.Event, run: Run) -> None:
    """A canary round now and every ``every`` seconds until ``stop`` (schedule run's loop)."""
    while True:
        written = canary.write_canaries(ep, ep.buckets)
        run.canary_rounds += 1
        run.canary_failures += len(written.failed)
        if stop.wait(every):
            return


def read_canaries(ep: StackEndpoints, moment: datetime, measured: Measured) -> None:
    """The newest canary in each store of a restored copy, and T minus it."""
    newest = canary.newest_canaries(ep, ep.buckets)
    measured.newest_canary = {k: v.isoformat() if v else None for k, v in newest.items()}
    measured.measured_rpo_s = canary.measured_rpo(moment, newest)
    measured.messages = count_messages(ep)


def count_messages(ep: StackEndpoints) -> int:
    with psycopg.connect(**ep.postgres.connect_kwargs()) as conn:
        row = conn.execute("SELECT count(*) FROM messages").fetchone()
    return int(row[0]) if row else 0


def empty_target(ep: StackEndpoints) -> None:
    """The second stack's Redis and buckets emptied (its PostgreSQL is never written by (a))."""
    client = connect_redis(ep.redis)
    try:
        client.flushall()
    finally:
        client.close()
    s3 = s3_client(ep.minio)
    for bucket in ep.buckets:
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                s3.delete_objects(Bucket=bucket, Delete={"Objects": keys})


def wait_sealed_past(operator: Path, moment: datetime, timeout: float) -> None:
    """Until the repository's WAL index holds a segment sealed after ``moment``."""
    repo = open_repo(load_config(operator, {}))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        index = load_index(repo.storage, repo.verify_keys, repo.info.repo_id)
        if any(datetime.fromisoformat(e.sealed) > moment for e in index.segments()):
            return
        time.sleep(2)
    raise SystemExit(f"no WAL segment sealed after {moment.isoformat()} within {timeout:.0f} s")


def restore_at(
    operator: Path, env: dict[str, str], work: Path, moment: datetime, source: StackEndpoints,
    second: StackEndpoints,
) -> Measured:  # fmt: skip
    """(a) The whole stack at T: PostgreSQL into a new DIR, Redis and the bucket into second."""
    into = work / "restored-at"
    argv = [str(DRTOOL), "--config", str(operator), "restore", "--at", moment.isoformat(),
            "--into", str(into), "--target", TARGET, "--yes", "--json"]  # fmt: skip
    m = Measured(" ".join(["drtool", *argv[1:]]))
    out = work / "restore-at.json"
    m.exit_code, m.wall_s, m.drtool_cpu_s, m.drtool_rss_mib = timed(argv, env, out)
    if m.exit_code != 0:
        m.error = out.with_suffix(".err").read_text().strip()[-500:]
        return m
    doc = json.loads(out.read_text())
    pitr = doc["pitr"]
    data_dir = Path(pitr["data_dir"])
    try:
        m.postgres_cpu_s = cpu_tree_s(postmaster_pid(data_dir))
        m.store_seconds = {**doc.get("seconds", {}), "total (restore_s)": doc.get("restore_s", 0)}
        m.reported_rpo_s = doc.get("measured_rpo_s", {})
        m.skew_s = {p["store"]: p.get("skew_s") for p in doc.get("plan", [])}
        m.effective = {p["store"]: p.get("effective") for p in doc.get("plan", [])}
        m.checks_passed = bool(doc.get("ok"))
        copy = replace(
            second, postgres=replace(source.postgres, host="127.0.0.1", port=pitr["port"])
        )
        read_canaries(copy, moment, m)
    finally:
        stop_copy(Path(pitr["pg_ctl"]).parent, data_dir)
        shutil.rmtree(into, ignore_errors=True)
    return m


def restore_nightly(
    operator: Path, env: dict[str, str], work: Path, moment: datetime, second: LocalStack
) -> Measured:
    """(b) The nightly snapshot (``latest``) into the emptied second stack."""
    empty_target(second.endpoints)
    argv = [str(DRTOOL), "--config", str(operator), "restore", "latest", "--target", TARGET,
            "--yes", "--json"]  # fmt: skip
    m = Measured(" ".join(["drtool", *argv[1:]]))
    out = work / "restore-nightly.json"
    server = postmaster_pid(second.postgres.data_dir)
    before = cpu_tree_s(server)
    m.exit_code, m.wall_s, m.drtool_cpu_s, m.drtool_rss_mib = timed(argv, env, out)
    m.postgres_cpu_s = cpu_tree_s(server) - before
    if m.exit_code != 0:
        m.error = out.with_suffix(".err").read_text().strip()[-500:]
        return m
    doc = json.loads(out.read_text())
    m.store_seconds = {c["name"]: c.get("seconds", 0.0) for c in doc.get("components", [])}
    m.store_seconds["total (seconds)"] = doc.get("seconds", 0.0)
    m.checks_passed = not any(c.get("problems") for c in doc.get("components", []))
    read_canaries(second.endpoints, moment, m)
    return m


def run_bench(args: argparse.Namespace, work: Path, src: LocalStack, second: LocalStack) -> Run:  # noqa: PLR0915
    run = Run(
        args.messages, args.minutes, args.rate, args.canary_interval, args.capture_interval,
        load_average(),
    )  # fmt: skip
    ep = src.endpoints
    print(f"seeding {args.messages:,} messages ...", flush=True)
    t = time.perf_counter()
    users = max(100, args.messages // 100)
    sizes = SeedSizes(users, max(10, users // 10), args.messages, max(20, args.messages // 1000))
    seed(ep, sizes, 1, progress=False)
    run.seed_s = time.perf_counter() - t
    setup = set_up_repository(
        work / "setup",
        {"url": (work / "repo").as_uri()},
        stores=stack_config(src),
        state_dir=work / "state",
        operator_stores=True,
        operator_extra={
            "targets": {TARGET: stack_config(second)},
            "backup": {"scratch_dir": str(work)},
        },
        label="bench",
    )
    backup, operator = with_wal(setup.backup_config), with_wal(setup.operator_config)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DRTOOL_")}
    env["DRTOOL_HOME"] = str(work / "home")
    streamer = subprocess.Popen(
        [str(DRTOOL), "--config", str(backup), "wal", "stream"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    capture: subprocess.Popen[bytes] | None = None
    stop_canaries, stop_traffic = threading.Event(), threading.Event()
    canaries = threading.Thread(
        target=canary_loop, args=(ep, args.canary_interval, stop_canaries, run), daemon=True
    )
    try:
        print("base backup ...", flush=True)
        t = time.perf_counter()
        subprocess.run(
            [str(DRTOOL), "--config", str(backup), "backup", "--component", "postgres-base"],
            env=env, check=True, capture_output=True,
        )  # fmt: skip
        run.base_backup_s = time.perf_counter() - t
        canaries.start()
        time.sleep(1)  # the first round's canaries are in before the nightly starts
        print("nightly snapshot ...", flush=True)
        t = time.perf_counter()
        run.nightly_at = datetime.now(UTC).isoformat()
        subprocess.run(
            [str(DRTOOL), "--config", str(backup), "backup"],
            env=env, check=True, capture_output=True,
        )  # fmt: skip
        run.nightly_s = time.perf_counter() - t
        config = work / "capture.toml"
        config.write_text(
            backup.read_text() + f"\n[capture]\ninterval_s = {args.capture_interval}\n"
        )
        config.chmod(0o600)
        repo_id = open_repo(load_config(operator, {})).info.repo_id
        state_file = state_path(work / "state", repo_id)
        started = datetime.now(UTC)
        with open(work / "capture.log", "w") as log:
            capture = subprocess.Popen(
                [str(DRTOOL), "--config", str(config), "capture", "run"],
                env=env, stdout=log, stderr=log,
            )  # fmt: skip
        wait_round_after(state_file, started, 120, capture)
        print(f"traffic {args.rate:g}/s for {args.minutes:g} min ...", flush=True)
        mix = AttachmentMix(args.share, 1024, 200_000)
        stats: list[Any] = []
        traffic = threading.Thread(
            target=lambda: stats.append(
                run_traffic(ep, args.rate, args.minutes * 60, 7, stop_traffic, mix)
            ),
            daemon=True,
        )
        traffic.start()
        traffic.join()
        stop_canaries.set()
        canaries.join()
        moment = datetime.now(UTC)  # the loss: nothing written after it counts
        run.moment = moment.isoformat()
        run.source_messages = count_messages(ep)
        run.traffic_messages = stats[0].messages if stats else 0
        print(f"loss at {run.moment}; waiting for the WAL and a capture round past it", flush=True)
        wait_round_after(state_file, moment, args.capture_interval * 2 + 120, capture)
        wait_sealed_past(operator, moment, 300)
    finally:
        stop_traffic.set()
        stop_canaries.set()
        for proc in (capture, streamer):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(120)
    print("(a) restore --at ...", flush=True)
    run.at = restore_at(operator, env, work, moment, ep, second.endpoints)
    print("(b) restore latest (the nightly) ...", flush=True)
    run.nightly = restore_nightly(operator, env, work, moment, second)
    run.load_end = load_average()
    return run


def print_table(run: Run) -> None:
    a, b = run.at, run.nightly
    assert a is not None and b is not None

    def fmt(v: float | None, spec: str = ".1f") -> str:
        return "-" if v is None else format(v, spec)

    print(
        f"\n{run.messages:,} seeded messages; {run.traffic_messages:,} more by traffic "
        f"({run.rate:g}/s, {run.minutes:g} min); canaries every {run.canary_interval_s:g} s "
        f"({run.canary_rounds} rounds, {run.canary_failures} store writes failed); capture "
        f"every {run.capture_interval_s:g} s; seed {run.seed_s:.0f} s, base backup "
        f"{run.base_backup_s:.1f} s, nightly snapshot {run.nightly_s:.1f} s at {run.nightly_at}"
    )
    print(f"loss moment T = {run.moment}\n")
    print("| measure | (a) restore --at T (whole stack) | (b) restore latest (nightly) |")
    print("|---|---|---|")
    rows = [
        ("exit code", str(a.exit_code), str(b.exit_code)),
        ("RTO: wall s", fmt(a.wall_s), fmt(b.wall_s)),
        ("drtool CPU s (with waited children)", fmt(a.drtool_cpu_s), fmt(b.drtool_cpu_s)),
        ("drtool peak RSS MiB (largest process)", fmt(a.drtool_rss_mib), fmt(b.drtool_rss_mib)),
        ("PostgreSQL server CPU s", fmt(a.postgres_cpu_s), fmt(b.postgres_cpu_s)),
        ("checks passed", str(a.checks_passed), str(b.checks_passed)),
        (
            f"messages in the copy (source at T: {run.source_messages:,})",
            f"{a.messages:,}",
            f"{b.messages:,}",
        ),
    ]
    for name, m in (("a", a), ("b", b)):
        for store, s in m.store_seconds.items():
            rows.append((f"seconds reported: {store}", fmt(s) if name == "a" else "",
                         fmt(s) if name == "b" else ""))  # fmt: skip
    stores = sorted(set(a.measured_rpo_s) | set(b.measured_rpo_s))
    for store in stores:
        rows.append(
            (f"measured RPO s (canary): {store}",
             fmt(a.measured_rpo_s.get(store)), fmt(b.measured_rpo_s.get(store)))
        )  # fmt: skip
    for store, skew in a.skew_s.items():
        rows.append((f"plan skew s: {store}", fmt(skew), "-"))
    for store, rpo in a.reported_rpo_s.items():
        rows.append((f"restore's own measured RPO s: {store}", fmt(rpo), "-"))
    for name, va, vb in rows:
        if va or vb:
            print(f"| {name} | {va} | {vb} |")
    for m in (a, b):
        if m.error:
            print(f"error in `{m.command}`: {m.error}")
    print(f"\n(a) `{a.command}`\n(b) `{b.command}`")
    print(f"start: {run.load_start}\nend: {run.load_end}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=1_000_000, help="seeded [1000000]")
    parser.add_argument("--minutes", type=float, default=5.0, help="traffic before T [5]")
    parser.add_argument("--rate", type=float, default=50.0, help="messages per second [50]")
    parser.add_argument("--share", type=float, default=0.1, help="share with an attachment")
    parser.add_argument("--canary-interval", type=float, default=60.0, help="seconds [60]")
    parser.add_argument("--capture-interval", type=float, default=60.0, help="seconds [60]")
    parser.add_argument("--json", action="store_true", help="print the run as JSON")
    args = parser.parse_args()
    print(f"start: {load_average()}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="drtool-bench-stack-at-", dir="/var/tmp"))
    work.chmod(0o711)  # PostgreSQL runs as its own user and must enter it
    src = LocalStack.up(work / "stack", "stackat-src")
    second: LocalStack | None = None
    try:
        second = LocalStack.up(work / "second", "stackat-second")
        run = run_bench(args, work, src, second)
    finally:
        if second is not None:
            second.down()
        src.down()
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(asdict(run), indent=1, default=str))
    else:
        print_table(run)


if __name__ == "__main__":
    main()
