"""Small helpers to pull exact byte counts out of an iterable of byte chunks."""

from __future__ import annotations

from collections.abc import Iterable, Iterator


class ByteReader:
    """Reads lines and exact byte counts from a chunk stream, tracking the stream offset."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._it = iter(chunks)
        self._buf = bytearray()
        self.offset = 0  # stream offset of the first unread byte

    def _fill(self, n: int) -> None:
        while len(self._buf) < n:
            piece = next(self._it, None)
            if piece is None:
                return
            self._buf += piece

    def read(self, n: int) -> bytes:
        """Return the next ``n`` bytes; fewer only at the end of the stream."""
        self._fill(n)
        out = bytes(self._buf[:n])
        del self._buf[:n]
        self.offset += len(out)
        return out

    def readline(self, limit: int) -> bytes:
        """Return the next line with its ``\\n``; without one, at most ``limit`` bytes."""
        searched = 0
        while True:
            end = self._buf.find(b"\n", searched, limit)
            if end >= 0:
                return self.read(end + 1)
            have = len(self._buf)
            if have >= limit:
                return self.read(limit)
            searched = have
            self._fill(have + 1)
            if len(self._buf) == have:
                return self.read(have)

    def rest(self) -> Iterator[bytes]:
        """Yield the unread remainder of the stream."""
        if self._buf:
            head = bytes(self._buf)
            self._buf.clear()
            yield head
        yield from self._it


def rechunk(chunks: Iterable[bytes], size: int) -> Iterator[tuple[bytes, bool]]:
    """Split a stream into ``size``-byte blocks, flagging the final one.

    Every block but the last is exactly ``size`` bytes; the last is 0 to ``size`` bytes
    (empty only when the whole stream is). A full block is held back until a further byte
    proves it is not the last, so memory stays below two blocks plus one input piece.
    """
    buf = bytearray()
    for piece in chunks:
        buf += piece
        if len(buf) > size:
            full = (len(buf) - 1) // size * size
            with memoryview(buf) as view:
                for off in range(0, full, size):
                    yield view[off : off + size].tobytes(), False
            del buf[:full]
    yield bytes(buf), True
