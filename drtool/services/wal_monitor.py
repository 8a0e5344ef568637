"""What ``drtool wal stream`` tells Prometheus: lag, the PITR window, the spool, a lost slot.

The streamer calls :class:`WalMonitor` once per tick, in its own thread, so the WAL index it
reads is exactly the one the sealer appends to (no second reader, no race). Every series
appears only once what it describes happened (ADR 0012, :class:`WalMetrics`).

- **Lag** is what the RPO depends on: the age of the oldest WAL the server wrote that is not
  in the repository yet. Each tick the server's WAL insert position is noted with the time;
  an observation is settled once the sealed segments reach past it. The age of the oldest
  unsettled observation is the lag: 0 on an idle server, up to about ``flush_interval`` plus
  one upload under traffic, growing while the repository or the receiver is down.
- **Window**: from the end of the oldest base backup (``postgres-base`` snapshot) whose WAL
  is unbroken up to the newest segment, to the time that segment was sealed. Snapshot
  manifests are read (signature-checked, each once) every ``window_every`` seconds.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime

import psycopg

from drtool.errors import DrtoolError
from drtool.repository.access import Repo
from drtool.repository.catalog import load_snapshot, snapshot_ids
from drtool.services.scheduling.metrics import WalMetrics
from drtool.wal import continuity
from drtool.wal.names import parse_lsn, parse_segment, segment_of_lsn
from drtool.wal.streamer import Streamer

log = logging.getLogger(__name__)

BASE_COMPONENT = "postgres-base"
PAGE_HEADER = 40  # a segment's first page header: an insert position this far in has no WAL yet
MAX_OBSERVATIONS = 10_000  # past this the newest observation is moved on, never a lag lost


@dataclass(frozen=True)
class Base:
    """A base backup as the window needs it: the segments it spans and when it finished."""

    first_segno: int
    last_segno: int
    finished: float


@dataclass
class WalMonitor:
    """Updates :class:`WalMetrics` from one streamer, once per tick."""

    metrics: WalMetrics
    repo: Repo
    slot: str
    spool_max_bytes: int
    window_policy_s: float
    window_every: float = 300.0
    _observed: deque[tuple[float, int]] = field(default_factory=deque)
    _cont: continuity.Continuity | None = None
    _entries_seen: int = -1
    _bases: dict[str, Base | None] = field(default_factory=dict)
    _bases_read: float = -math.inf
    _position_read: bool = False

    def __post_init__(self) -> None:
        self.metrics.spool_max_bytes.labels(self.slot).set(self.spool_max_bytes)
        self.metrics.window_policy.labels(self.slot).set(self.window_policy_s)

    def __call__(self, streamer: Streamer) -> None:
        """One tick: spool, newest segment, lag, window, slot loss."""
        m, slot = self.metrics, self.slot
        m.spool_bytes.labels(slot).set(streamer.spool.size())
        if streamer.slot_lost_at is not None:
            m.slot_lost.labels(slot).set(streamer.slot_lost_at)
        cont = self._continuity(streamer)
        sealed_end = None
        if cont.last is not None:
            m.last_segment.labels(slot).set(_ts(cont.last.sealed))
            size = streamer.sealer.index.segment_size or streamer.sealer.segment_size
            sealed_end = (parse_segment(cont.last.name, size).segno + 1) * size
        self._lag(streamer, sealed_end)
        self._window(streamer, cont)

    # --- the newest segment and continuity ----------------------------------------------

    def _continuity(self, streamer: Streamer) -> continuity.Continuity:
        index = streamer.sealer.index
        if self._cont is None or len(index.entries) != self._entries_seen:
            self._cont = continuity.check(index)  # only when something was sealed
            self._entries_seen = len(index.entries)
        return self._cont

    # --- lag ----------------------------------------------------------------------------

    def _lag(self, streamer: Streamer, sealed_end: int | None) -> None:
        switcher = streamer.switcher
        if switcher is not None:
            try:
                position = switcher.insert_lsn()
            except psycopg.Error:
                switcher.close()  # the server is away: what is unsettled keeps ageing
                position = None
            if position == "":
                return  # a standby inserts no WAL: no lag of its own to report
            if position is not None:
                self.observe(time.time(), parse_lsn(position))
                self._position_read = True
        if not self._position_read:
            return  # the server's position was never read: no lag to claim
        self.settle(sealed_end)
        self.metrics.lag.labels(self.slot).set(self.lag(time.time()))

    def observe(self, when: float, lsn: int) -> None:
        """The server's WAL reached ``lsn`` at ``when``."""
        if self._observed and self._observed[-1][1] == lsn:
            return
        if len(self._observed) >= MAX_OBSERVATIONS:
            self._observed[-1] = (self._observed[-1][0], lsn)  # older time: lag overstated
            return
        self._observed.append((when, lsn))

    def settle(self, sealed_end: int | None) -> None:
        """Drop the observations the repository now holds."""
        if sealed_end is None:
            return
        while self._observed and self._observed[0][1] <= sealed_end + PAGE_HEADER:
            self._observed.popleft()

    def lag(self, now: float) -> float:
        """Age of the oldest WAL position not yet stored (0 when none is pending)."""
        return max(0.0, now - self._observed[0][0]) if self._observed else 0.0

    # --- the window ---------------------------------------------------------------------

    def _window(self, streamer: Streamer, cont: continuity.Continuity) -> None:
        if cont.first is None or cont.last is None:
            return
        if time.monotonic() - self._bases_read >= self.window_every:
            self._bases_read = time.monotonic()
            try:
                self._read_bases(streamer.sealer.index.segment_size or streamer.sealer.segment_size)
            except DrtoolError as exc:  # the repository is away: keep what is known
                log.warning("PITR window: snapshots not read (%s)", exc)
        size = streamer.sealer.index.segment_size or streamer.sealer.segment_size
        first = parse_segment(cont.first.name, size).segno
        last = parse_segment(cont.last.name, size).segno
        covered = [
            b.finished
            for b in self._bases.values()
            if b is not None and first <= b.first_segno and b.last_segno <= last
        ]
        if covered:
            self.metrics.window_start.labels(self.slot).set(min(covered))
            self.metrics.window_end.labels(self.slot).set(_ts(cont.last.sealed))
        else:  # no base before unbroken WAL (none yet, or a gap since): no window
            for gauge in (self.metrics.window_start, self.metrics.window_end):
                with contextlib.suppress(KeyError):
                    gauge.remove(self.slot)

    def _read_bases(self, segment_size: int) -> None:
        """Each new snapshot's manifest, once: its base backup's segments, if it has one."""
        repo = self.repo
        listed = snapshot_ids(repo.storage)
        for gone in set(self._bases) - set(listed):  # pruned
            del self._bases[gone]
        for sid in listed:
            if sid in self._bases:
                continue
            manifest, _, problem = load_snapshot(
                repo.storage, sid, repo.verify_keys, repo.info.repo_id
            )
            entry = manifest.component(BASE_COMPONENT) if manifest is not None else None
            if manifest is None or entry is None or problem is not None:
                self._bases[sid] = None
                continue
            d = entry.details
            try:
                timeline = int(d["timeline"])
                start = parse_segment(str(d["start_segment"]), segment_size).segno
                stop = segment_of_lsn(parse_lsn(str(d["stop_lsn"])), timeline, segment_size)
                self._bases[sid] = Base(start, stop.segno, _ts(manifest.finished))
            except (KeyError, ValueError, TypeError) as exc:
                log.warning("snapshot %s: base backup details unreadable (%s)", sid, exc)
                self._bases[sid] = None


def _ts(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()
