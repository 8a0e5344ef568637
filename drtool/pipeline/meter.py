"""Byte count and SHA-256 of a stream, measured as it passes."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator


class Meter:
    """Counts the bytes and SHA-256 of the stream passed through :meth:`wrap`."""

    def __init__(self) -> None:
        self.size = 0
        self.finished = False
        self._hash = hashlib.sha256()

    def wrap(self, chunks: Iterable[bytes]) -> Iterator[bytes]:
        """Yield ``chunks`` unchanged while measuring them; ``finished`` is set at the end."""
        for chunk in chunks:
            self.size += len(chunk)
            self._hash.update(chunk)
            yield chunk
        self.finished = True

    @property
    def sha256(self) -> str:
        """Hex SHA-256 of the bytes seen so far."""
        return self._hash.hexdigest()


def measure(chunks: Iterable[bytes]) -> tuple[int, str]:
    """Byte count and hex SHA-256 of a whole stream (e.g. a file read in chunks): the one way
    a file written or kept is checked against a recorded sha256."""
    meter = Meter()
    for _ in meter.wrap(chunks):
        pass
    return meter.size, meter.sha256
