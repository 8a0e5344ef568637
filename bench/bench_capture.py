"""Continuous attachment capture under chat traffic: its measured RPO, what it costs, and
that its S3 requests do not grow with the bucket (issue 13, benchmark).

Usage: python bench/bench_capture.py [--minutes 10] [--rate 200] [--sizes 2000,20000]
       [--intervals 60] [--json]

A local co-talk stack (PostgreSQL, Redis, SeaweedFS) is seeded; the repository is an S3
bucket on the same SeaweedFS (so its requests can be counted too). For each bucket size in
``--sizes`` (the first phase fills the bucket up to it with small objects no row names, the
next phase adds to them) and each capture interval in ``--intervals``:

- ``drtool capture run`` runs as its own process (``capture.interval_s`` as given) through
  bench/s3_counted.py, which counts every S3 HTTP request it sends by bucket (botocore's
  ``before-send`` hook, retries and parts included);
- ``chat_stack.traffic`` writes ``--rate`` messages/s for ``--minutes``, ``--share`` of them
  with an attachment of ``--attachment-bytes`` (log-uniform);
- every ``--sample`` seconds the **attachments RPO** is sampled: the newest committed
  attachment row whose object exists in the source minus the newest row whose object is
  sealed into the repository (a signed chain record, its journal decrypted with the
  operator's identity; before the first one, the start of the traffic). Measured, not
  computed from the interval;
- after the traffic, one more capture round; then every attachment row the traffic wrote is
  looked up in the journal (missed = rows not journaled) and the blobs uploaded are counted
  (more than the rows = an object uploaded twice).

The capture's CPU seconds, peak RSS (VmHWM) and S3 requests per minute (source bucket,
repository bucket) are taken from its first round's end to its last round's end. The peer
column: ``rclone copy`` (Debian's, a baseline only) of the source bucket to a mirror bucket,
the periodic listing sync a user could run instead: the requests of one round that catches
up and of one round with nothing new, with rclone's defaults and with its cheapest flags
(``--size-only --fast-list``). The load average is printed at the start and the end: the
machine may be shared.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_copy import ensure_rclone, rclone_env  # noqa: E402
from procstat import cpu_s, hwm_mib, load_average  # noqa: E402

from chat_stack.seed import SeedSizes, seed  # noqa: E402
from chat_stack.traffic import AttachmentMix, run_traffic  # noqa: E402
from drtool.capture import chain as capture_chain  # noqa: E402
from drtool.capture.state import load_state, state_path  # noqa: E402
from drtool.config import load_config  # noqa: E402
from drtool.endpoints import StackEndpoints  # noqa: E402
from drtool.repository.access import Repo, identities_of, open_repo, read_object  # noqa: E402
from drtool.runtime.local import LocalStack  # noqa: E402
from drtool.s3session import s3_client  # noqa: E402
from drtool.services.repo_setup import set_up_repository  # noqa: E402
from drtool.services.stack import stack_config  # noqa: E402

COUNTED = Path(__file__).with_name("s3_counted.py")
REPO_BUCKET, MIRROR_BUCKET = "drtool-repo", "mirror"
NEWEST_ROWS = (
    "SELECT object_key, created_at FROM attachments WHERE created_at >= %s "
    "ORDER BY created_at DESC LIMIT 5"
)


@dataclass
class Phase:
    """One run of traffic + capture at one bucket size and capture interval."""

    objects_before: int
    interval_s: float
    minutes: float = 0.0
    messages: int = 0
    attachment_rows: int = 0
    attachment_mb: float = 0.0
    rpo_samples: list[float] = field(default_factory=list)
    rounds: list[tuple[float, int]] = field(default_factory=list)  # (seconds, objects)
    missed: int = 0
    uploaded: int = 0
    capture_cpu_s: float = 0.0
    capture_rss_mib: float = 0.0
    source_requests: dict[str, int] = field(default_factory=dict)
    repo_requests: dict[str, int] = field(default_factory=dict)
    rclone: dict[str, dict[str, int]] = field(default_factory=dict)
    load_start: str = ""
    load_end: str = ""

    def per_minute(self, counts: dict[str, int]) -> float:
        return sum(counts.values()) / self.minutes if self.minutes else 0.0

    def rpo(self, q: float) -> float | None:
        if not self.rpo_samples:
            return None
        if len(self.rpo_samples) < 2:
            return self.rpo_samples[0]
        return statistics.quantiles(self.rpo_samples, n=100, method="inclusive")[int(q) - 1]


class Sealed:
    """The newest attachment row whose object the repository holds, read as an operator would.

    Each new chain record's journal is decrypted once; its keys are mapped to their rows'
    ``created_at``. Only committed (signed) records count.
    """

    def __init__(self, repo: Repo, identities: list[str], conninfo: dict[str, Any]) -> None:
        self.repo, self.identities, self.conninfo = repo, identities, conninfo
        self.seen: set[int] = set()
        self.keys: set[str] = set()
        self.newest: datetime | None = None

    def refresh(self) -> list[tuple[float, int]]:
        """Read the records committed since the last call; (seconds, objects) of each round.

        A round's seconds run from its start (the record's ``created``) to its last object
        captured (``last_captured``): the time spent reading and sealing, without the journal.
        """
        rounds: list[tuple[float, int]] = []
        found = capture_chain.load_chain(
            self.repo.storage, self.repo.verify_keys, self.repo.info.repo_id
        )
        if found.problems:
            raise SystemExit(f"capture chain: {found.problems[0]}")
        for _, record in found.records:
            if record.seq in self.seen:
                continue
            header = capture_chain.journal_header(self.repo.info.repo_id, record.seq)
            data = read_object(
                self.repo, record.journal.entry(capture_chain.JOURNAL_KIND), header,
                self.identities,
            )  # fmt: skip
            keys = [e.key for e in capture_chain.decode_journal(data, name=record.journal.key)]
            self.keys.update(keys)
            with psycopg.connect(**self.conninfo) as conn:
                row = conn.execute(
                    "SELECT max(created_at) FROM attachments WHERE object_key = ANY(%s)", (keys,)
                ).fetchone()
            if row and row[0] and (self.newest is None or row[0] > self.newest):
                self.newest = row[0]
            self.seen.add(record.seq)
            took = datetime.fromisoformat(record.last_captured) - datetime.fromisoformat(
                record.created
            )
            rounds.append((took.total_seconds(), len(keys)))
        return rounds


def source_newest(conn: psycopg.Connection[Any], s3: Any, bucket: str, since: datetime) -> Any:
    """The newest committed attachment row (since ``since``) whose object is in the bucket."""
    for key, created in conn.execute(NEWEST_ROWS, (since,)).fetchall():
        try:
            s3.head_object(Bucket=bucket, Key=key)
        except s3.exceptions.ClientError:
            continue
        return created
    return None


def fill(s3: Any, bucket: str, target: int, size: int) -> int:
    """Put small objects no row names into ``bucket`` until it holds ``target``; the count."""
    have = sum(
        page.get("KeyCount", 0)
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    )
    body = os.urandom(size)

    def put(i: int) -> None:
        s3.put_object(Bucket=bucket, Key=f"existing/{i:08d}.bin", Body=body)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(put, range(have, target)))
    return max(have, target)


def read_counts(path: Path) -> Counter[str]:
    try:
        return Counter(json.loads(path.read_text()))
    except (FileNotFoundError, ValueError):
        return Counter()


def by_bucket(counts: Counter[str], bucket: str) -> dict[str, int]:
    """``{"<bucket> <Op>": n}`` -> ``{Op: n}`` for one bucket."""
    return {k.split(" ", 1)[1]: v for k, v in sorted(counts.items()) if k.startswith(bucket + " ")}


def wait_round_after(state_file: Path, moment: datetime, timeout: float, proc: Any) -> None:
    """Until a capture round that started after ``moment`` has finished (saved its state)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"drtool capture run exited {proc.returncode}")
        state = load_state(state_file)
        if state.last_round and datetime.fromisoformat(state.last_round) > moment:
            return
        time.sleep(0.5)
    raise SystemExit(f"no capture round finished within {timeout:.0f} s")


