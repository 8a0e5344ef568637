"""Which base backup and which WAL a point-in-time restore needs, decided before any byte moves.

A target is a moment (``--at``, with a timezone) or a WAL position (``--lsn``). The base is the
newest valid ``postgres-base`` consistent at or before it: for a moment, its snapshot finished
at or before the target (the manifest is written after the base's stop point, so that is
conservative); for a position, its ``stop_lsn`` is at or before it. No such base is an error
naming the window, never a silent restore to a later moment. From the base's
``start_segment`` the WAL index must hold every following segment up to the target: a moment
is in reach when the run of consecutive segments from the base holds a segment sealed at or
after it, a position when the run's end lies at or beyond it. A missing segment before the
target names it and the latest reachable moment.

Timelines: recovery runs with ``recovery_target_timeline = 'latest'`` and never goes back to
an older timeline's file once it read a newer one, so the run is built along the timeline it
follows (drtool/wal/history.py, :class:`Followed`: for each segment number, the file of the
newest timeline begun there), read from the history files themselves; a gap is named under
that file's name, although another timeline may hold a segment of that number. A moment only
an abandoned timeline's WAL reaches (WAL of a timeline after it was left) is refused: that
history cannot be chosen. Key-less callers (the whole-stack preview, the drill's window) pass
no histories: each timeline is then taken to branch from the one below at its first segment
held, an estimate; the restore itself reads them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from drtool.errors import IntegrityError, NotFound
from drtool.repository.catalog import SnapshotRecord
from drtool.repository.manifest import ComponentEntry, Manifest
from drtool.wal.history import Branch, Followed, follow, timeline_at
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
    followed: Followed | None = None  # the timeline recovery follows, and its history
    notes: list[str] = field(default_factory=list)  # said with the plan and the result

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


def estimated_histories(index: WalIndex, size: int) -> dict[int, list[Branch]]:
    """Without the identity to read them: each timeline with a history file held taken to
    branch from the one below at its first segment held (the usual promotion's shape)."""
    firsts: dict[int, int] = {}
    lasts: dict[int, int] = {}
    for entry in index.segments():
        seg = parse_segment(entry.name, size)
        firsts[seg.timeline] = min(firsts.get(seg.timeline, seg.segno), seg.segno)
        lasts[seg.timeline] = max(lasts.get(seg.timeline, seg.segno), seg.segno)
    out: dict[int, list[Branch]] = {}
    for timeline in sorted(timeline_of(n) for n in index.entries if is_history(n)):
        parent = out.get(timeline - 1, [])
        begin = firsts.get(timeline, lasts.get(timeline - 1, -1) + 1) * size
        floor = parent[-1].end if parent else 0
        out[timeline] = [*parent, Branch(timeline - 1, max(begin, floor))]
    return out


def followed_from(
    base: Base, index: WalIndex, size: int, histories: dict[int, list[Branch]] | None
) -> Followed:
    """The timeline recovery from ``base`` follows (the histories read, else estimated)."""
    return follow(
        base.timeline, estimated_histories(index, size) if histories is None else histories
    )


def run_from(
    index: WalIndex,
    base: Base,
    size: int,
    histories: dict[int, list[Branch]] | None = None,
) -> tuple[list[WalEntry], str | None]:
    """The consecutive segments from ``base.start`` along the timeline recovery follows, and
    the first missing one after them under the name recovery asks for (None when the run
    reaches the newest segment held on that timeline's path)."""
    followed = followed_from(base, index, size, histories)
    newest = -1
    for entry in index.segments():
        seg = parse_segment(entry.name, size)
        if seg.segno >= base.start.segno and seg.timeline == followed.timeline_for(seg.segno, size):
            newest = max(newest, seg.segno)
    run: list[WalEntry] = []
    segno = base.start.segno
    while (held := index.entries.get(_path_name(followed, segno, size))) is not None:
        run.append(held)
        segno += 1
    missing = _path_name(followed, segno, size) if segno <= newest else None
    return run, missing


def _path_name(followed: Followed, segno: int, size: int) -> str:
    return SegmentId(segno, followed.timeline_for(segno, size)).name(size)


def abandoned(index: WalIndex, base: Base, followed: Followed, size: int) -> list[WalEntry]:
    """Segments from the base on that recovery never reads past a switch: WAL a timeline
    wrote after it was left (or of a timeline outside the followed history)."""
    out = []
    for entry in index.segments():
        seg = parse_segment(entry.name, size)
        if seg.timeline < base.timeline or seg.segno < base.start.segno:
            continue
        if seg.timeline == followed.timeline_for(seg.segno, size):
            continue
        end = followed.end_of(seg.timeline)
        if end is None or seg.segno > end // size:
            out.append(entry)
    return out


def _sealed(entry: WalEntry) -> datetime:
    return datetime.fromisoformat(entry.sealed)


def _end_lsn(entry: WalEntry, size: int) -> int:
    return (parse_segment(entry.name, size).segno + 1) * size


def window_text(
    bases: list[Base],
    index: WalIndex,
    size: int,
    histories: dict[int, list[Branch]] | None = None,
) -> str:
    """From the oldest base's finish to the newest WAL reachable from the newest base."""
    if not bases:
        return "no base backup in the repository (run `drtool backup --component postgres-base`)"
    run, _ = run_from(index, bases[-1], size, histories)
    oldest = bases[0]
    start = f"{oldest.finished.isoformat()} (LSN {oldest.component.details['stop_lsn']})"
    if not run:
        end = f"{bases[-1].finished.isoformat()} (no WAL after the newest base)"
    else:
        last = run[-1]
        end_lsn = _end_lsn(last, size)
        end = f"{last.sealed} (segment {last.name}, LSN {_lsn(end_lsn)})"
    return f"{start} .. {end}"


def plan(
    records: list[SnapshotRecord],
    index: WalIndex,
    target: Target,
    histories: dict[int, list[Branch]] | None = None,
) -> PitrPlan:
    """Choose the base and the WAL for ``target``; NotFound/IntegrityError naming the window.

    ``histories``: every history file of the index, read (drtool/wal/fetch.py
    ``read_histories``); None estimates them (key-less previews, see the module's text)."""
    if index.problems:
        raise IntegrityError(
            f"WAL index: {index.problems[0]}; nothing restored (run `drtool wal verify`)"
        )
    size = index.segment_size
    if size is None:
        raise NotFound("restore to a moment: the repository holds no WAL (`drtool wal stream`)")
    bases = bases_of(records, size)
    window = window_text(bases, index, size, histories)
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
    followed = followed_from(base, index, size, histories)
    if histories is not None:  # an estimate cannot tell where inside a segment a switch lay
        _check_on_history(base, followed, target)
    run, missing = run_from(index, base, size, histories)

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
        _refuse_abandoned(index, base, followed, size, target, reachable())
        raise NotFound(
            f"restore to {target.describe()}: after the newest WAL held; the window is {window}"
        )
    history = [
        e
        for e in index.entries.values()
        if is_history(e.name) and timeline_of(e.name) >= base.timeline
    ]
    stage_count = min(len(run), upto + 1 + MARGIN)
    chosen = PitrPlan(base, target, run, stage_count, history, window, size, missing, followed)
    chosen.notes += _also_abandoned(index, base, followed, size, target, run[upto])
    return chosen


def _check_on_history(base: Base, followed: Followed, target: Target) -> None:
    """PostgreSQL refuses a base its target timeline's history left before the base ended
    ("requested timeline is not a child of this server's history"): say so first."""
    on = timeline_at(base.stop_lsn, followed.timeline, list(followed.branches))
    if on != base.timeline:
        raise NotFound(
            f"restore to {target.describe()}: base backup {base.snapshot_id} (timeline "
            f"{base.timeline}, up to LSN {_lsn(base.stop_lsn)}) is not on the history of "
            f"timeline {followed.timeline}, the newest, which recovery follows; a timeline "
            "other than the newest cannot be chosen"
        )


def _refuse_abandoned(
    index: WalIndex, base: Base, followed: Followed, size: int, target: Target, reachable: str
) -> None:
    """A target only WAL of an abandoned timeline reaches: refused, naming that timeline."""
    for entry in abandoned(index, base, followed, size):
        beyond = (
            _sealed(entry) >= target.at
            if target.at is not None
            else _end_lsn(entry, size) > parse_lsn(str(target.lsn))
        )
        if beyond:
            end = followed.end_of(entry.timeline)
            left = f"after it was left at LSN {_lsn(end)}" if end is not None else "off it"
            raise NotFound(
                f"restore to {target.describe()}: only WAL of timeline {entry.timeline} "
                f"{left} reaches it (segment {entry.name}); recovery follows timeline "
                f"{followed.timeline} (the newest), so a moment on an abandoned timeline cannot "
                f"be chosen; the latest reachable moment is {reachable}"
            )


def _also_abandoned(
    index: WalIndex, base: Base, followed: Followed, size: int, target: Target, at: WalEntry
) -> list[str]:
    """The target reached along the followed timeline while an abandoned timeline's WAL after
    its switch also reaches it: two histories held that moment; say which one is restored."""
    seg = parse_segment(at.name, size).segno
    notes = []
    dropped = abandoned(index, base, followed, size)
    for timeline in sorted({e.timeline for e in dropped}):
        end = followed.end_of(timeline)
        tail = [
            e
            for e in dropped
            if e.timeline == timeline
            and (
                _sealed(e) >= target.at
                if target.at is not None
                else _end_lsn(e, size) > parse_lsn(str(target.lsn))
            )
        ]
        if end is not None and seg >= end // size and tail:
            notes.append(
                f"timeline {timeline} also holds WAL after it was left at LSN {_lsn(end)} "
                f"(through segment {max(e.name for e in tail)}): {target.describe()} is "
                f"restored along timeline {followed.timeline}, the newest (recovery follows "
                f"it; a moment on timeline {timeline} after the switch cannot be chosen)"
            )
    return notes


def _lsn(value: int) -> str:
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"
