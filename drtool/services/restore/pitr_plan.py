"""Which base backup and which WAL a point-in-time restore needs, decided before any byte moves.

A target is a moment (``--at``, with a timezone) or a WAL position (``--lsn``). The base is the
newest valid ``postgres-base`` consistent at or before it: for a moment, its snapshot finished
at or before the target (the manifest is written after the base's stop point, so that is
conservative); for a position, its ``stop_lsn`` is at or before it. No such base is an error
naming the window, never a silent restore to a later moment. From the base's
``start_segment`` the WAL index must hold every following segment up to the target: a moment
is in reach when the run of consecutive segments from the base holds a segment sealed at or
after it, a position when the run's end lies at or beyond it. A missing segment before the
target names it and the latest reachable moment. Timelines: segments of any timeline at or
above the base's count (recovery follows the history files, all of which are staged).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from drtool.errors import IntegrityError, NotFound
from drtool.repository.catalog import SnapshotRecord
from drtool.repository.manifest import ComponentEntry, Manifest
from drtool.wal.index import WalEntry, WalIndex
from drtool.wal.names import SegmentId, is_history, parse_lsn, parse_segment, timeline_of

BASE = "postgres-base"
MARGIN = 1  # segments staged past the target's: a record or commit that crosses the boundary


@dataclass(frozen=True)
class Base:
    """One restorable base backup."""

    manifest: Manifest
    component: ComponentEntry
    finished: datetime
    start: SegmentId
    stop_lsn: int
    timeline: int
    system_identifier: str

    @property
    def snapshot_id(self) -> str:
        """The snapshot holding it."""
        return self.manifest.snapshot_id


@dataclass(frozen=True)
class Target:
    """A moment or a WAL position (exactly one)."""

    at: datetime | None = None
    lsn: str | None = None

    def describe(self) -> str:
        """For messages."""
        return self.at.isoformat() if self.at is not None else f"LSN {self.lsn}"


@dataclass
class PitrPlan:
    """The chosen base, the run of WAL it can replay, and what to stage first."""

    base: Base
    target: Target
    run: list[WalEntry]  # consecutive segments from the base's start, as far as they go
    stage_count: int  # how many of ``run`` to stage first (more on demand)
    history: list[WalEntry]
    window: str
    segment_size: int
    missing: str | None = None  # the first segment absent after ``run`` (a gap), if any

    def staged_first(self) -> list[WalEntry]:
        """The segments staged before recovery starts."""
        return self.run[: self.stage_count]


def bases_of(records: list[SnapshotRecord], size: int) -> list[Base]:
    """Every valid snapshot's base backup, oldest first."""
    found = []
    for record in records:
        m = record.manifest
        comp = m.component(BASE) if record.valid and m is not None else None
        if m is None or comp is None:
            continue
        d = comp.details
        found.append(
            Base(
                m,
                comp,
                datetime.fromisoformat(m.finished),
                parse_segment(str(d["start_segment"]), size),
                parse_lsn(str(d["stop_lsn"])),
                int(d["timeline"]),
                str(d["system_identifier"]),
            )
        )
    return sorted(found, key=lambda b: b.finished)


def run_from(index: WalIndex, base: Base, size: int) -> tuple[list[WalEntry], str | None]:
    """The consecutive segments from ``base.start`` and the first missing one after them
    (None when the run reaches the newest segment the index holds)."""
    by_segno: dict[int, list[tuple[int, WalEntry]]] = {}
    for entry in index.segments():
        seg = parse_segment(entry.name, size)
        if seg.timeline >= base.timeline:
            by_segno.setdefault(seg.segno, []).append((seg.timeline, entry))
    newest = max(by_segno, default=-1)
    run: list[WalEntry] = []
    segno = base.start.segno
    while segno in by_segno:
        run += [e for _, e in sorted(by_segno[segno], key=lambda t: t[0])]
        segno += 1
    missing = None
    if segno <= newest:
        timeline = timeline_of(run[-1].name) if run else base.timeline
        missing = SegmentId(segno, timeline).name(size)
    return run, missing


def _sealed(entry: WalEntry) -> datetime:
    return datetime.fromisoformat(entry.sealed)


def _end_lsn(entry: WalEntry, size: int) -> int:
    return (parse_segment(entry.name, size).segno + 1) * size


def window_text(bases: list[Base], index: WalIndex, size: int) -> str:
    """From the oldest base's finish to the newest WAL reachable from the newest base."""
    if not bases:
        return "no base backup in the repository (run `drtool backup --component postgres-base`)"
    run, _ = run_from(index, bases[-1], size)
    oldest = bases[0]
    start = f"{oldest.finished.isoformat()} (LSN {oldest.component.details['stop_lsn']})"
    if not run:
        end = f"{bases[-1].finished.isoformat()} (no WAL after the newest base)"
    else:
        last = run[-1]
        end_lsn = _end_lsn(last, size)
        end = f"{last.sealed} (segment {last.name}, LSN {end_lsn >> 32:X}/{end_lsn & 0xFFFFFFFF:X})"
    return f"{start} .. {end}"


def plan(records: list[SnapshotRecord], index: WalIndex, target: Target) -> PitrPlan:
    """Choose the base and the WAL for ``target``; NotFound/IntegrityError naming the window."""
    if index.problems:
        raise IntegrityError(
            f"WAL index: {index.problems[0]}; nothing restored (run `drtool wal verify`)"
        )
    size = index.segment_size
    if size is None:
        raise NotFound("restore to a moment: the repository holds no WAL (`drtool wal stream`)")
    bases = bases_of(records, size)
    window = window_text(bases, index, size)
    if target.at is not None:
        at = target.at
        fitting = [b for b in bases if b.finished <= at]
    else:
        assert target.lsn is not None
        lsn = parse_lsn(target.lsn)
        fitting = [b for b in bases if b.stop_lsn <= lsn]
    if not fitting:
        raise NotFound(
            f"restore to {target.describe()}: no base backup at or before it; the window is "
            f"{window}"
        )
    base = fitting[-1]
    run, missing = run_from(index, base, size)

    def reachable() -> str:
        if not run:
            return f"none (base backup {base.snapshot_id} has no WAL)"
        return f"{run[-1].sealed} (through segment {run[-1].name})"

    if target.at is not None:
        upto = next((i for i, e in enumerate(run) if _sealed(e) >= target.at), None)
        while upto is not None and upto + 1 < len(run) and run[upto + 1].sealed == run[upto].sealed:
            upto += 1  # sealed in one batch: any of them may hold the moment
    else:
        upto = next((i for i, e in enumerate(run) if _end_lsn(e, size) > lsn), None)
        if upto is None and run and _end_lsn(run[-1], size) == lsn:
            upto = len(run) - 1
    if upto is None:
        if missing is not None:
            raise NotFound(
                f"restore to {target.describe()}: WAL segment {missing} is missing (a gap in the "
                f"WAL from base backup {base.snapshot_id}); the latest reachable moment is "
                f"{reachable()}"
            )
        raise NotFound(
            f"restore to {target.describe()}: after the newest WAL held; the window is {window}"
        )
    history = [
        e
        for e in index.entries.values()
        if is_history(e.name) and timeline_of(e.name) >= base.timeline
    ]
    stage_count = min(len(run), upto + 1 + MARGIN)
    return PitrPlan(base, target, run, stage_count, history, window, size, missing)
