"""Bounded retries with exponential backoff and full jitter (the AWS "full jitter" scheme)."""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Backoff:
    """``attempts`` tries in all; before retry n wait uniform(0, min(cap, base * 2**(n-1)))."""

    attempts: int = 6
    base: float = 0.25
    cap: float = 20.0

    def delay(self, failures: int) -> float:
        """Seconds to wait after the ``failures``-th failed attempt."""
        return random.uniform(0.0, min(self.cap, self.base * 2 ** (failures - 1)))


def retry_call(
    fn: Callable[[], T],
    *,
    backoff: Backoff,
    retryable: Callable[[Exception], bool],
    on_retry: Callable[[Exception, int, float], None] | None = None,
    stop: threading.Event | None = None,
) -> T:
    """Call ``fn`` until it succeeds, raising the last error when it is not retryable, the
    budget is spent or ``stop`` is set. ``fn`` must be safe to repeat (same request, same bytes).
    """
    stop = stop or threading.Event()
    failures = 0
    while True:
        try:
            return fn()
        except Exception as e:
            failures += 1
            if failures >= backoff.attempts or not retryable(e) or stop.is_set():
                raise
            wait = backoff.delay(failures)
            if on_retry is not None:
                on_retry(e, failures, wait)
            if stop.wait(wait):
                raise
