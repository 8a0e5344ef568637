"""Run one stage of a byte pipeline in its own thread, with a bounded hand-off queue.

A stream is a chain of generators (read pg_dump → compress → encrypt → hash → upload) that
otherwise runs one step at a time in one thread. zstd, the pipe read and hashing release the
GIL, so putting a stage in a thread lets it work while the next stage does: the chain runs
at the speed of its slowest stage rather than the sum of all. Memory stays bounded by
``depth`` chunks. Errors of the producer reach the consumer; a consumer that stops early
stops the producer (its generator is closed in its own thread).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator

_DONE = object()


def prefetch(chunks: Iterable[bytes], *, depth: int = 4) -> Iterator[bytes]:
    """Yield ``chunks``, produced ahead by a background thread (at most ``depth`` in flight)."""
    handoff: queue.Queue[object] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        source = iter(chunks)
        try:
            for chunk in source:
                while not stop.is_set():
                    try:
                        handoff.put(chunk, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    break
            else:
                handoff.put(_DONE)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            handoff.put(exc)
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()

    worker = threading.Thread(target=produce, name="drtool-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            item = handoff.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            assert isinstance(item, bytes)
            yield item
    finally:
        stop.set()
        while worker.is_alive():  # unblock a producer waiting on a full queue
            try:
                handoff.get_nowait()
            except queue.Empty:
                worker.join(timeout=0.1)
