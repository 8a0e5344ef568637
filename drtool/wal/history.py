"""Timeline history files: which timeline a WAL position belongs to on a given timeline.

``0000000T.history`` lists, one line per ancestor, ``<parent timeline>\\t<switch LSN>\\t<reason>``:
timeline T branched from each parent at that position. When a promotion lands inside a
segment, the new timeline's copy of that segment starts with the parent's bytes, so its first
page header names the parent timeline, not T. PostgreSQL decides which timeline a position is
on with ``tliOfPointInHistory``; :func:`timeline_at` is the same rule, so a staged segment's
header can be checked against what its timeline's history says it must carry.
"""

from __future__ import annotations

from dataclasses import dataclass

from drtool.errors import IntegrityError
from drtool.wal.names import parse_lsn


@dataclass(frozen=True)
class Branch:
    """Timeline ``parent`` ended (was branched from) at WAL position ``end``."""

    parent: int
    end: int


def parse_history(text: str, *, name: str) -> list[Branch]:
    """The branches a history file records, oldest first; IntegrityError when malformed."""
    branches = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        try:
            branches.append(Branch(int(fields[0]), parse_lsn(fields[1])))
        except (IndexError, ValueError):
            raise IntegrityError(f"{name}: not a timeline history line: {line[:80]!r}") from None
    return branches


def timeline_at(position: int, timeline: int, branches: list[Branch]) -> int:
    """The timeline WAL ``position`` lies on, seen from ``timeline`` (tliOfPointInHistory)."""
    for branch in branches:
        if position < branch.end:
            return branch.parent
    return timeline
