"""The threaded pipeline stage: same bytes, errors passed on, early stop, bounded read-ahead."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from drtool.pipeline.prefetch import prefetch


def test_passes_every_chunk_in_order() -> None:
    chunks = [bytes([i]) * (i + 1) for i in range(200)]
    assert list(prefetch(iter(chunks), depth=3)) == chunks


def test_a_producer_error_reaches_the_consumer_after_the_good_chunks() -> None:
    def failing() -> Iterator[bytes]:
        yield b"a"
        yield b"b"
        raise OSError("disk went away")

    got = []
    with pytest.raises(OSError, match="disk went away"):
        for chunk in prefetch(failing()):
            got.append(chunk)
    assert got == [b"a", b"b"]


def test_stopping_early_closes_the_producer_and_bounds_read_ahead() -> None:
    produced = 0
    closed = threading.Event()

    def endless() -> Iterator[bytes]:
        nonlocal produced
        try:
            while True:
                produced += 1
                yield b"x"
        finally:
            closed.set()

    stream = prefetch(endless(), depth=4)
    assert next(stream) == b"x"
    stream.close()
    assert closed.wait(5), "the producer generator was not closed"
    # one consumed, at most `depth` queued, one more in the producer's hand
    assert produced <= 1 + 4 + 2
