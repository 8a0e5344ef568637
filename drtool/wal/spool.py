"""The local spool ``pg_receivewal`` writes into, and what of it is ready to be sealed.

``pg_receivewal`` writes the segment in progress as ``<name>.partial`` and renames it to
``<name>`` once it is complete and fsynced; history files appear complete. Only complete files
are sealed, and a file leaves the spool only after its object is stored and confirmed and its
index entry committed (drtool/wal/streamer.py). One streamer per spool: an flock on
``.drtool-spool.lock`` refuses a second one (two would fight over the slot and the index).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from drtool.errors import Locked, StorageError
from drtool.wal.names import is_history, is_segment

LOCK_FILE = ".drtool-spool.lock"
STATE_FILE = ".drtool-stream.json"


class Spool:
    """A spool directory (created 0700 on first use)."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory

    def create(self) -> None:
        """Create the directory (private: WAL holds every row written)."""
        try:
            self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(
                f"wal.spool_dir: cannot create {self.dir} ({exc.strerror})"
            ) from None

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the spool for one streamer; ``Locked`` when another process holds it."""
        self.create()
        fd = os.open(self.dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise Locked(
                    f"wal spool {self.dir}: another `drtool wal stream` is using it"
                ) from None
            yield
        finally:
            os.close(fd)

    def closed(self) -> list[Path]:
        """Complete files ready to seal: history files first, then segments in WAL order."""
        if not self.dir.is_dir():
            return []
        names = [p.name for p in self.dir.iterdir()]
        history = sorted(n for n in names if is_history(n))
        segments = sorted((n for n in names if is_segment(n)), key=lambda n: (n[8:], n[:8]))
        return [self.dir / n for n in history + segments]

    def partial(self) -> list[str]:
        """Names of the segments being received (``.partial``)."""
        if not self.dir.is_dir():
            return []
        return sorted(p.name for p in self.dir.iterdir() if p.name.endswith(".partial"))

    def size(self) -> int:
        """Bytes the spool holds (complete and partial WAL files)."""
        if not self.dir.is_dir():
            return 0
        total = 0
        for path in self.dir.iterdir():
            if not path.name.startswith("."):
                with contextlib.suppress(FileNotFoundError):  # renamed or removed meanwhile
                    total += path.stat().st_size
        return total

    def remove(self, paths: list[Path]) -> None:
        """Delete stored files, then fsync the directory so the deletion is durable."""
        for path in paths:
            path.unlink(missing_ok=True)
        fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def write_state(self, state: dict[str, Any]) -> None:
        """The streamer's heartbeat for `drtool wal status` (atomic replace)."""
        tmp = self.dir / f"{STATE_FILE}.tmp"
        tmp.write_text(json.dumps(state, indent=1, sort_keys=True))
        tmp.replace(self.dir / STATE_FILE)

    def read_state(self) -> dict[str, Any] | None:
        """The last heartbeat, if a streamer ever ran on this spool."""
        try:
            data = json.loads((self.dir / STATE_FILE).read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None
