"""Streaming zstd compression and decompression with bounded output pieces.

Compression uses ``zstandard`` (content checksums on, so the stock ``zstd -d`` also verifies).
Decompression uses ``backports.zstd`` (the PEP 784 ``compression.zstd`` API), because it can
bound the output of each call (``max_length``) and report whether a frame ended (``eof``):
``zstandard``'s streaming readers silently stop at a truncated frame, and its ``decompressobj``
returns a whole frame's output at once, which a highly compressible input turns into gigabytes.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import zstandard
from backports.zstd import ZstdDecompressor, ZstdError

from drtool.errors import IntegrityError

MAX_PIECE = 1 << 20  # upper bound of every yielded piece


def compress(chunks: Iterable[bytes], level: int = 3, threads: int = 0) -> Iterator[bytes]:
    """Compress a stream into one zstd frame; pieces are at most 1 MiB."""
    compressor = zstandard.ZstdCompressor(level=level, threads=threads, write_checksum=True)
    chunker = compressor.chunker(chunk_size=MAX_PIECE)
    for piece in chunks:
        yield from chunker.compress(piece)
    yield from chunker.finish()


def decompress(chunks: Iterable[bytes], *, name: str = "object") -> Iterator[bytes]:
    """Decompress one or more zstd frames (skippable frames are skipped); pieces ≤ 1 MiB.

    IntegrityError if the data is corrupt, empty, or ends inside a frame.
    """
    decoder = ZstdDecompressor()
    inside = False  # the current decoder has been fed part of a frame
    frames = 0
    try:
        for piece in chunks:
            data = piece
            while data or (inside and not decoder.needs_input):
                out = decoder.decompress(data, MAX_PIECE)
                inside = True
                if out:
                    yield out
                if decoder.eof:
                    frames += 1
                    data = decoder.unused_data
                    decoder = ZstdDecompressor()
                    inside = False
                else:
                    data = b""
    except ZstdError as exc:
        raise IntegrityError(f"{name}: corrupt zstd data ({exc})") from None
    if inside or not frames:
        raise IntegrityError(f"{name}: truncated zstd data: the stream ends inside a frame")
