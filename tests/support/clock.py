"""A fake monotonic clock for code that takes ``clock``/``sleep`` parameters (the scheduler's
``Runner``): sleeping moves the clock at once, so backoff and jitter are checked without
waiting them out, and what was slept is recorded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class FakeClock:
    """Seconds that only pass when someone sleeps; ``on_sleep(now)`` runs after each sleep."""

    now: float = 0.0
    slept: list[float] = field(default_factory=list)
    on_sleep: Callable[[float], None] | None = None

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        """Advance the clock by ``seconds`` (never backwards) instead of waiting."""
        self.slept.append(seconds)
        self.now += max(0.0, seconds)
        if self.on_sleep is not None:
            self.on_sleep(self.now)
