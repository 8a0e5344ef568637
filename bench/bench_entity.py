"""Benchmark ``drtool restore-entity room`` against a full ``drtool restore`` of the same snapshot.

Usage: python bench/bench_entity.py [--messages 1000000] [--attachments 2000] [--room-messages N]

Two local stacks (production and a restore target) are started under a temp home; production
is seeded and backed up (bench/repo_setup.py). The room whose message count is closest to
``--room-messages`` is deleted in production (cascade), then brought back with
``restore-entity room ID --yes``; the same snapshot is then restored whole into the target
(``restore --force --drop-old``), PostgreSQL alone and all three stores. Each run is a
subprocess: wall time and peak RSS of its largest process. Issue 17's target: the entity
restore within 20 % of the full restore's time.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

import psycopg
from bench_restore import measure
from repo_setup import DRTOOL, seed_and_back_up

from drtool.endpoints import PostgresEndpoint
from drtool.s3session import s3_client
from drtool.services.stack import stack_up


def _room_of_size(endpoint: PostgresEndpoint, wanted: int) -> tuple[int, int]:
    """Delete the room whose message count is closest to ``wanted``; its (id, messages)."""
    with psycopg.connect(**endpoint.connect_kwargs()) as conn:
        row = conn.execute(
            "SELECT room_id, count(*) FROM messages GROUP BY room_id "
            "ORDER BY abs(count(*) - %s), room_id LIMIT 1",
            (wanted,),
        ).fetchone()
        assert row is not None
        conn.execute("DELETE FROM chat_rooms WHERE id = %s", (row[0],))
        conn.commit()
    return int(row[0]), int(row[1])


def main() -> None:
    """Seed, back up, delete a room, restore it; restore the whole snapshot; print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--attachments", type=int, default=2000)  # the README's 1 M snapshot
    parser.add_argument("--room-messages", type=int, default=10_000)
    parser.add_argument("--debug", action="store_true", help="drtool's phase logs on stderr")
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="drtool-bench-"))
    home.chmod(0o711)
    src = stack_up(home, "benchsrc").stack
    dst = stack_up(home, "benchdst").stack
    try:
        s3_client(src.endpoints.minio).create_bucket(Bucket="drtool-repo")
        secrets = src.state_dir / "secrets"
        repository = {
            "url": "s3://drtool-repo/bench",
            "endpoint_url": src.endpoints.minio.endpoint_url,
            "access_key_file": str(secrets / "s3_access_key"),
            "secret_key_file": str(secrets / "s3_secret_key"),
        }
        operator_cfg = seed_and_back_up(
            home,
            src,
            repository,
            messages=args.messages,
            attachments=args.attachments,
            operator_extra={"backup": {"scratch_dir": str(home)}},
        ).operator_config
        room, size = _room_of_size(src.endpoints.postgres, args.room_messages)
        base = [str(DRTOOL), "--config", str(operator_cfg), "--home", str(home)]
        base += ["--debug"] if args.debug else []
        load = os.getloadavg()[0]
        entity = measure([*base, "restore-entity", "room", str(room), "--yes"])
        full = [*base, "restore", "--target", "benchdst", "--yes", "--json", "--force"]
        full_pg = measure([*full, "--drop-old", "--component", "postgres"])
        full_all = measure([*full, "--drop-old"])
        rows = [
            (f"restore-entity room {room} ({size:,} messages)", entity),
            ("restore --component postgres (full)", full_pg),
            ("restore, all stores (full)", full_all),
        ]
        print(f"\n{'variant':<46}{'seconds':>9}{'peak RSS MiB':>14}")
        for name, run in rows:
            rss = int(str(run["rss_kb"])) / 1024
            print(f"{name:<46}{float(str(run['seconds'])):>9.1f}{rss:>14.0f}")
        seconds = float(str(entity["seconds"]))
        for name, run in rows[1:]:
            print(f"entity / {name}: {seconds / float(str(run['seconds'])):.2f} (target <= 0.20)")
        print(f"load average at the start: {load:.1f}")
    finally:
        dst.down()
        src.down()
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
