"""The true RPO of continuous WAL capture under chat traffic, and what the streamer costs.

Usage: python bench/bench_rpo.py [--minutes 10] [--rate 200] [--losses 10]

A local co-talk stack (PostgreSQL, Redis, SeaweedFS) is seeded; a ``file://`` repository gets
a base backup while ``drtool wal stream`` (``flush_interval`` 30 s, the default) runs and
``chat_stack.traffic`` writes ``--rate`` messages per second for ``--minutes`` (the first
``--warmup`` seconds only warm up: before them the newest message is the seeded past's).

At ``--losses`` moments spread over the run the NAS "dies": the newest message committed in
the source at that moment is read, and the repository is frozen as it was (a hard-linked copy:
file:// writes by rename, so the copy holds exactly the objects stored by then). After the
run, each frozen repository is restored with ``drtool restore --component postgres --at
<the newest moment it holds> --into DIR`` and the newest message in the restored copy is
read. **RPO** = the source's newest message at the loss minus the restored copy's newest
(commit times; p50 and the max, which is the p99 at this sample size).

Also: the streamer's CPU (user+sys of the drtool process and its pg_receivewal, from /proc)
as a share of one core, its peak RSS (VmHWM), and the WAL bytes stored per hour. Targets
(issue 12): RPO p99 <= 60 s, streamer < 5 % of a core and < 64 MB RSS.
The machine may be shared: the load average is printed with the table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from procstat import children, cpu_s, hwm_mib, load_average  # noqa: E402
from repo_setup import DRTOOL  # noqa: E402

from chat_stack.seed import SeedSizes, seed  # noqa: E402
from chat_stack.traffic import run_traffic  # noqa: E402
from drtool.config import load_config  # noqa: E402
from drtool.repository.access import open_repo  # noqa: E402
from drtool.runtime.local import LocalStack  # noqa: E402
from drtool.services.repo_setup import set_up_repository  # noqa: E402
from drtool.services.restore.pitr_recover import stop as stop_copy  # noqa: E402
from drtool.services.stack import stack_config  # noqa: E402
from drtool.wal.index import load_index  # noqa: E402

NEWEST = "SELECT max(created_at), count(*) FROM messages"


@dataclass
class Loss:
    """One simulated loss: when, what the source held, and its frozen repository."""

    at: datetime
    source_newest: datetime
    source_count: int
    repo: Path
    restored_newest: datetime | None = None
    restored_count: int = 0
    restore_s: float = 0.0

    @property
    def rpo_s(self) -> float | None:
        if self.restored_newest is None:
            return None
        return max(0.0, (self.source_newest - self.restored_newest).total_seconds())


def newest(conninfo: dict[str, object]) -> tuple[datetime, int]:
    with psycopg.connect(**conninfo) as conn:  # type: ignore[arg-type]
        row = conn.execute(NEWEST).fetchone()
    assert row is not None
    return row[0], int(row[1])


def with_wal(config: Path, repo_url: str | None = None) -> Path:
    """``config`` with a [wal] section (and another repository URL), written beside it."""
    text = config.read_text()
    if repo_url is not None:
        text = text.replace(text.split('url = "', 1)[1].split('"', 1)[0], repo_url, 1)
    out = config.with_name(f"{config.stem}-{abs(hash(repo_url)) % 10**8}.toml")
    out.write_text(text + f'\n[wal]\nspool_dir = "{config.parent / "spool"}"\nslot = "rpo"\n')
    out.chmod(0o600)
    return out


def restore(
    loss: Loss, operator: Path, scratch: Path, env: dict[str, str], source: dict[str, object]
) -> None:
    """Restore the frozen repository to the newest moment it holds; read the newest message."""
    cfg = load_config(operator, {})
    repo = open_repo(cfg)
    index = load_index(repo.storage, repo.verify_keys, repo.info.repo_id)
    end = max(e.sealed for e in index.segments())
    into = scratch / f"restored-{loss.repo.name}"
    started = time.perf_counter()
    run = subprocess.run(
        [str(DRTOOL), "--config", str(operator), "restore", "--component", "postgres",
         "--at", end, "--into", str(into), "--yes", "--json"],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    loss.restore_s = time.perf_counter() - started
    if run.returncode != 0:
        print(f"restore of {loss.repo.name} failed: {run.stderr.strip()[-300:]}", flush=True)
        return
    result = json.loads(run.stdout)
    conninfo = {**source, "host": "127.0.0.1", "port": result["port"]}  # the source's roles
    try:
        loss.restored_newest, loss.restored_count = newest(conninfo)
    finally:
        stop_copy(Path(result["pg_ctl"]).parent, into)
        shutil.rmtree(into, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=200.0, help="messages per second")
    parser.add_argument("--losses", type=int, default=10)
    parser.add_argument(
        "--warmup", type=float, default=60.0, help="seconds of traffic before the first loss"
    )
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="drtool-bench-rpo-", dir="/var/tmp"))
    work.chmod(0o711)  # PostgreSQL runs as its own user and must enter it
    stack = LocalStack.up(work / "stack", "rpo")
    try:
        run_bench(args, work, stack)
    finally:
        stack.down()
        shutil.rmtree(work, ignore_errors=True)


def run_bench(args: argparse.Namespace, work: Path, stack: LocalStack) -> None:  # noqa: PLR0915
    ep = stack.endpoints
    print("seeding ...", flush=True)
    seed(ep, SeedSizes(users=200, rooms=40, messages=20_000, attachments=20), 1, progress=False)
    setup = set_up_repository(
        work / "setup",
        {"url": (work / "repo").as_uri()},
        stores=stack_config(stack),
        state_dir=work / "state",
        label="bench",
    )
    backup, operator = with_wal(setup.backup_config), setup.operator_config
    env = {k: v for k, v in os.environ.items() if not k.startswith("DRTOOL_")}
    env["DRTOOL_HOME"] = str(work / "home")
    streamer = subprocess.Popen(
        [str(DRTOOL), "--config", str(backup), "wal", "stream"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    base = [str(DRTOOL), "--config", str(backup), "backup", "--component", "postgres-base"]
    subprocess.run(base, env=env, check=True, stdout=subprocess.DEVNULL)
    stop = threading.Event()
    seconds = args.minutes * 60
    traffic = threading.Thread(
        target=run_traffic, args=(ep, args.rate, seconds, 1, stop), daemon=True
    )
    cpu_before = cpu_s(streamer.pid)
    started = time.monotonic()
    traffic.start()
    losses: list[Loss] = []
    conninfo = dict(ep.postgres.connect_kwargs())
    steady = seconds - args.warmup  # losses fall in the steady state, not the seeded past
    for i in range(args.losses):
        due = started + args.warmup + steady * (i + 1) / (args.losses + 1)
        time.sleep(max(0.0, due - time.monotonic()))
        source_newest, count = newest(conninfo)
        frozen = work / f"repo-loss{i:02d}"
        subprocess.run(["cp", "-al", str(work / "repo"), str(frozen)], check=True)
        losses.append(Loss(datetime.now().astimezone(), source_newest, count, frozen))
        print(f"loss {i}: source newest {source_newest.isoformat()}", flush=True)
    traffic.join()
    elapsed = time.monotonic() - started
    cpu = cpu_s(streamer.pid) - cpu_before
    rss = max([hwm_mib(streamer.pid)] + [hwm_mib(c) for c in children(streamer.pid)])
    streamer.send_signal(signal.SIGTERM)
    streamer.wait(120)
    cfg = load_config(operator, {})
    repo = open_repo(cfg)
    stored = sum(e.size for e in load_index(repo.storage, repo.verify_keys, repo.info.repo_id)
                 .segments())  # fmt: skip

    scratch = work / "scratch"
    scratch.mkdir(mode=0o711)
    for loss in losses:
        restore(loss, with_wal(operator, loss.repo.as_uri()), scratch, env, conninfo)

    print(
        f"\n{args.rate:.0f} messages/s for {elapsed / 60:.1f} min, {len(losses)} losses; "
        f"{load_average()}"
    )
    print(f"{'loss':6} {'source newest':>26} {'restored newest':>26} {'RPO s':>7} {'restore s':>9}")
    for i, loss in enumerate(losses):
        got = loss.restored_newest.isoformat() if loss.restored_newest else "failed"
        rpo = f"{loss.rpo_s:7.1f}" if loss.rpo_s is not None else f"{'-':>7}"
        print(f"{i:<6} {loss.source_newest.isoformat():>26} {got:>26} {rpo} {loss.restore_s:9.1f}")
    rpos = [loss.rpo_s for loss in losses if loss.rpo_s is not None]
    print()
    print(f"{'measure':40} {'value':>10} {'target':>10}")
    if rpos:
        print(f"{'RPO p50 s':40} {statistics.median(rpos):10.1f} {'':>10}")
        print(f"{'RPO max (p99 at this n) s':40} {max(rpos):10.1f} {'<= 60':>10}")
    print(f"{'restores that failed':40} {len(losses) - len(rpos):10d} {'0':>10}")
    print(f"{'streamer CPU, % of one core':40} {100 * cpu / elapsed:10.2f} {'< 5':>10}")
    print(f"{'streamer peak RSS MiB (largest process)':40} {rss:10.1f} {'< 64':>10}")
    print(f"{'WAL stored, MB per hour':40} {stored / 1e6 / elapsed * 3600:10.1f} {'':>10}")


if __name__ == "__main__":
    main()
