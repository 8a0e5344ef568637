"""When each part (component) of a snapshot was taken, at the earliest and the latest.

A restore to a moment may use a snapshot's Redis or MinIO part only if that part had ended
by the moment (ADR 0027 §1): a part that may have ended after it can hold writes made after
the moment. Manifests record each part's start and end (to the microsecond); older ones hold
only the snapshot's ``started`` and ``finished`` (to the second) and each part's duration,
and the backup spends time before its first part (the repository, its lock, the rollback
check) that no duration counts. For them the window is bounded conservatively: it starts no
earlier than ``started`` plus the durations of the parts before it, and ends no later than
``finished`` (plus its rounding) minus the durations of the parts after it.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from drtool.repository.manifest import Manifest

#: a manifest's ``started``/``finished`` are written to the second: up to this much later
SECOND = timedelta(seconds=1)


def part_window(manifest: Manifest, name: str) -> tuple[datetime, datetime] | None:
    """(earliest start, latest end) of part ``name``; None when the snapshot lacks it."""
    comps = manifest.components
    index = next((i for i, c in enumerate(comps) if c.name == name), None)
    if index is None:
        return None
    comp = comps[index]
    if comp.started and comp.ended:
        return datetime.fromisoformat(comp.started), datetime.fromisoformat(comp.ended)
    earlier = sum(c.duration_s for c in comps[:index])
    later = sum(c.duration_s for c in comps[index + 1 :])
    start = datetime.fromisoformat(manifest.started) + timedelta(seconds=earlier)
    end = datetime.fromisoformat(manifest.finished) + SECOND - timedelta(seconds=later)
    return start, max(end, start + timedelta(seconds=comp.duration_s))