REQUEST_LINE = re.compile(r"DEBUG : (GET|PUT|HEAD|POST|DELETE) /([^/? ]*)")


def rclone_round(
    rclone: str, env: dict[str, str], src: str, flags: list[str], log: Path
) -> dict[str, int]:
    """One ``rclone copy`` round; its HTTP requests by ``<METHOD> <bucket>`` (--dump headers)."""
    log.unlink(missing_ok=True)
    argv = [rclone, "copy", f"src:{src}", f"dst:{MIRROR_BUCKET}", "--transfers", "4"]
    argv += ["--checkers", "8", *flags, "--dump", "headers", "--log-file", str(log)]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"rclone failed ({done.returncode}): {done.stderr[-500:]}")
    counts: Counter[str] = Counter()
    for line in log.read_text(errors="replace").splitlines():
        if m := REQUEST_LINE.search(line):
            counts[f"{m[1]} {m[2]}"] += 1
    return dict(sorted(counts.items()))


def run_phase(  # noqa: PLR0915
    args: argparse.Namespace,
    work: Path,
    ep: StackEndpoints,
    backup: Path,
    sealed: Sealed,
    rclone: str,
    phase: Phase,
    number: int,
) -> None:
    bucket = ep.buckets[0]
    s3 = s3_client(ep.minio)
    config = work / f"capture-{number}.toml"
    config.write_text(backup.read_text() + f"\n[capture]\ninterval_s = {phase.interval_s}\n")
    config.chmod(0o600)
    counts_file = work / f"counts-{number}.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DRTOOL_")}
    env |= {"DRTOOL_HOME": str(work / "home")}
    state_file = state_path(work / "state", sealed.repo.info.repo_id)
    phase.load_start = load_average()
    started_at = datetime.now(UTC)
    with open(work / f"capture-{number}.log", "w") as out:
        capture = subprocess.Popen(
            [sys.executable, str(COUNTED), str(counts_file), "--config", str(config),
             "capture", "run"],
            env=env, stdout=out, stderr=out,
        )  # fmt: skip
    try:
        wait_round_after(state_file, started_at, 120, capture)  # the first round: the baseline
        cpu0, counts0 = cpu_s(capture.pid), read_counts(counts_file)
        uploaded0 = load_state(state_file).uploaded
        t0 = time.monotonic()
        stop = threading.Event()
        mix = AttachmentMix(args.share, *args.attachment_bytes)
        stats: list[Any] = []
        traffic_start = datetime.now().astimezone()
        traffic = threading.Thread(
            target=lambda: stats.append(
                run_traffic(ep, args.rate, args.minutes * 60, number + 1, stop, mix)
            ),
            daemon=True,
        )
        traffic.start()
        with psycopg.connect(**ep.postgres.connect_kwargs()) as conn:
            conn.autocommit = True
            while traffic.is_alive():
                newest = source_newest(conn, s3, bucket, traffic_start)
                phase.rounds += sealed.refresh()
                if newest is not None:
                    covered = max(sealed.newest or traffic_start, traffic_start)
                    phase.rpo_samples.append(max(0.0, (newest - covered).total_seconds()))
                traffic.join(args.sample)
        traffic_end = datetime.now(UTC)
        wait_round_after(state_file, traffic_end, phase.interval_s * 2 + 300, capture)
        phase.minutes = (time.monotonic() - t0) / 60
        phase.capture_cpu_s = cpu_s(capture.pid) - cpu0
        phase.capture_rss_mib = hwm_mib(capture.pid)
        phase.uploaded = load_state(state_file).uploaded - uploaded0
        phase.rounds += sealed.refresh()
    finally:
        capture.send_signal(signal.SIGTERM)
        capture.wait(120)
    counts = read_counts(counts_file) - counts0
    phase.source_requests = by_bucket(counts, bucket)
    phase.repo_requests = by_bucket(counts, REPO_BUCKET)
    if stats:
        phase.messages, phase.attachment_rows = stats[0].messages, stats[0].attachments
        phase.attachment_mb = stats[0].object_bytes / 1e6
    phase.missed = missed(sealed, ep, traffic_start)
    phase.rclone = rclone_rounds(rclone, ep, work / "rclone.log")
    phase.load_end = load_average()


