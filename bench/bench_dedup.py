"""What repeated PostgreSQL dumps WOULD store under candidate dedup designs (issue 14.5, ADR 0036).

Usage: python bench/bench_dedup.py [--messages 1000000] [--skip-peers]

Chat data is append-mostly: after a day-like change most of yesterday's dump is unchanged, yet
drtool stores each day's ``pg_dump -Fc -Z0`` as one new sealed part (~101 % of the first day),
where restic and borg store a few percent. Before drtool's stored format changes, this measures
on the same seeded data (``chat_stack.seed``, messages partitioned by month) what each design
would store, without implementing any of them in drtool:

- (a) today's design: the whole dump, zstd -3, one object per day;
- (b) one content-addressed blob per TOC data entry of the ``-Z0`` custom archive (a table or
  a leaf partition: an old month's partition is byte-identical day to day, so it is reused),
  plus the header and TOC as one new blob each day; blocks found with drtool's own archive
  parser (``drtool.sources.postgres``: the offsets ``index_archive`` fills in, and the block
  header's dump id), named with ``pg_restore --list``;
- (c) content-defined chunking of the whole ``-Z0`` stream (``fastcdc`` from PyPI, FastCDC
  with normalised chunking) at several average chunk sizes (restic's is ~1 MiB, borg's
  ~2 MiB): a chunk is stored when its sha256 was not stored before;
- borg (``create --compression zstd,3``) and restic (``backup --stdin``) on the same dump
  files, for reference (``--skip-peers`` leaves them out; installed from Debian when missing,
  as bench_peers.py does).

Every stored unit is compressed on its own with zstd level 3 (what a sealed object would hold;
age's overhead, 16 bytes per 64 KiB, is left out). Day 1 is the seeded database; day 2 the
day-like change of bench_peers.py (0.1 % of the most recent messages edited, 0.9 % new ones);
day 3 then edits 1 % of all messages chosen uniformly (what defeats every design: the issue's
"all three store ~101 %"). Each later day's share is of the same design's day 1.
"""

from __future__ import annotations

import argparse
import hashlib
import mmap
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import zstandard

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_peers import PASSWORD, day_like_change, dir_bytes, ensure_peers  # noqa: E402

from chat_stack.seed import SeedSizes, seed  # noqa: E402
from drtool.endpoints import PostgresEndpoint  # noqa: E402
from drtool.runtime import binaries  # noqa: E402
from drtool.runtime.local import LocalStack  # noqa: E402

# drtool's custom-format parser (read-only use; issue 14.1's work moves it to its own module:
# only data_blocks() uses it)
from drtool.sources.pg_archive_stream import ArchiveStream  # noqa: E402
from drtool.sources.postgres import archive_list  # noqa: E402

MB = 1e6
KIB = 1024
#: average chunk sizes tried for (c); min = avg / 4, max = avg * 8 (restic: 512 KiB..8 MiB)
CDC_AVERAGES = (64 * KIB, 256 * KIB, 1024 * KIB, 2048 * KIB)
ZSTD_LEVEL = 3


def pack(data: bytes | memoryview) -> int:
    """Bytes a unit would take stored: zstd level 3 on its own."""
    return len(zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(data))


@dataclass
class Design:
    """One design's content-addressed store: what each day added (units, bytes stored)."""

    name: str
    seen: set[bytes] = field(default_factory=set)
    days: list[tuple[int, int, int]] = field(default_factory=list)  # (new units, units, bytes)

    def add_day(self, units: Iterator[bytes | memoryview]) -> None:
        """Store the day's units that are not stored yet."""
        new = total = stored = 0
        for unit in units:
            total += 1
            digest = hashlib.sha256(unit).digest()
            if digest in self.seen:
                continue
            self.seen.add(digest)
            new += 1
            stored += pack(unit)
        self.days.append((new, total, stored))


def whole_dump(data: mmap.mmap) -> Iterator[memoryview]:
    """(a): the dump as one unit (never equal to yesterday's: the TOC has the dump's time)."""
    yield memoryview(data)


def data_blocks(data: mmap.mmap, path: Path) -> list[tuple[int, int, int]]:
    """(start, end, dump id) of each data block, in archive order: the one use of drtool's
    custom-format reader here (it finds the blocks of a dump written to a pipe, whose TOC
    has no offsets, as ``index_archive`` does)."""
    reader = ArchiveStream(digest=False)
    for i in range(0, len(data), 1 << 20):
        reader.feed(data[i : i + (1 << 20)])
    reader.finish()
    starts = sorted((start, dump_id) for dump_id, start in reader.blocks.items())
    ends = [start for start, _ in starts[1:]] + [len(data)]
    return [(start, end, dump_id) for (start, dump_id), end in zip(starts, ends, strict=True)]


