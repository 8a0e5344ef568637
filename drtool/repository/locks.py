"""Repository locks: one writer (backup, prune) at a time, and no lockout by a dead one.

A lock is a small object ``locks/<lock-id>.json`` naming its holder: host, boot id, container
id, pid and the pid's start time (see :mod:`drtool.liveness`), the operation, when it was
taken, and a **heartbeat** the holder rewrites every ``heartbeat_s`` seconds from a background
thread. To take the lock a writer lists ``locks/``; any live lock of another writer refuses
with "locked by host/pid ... since T" and the exact command that clears it (exit 11). It then
writes its own object and lists again; when two writers raced, the one whose lock sorts later
steps back. Once it holds the lock it **sweeps** (deletes) every lock whose holder is dead.

A holder is dead (its lock is ignored and swept) when

- its lock says it was released (the holder could not delete it and marked it instead);
- it is this very process, and this process no longer holds that lock (a lock left by an
  earlier job of the scheduler whose delete failed: a process never waits for itself);
- it ran in this pid namespace (same host, boot id and container) and its pid is gone or
  now belongs to a process that started at another time: PID 1 of a restarted container;
- its heartbeat is older than ``LAPSE`` intervals, wherever it was written;
- (locks of drtool versions without a heartbeat) its pid is gone on this host, or it is older
  than ``stale_after`` (12 h).

A live holder whose own heartbeat could not be written for ``LAPSE - 2`` intervals may have
been judged dead by someone else: :meth:`HeldLock.ensure_held` refuses to commit then. The
decision is recorded in docs/decisions/0011-lock-liveness.md.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, replace
from datetime import UTC, datetime, timedelta

from drtool import liveness
from drtool.errors import DrtoolError, Locked, NotFound
from drtool.repository import layout
from drtool.storage.base import Storage

log = logging.getLogger(__name__)

DEFAULT_STALE_AFTER = timedelta(hours=12)  # locks without a heartbeat (older drtool versions)
HEARTBEAT_S = 60.0
LAPSE = 5  # a heartbeat older than LAPSE intervals means a dead holder

_HELD: set[str] = set()  # lock ids this process holds right now
_HELD_GUARD = threading.Lock()


@dataclass(frozen=True)
class LockInfo:
    """Who holds a lock, as stored."""

    lock_id: str
    host: str
    pid: int
    operation: str
    since: str
    boot_id: str = ""
    container: str = ""
    pid_start: int | None = None
    heartbeat: str | None = None
    heartbeat_s: float = 0.0
    released: str | None = None

    @property
    def key(self) -> str:
        """The storage key of this lock."""
        return f"{layout.LOCKS}{self.lock_id}.json"

    @property
    def owner(self) -> liveness.Owner:
        """The holder as a process to look up."""
        return liveness.Owner(self.host, self.boot_id, self.container, self.pid, self.pid_start)

    def describe(self) -> str:
        """``host/pid (operation) since T``: how messages name the holder."""
        return f"{self.host}/{self.pid} ({self.operation}) since {self.since}"

    @classmethod
    def from_json(cls, data: dict[str, object]) -> LockInfo:
        """A stored lock; fields a newer drtool added are ignored, not a reason to skip it."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})  # type: ignore[arg-type]

    def to_json(self) -> bytes:
        """The stored form."""
        return json.dumps(asdict(self)).encode()


def verdict(
    lock: LockInfo,
    now: datetime | None = None,
    stale_after: timedelta = DEFAULT_STALE_AFTER,
    *,
    here: liveness.Owner | None = None,
) -> tuple[bool, str]:
    """(alive, why) for ``lock``'s holder; see the module docstring for the rules."""
    now = now or datetime.now(UTC)
    here = here or liveness.current()
    if lock.released:
        return False, f"released at {lock.released} (its holder could not delete it)"
    with _HELD_GUARD:
        held_here = lock.lock_id in _HELD
    if held_here:
        return True, "held by this process"
    if lock.boot_id and lock.owner == here:  # same host, boot, container, pid, start time
        return False, "left by this process, which no longer holds it"
    alive, why = liveness.process_verdict(lock.owner, here)
    if alive is False:
        return False, why
    if lock.heartbeat:
        age = now - datetime.fromisoformat(lock.heartbeat)
        lapse = timedelta(seconds=LAPSE * (lock.heartbeat_s or HEARTBEAT_S))
        if age > lapse:
            return False, f"no heartbeat since {lock.heartbeat} ({_ago(age)} ago)"
        return True, f"heartbeat {_ago(age)} ago"
    if lock.host == here.host and not lock.boot_id and not liveness.pid_exists(lock.pid):
        return False, f"process {lock.pid} is gone"
    if now - datetime.fromisoformat(lock.since) > stale_after:
        return False, f"older than {stale_after} (a lock without heartbeat)"
    return True, "a lock without heartbeat, younger than " + str(stale_after)