def missed(sealed: Sealed, ep: StackEndpoints, since: datetime) -> int:
    """The attachment rows written since ``since`` whose object no sealed journal names."""
    with psycopg.connect(**ep.postgres.connect_kwargs()) as conn:
        rows = conn.execute(
            "SELECT object_key FROM attachments WHERE created_at >= %s", (since,)
        ).fetchall()
    return sum(1 for (key,) in rows if key not in sealed.keys)


def rclone_rounds(rclone: str, ep: StackEndpoints, log: Path) -> dict[str, dict[str, int]]:
    """The peer: a listing sync of the source bucket to a mirror, catching up then idle."""
    env, bucket = rclone_env(ep.minio, ep.minio), ep.buckets[0]
    return {
        "catch-up": rclone_round(rclone, env, bucket, [], log),
        "nothing new": rclone_round(rclone, env, bucket, [], log),
        "nothing new, --size-only --fast-list": rclone_round(
            rclone, env, bucket, ["--size-only", "--fast-list"], log
        ),
    }


def run_bench(args: argparse.Namespace, work: Path, stack: LocalStack, rclone: str) -> list[Phase]:
    ep = stack.endpoints
    print("seeding ...", flush=True)
    seed(ep, SeedSizes(users=200, rooms=40, messages=2000, attachments=20), 1, progress=False)
    s3 = s3_client(ep.minio)
    for name in (REPO_BUCKET, MIRROR_BUCKET):
        s3.create_bucket(Bucket=name)
    secrets = stack.state_dir / "secrets"
    repository = {
        "url": f"s3://{REPO_BUCKET}/drtool",
        "endpoint_url": ep.minio.endpoint_url,
        "access_key_file": str(secrets / "s3_access_key"),
        "secret_key_file": str(secrets / "s3_secret_key"),
    }
    setup = set_up_repository(
        work / "setup",
        repository,
        stores=stack_config(stack),
        state_dir=work / "state",
        label="bench",
    )
    cfg = load_config(setup.operator_config, {})
    sealed = Sealed(open_repo(cfg), identities_of(cfg), dict(ep.postgres.connect_kwargs()))
    phases: list[Phase] = []
    for size in args.sizes:
        for interval in args.intervals:
            print(f"filling {ep.buckets[0]} to {size:,} objects ...", flush=True)
            have = fill(s3, ep.buckets[0], size, args.existing_bytes)
            phase = Phase(have, interval)
            print(f"phase {len(phases) + 1}: {have:,} objects, interval {interval:g} s", flush=True)
            run_phase(args, work, ep, setup.backup_config, sealed, rclone, phase, len(phases))
            phases.append(phase)
    return phases


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",")]


