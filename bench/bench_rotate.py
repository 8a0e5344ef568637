"""What `drtool keys rotate` transfers, against rewriting every object (issue 15, benchmark).

Usage: python bench/bench_rotate.py [--dump-mb 1024] [--blobs 2000]

A SeaweedFS is started in a temp dir behind the tests' counting proxy; a repository gets one
snapshot holding an incompressible dump of ``--dump-mb`` MiB and ``--blobs`` attachment blobs
(2-6 KiB). Then:

- ``rotate``   `keys rotate --add-recipient` (in-process, through the proxy): request bytes
  sent (uploads) and answer bytes received (downloads), and the time;
- ``rewrite``  the floor of re-encrypting instead: every object downloaded and uploaded again
  whole (GET + PUT through the same proxy, no crypto), bytes and time.

The target of the issue is upload <= 2 % of the repository size. The machine may be shared:
the load average is printed with the table.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from support.fault_proxy import fault_proxy  # noqa: E402
from support.repo_kit import s3_kit  # noqa: E402

from drtool import keys  # noqa: E402
from drtool.config import load_config  # noqa: E402
from drtool.repository.ids import new_id  # noqa: E402
from drtool.repository.manifest import ComponentEntry, Manifest  # noqa: E402
from drtool.runtime.s3server import SeaweedServer  # noqa: E402
from drtool.s3session import s3_client  # noqa: E402
from drtool.services import rotate as rotate_svc  # noqa: E402
from drtool.storage import StorageOptions, open_storage  # noqa: E402

MiB = 1 << 20


def _random(total: int) -> Iterator[bytes]:
    while total > 0:
        piece = min(total, MiB)
        yield secrets.token_bytes(piece)
        total -= piece


def main() -> None:
    """Build the repository, measure both ways, print one table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dump-mb", type=int, default=1024)
    parser.add_argument("--blobs", type=int, default=2000)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="drtool-bench-rotate-"))
    server = SeaweedServer(work / "s3")
    server.start()
    try:
        rows, size = run(server, work, args.dump_mb, args.blobs)
    finally:
        server.stop()
    print(f"\nload average {os.getloadavg()[0]:.1f}; repository {size:,} bytes")
    print("| way | uploaded | downloaded | upload / repository | seconds |")
    print("|---|---|---|---|---|")
    for way, sent, received, seconds in rows:
        print(f"| {way} | {sent:,} | {received:,} | {100 * sent / size:.2f} % | {seconds:.1f} |")


def run(
    server: SeaweedServer, work: Path, dump_mb: int, blobs: int
) -> tuple[list[tuple[str, int, int, float]], int]:
    """One repository; the rotation and the rewrite floor on it."""
    bucket = "rotate"
    s3_client(server.endpoint).create_bucket(Bucket=bucket)
    kit = s3_kit(work, server.endpoint, bucket)
    when = datetime.now(UTC) - timedelta(hours=1)
    writer = kit.writer(new_id(when))
    t = time.perf_counter()
    dump = writer.put_snapshot_object(
        "postgres", "dump.pgdump", _random(dump_mb * MiB), kind="pg_dump"
    )
    entries = [
        writer.put_blob(secrets.token_hex(16), [secrets.token_bytes(2048 + i % 4096)]).entry
        for i in range(blobs)
    ]
    writer.commit(
        Manifest(
            repo_id=kit.info.repo_id,
            snapshot_id=writer.snapshot_id,
            started=when.isoformat(timespec="seconds"),
            finished=(when + timedelta(minutes=1)).isoformat(timespec="seconds"),
            host="bench",
            stack="co-talk",
            drtool_version="bench",
            components=(
                ComponentEntry("postgres", (dump.entry,), dump.plain_bytes, 1.0),
                ComponentEntry("minio", tuple(entries), blobs * 4096, 1.0),
            ),
        )
    )
    print(f"repository written in {time.perf_counter() - t:.1f} s")
    size = sum(o.size for o in kit.storage.list())
    rows = []
    recipient = keys.write_identity(work / "new.key", passphrase=None)
    with fault_proxy(server.endpoint.endpoint_url) as proxy:
        cfg = load_config(kit.config_file, {})
        cfg = replace(cfg, repository=replace(cfg.repository, endpoint_url=proxy.endpoint_url))
        t = time.perf_counter()
        result = rotate_svc.rotate(cfg, [recipient], [])
        rows.append(("rotate", proxy.sent_bytes, proxy.received_bytes, time.perf_counter() - t))
        assert result.rewritten == blobs + 1, result
        proxy.bodies.clear()
        proxy.received_bytes = 0
        ep = server.endpoint
        storage = open_storage(
            f"s3://{bucket}/drtool",
            StorageOptions(
                endpoint_url=proxy.endpoint_url, access_key=ep.access_key, secret_key=ep.secret_key
            ),
        )
        t = time.perf_counter()
        for obj in [o for o in storage.list() if o.key.endswith(".age")]:
            storage.put(f"rewrite/{obj.key}", storage.get(obj.key), expected_size=obj.size)
        rows.append(
            ("rewrite all", proxy.sent_bytes, proxy.received_bytes, time.perf_counter() - t)
        )
    return rows, size


if __name__ == "__main__":
    main()
