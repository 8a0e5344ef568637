"""Timeline history files: which timeline a WAL position belongs to, and which timeline's file
PostgreSQL reads for each segment when recovery follows the latest timeline.

``0000000T.history`` lists, one line per ancestor, ``<parent timeline>\\t<switch LSN>\\t<reason>``:
timeline T branched from each parent at that position. When a promotion lands inside a
segment, the new timeline's copy of that segment starts with the parent's bytes, so its first
page header names the parent timeline, not T. PostgreSQL decides which timeline a position is
on with ``tliOfPointInHistory``; :func:`timeline_at` is the same rule, so a staged segment's
header can be checked against what its timeline's history says it must carry.

Recovery with ``recovery_target_timeline = 'latest'`` (what drtool sets) first finds the
newest timeline (``findNewestTimeLine``: history files probed upward from the base's timeline,
stopping at the first absent one) and then, for each segment, reads the file of the newest
timeline of that timeline's history that had begun by then (``XLogFileReadAnyTLI``); it never
goes back to an older timeline's file once it read a newer one. :class:`Followed` is that
rule, so a plan can name the exact file recovery will ask for, and a gap under its name.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from drtool.errors import IntegrityError
from drtool.wal.names import is_history, parse_lsn, timeline_of


@dataclass(frozen=True)
class Branch:
    """Timeline ``parent`` ended (was branched from) at WAL position ``end``."""

    parent: int
    end: int


def parse_history(text: str, *, name: str) -> list[Branch]:
    """The branches a history file records, oldest first; IntegrityError when malformed.

    As PostgreSQL's ``readTimeLineHistory``: timelines strictly increase and stay below the
    file's own; switch points never go back (a file that says otherwise is not a history).
    """
    own = timeline_of(name) if is_history(name) else None
    branches: list[Branch] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        try:
            branch = Branch(int(fields[0]), parse_lsn(fields[1]))
        except (IndexError, ValueError):
            raise IntegrityError(f"{name}: not a timeline history line: {line[:80]!r}") from None
        if branches and (branch.parent <= branches[-1].parent or branch.end < branches[-1].end):
            raise IntegrityError(
                f"{name}: timelines and switch points must increase (timeline {branch.parent} "
                f"at {branch.end:X} after timeline {branches[-1].parent} at "
                f"{branches[-1].end:X})"
            )
        if own is not None and branch.parent >= own:
            raise IntegrityError(f"{name}: parent timeline {branch.parent} is not below {own}")
        branches.append(branch)
    return branches


def timeline_at(position: int, timeline: int, branches: list[Branch]) -> int:
    """The timeline WAL ``position`` lies on, seen from ``timeline`` (tliOfPointInHistory)."""
    for branch in branches:
        if position < branch.end:
            return branch.parent
    return timeline


def newest_timeline(start: int, with_history: Iterable[int]) -> int:
    """PostgreSQL's ``findNewestTimeLine``: from ``start``, up while the next history exists."""
    present = set(with_history)
    newest = start
    while newest + 1 in present:
        newest += 1
    return newest


@dataclass(frozen=True)
class Followed:
    """The timeline recovery follows and its history (its ancestors and where each ended)."""

    timeline: int
    branches: tuple[Branch, ...] = ()

    def begins(self) -> list[tuple[int, int]]:
        """Each timeline of the history with the WAL position it began at, oldest first."""
        out, begin = [], 0
        for branch in self.branches:
            out.append((branch.parent, begin))
            begin = branch.end
        return [*out, (self.timeline, begin)]

    def timeline_for(self, segno: int, segment_size: int) -> int:
        """The timeline whose file of segment ``segno`` recovery reads (the newest begun)."""
        for timeline, begin in reversed(self.begins()):
            if segno >= begin // segment_size:
                return timeline
        return self.begins()[0][0]

    def end_of(self, timeline: int) -> int | None:
        """Where ``timeline`` was left for the next one of this history; None for the
        followed timeline and for a timeline not in its history."""
        return next((b.end for b in self.branches if b.parent == timeline), None)


def follow(start: int, histories: dict[int, list[Branch]]) -> Followed:
    """The timeline recovery from a base on ``start`` follows, with ``histories`` (every
    history file read, by timeline)."""
    newest = newest_timeline(start, histories)
    return Followed(newest, tuple(histories.get(newest, [])))