def _range(text: str) -> tuple[int, int]:
    low, _, high = text.partition("-")
    return int(low), int(high)


def print_table(args: argparse.Namespace, phases: list[Phase]) -> None:
    def fmt(v: float | None, spec: str = ".1f") -> str:
        return "-" if v is None else format(v, spec)

    def rclone_total(p: Phase, name: str) -> str:
        return f"{sum(p.rclone.get(name, {}).values()):,}"

    header = [f"{p.objects_before:,} obj, {p.interval_s:g} s" for p in phases]
    rows: list[tuple[str, list[str]]] = [
        ("minutes measured", [fmt(p.minutes) for p in phases]),
        ("messages written", [f"{p.messages:,}" for p in phases]),
        ("attachment rows (MB)",
         [f"{p.attachment_rows:,} ({p.attachment_mb:,.0f})" for p in phases]),
        ("RPO samples", [str(len(p.rpo_samples)) for p in phases]),
        ("attachments RPO p50 s", [fmt(p.rpo(50)) for p in phases]),
        ("attachments RPO p99 s (target <= 90)", [fmt(p.rpo(99)) for p in phases]),
        ("attachments RPO max s", [fmt(max(p.rpo_samples, default=None)) for p in phases]),
        ("capture rounds: objects per round p50",
         [fmt(statistics.median([n for _, n in p.rounds]) if p.rounds else None, ".0f")
          for p in phases]),
        ("capture rounds: seconds reading+sealing p50 / max",
         [f"{fmt(statistics.median([t for t, _ in p.rounds]) if p.rounds else None)} / "
          f"{fmt(max((t for t, _ in p.rounds), default=None))}" for p in phases]),
        ("rows missed by the capture", [str(p.missed) for p in phases]),
        ("blobs uploaded", [f"{p.uploaded:,}" for p in phases]),
        ("capture CPU-s (% of a core)",
         [f"{p.capture_cpu_s:.1f} ({100 * p.capture_cpu_s / (p.minutes * 60 or 1):.1f} %)"
          for p in phases]),
        ("capture peak RSS MiB", [fmt(p.capture_rss_mib) for p in phases]),
        ("capture S3 req/min, source bucket",
         [fmt(p.per_minute(p.source_requests)) for p in phases]),
        ("capture S3 req/min, repository", [fmt(p.per_minute(p.repo_requests)) for p in phases]),
        ("capture source requests, by op",
         [" ".join(f"{k}={v}" for k, v in p.source_requests.items()) for p in phases]),
        ("capture repository requests, by op",
         [" ".join(f"{k}={v}" for k, v in p.repo_requests.items()) for p in phases]),
    ]  # fmt: skip
    for name in ("catch-up", "nothing new", "nothing new, --size-only --fast-list"):
        rows.append(
            (f"rclone copy round ({name}) requests", [rclone_total(p, name) for p in phases])
        )
    rows.append(("load average at start", [p.load_start.split(";")[0][13:] for p in phases]))
    rows.append(("load average at end", [p.load_end.split(";")[0][13:] for p in phases]))
    print(
        f"\n{args.rate:g} messages/s, {100 * args.share:g} % with an attachment of "
        f"{args.attachment_bytes[0]:,}-{args.attachment_bytes[1]:,} bytes, {args.minutes:g} min "
        f"per phase, RPO sampled every {args.sample:g} s; {os.cpu_count()} CPUs"
    )
    print("| measure | " + " | ".join(header) + " |")
    print("|---|" + "---|" * len(phases))
    for name, values in rows:
        print(f"| {name} | " + " | ".join(values) + " |")
    for i, p in enumerate(phases):
        for name, counts in p.rclone.items():
            print(f"phase {i + 1} rclone ({name}): {counts}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="traffic per phase [10]")
    parser.add_argument("--rate", type=float, default=200.0, help="messages per second [200]")
    parser.add_argument("--share", type=float, default=0.1, help="share with an attachment [0.1]")
    parser.add_argument("--attachment-bytes", type=_range, default=(100_000, 5_000_000))
    parser.add_argument("--sizes", type=_ints, default=[2000, 20000], help="objects before")
    parser.add_argument("--intervals", type=_floats, default=[60.0], help="capture_interval s")
    parser.add_argument("--existing-bytes", type=int, default=1024, help="size of filler objects")
    parser.add_argument("--sample", type=float, default=5.0, help="RPO sample period s [5]")
    parser.add_argument("--json", action="store_true", help="print the phases as JSON")
    args = parser.parse_args()
    rclone = ensure_rclone()
    print(f"start: {load_average()}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="drtool-bench-capture-", dir="/var/tmp"))
    work.chmod(0o711)  # PostgreSQL runs as its own user and must enter it
    stack = LocalStack.up(work / "stack", "capbench")
    try:
        phases = run_bench(args, work, stack, rclone)
    finally:
        stack.down()
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        doc = {"parameters": vars(args), "phases": [asdict(p) for p in phases]}
        print(json.dumps(doc, indent=1, default=str))
    else:
        print_table(args, phases)
    print(f"end: {load_average()}")


if __name__ == "__main__":
    main()
