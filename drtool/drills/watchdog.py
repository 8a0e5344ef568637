"""A drill's overall deadline and its progress in the log.

A drill that stalls (a scratch container at its memory limit, a hung server) used to sit
silent for many minutes and then fail with a network timeout that blamed the wrong thing. The
watchdog logs the running phase every ``progress_s`` seconds, and at the deadline interrupts
the drill in the main thread with :class:`DrillDeadline` (a real signal, SIGUSR1, so that a
blocking read or wait returns): the drill unwinds as on Ctrl-C, its scratch stack is torn
down, and the drill is reported failed with the phase it was stuck in. On each tick a
runtime's monitor may look at the stack (the docker runtime: its containers' memory); when it
reports the drill cannot pass any more (a scratch container was killed), the drill is stopped
the same way at once, with that reason, instead of waiting for its step's retries.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

log = logging.getLogger(__name__)

PROGRESS_S = 30.0
DEADLINE_SIGNAL = signal.SIGUSR1


class DrillDeadline(KeyboardInterrupt):
    """The drill ran past its deadline (a KeyboardInterrupt: everything unwinds as on Ctrl-C)."""


class Watchdog:
    """Which phase the drill is in, logged while it runs; the deadline's interrupt."""

    def __init__(self, drill_id: str, deadline_s: float, progress_s: float) -> None:
        self.drill_id = drill_id
        self.deadline_s = deadline_s
        self.progress_s = progress_s
        self.phase = "starting"
        self.expired = False
        self.closing = False
        self._phase_started = time.monotonic()
        self._started = time.monotonic()
        self._done = threading.Event()
        # called on each progress tick (the docker runtime looks at its containers' memory);
        # a reason it returns (a scratch container was killed) stops the drill at once
        self.monitor: Callable[[], str | None] | None = None
        self.stopped_for = ""

    def enter(self, phase: str) -> None:
        """The drill starts ``phase`` (logged)."""
        self.phase = phase
        self._phase_started = time.monotonic()
        log.info("drill %s: %s", self.drill_id, phase)

    def elapsed(self) -> float:
        """Seconds since the drill started."""
        return time.monotonic() - self._started

    def _watch(self, main_thread: int | None) -> None:
        """Log the phase every ``progress_s``; at the deadline interrupt the main thread.

        A signal to the main thread (not an exception in this one) is what makes a blocked
        wait on a subprocess or a socket return, so the drill unwinds and tears down.
        """
        deadline = self._started + self.deadline_s
        while not self._done.wait(min(self.progress_s, max(0.0, deadline - time.monotonic()))):
            now = time.monotonic()
            if now >= deadline:
                self.expired = True
                log.error(
                    "drill %s: deadline of %.0f s reached while %s; stopping it",
                    self.drill_id,
                    self.deadline_s,
                    self.phase,
                )
                if main_thread is not None:
                    signal.pthread_kill(main_thread, DEADLINE_SIGNAL)
                return
            log.info(
                "drill %s: %s for %.0f s (%.0f s in all; deadline in %.0f s)",
                self.drill_id,
                self.phase,
                now - self._phase_started,
                now - self._started,
                deadline - now,
            )
            reason = self._look()
            if reason and not self.closing:
                # the drill cannot pass any more: no point waiting for its step's retries
                self.stopped_for = f"the drill was stopped while {self.phase}: {reason}"
                self.expired = True
                log.error("drill %s: %s", self.drill_id, self.stopped_for)
                if main_thread is not None:
                    signal.pthread_kill(main_thread, DEADLINE_SIGNAL)
                return

    def _look(self) -> str | None:
        """Run the monitor; its failure is logged, never the end of the watch."""
        if self.monitor is None:
            return None
        try:
            return self.monitor()
        except Exception as exc:  # the engine busy or gone: the drill itself will say
            log.debug("drill %s: monitor failed: %s: %s", self.drill_id, type(exc).__name__, exc)
            return None

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.expired and not self.closing:  # not once the drill is over anyway
            raise DrillDeadline(
                self.stopped_for
                or f"the drill's deadline of {self.deadline_s:.0f} s passed while {self.phase}"
            )


@contextmanager
def watchdog(
    drill_id: str, deadline_s: float, progress_s: float | None = None
) -> Iterator[Watchdog]:
    """Watch one drill (progress every ``progress_s``, default :data:`PROGRESS_S`). Outside
    the main thread it only logs progress (no interrupt)."""
    dog = Watchdog(drill_id, deadline_s, progress_s or PROGRESS_S)
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(DEADLINE_SIGNAL, dog._on_signal) if in_main else None
    thread = threading.Thread(
        target=dog._watch,
        args=(threading.main_thread().ident if in_main else None,),
        name=f"drill-watchdog-{drill_id}",
        daemon=True,
    )
    thread.start()
    try:
        yield dog
    finally:
        dog.closing = True
        dog._done.set()
        thread.join()
        if in_main:
            signal.signal(DEADLINE_SIGNAL, previous if previous is not None else signal.SIG_DFL)
