"""`drtool copy` throughput against `rclone copy` of the same bucket prefix (issue 15, benchmark).

Usage: python bench/bench_copy.py [--blobs 1000] [--blob-kib 16] [--dump-mib 100] [--jobs 4]

Two SeaweedFS servers are started in a temp dir (two "providers" on loopback). A repository
is written on the first: one snapshot of one ``--dump-mib`` pg dump object and ``--blobs``
blobs of ``--blob-kib`` (random bytes, sealed with age like real ones). Then the same
prefix is copied to fresh buckets on the second server twice:

- ``drtool copy --jobs N``: checks each object against the manifest on the way and reads it
  back from the destination before the manifest (so it moves twice the bytes rclone does);
- ``rclone copy --transfers N``: Debian's rclone (installed with apt-get when missing), its
  default checks (size, and the MD5 ETag where the server gives one).

Each is timed as a whole command (process start included). Then a second run of each on the
unchanged source (nothing to do). The machine may be shared: the load average is printed.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import tomli_w

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from drtool import keys  # noqa: E402
from drtool.endpoints import S3Endpoint  # noqa: E402
from drtool.repository import layout  # noqa: E402
from drtool.repository.ids import new_id  # noqa: E402
from drtool.repository.manifest import ComponentEntry, Manifest  # noqa: E402
from drtool.repository.writer import SnapshotWriter  # noqa: E402
from drtool.runtime.s3server import SeaweedServer  # noqa: E402
from drtool.s3session import s3_client  # noqa: E402
from drtool.services.repo_setup import generate_keys  # noqa: E402
from drtool.storage import StorageOptions, open_storage  # noqa: E402

DRTOOL = Path(sys.executable).with_name("drtool")
MiB = 1 << 20


def ensure_rclone() -> str:
    """The rclone binary; installed from Debian when missing."""
    found = shutil.which("rclone")
    if found:
        return found
    print("rclone missing: apt-get install -y rclone", file=sys.stderr)
    subprocess.run(["apt-get", "install", "-y", "-q", "rclone"], check=True)
    found = shutil.which("rclone")
    assert found, "rclone still missing after apt-get install"
    return found


def _options(ep: S3Endpoint) -> StorageOptions:
    return StorageOptions(
        endpoint_url=ep.endpoint_url, access_key=ep.access_key, secret_key=ep.secret_key
    )


def make_source(work: Path, ep: S3Endpoint, blobs: int, blob_kib: int, dump_mib: int) -> Path:
    """A repository on ``ep`` with one snapshot; returns the signing key file."""
    key_dir = work / "keys"
    repo_keys = generate_keys(key_dir)
    s3_client(ep).create_bucket(Bucket="source")
    storage = open_storage("s3://source/drtool", _options(ep))
    info = layout.init_repository(storage, [repo_keys.recipient], repo_keys.verify_key)
    snapshot_id = new_id(datetime.now(UTC))
    writer = SnapshotWriter(
        storage,
        info,
        snapshot_id,
        keys.load_signing_key(repo_keys.signing_key_file),
        (repo_keys.recipient,),
        compression_level=1,
    )

    def dump() -> Iterator[bytes]:
        for _ in range(dump_mib):
            yield secrets.token_bytes(MiB)

    written = writer.put_snapshot_object("postgres", "dump.pgdump", dump(), kind="pg_dump")
    entries = []
    for _ in range(blobs):
        entries.append(
            writer.put_blob(secrets.token_hex(16), [secrets.token_bytes(blob_kib * 1024)]).entry
        )
    now = datetime.now(UTC).isoformat(timespec="seconds")
    writer.commit(
        Manifest(
            repo_id=info.repo_id,
            snapshot_id=snapshot_id,
            started=now,
            finished=now,
            host="bench",
            stack="bench",
            drtool_version="0.1.0",
            components=(
                ComponentEntry("postgres", (written.entry,), written.plain_bytes, 1.0),
                ComponentEntry("minio", tuple(entries), blobs * blob_kib * 1024, 1.0),
            ),
        )
    )
    return repo_keys.signing_key_file


def _secret(work: Path, name: str, value: str) -> str:
    path = work / "keys" / name
    path.write_text(value)
    path.chmod(0o600)
    return str(path)


def drtool_config(work: Path, signing: Path, a: S3Endpoint, b: S3Endpoint, bucket: str) -> Path:
    """Backup-host config: [repository] on A, [repositories.copy] on B."""

    def repo(ep: S3Endpoint, url: str, tag: str) -> dict[str, object]:
        return {
            "url": url,
            "endpoint_url": ep.endpoint_url,
            "access_key_file": _secret(work, f"{tag}-ak", ep.access_key),
            "secret_key_file": _secret(work, f"{tag}-sk", ep.secret_key),
        }

    doc = {
        "repository": repo(a, "s3://source/drtool", "a"),
        "repositories": {"copy": repo(b, f"s3://{bucket}/drtool", "b")},
        "keys": {"signing_key_file": str(signing)},
        "backup": {"state_dir": str(work / "state")},
    }
    path = work / f"drtool-{bucket}.toml"
    path.write_text(tomli_w.dumps(doc))
    return path


def rclone_env(a: S3Endpoint, b: S3Endpoint) -> dict[str, str]:
    """rclone remotes ``src`` and ``dst`` from the environment (no config file)."""
    # no AWS_* (an AWS_CA_BUNDLE makes rclone's S3 client refuse its own transport)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    for name, ep in (("SRC", a), ("DST", b)):
        env |= {
            f"RCLONE_CONFIG_{name}_TYPE": "s3",
            f"RCLONE_CONFIG_{name}_PROVIDER": "Other",
            f"RCLONE_CONFIG_{name}_ENDPOINT": ep.endpoint_url,
            f"RCLONE_CONFIG_{name}_ACCESS_KEY_ID": ep.access_key,
            f"RCLONE_CONFIG_{name}_SECRET_ACCESS_KEY": ep.secret_key,
            f"RCLONE_CONFIG_{name}_FORCE_PATH_STYLE": "true",
        }
    return env


def timed(argv: list[str], env: dict[str, str] | None = None) -> float:
    started = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{argv[0]} failed ({done.returncode}): {done.stderr[-2000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blobs", type=int, default=1000)
    parser.add_argument("--blob-kib", type=int, default=16)
    parser.add_argument("--dump-mib", type=int, default=100)
    parser.add_argument("--jobs", type=int, default=4)
    args = parser.parse_args()
    rclone = ensure_rclone()
    work = Path(tempfile.mkdtemp(prefix="drtool-bench-copy-"))
    a, b = SeaweedServer(work / "s3a"), SeaweedServer(work / "s3b")
    a.start()
    b.start()
    rows: list[tuple[str, float]] = []
    try:
        signing = make_source(work, a.endpoint, args.blobs, args.blob_kib, args.dump_mib)
        source = open_storage("s3://source/drtool", _options(a.endpoint))
        objects = list(source.list())
        total = sum(o.size for o in objects)
        for bucket in ("viadrtool", "viarclone"):
            s3_client(b.endpoint).create_bucket(Bucket=bucket)
        config = drtool_config(work, signing, a.endpoint, b.endpoint, "viadrtool")
        env = {**os.environ, "DRTOOL_HOME": str(work / "home")}
        copy = [str(DRTOOL), "--config", str(config), "copy", "--to", "copy"]
        copy += ["--jobs", str(args.jobs)]
        rows.append(("drtool copy", timed(copy, env)))
        rows.append(("drtool copy (again, nothing new)", timed(copy, env)))
        sync = [rclone, "copy", "src:source/drtool", "dst:viarclone/drtool"]
        sync += ["--transfers", str(args.jobs), "--checkers", "8"]
        renv = rclone_env(a.endpoint, b.endpoint)
        version = subprocess.check_output([rclone, "version"], text=True).split()[1]
        rows.append((f"rclone copy ({version})", timed(sync, renv)))
        rows.append(("rclone copy (again, nothing new)", timed(sync, renv)))
    finally:
        a.stop()
        b.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n{len(objects):,} objects, {total / MiB:.1f} MiB stored; jobs/transfers {args.jobs}")
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print("| tool | seconds | MiB/s | objects/s |")
    print("|---|---|---|---|")
    for name, seconds in rows:
        if "again" in name:
            print(f"| {name} | {seconds:.1f} | - | - |")
        else:
            rate = f"{total / MiB / seconds:.1f} | {len(objects) / seconds:.0f}"
            print(f"| {name} | {seconds:.1f} | {rate} |")


if __name__ == "__main__":
    main()
