"""Snapshot and drill ids that sort by time: ``20261125T020000Z-7f3a``."""

from __future__ import annotations

import re
import secrets
from datetime import UTC, datetime

ID_RE = re.compile(r"^(\d{8}T\d{6}Z)-[0-9a-f]{4}$")


def new_id(now: datetime) -> str:
    """A fresh id for an event at ``now`` (UTC) that sorts after earlier events.

    The four hex digits are the millisecond (top 10 bits), so two runs within one
    second still sort in start order, and 6 random bits against collisions.
    """
    utc = now.astimezone(UTC)
    suffix = (utc.microsecond // 1000) << 6 | secrets.randbits(6)
    return f"{utc:%Y%m%dT%H%M%SZ}-{suffix:04x}"


def is_id(text: str) -> bool:
    """Whether ``text`` has the shape of a snapshot id."""
    return bool(ID_RE.match(text))


def id_time(snapshot_id: str) -> datetime:
    """The UTC time encoded in an id."""
    match = ID_RE.match(snapshot_id)
    if not match:
        raise ValueError(f"not a snapshot id: {snapshot_id!r}")
    return datetime.strptime(match.group(1), "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
