"""Repository locks: one writer (backup, prune) at a time.

A lock is a small object ``locks/<lock-id>.json`` naming host, pid, operation and start time.
To take the lock a writer lists ``locks/``; any live lock of another writer refuses with
"locked by host/pid since T" (exit 11). It then writes its own object and lists again; when two
writers raced, the one whose lock sorts later steps back. A lock is stale when its holder is a
dead process on this host, or older than ``stale_after``; stale locks are ignored and swept.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta

from drtool.errors import DrtoolError, Locked, NotFound
from drtool.repository import layout
from drtool.storage.base import Storage

log = logging.getLogger(__name__)

DEFAULT_STALE_AFTER = timedelta(hours=12)


@dataclass(frozen=True)
class LockInfo:
    """Who holds a lock, as stored."""

    lock_id: str
    host: str
    pid: int
    operation: str
    since: str

    @property
    def key(self) -> str:
        """The storage key of this lock."""
        return f"{layout.LOCKS}{self.lock_id}.json"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_stale(lock: LockInfo, now: datetime, stale_after: timedelta) -> bool:
    """Whether ``lock``'s holder is gone: a dead pid on this host, or older than stale_after."""
    if lock.host == socket.gethostname() and not _pid_alive(lock.pid):
        return True
    return now - datetime.fromisoformat(lock.since) > stale_after


def read_locks(storage: Storage) -> list[LockInfo]:
    """Every lock object in the repository (unreadable ones are skipped with a warning)."""
    locks = []
    for obj in storage.list(layout.LOCKS):
        try:
            data = json.loads(storage.get_bytes(obj.key))
            locks.append(LockInfo(**data))
        except NotFound:
            continue  # released while we listed
        except (ValueError, TypeError):
            log.warning("ignoring an unreadable lock object %s", obj.key)
    return sorted(locks, key=lambda lk: (lk.since, lk.lock_id))


@contextmanager
def repository_lock(
    storage: Storage,
    operation: str,
    *,
    now: datetime | None = None,
    stale_after: timedelta = DEFAULT_STALE_AFTER,
) -> Iterator[LockInfo]:
    """Hold the repository's writer lock for the duration of the block."""
    now = now or datetime.now(UTC)
    mine = LockInfo(
        lock_id=f"{now:%Y%m%dT%H%M%S}-{secrets.token_hex(4)}",
        host=socket.gethostname(),
        pid=os.getpid(),
        operation=operation,
        since=now.isoformat(timespec="seconds"),
    )

    def live_others() -> list[LockInfo]:
        return [
            lk
            for lk in read_locks(storage)
            if lk.lock_id != mine.lock_id and not is_stale(lk, now, stale_after)
        ]

    holders = live_others()
    if holders:
        raise _locked(holders[0])
    storage.put_bytes(mine.key, json.dumps(asdict(mine)).encode())
    try:
        rivals = [lk for lk in live_others() if (lk.since, lk.lock_id) < (mine.since, mine.lock_id)]
        if rivals:
            raise _locked(rivals[0])
        yield mine
    except BaseException:
        # the run's own error is the one to report; a lock we cannot delete is stale anyway
        try:
            storage.delete(mine.key)
        except DrtoolError as exc:
            log.warning("could not release the repository lock: %s", exc.message)
        raise
    storage.delete(mine.key)


def _locked(holder: LockInfo) -> Locked:
    return Locked(
        f"repository locked by {holder.host}/{holder.pid} ({holder.operation}) since "
        f"{holder.since}; if that run is gone, `drtool unlock` removes stale locks"
    )


def unlock(
    storage: Storage, *, everything: bool, stale_after: timedelta = DEFAULT_STALE_AFTER
) -> list[LockInfo]:
    """Remove stale locks (or every lock with ``everything``); returns what was removed."""
    now = datetime.now(UTC)
    removed = []
    for lock in read_locks(storage):
        if everything or is_stale(lock, now, stale_after):
            storage.delete(lock.key)
            removed.append(lock)
    return removed
