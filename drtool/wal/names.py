"""PostgreSQL WAL file names: ``TTTTTTTTXXXXXXXXYYYYYYYY`` segments and ``TTTTTTTT.history``.

A segment name is the timeline and the absolute segment number split in two 32-bit halves:
``XXXXXXXX = segno // per_id`` and ``YYYYYYYY = segno % per_id`` with
``per_id = 2**32 // segment_size``. The split depends on the cluster's ``wal_segment_size``,
so continuity (``segno + 1``) is computed with the size the WAL index records.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SEGMENT_RE = re.compile(r"[0-9A-F]{24}")
HISTORY_RE = re.compile(r"[0-9A-F]{8}\.history")
DEFAULT_SEGMENT_SIZE = 16 * 1024 * 1024


def is_segment(name: str) -> bool:
    """Whether ``name`` is a complete WAL segment file name (not ``.partial``)."""
    return SEGMENT_RE.fullmatch(name) is not None


def is_history(name: str) -> bool:
    """Whether ``name`` is a timeline history file name."""
    return HISTORY_RE.fullmatch(name) is not None


def _per_id(segment_size: int) -> int:
    return 0x1_0000_0000 // segment_size


@dataclass(frozen=True, order=True)
class SegmentId:
    """A segment's position: absolute segment number first, so sorting follows the WAL."""

    segno: int
    timeline: int

    def name(self, segment_size: int) -> str:
        """The file name of this segment."""
        per = _per_id(segment_size)
        return f"{self.timeline:08X}{self.segno // per:08X}{self.segno % per:08X}"


def parse_segment(name: str, segment_size: int) -> SegmentId:
    """The position of segment ``name``; ValueError when it is not a segment name."""
    if not is_segment(name):
        raise ValueError(f"not a WAL segment name: {name!r}")
    timeline, high, low = int(name[:8], 16), int(name[8:16], 16), int(name[16:], 16)
    if low >= _per_id(segment_size):
        raise ValueError(f"{name}: not a segment name for {segment_size}-byte segments")
    return SegmentId(high * _per_id(segment_size) + low, timeline)


def timeline_of(name: str) -> int:
    """The timeline a segment or history file belongs to."""
    return int(name[:8], 16)


def history_name(timeline: int) -> str:
    """The history file that starts ``timeline``."""
    return f"{timeline:08X}.history"


def segment_of_lsn(lsn: int, timeline: int, segment_size: int) -> SegmentId:
    """The segment holding byte ``lsn`` of the WAL."""
    return SegmentId(lsn // segment_size, timeline)


def parse_lsn(text: str) -> int:
    """``16/B374D848`` as an integer."""
    high, _, low = text.partition("/")
    return (int(high, 16) << 32) | int(low, 16)