def per_toc_entry(data: mmap.mmap, path: Path) -> Iterator[memoryview]:
    """(b): the header and TOC as one unit, then each data block (a table or leaf partition)
    as one unit: the block's header (type, dump id) and its length-prefixed chunks."""
    blocks = data_blocks(data, path)
    view = memoryview(data)
    yield view[: blocks[0][0]]
    for start, end, _ in blocks:
        yield view[start:end]


def table_names(path: Path, pg_bin_dir: Path) -> dict[int, str]:
    """Dump id -> schema.table of each TABLE DATA entry (``pg_restore --list``)."""
    names = {}
    for line in archive_list(path, pg_bin_dir, timeout=600).splitlines():
        # "3461; 0 16418 TABLE DATA public messages_y2025m01 owner"
        m = re.match(r"^(\d+); \d+ \d+ TABLE DATA (\S+) (\S+) ", line)
        if m:
            names[int(m.group(1))] = f"{m.group(2)}.{m.group(3)}"
    return names


def cdc(avg: int) -> Callable[[mmap.mmap, Path], Iterator[bytes]]:
    """(c): FastCDC chunks of the whole stream at average size ``avg``."""
    from fastcdc import fastcdc

    def chunks(data: mmap.mmap, path: Path) -> Iterator[bytes]:
        for chunk in fastcdc(
            str(path), min_size=avg // 4, avg_size=avg, max_size=avg * 8, fat=True
        ):
            yield chunk.data

    return chunks


class Dumps:
    """``pg_dump -Fc -Z0`` into files, through a pipe as drtool's backup runs it."""

    def __init__(self, work: Path, endpoint: PostgresEndpoint) -> None:
        self.work, self.endpoint = work, endpoint
        self.bin_dir = binaries.pg_bin_dir()

    def take(self, name: str) -> Path:
        path = self.work / f"{name}.pgdump"
        env = {**os.environ, **self.endpoint.libpq_env()}
        argv = [str(self.bin_dir / "pg_dump"), "-Fc", "-Z0", "-d", self.endpoint.dbname]
        with subprocess.Popen(argv, stdout=subprocess.PIPE, env=env) as proc, open(path, "wb") as f:
            assert proc.stdout is not None
            shutil.copyfileobj(proc.stdout, f, 1 << 20)
        if proc.returncode != 0:
            raise SystemExit(f"pg_dump failed ({proc.returncode})")
        return path


@dataclass
class Peers:
    """borg and restic repositories fed the same dump files."""

    work: Path
    env: dict[str, str] = field(init=False)
    days: dict[str, list[int]] = field(default_factory=lambda: {"borg": [], "restic": []})

    def __post_init__(self) -> None:
        self.env = {
            **os.environ,
            "BORG_PASSPHRASE": PASSWORD,
            "BORG_BASE_DIR": str(self.work / "borg-home"),
            "BORG_DISPLAY_PASSPHRASE": "no",
            "RESTIC_PASSWORD": PASSWORD,
            "RESTIC_CACHE_DIR": str(self.work / "restic-cache"),
        }
        borg, restic = self.work / "borg", self.work / "restic"
        # as bench_peers.py makes them
        self._sh(f"borg init --encryption=repokey-blake2 {borg}")
        self._sh(f"restic init -q --repository-version 2 --repo {restic}")

    def _sh(self, script: str) -> None:
        subprocess.run(["bash", "-c", script], check=True, env=self.env, capture_output=True)

    def add_day(self, n: int, dump: Path) -> None:
        for tool, script in (
            (
                "borg",
                f"borg create --compression zstd,3 --stdin-name dump.pgdump "
                f"{self.work / 'borg'}::day{n} - < {dump}",
            ),
            (
                "restic",
                f"restic -q --repo {self.work / 'restic'} backup --stdin "
                f"--stdin-filename dump.pgdump < {dump}",
            ),
        ):
            before = dir_bytes(self.work / tool)
            self._sh(script)
            self.days[tool].append(dir_bytes(self.work / tool) - before)


def edit_uniformly(endpoint: PostgresEndpoint, share: float = 0.01) -> int:
    """Edit ``share`` of all messages, chosen uniformly (every month's partition changes)."""
    with psycopg.connect(**endpoint.connect_kwargs(), autocommit=True) as conn:
        conn.execute("SELECT setseed(0.36)")
        cur = conn.execute(
            "UPDATE messages SET content = left(content, 3900) || ' (edited)', "
            "edited_at = created_at + interval '1 minute' WHERE random() < %s",
            (share,),
        )
        return cur.rowcount


