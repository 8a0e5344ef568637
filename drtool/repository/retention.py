"""Grandfather-father-son retention: which valid snapshots to keep, and why.

Only valid snapshots are considered (invalid ones are never counted as kept copies). Walking
from newest to oldest, each rule keeps the newest snapshot of each of its last N periods.

A kept copy that was never verified may be damaged (a flipped byte keeps its size), so by
default only verified snapshots count toward a rule: an unverified one in a rule's way is kept
too, but the rule goes on until N verified ones are kept ("keep the last 1" keeps the newest
snapshot and, when that is unverified, every one back to the newest verified one). With no
verified snapshot at all nothing is forgotten. ``verified=None`` counts every valid snapshot.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import datetime

from drtool.errors import UsageError


@dataclass(frozen=True)
class Policy:
    """How many snapshots each rule keeps (0 = rule off)."""

    last: int = 0
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0

    def check(self) -> None:
        """Refuse a policy that would keep nothing, or negative counts."""
        counts = (self.last, self.hourly, self.daily, self.weekly, self.monthly)
        if any(c < 0 for c in counts):
            raise UsageError("prune: --keep-* counts cannot be negative")
        if not any(counts):
            raise UsageError(
                "prune: this policy keeps nothing; give at least one --keep-* option "
                "(e.g. --keep-daily 7)"
            )


PERIODS: dict[str, Callable[[datetime], object]] = {
    "hourly": lambda t: (t.year, t.month, t.day, t.hour),
    "daily": lambda t: (t.year, t.month, t.day),
    "weekly": lambda t: t.isocalendar()[:2],
    "monthly": lambda t: (t.year, t.month),
}


UNVERIFIED = " (unverified: not counted)"


def select(
    snapshots: list[tuple[str, datetime]],
    policy: Policy,
    verified: Collection[str] | None = None,
) -> dict[str, list[str]]:
    """Map each kept snapshot id to the rules that keep it; ids not in the map go.

    Only ids in ``verified`` count toward a rule's N (all of them when it is None).
    """
    policy.check()
    # ids carry the start's millisecond (repository/ids.py): within one second of start time
    # the larger id is the newer snapshot, so ties go to it, never to list order
    newest_first = sorted(snapshots, key=lambda s: (s[1], s[0]), reverse=True)
    keep: dict[str, list[str]] = {}

    def counts(snapshot_id: str, rule: str) -> bool:
        counted = verified is None or snapshot_id in verified
        keep.setdefault(snapshot_id, []).append(rule if counted else rule + UNVERIFIED)
        return counted

    kept = 0
    for snapshot_id, _ in newest_first:
        if kept >= policy.last:
            break
        kept += counts(snapshot_id, "last")
    for rule, period_of in PERIODS.items():
        count = getattr(policy, rule)
        seen: set[object] = set()
        for snapshot_id, when in newest_first:
            if len(seen) >= count:
                break
            period = period_of(when)
            if period not in seen and counts(snapshot_id, rule):
                seen.add(period)
    return keep
