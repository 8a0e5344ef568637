"""Streaming zstd compression and decompression with bounded output pieces.

Compression uses ``zstandard`` (content checksums on, so the stock ``zstd -d`` also verifies).
Decompression uses ``backports.zstd`` (the PEP 784 ``compression.zstd`` API), because it can
bound the output of each call (``max_length``) and report whether a frame ended (``eof``):
``zstandard``'s streaming readers silently stop at a truncated frame, and its ``decompressobj``
returns a whole frame's output at once, which a highly compressible input turns into gigabytes.

Data that does not compress (JPEG, PNG, video, zip: most attachments) is not run through the
compressor at all when the caller asks for a probe (:func:`compress` with ``probe=True``): the
first 64 KiB are compressed once, and when that saves less than 3 % the stream is written as a
zstd frame of *raw blocks* (RFC 8878 §3.1.1.2.2, Block_Type 0). That is still one ordinary zstd
frame: the stock ``zstd -d``, ``backports.zstd`` and every older drtool decode it, so the choice
needs no record beside the object (the frame itself says it) and restore and verify are
unchanged (ADR 0035). Such a frame carries no content checksum (zstd's XXH64 is not exposed by
either library); the age AEAD authenticates every byte and the snapshot records the sha256.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator

import zstandard
from backports.zstd import ZstdDecompressor, ZstdError

from drtool.errors import IntegrityError

MAX_PIECE = 1 << 20  # upper bound of every yielded piece
PROBE_SIZE = 64 * 1024  # bytes compressed once to decide whether the stream compresses
PROBE_GAIN = 0.97  # compressed probe at or above this share of the input: store raw blocks

FRAME_MAGIC = (0xFD2FB528).to_bytes(4, "little")
RAW_BLOCK = 128 * 1024  # Block_Maximum_Size: the largest block any frame may hold
# Frame_Header_Descriptor 0: no content size, not single-segment, no checksum, no dictionary;
# Window_Descriptor 0x38: exponent 7, mantissa 0 = a 2^17-byte window, one raw block's size.
_RAW_FRAME_HEADER = FRAME_MAGIC + bytes([0x00, 0x38])


def compress(
    chunks: Iterable[bytes], level: int = 3, threads: int = 0, *, probe: bool = False
) -> Iterator[bytes]:
    """Compress a stream into one zstd frame; pieces are at most 1 MiB.

    With ``probe``, a stream whose first 64 KiB do not compress becomes a frame of raw blocks
    (see the module docstring) instead: no compression work for data that would not shrink.
    """
    if probe:
        head, rest = _take(chunks, PROBE_SIZE)
        sample = head[:PROBE_SIZE]
        if sample and not _compresses(sample, level):
            yield from raw_frame(itertools.chain([head], rest))
            return
        chunks = itertools.chain([head], rest)
    compressor = zstandard.ZstdCompressor(level=level, threads=threads, write_checksum=True)
    chunker = compressor.chunker(chunk_size=MAX_PIECE)
    for piece in chunks:
        yield from chunker.compress(piece)
    yield from chunker.finish()


def _take(chunks: Iterable[bytes], size: int) -> tuple[bytes, Iterator[bytes]]:
    """At least ``size`` leading bytes of the stream (fewer only at its end), and the rest."""
    it = iter(chunks)
    first = next(it, b"")
    if len(first) >= size:
        return first, it  # the usual case (1 MiB reads): no copy
    head = bytearray(first)
    while len(head) < size:
        piece = next(it, None)
        if piece is None:
            break
        head += piece
    return bytes(head), it


def _compresses(sample: bytes, level: int) -> bool:
    """Whether zstd at ``level`` saves at least 3 % on ``sample``."""
    packed = zstandard.ZstdCompressor(level=level, write_content_size=False).compress(sample)
    return len(packed) < len(sample) * PROBE_GAIN


def raw_frame(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """One zstd frame of raw (stored) blocks holding the stream's bytes unchanged.

    Each piece is a 3-byte block header and up to 128 KiB of data; the last block is flagged
    (an empty stream is one empty last block, which is valid).
    """
    yield _RAW_FRAME_HEADER
    pending = b""  # a full block is held until more data proves it is not the last
    for piece in chunks:
        data = pending + piece if pending else piece
        view = memoryview(data)
        full = (len(view) - 1) // RAW_BLOCK * RAW_BLOCK if view else 0
        for off in range(0, full, RAW_BLOCK):
            yield _block_header(RAW_BLOCK, last=False) + view[off : off + RAW_BLOCK]
        pending = bytes(view[full:])
    yield _block_header(len(pending), last=True) + pending


def _block_header(size: int, *, last: bool) -> bytes:
    """Block_Header: Last_Block bit, Block_Type 0 (raw), Block_Size, little-endian, 3 bytes."""
    return ((size << 3) | int(last)).to_bytes(3, "little")


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
