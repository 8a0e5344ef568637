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