def report(
    designs: list[Design], peers: Peers | None, days: list[str], dump_sizes: list[int]
) -> None:
    load = os.getloadavg()
    print(f"\nload average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; {os.cpu_count()} CPUs")
    for n, (day, size) in enumerate(zip(days, dump_sizes, strict=True), start=1):
        print(f"day {n}: {day}; plain dump {size / MB:.1f} MB")
    print("stored: zstd -3 of each new unit; share: of the same design's day 1; units: new/all")
    head = f"{'design':38} {'day 1 MB':>8} {'units':>6}"
    for n in range(2, len(days) + 1):
        head += f" | {f'day {n} MB':>8} {'share':>7} {'units':>11}"
    print(head)
    print("-" * len(head))
    for d in designs:
        _, units1, first = d.days[0]
        line = f"{d.name:38} {first / MB:8.1f} {units1:6d}"
        for new, units, stored in d.days[1:]:
            line += f" | {stored / MB:8.2f} {stored / first:7.1%} {f'{new}/{units}':>11}"
        print(line)
    if peers is not None:
        for tool, sizes in peers.days.items():
            line = f"{tool + ' (repository growth)':38} {sizes[0] / MB:8.1f} {'':>6}"
            for more in sizes[1:]:
                line += f" | {more / MB:8.2f} {more / sizes[0]:7.1%} {'':>11}"
            print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--skip-peers", action="store_true", help="leave borg and restic out")
    args = parser.parse_args()
    try:
        import fastcdc  # noqa: F401
    except ImportError:
        raise SystemExit("fastcdc is not installed: pip install fastcdc (bench only)") from None
    if not args.skip_peers:
        ensure_peers()
    work = Path(tempfile.mkdtemp(prefix="drtool-bench-dedup-"))
    work.chmod(0o711)  # PostgreSQL runs as its own user and must enter it
    stack = LocalStack.up(work / "stack", "dedup")
    try:
        sizes = SeedSizes(
            users=max(50, args.messages // 500),
            rooms=max(10, args.messages // 5000),
            messages=args.messages,
            attachments=5,
        )
        print(f"seeding {sizes} ...", flush=True)
        seed(stack.endpoints, sizes, 1, progress=False)
        endpoint = stack.endpoints.postgres
        dumps = Dumps(work, endpoint)
        designs = [
            Design("(a) whole dump, one part (today)"),
            Design("(b) one blob per TOC data entry"),
            *(Design(f"(c) FastCDC, average {avg // KIB} KiB") for avg in CDC_AVERAGES),
        ]
        splitters: list[Callable[[mmap.mmap, Path], Iterator[bytes | memoryview]]] = [
            lambda data, path: whole_dump(data),
            per_toc_entry,
            *(cdc(avg) for avg in CDC_AVERAGES),
        ]
        peers = None if args.skip_peers else Peers(work)
        days = ["seeded", "0.9 % new, 0.1 % recent edited", "1 % of all edited uniformly"]
        changes: list[Callable[[], str]] = [
            lambda: "seeded",
            lambda: "{1:,} new, {0:,} recent edited".format(*day_like_change(endpoint)),
            lambda: f"{edit_uniformly(endpoint):,} edited uniformly",
        ]
        dump_sizes = []
        for n, change in enumerate(changes, start=1):
            what = change()
            started = time.perf_counter()
            path = dumps.take(f"day{n}")
            dump_sizes.append(path.stat().st_size)
            with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                stored_blocks = set(designs[1].seen)
                for design, split in zip(designs, splitters, strict=True):
                    design.add_day(split(data, path))
                if n > 1:
                    names = table_names(path, dumps.bin_dir)
                    changed = [
                        f"{names.get(dump_id, dump_id)} ({(end - start) / MB:.1f} MB)"
                        for start, end, dump_id in data_blocks(data, path)
                        if hashlib.sha256(data[start:end]).digest() not in stored_blocks
                    ]
                    print(f"  day {n}: TOC data entries not stored before: {', '.join(changed)}")
            if peers is not None:
                peers.add_day(n, path)
            took = time.perf_counter() - started
            print(f"day {n} ({what}): measured in {took:.0f} s", flush=True)
            if n > 1:
                (work / f"day{n - 1}.pgdump").unlink()
        report(designs, peers, days, dump_sizes)
    finally:
        stack.down()
        subprocess.run(["rm", "-rf", str(work)], check=False)


if __name__ == "__main__":
    main()
