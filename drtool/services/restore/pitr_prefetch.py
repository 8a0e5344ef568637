"""Staging the rest of the WAL while PostgreSQL replays, never handing it an unchecked byte.

Which segment holds a moment is only estimated before recovery (sealed times bound close times
from above), so the first staged set may be short. Restarting recovery with more WAL replays
again from the last restartpoint (from the base when the replay was shorter than
``checkpoint_timeout`` and ``max_wal_size``); instead, a thread goes on staging the run in
order, each file fetched and checked exactly like the first ones (drtool/wal/fetch.py) and
renamed into the staged directory only then, at most ``LOOKAHEAD`` segments ahead of the one
PostgreSQL last asked for. ``restore_command`` is a small shell script: for a planned name it
waits until the file is there (or staging has ended), then copies it; any other name fails at
once, as a plain ``cp`` would (PostgreSQL probes for history files that do not exist). When
staging ends (the run is exhausted, or a file failed its checks) it marks the end, so a
missing file ends recovery the way a missing file in an archive does; the error is raised by
the caller only if recovery needed what failed.
"""

from __future__ import annotations

import shlex
import threading
from collections.abc import Callable
from pathlib import Path

from drtool.wal.index import WalEntry

LOOKAHEAD = 8  # segments staged ahead of recovery (disk: 8 x 16 MiB)
POLL_S = 0.05

SCRIPT = """#!/bin/sh
# drtool restore to a moment: restore_command (see drtool/services/restore/pitr_prefetch.py)
staging={staging}
if grep -qxF "$1" "$staging/planned"; then
  echo "$1" > "$staging/wanted"
  while [ ! -e "$staging/wal/$1" ] && [ ! -e "$staging/end" ]; do sleep {poll}; done
fi
exec cp "$staging/wal/$1" "$2"
"""


def write_script(staging: Path, run: list[WalEntry]) -> str:
    """Write the script and the planned names; returns the ``restore_command`` value."""
    (staging / "planned").write_text("".join(f"{e.name}\n" for e in run))
    script = staging / "fetch.sh"
    script.write_text(SCRIPT.format(staging=shlex.quote(str(staging)), poll=POLL_S))
    script.chmod(0o755)
    return f"sh {shlex.quote(str(script))} %f %p"


class Prefetcher:
    """A thread staging ``run[start:]`` in order, a bounded distance ahead of recovery."""

    def __init__(
        self,
        staging: Path,
        run: list[WalEntry],
        start: int,
        fetch: Callable[[list[WalEntry]], None],
    ) -> None:
        self.staging = staging
        self.run = run
        self.position = {e.name: i for i, e in enumerate(run)}
        self.next = start
        self.fetch = fetch
        self.error: BaseException | None = None
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._work, name="pitr-prefetch", daemon=True)

    def start(self) -> None:
        """Begin staging."""
        if self.next >= len(self.run):
            self._end()
            return
        self.thread.start()

    def _wanted(self) -> int:
        try:
            name = (self.staging / "wanted").read_text().strip()
        except OSError:
            return -1
        return self.position.get(name, -1)

    def _work(self) -> None:
        try:
            while self.next < len(self.run) and not self.stopping.is_set():
                if self.next - self._wanted() > LOOKAHEAD:
                    self.stopping.wait(POLL_S)
                    continue
                self.fetch([self.run[self.next]])
                self.next += 1
        except BaseException as exc:  # handed to the caller, which decides if it mattered
            self.error = exc
        finally:
            self._end()

    def _end(self) -> None:
        (self.staging / "end").touch()

    def exhausted(self) -> bool:
        """Every segment of the run was staged."""
        return self.next >= len(self.run)

    def stop(self) -> None:
        """Stop staging (after promotion, or on the way out of a failure)."""
        self.stopping.set()
        if self.thread.is_alive():
            self.thread.join(600)
