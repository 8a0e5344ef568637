"""``timed()``: the one way drtool measures a phase (backup per store, restore, drill phases).

Phase times are reported (RTO, summaries, drill reports), so they are all taken the same way:
on the monotonic clock, from entering the block to leaving it, exception or not.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field


@dataclass
class Timer:
    """A phase's clock: ``seconds`` is final once its block is left."""

    started: float = field(default_factory=time.monotonic)
    seconds: float = 0.0

    def elapsed(self) -> float:
        """Seconds since the block was entered (while it still runs)."""
        return time.monotonic() - self.started


@contextmanager
def timed() -> Iterator[Timer]:
    """Time the ``with`` block: ``with timed() as t: ...`` then ``t.seconds``."""
    timer = Timer()
    try:
        yield timer
    finally:
        timer.seconds = timer.elapsed()