def is_stale(lock: LockInfo, now: datetime, stale_after: timedelta = DEFAULT_STALE_AFTER) -> bool:
    """Whether ``lock``'s holder is dead (its lock is ignored and may be swept)."""
    return not verdict(lock, now, stale_after)[0]


def _ago(delta: timedelta) -> str:
    seconds = max(0, int(delta.total_seconds()))
    return f"{seconds}s" if seconds < 120 else f"{seconds // 60}m"


def read_locks(storage: Storage) -> list[LockInfo]:
    """Every lock object in the repository (unreadable ones are skipped with a warning)."""
    locks = []
    for obj in storage.list(layout.LOCKS):
        try:
            locks.append(LockInfo.from_json(json.loads(storage.get_bytes(obj.key))))
        except NotFound:
            continue  # released while we listed
        except (ValueError, TypeError, AttributeError):
            log.warning("ignoring an unreadable lock object %s", obj.key)
    return sorted(locks, key=lambda lk: (lk.since, lk.lock_id))


class HeldLock:
    """The lock this process holds; refreshes its heartbeat until released."""

    def __init__(self, storage: Storage, info: LockInfo, heartbeat_s: float) -> None:
        self.storage = storage
        self.info = info
        self.heartbeat_s = heartbeat_s
        self.left_behind: str | None = None  # set when the release failed: what to tell
        self._stop = threading.Event()
        self._last_ok = time.monotonic()
        self._thread = threading.Thread(target=self._beat, name="drtool-lock-heartbeat")
        self._thread.daemon = True

    @property
    def lock_id(self) -> str:
        """The lock's id."""
        return self.info.lock_id

    @property
    def host(self) -> str:
        """The holder's host name."""
        return self.info.host

    @property
    def since(self) -> str:
        """When the lock was taken."""
        return self.info.since

    @property
    def operation(self) -> str:
        """What the holder does."""
        return self.info.operation

    @property
    def key(self) -> str:
        """The lock's storage key."""
        return self.info.key

    def _beat(self) -> None:
        failing = False
        while not self._stop.wait(self.heartbeat_s):
            stamp = datetime.now(UTC).isoformat(timespec="seconds")
            try:
                self.storage.put_bytes(self.key, replace(self.info, heartbeat=stamp).to_json())
            except DrtoolError as exc:
                if not failing:
                    log.warning("could not refresh the repository lock's heartbeat: %s", exc)
                failing = True
                continue
            failing = False
            self._last_ok = time.monotonic()

    def ensure_held(self) -> None:
        """Refuse to go on when the heartbeat lapsed so long that others may think us dead."""
        silent = time.monotonic() - self._last_ok
        if silent > (LAPSE - 2) * self.heartbeat_s:
            raise Locked(
                f"the repository lock's heartbeat could not be written for {silent:.0f} s; "
                "another writer may have taken the lock, so this run stops before committing"
            )

    def release(self) -> None:
        """Delete the lock; when that fails, mark it released and say so in ``left_behind``."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        with _HELD_GUARD:
            _HELD.discard(self.lock_id)
        try:
            self.storage.delete(self.key)
            return
        except DrtoolError as exc:
            problem = exc.message
        stamp = datetime.now(UTC).isoformat(timespec="seconds")
        try:
            self.storage.put_bytes(self.key, replace(self.info, released=stamp).to_json())
            fate = "it is marked released, so no run waits for it"
        except DrtoolError:
            fate = (
                "no run of this process waits for it, and others treat it as dead once its "
                f"heartbeat is {LAPSE * self.heartbeat_s:g} s old"
            )
        self.left_behind = (
            f"the repository lock {self.key} could not be removed ({problem}); {fate}; "
            "`drtool unlock` removes it (it needs the right to delete under locks/)"
        )
        log.warning("%s", self.left_behind)


@contextmanager
def repository_lock(
    storage: Storage,
    operation: str,
    *,
    now: datetime | None = None,
    stale_after: timedelta = DEFAULT_STALE_AFTER,
    heartbeat_s: float = HEARTBEAT_S,
) -> Iterator[HeldLock]:
    """Hold the repository's writer lock for the duration of the block.

    After the block, ``left_behind`` of the yielded lock is set when the lock could not be
    removed; the block's own outcome stands either way (a committed snapshot stays committed).
    """
    now = now or datetime.now(UTC)
    here = liveness.current()
    stamp = now.isoformat(timespec="seconds")
    info = LockInfo(
        lock_id=f"{now:%Y%m%dT%H%M%S}-{secrets.token_hex(4)}",
        host=here.host,
        pid=here.pid,
        operation=operation,
        since=stamp,
        boot_id=here.boot_id,
        container=here.container,
        pid_start=here.started,
        heartbeat=datetime.now(UTC).isoformat(timespec="seconds"),
        heartbeat_s=heartbeat_s,
    )

    def others() -> tuple[list[LockInfo], list[tuple[LockInfo, str]]]:
        live, dead = [], []
        for lk in read_locks(storage):
            if lk.lock_id == info.lock_id:
                continue
            alive, why = verdict(lk, datetime.now(UTC), stale_after, here=here)
            if alive:
                live.append(lk)
            else:
                dead.append((lk, why))
        return live, dead

    holders, _ = others()
    if holders:
        raise locked_error(holders[0])
    held = HeldLock(storage, info, heartbeat_s)
    with _HELD_GUARD:
        _HELD.add(info.lock_id)
    try:
        storage.put_bytes(info.key, info.to_json())
    except BaseException:
        with _HELD_GUARD:
            _HELD.discard(info.lock_id)
        raise
    try:
        live, dead = others()
        rivals = [lk for lk in live if (lk.since, lk.lock_id) < (info.since, info.lock_id)]
        if rivals:
            raise locked_error(rivals[0])
        held._thread.start()
        _sweep(storage, dead)
        yield held
    finally:
        # the run's own error (if any) is the one to report; a failed release is a warning
        held.release()


def _sweep(storage: Storage, dead: list[tuple[LockInfo, str]]) -> None:
    """Delete the locks of dead holders (best effort: a failure is one warning)."""
    failed: list[str] = []
    for lock, why in dead:
        try:
            storage.delete(lock.key)
        except NotFound:
            continue
        except DrtoolError as exc:
            failed.append(f"{lock.lock_id} ({exc.message})")
            continue
        log.info("removed the lock of %s: its holder is dead: %s", lock.describe(), why)
    if failed:
        log.warning(
            "could not remove %d lock(s) of dead holders: %s", len(failed), "; ".join(failed)
        )


def locked_error(holder: LockInfo) -> Locked:
    """The "locked" error: who holds the lock, why they count as alive, and how to clear it."""
    where = f" in container {holder.container[:12]}" if holder.container else ""
    _, why = verdict(holder)
    return Locked(
        f"repository locked by {holder.describe()}{where} ({why}); wait for it to finish, "
        f"or if that run is gone: `drtool unlock --id {holder.lock_id}`"
    )


def unlock(
    storage: Storage,
    *,
    everything: bool = False,
    lock_id: str | None = None,
    stale_after: timedelta = DEFAULT_STALE_AFTER,
) -> list[tuple[LockInfo, str]]:
    """Remove the locks of dead holders (``lock_id``: that one; ``everything``: every lock).

    Returns each removed lock with why it went.
    """
    now = datetime.now(UTC)
    here = liveness.current()
    removed = []
    found = False
    for lock in read_locks(storage):
        if lock_id is not None:
            if lock.lock_id != lock_id:
                continue
            found, why = True, "asked for by id"
        elif everything:
            why = "--all"
        else:
            alive, why = verdict(lock, now, stale_after, here=here)
            if alive:
                continue
        try:
            storage.delete(lock.key)
        except NotFound:
            continue
        removed.append((lock, why))
    if lock_id is not None and not found:
        raise NotFound(f"lock {lock_id}: not in the repository (`drtool unlock` lists none)")
    return removed
