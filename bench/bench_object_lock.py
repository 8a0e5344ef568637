"""What keeping reused blobs locked costs a backup (issue 19 item 1), at 2,000 and 20,000 blobs.

Usage: python bench/bench_object_lock.py [--blobs 2000 20000]

A SeaweedFS with an Object Lock bucket is started in a temp dir; N small objects are written
with a 1-day GOVERNANCE retention (as blobs of an earlier, short-lived backup), then
``object_lock.protect`` — what a backup runs before its manifest — is timed in the cases a
backup host meets:

- ``new host``      no cache: one GetObjectRetention each, then a Put for every short one
- ``next backup``   the cache knows every date and they are long enough: no request
- ``margin spent``  the cache knows the dates but the new snapshot needs later ones: a Put each

The floor is one listing of the blobs (what every incremental backup already pays).
The machine may be shared: the load average is printed with the table.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from drtool.repository.object_lock import RetentionCache, protect  # noqa: E402
from drtool.runtime.s3server import SeaweedServer  # noqa: E402
from drtool.s3session import s3_client  # noqa: E402
from drtool.storage import StorageOptions, open_storage  # noqa: E402


def main() -> None:
    """Run every size and print one table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blobs", type=int, nargs="+", default=[2000, 20000])
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="drtool-bench-lock-"))
    server = SeaweedServer(work / "s3")
    server.start()
    rows = []
    try:
        for n in args.blobs:
            rows += run(server, work, n)
    finally:
        server.stop()
    print(f"\nload average {os.getloadavg()[0]:.1f}")
    print("| blobs | case | requests | seconds |")
    print("|---|---|---|---|")
    for n, case, requests, seconds in rows:
        print(f"| {n:,} | {case} | {requests:,} | {seconds:.2f} |")


def run(server: SeaweedServer, work: Path, n: int) -> list[tuple[int, str, int, float]]:
    """Write ``n`` locked blobs and time each case of :func:`protect` on them."""
    ep = server.endpoint
    bucket = f"lock{n}"
    s3_client(ep).create_bucket(Bucket=bucket, ObjectLockEnabledForBucket=True)
    storage = open_storage(
        f"s3://{bucket}/repo",
        StorageOptions(
            endpoint_url=ep.endpoint_url,
            access_key=ep.access_key,
            secret_key=ep.secret_key,
            object_lock_mode="GOVERNANCE",
        ),
    )
    now = datetime.now(UTC)
    keys = [f"blobs/{i % 256:02x}/{i:032x}.zst.age" for i in range(n)]
    t = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        list(
            pool.map(
                lambda k: storage.put_bytes(k, b"x" * 64, retain_until=now + timedelta(1)), keys
            )
        )
    print(f"{n:,} blobs written in {time.perf_counter() - t:.1f} s")
    rows = []
    t = time.perf_counter()
    listed = sum(1 for _ in storage.list("blobs/"))
    assert listed == n
    rows.append((n, "floor: one listing of blobs/", -(-n // 1000), time.perf_counter() - t))
    cache = RetentionCache(work / f"cache-{n}.json")
    margin = timedelta(days=7.5)
    for case, until in (
        ("new host (no cache)", now + timedelta(days=30)),
        ("next backup (cache, within margin)", now + timedelta(days=31)),
        ("margin spent (cache, extend all)", now + timedelta(days=40)),
    ):
        stats = protect(storage, keys, until, margin=margin, cache=cache)
        rows.append((n, case, stats.requests, stats.seconds))
    return rows


if __name__ == "__main__":
    main()
