"""Benchmark drtool's seal() against raw zstd, raw ChaCha20-Poly1305 and the CLI pipeline.

Usage: python bench/bench_pipeline.py [--size-mb 1024] [--level 3] [--threads 0]

The input is deterministic pg_dump-like text (rows with random parts), written once to a
temporary file and reused. Each variant runs in its own subprocess, which reports its time
and its peak RSS (ru_maxrss; for the CLI pipeline the larger of its two processes).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

READ_SIZE = 1 << 20
VARIANTS = ["seal", "zstd", "chacha", "cli"]


def make_input(path: Path, size: int) -> None:
    """Write ``size`` bytes of deterministic, compressible, pg_dump-like text rows."""
    rng = random.Random(20261125)
    words = [
        w.encode()
        for w in ["the", "a", "room", "user", "hello", "ok", "thanks", "see", "you", "tomorrow"]
    ]
    written = 0
    row_id = 0
    with open(path, "wb") as out:
        while written < size:
            rows = []
            for _ in range(2000):
                row_id += 1
                text = b" ".join(rng.choices(words, k=rng.randrange(3, 12)))
                rows.append(
                    b"%d\t%d\t%d\t%s\t2026-11-%02d %02d:%02d:%02d+00\t%s\n"
                    % (row_id, rng.randrange(500), rng.randrange(10_000), text,
                       rng.randrange(1, 29), rng.randrange(24), rng.randrange(60),
                       rng.randrange(60), rng.randbytes(8).hex().encode())
                )  # fmt: skip
            block = b"".join(rows)[: size - written]
            out.write(block)
            written += len(block)


def read_pieces(path: Path) -> Iterator[bytes]:
    """The file in 1 MiB pieces."""
    with open(path, "rb") as handle:
        while piece := handle.read(READ_SIZE):
            yield piece


def run_variant(
    variant: str, path: Path, level: int, threads: int, recipient: str
) -> dict[str, float]:
    """Run one variant in this process; return its seconds, output bytes and peak RSS."""
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

    from drtool.pipeline.compress import compress
    from drtool.pipeline.header import InnerHeader
    from drtool.pipeline.seal import seal

    out = 0
    start = time.perf_counter()
    if variant == "seal":
        header = InnerHeader("bench", "20261125T020000Z-0000", "postgres", "pg_dump")
        sealed = seal(read_pieces(path), header=header, recipients=[recipient], level=level,
                      threads=threads)  # fmt: skip
        for piece in sealed.stream:
            out += len(piece)
        assert sealed.plain.sha256 and sealed.stored.size == out
    elif variant == "zstd":
        for piece in compress(read_pieces(path), level=level, threads=threads):
            out += len(piece)
    elif variant == "chacha":
        aead = ChaCha20Poly1305(os.urandom(32))
        nonce = bytes(12)
        for piece in read_pieces(path):
            for off in range(0, len(piece), 65536):
                out += len(aead.encrypt(nonce, piece[off : off + 65536], None))
    elif variant == "cli":
        zstd_threads = f"-T{threads}" if threads else "-T1"
        command = f"zstd -{level} {zstd_threads} -q -c {path} | age -r {recipient} | wc -c"
        result = subprocess.run(command, shell=True, check=True, capture_output=True, text=True)
        out = int(result.stdout)
    seconds = time.perf_counter() - start
    who = resource.RUSAGE_CHILDREN if variant == "cli" else resource.RUSAGE_SELF
    usage = resource.getrusage(who)
    return {
        "seconds": seconds,
        "cpu_seconds": usage.ru_utime + usage.ru_stime,
        "out_bytes": out,
        "rss_mb": usage.ru_maxrss / 1024,
    }


def main() -> None:
    """Parse arguments, prepare the input and print the comparison table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--level", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--input", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--recipient", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.variant:
        result = run_variant(args.variant, args.input, args.level, args.threads, args.recipient)
        print(json.dumps(result))
        return

    from drtool.pipeline.age import generate_identity

    size = args.size_mb * 1_000_000
    path = Path(tempfile.gettempdir()) / f"drtool-bench-{args.size_mb}mb.txt"
    if not path.exists() or path.stat().st_size != size:
        print(f"writing {args.size_mb} MB of input to {path} ...", file=sys.stderr)
        make_input(path, size)
    _, recipient = generate_identity()
    print(f"input: {args.size_mb} MB, zstd level {args.level}, threads {args.threads}\n")
    print(f"| {'variant':<34} | wall MB/s | CPU MB/s | peak RSS MB | ratio |")
    print(f"|{'-' * 36}|-----------|----------|-------------|-------|")
    labels = {
        "seal": "drtool seal() (zstd+age+2x sha256)",
        "zstd": "raw zstd (python-zstandard)",
        "chacha": "raw ChaCha20-Poly1305, 64 KiB",
        "cli": "CLI: zstd -c | age -r",
    }
    for variant in VARIANTS:
        command = [
            sys.executable, __file__, "--variant", variant, "--input", str(path),
            "--level", str(args.level), "--threads", str(args.threads), "--recipient", recipient,
        ]  # fmt: skip
        done = subprocess.run(command, check=True, capture_output=True, text=True)
        result = json.loads(done.stdout)
        wall = size / result["seconds"] / 1e6
        cpu = size / result["cpu_seconds"] / 1e6
        ratio = result["out_bytes"] / size
        print(
            f"| {labels[variant]:<34} | {wall:9.0f} | {cpu:8.0f} | {result['rss_mb']:11.1f}"
            f" | {ratio:5.3f} |"
        )


if __name__ == "__main__":
    main()
