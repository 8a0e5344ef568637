"""Continuity of the WAL the index records: runs of consecutive segments, gaps, timelines.

Recovery replays segments in order; one missing segment ends what can be reached. Segments
are walked by absolute segment number; a step to a higher timeline (a promotion) is followed
when that timeline's history file is recorded, since recovery needs it to switch. The
recoverable stretch is the last unbroken run (a base backup that starts before its first
segment is needed to use it; that is the base backup's part, not the index's).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from drtool.wal.index import WalEntry, WalIndex
from drtool.wal.names import SegmentId, history_name, parse_segment


@dataclass(frozen=True)
class Gap:
    """Segments missing between two recorded ones."""

    after: str  # the last segment before the gap
    first_missing: str
    missing: int  # how many segment numbers are absent
    resumes: str  # the first segment after the gap

    def describe(self) -> str:
        """One line naming the missing segment."""
        more = f" and {self.missing - 1} more" if self.missing > 1 else ""
        return f"missing WAL segment {self.first_missing}{more} (after {self.after})"


@dataclass
class Continuity:
    """What the index proves: the last unbroken run, the gaps and timeline problems."""

    first: WalEntry | None = None  # first segment of the last unbroken run
    last: WalEntry | None = None  # newest segment
    oldest: WalEntry | None = None  # oldest segment recorded at all
    segments: int = 0
    gaps: list[Gap] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # missing history files


def check(index: WalIndex) -> Continuity:
    """Walk the recorded segments in WAL order and report runs, gaps and timeline switches."""
    result = Continuity()
    size = index.segment_size
    if size is None:
        return result
    ordered: list[tuple[SegmentId, WalEntry]] = sorted(
        (parse_segment(e.name, size), e) for e in index.segments()
    )
    result.segments = len(ordered)
    if not ordered:
        return result
    result.oldest, result.first = ordered[0][1], ordered[0][1]
    prev_id, prev = ordered[0]
    for seg_id, entry in ordered[1:]:
        if seg_id.segno > prev_id.segno + 1:
            missing = SegmentId(prev_id.segno + 1, prev_id.timeline).name(size)
            gap = Gap(prev.name, missing, seg_id.segno - prev_id.segno - 1, entry.name)
            result.gaps.append(gap)
            result.first = entry
        if seg_id.timeline > prev_id.timeline and history_name(seg_id.timeline) not in (
            index.entries
        ):
            result.problems.append(
                f"timeline {seg_id.timeline}: history file {history_name(seg_id.timeline)} "
                f"is not in the WAL index (needed to follow the switch at {entry.name})"
            )
        prev_id, prev = seg_id, entry
    result.last = prev
    return result
