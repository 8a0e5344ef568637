"""What the catalog costs at 100, 1,000 and 10,000 snapshots, before and after the index.

Usage: python bench/bench_catalog.py [--snapshots 100 1000 10000] [--s3 N ...] [--verified]
       (``--snapshots`` with no number: the SeaweedFS sizes only)

A ``file://`` repository (and, with ``--s3``, a SeaweedFS bucket) gets N signed, chained,
Redis-only snapshots an hour apart (tests/support/synthetic_catalog.py). Each operation is
run through a storage wrapper that counts requests (a LIST page per 1,000 keys), twice:

- ``before``  no index: what drtool did before ADR 0020 (every manifest read; ``list --last``
  did not exist, so it is the full list cut to 5; ``latest`` resolves over the full list)
- ``index``   with the signed index only (with ``--verified``: no verification summary, what
  drtool read before the summary existed)
- ``after``   with the signed index (one full page, written as the next backup would) and,
  with ``--verified``, the signed verification summary ``verify`` writes

``chain link`` is the backup's ``newest_authentic``; ``restore latest`` the resolution only
(no data read). ``--verified`` gives every snapshot a signed verification record (a nightly
``verify --all``): ``list`` then reads one per snapshot, eight at a time, ``before``; ``after``
also has the signed summary that ``verify`` writes (one GET instead). The machine may be
shared: the load average is printed with the table.

On S3 the requests are also counted where they leave: a botocore ``before-call`` hook on the
client (``http``), so a listing's real pages and any request the wrapper cannot see count.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from support.repo_kit import RepoKit, file_kit, s3_kit  # noqa: E402
from support.synthetic_catalog import CountingStorage, write_history  # noqa: E402

from drtool.repository import catalog, catalog_index, verifications  # noqa: E402
from drtool.runtime.s3server import SeaweedServer  # noqa: E402
from drtool.s3session import s3_client  # noqa: E402
from drtool.storage.s3 import S3Storage  # noqa: E402

Row = tuple[str, int, str, str, int, int | None, float]


def main() -> None:
    """Run every size and print one table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--snapshots", type=int, nargs="*", default=[100, 1000, 10000])
    parser.add_argument("--s3", type=int, nargs="*", default=[], metavar="N")
    parser.add_argument(
        "--verified", action="store_true", help="each snapshot has a verification record"
    )
    parser.add_argument(
        "--modes",
        nargs="+",
        choices=["before", "index", "after"],
        default=["before", "after"],
        help="index: the index without the verification summary (as before issue 16.5's fix)",
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="drtool-bench-catalog-"))
    try:
        rows = measure(work, args.snapshots, args.s3, args.verified, tuple(args.modes))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nload average {os.getloadavg()[0]:.1f}")
    print("| store | snapshots | operation | catalog | requests | http requests | seconds |")
    print("|---|---|---|---|---|---|---|")
    for store, n, op, mode, requests, http, seconds in rows:
        sent = "" if http is None else f"{http:,}"
        print(f"| {store} | {n:,} | {op} | {mode} | {requests:,} | {sent} | {seconds:.2f} |")


def measure(
    work: Path,
    sizes: list[int],
    s3_sizes: list[int],
    verified: bool,
    modes: tuple[str, ...] = ("before", "after"),
) -> list[Row]:
    """Every size on a directory, then (when asked) on a SeaweedFS bucket."""
    rows: list[Row] = []
    for n in sizes:
        tmp = work / f"file-{n}"
        tmp.mkdir()
        kit = file_kit(tmp)
        rows += run(kit, n, "file", root=tmp / "repo", verified=verified, modes=modes)
    if s3_sizes:
        server = SeaweedServer(work / "s3")
        server.start()
        try:
            for n in s3_sizes:
                bucket = f"catalog-{uuid.uuid4().hex[:8]}"
                s3_client(server.endpoint).create_bucket(Bucket=bucket)
                tmp = work / f"s3-{n}"
                tmp.mkdir()
                kit = s3_kit(tmp, server.endpoint, bucket)
                rows += run(kit, n, "s3", root=None, verified=verified, modes=modes)
        finally:
            server.stop()
    return rows


def run(
    kit: RepoKit,
    n: int,
    store: str,
    *,
    root: Path | None,
    verified: bool,
    modes: tuple[str, ...] = ("before", "after"),
) -> list[Row]:
    """Write ``n`` snapshots into ``kit`` and measure each operation before and after."""
    t = time.perf_counter()
    newest = datetime.now(UTC) - timedelta(minutes=5)
    when = newest + timedelta(minutes=1) if verified else None
    write_history(
        kit.storage, kit.info, kit.signing_key, n, newest=newest, root=root, verified=when
    )
    print(f"{store}: {n:,} snapshots written in {time.perf_counter() - t:.1f} s", flush=True)
    keys, rid = [kit.verify_key], kit.info.repo_id
    sent = http_requests(kit.storage)
    ops: dict[str, Callable[[CountingStorage], object]] = {
        "list": lambda st: catalog.list_snapshots(st, keys, rid),
        "list --last 5": lambda st: catalog.recent_snapshots(st, keys, rid, 5),
        "restore latest (resolve)": lambda st: catalog.find(st, keys, rid, "latest"),
        "chain link (backup)": lambda st: catalog.newest_authentic(st, keys, rid),
    }
    before: dict[str, Callable[[CountingStorage], object]] = {
        **ops,
        "list --last 5": lambda st: catalog.list_snapshots(st, keys, rid)[-5:],
        "restore latest (resolve)": lambda st: catalog.resolve(
            catalog.list_snapshots(st, keys, rid), "latest"
        ),
    }
    rows: list[Row] = []
    tables = {"before": before, "index": ops, "after": ops}
    for mode in modes:
        table = tables[mode]
        if mode != "before" and not catalog_index.page_seqs(kit.storage):
            catalog.rebuild_index(kit.storage, kit.signing_key, keys, rid)
            pages = catalog_index.page_seqs(kit.storage)
            assert len(pages) == 1, pages
        if mode == "after" and when is not None:  # what the verify that left them writes
            verifications.write_summary(kit.storage, kit.signing_key, keys, rid, when)
        for op, call in table.items():
            counting = CountingStorage(kit.storage)
            sent.clear()
            t = time.perf_counter()
            result = call(counting)
            seconds = time.perf_counter() - t
            assert result, f"{op} found nothing"
            http = len(sent) if isinstance(kit.storage, S3Storage) else None
            rows.append((store, n, op, mode, counting.requests, http, seconds))
    return rows


def http_requests(storage: object) -> list[str]:
    """The S3 operations ``storage`` sends from now on, by name (empty for a directory)."""
    sent: list[str] = []
    if isinstance(storage, S3Storage):
        storage._client.meta.events.register(
            "before-call.s3", lambda model, **_: sent.append(model.name)
        )
    return sent


if __name__ == "__main__":
    main()
