"""Snapshot and drill ids that sort by time: ``20261125T020000Z-7f3a``."""

from __future__ import annotations

import re
import secrets
from datetime import UTC, datetime

ID_RE = re.compile(r"^(\d{8}T\d{6}Z)-[0-9a-f]{4}$")


def new_id(now: datetime) -> str:
    """A fresh id for an event at ``now`` (UTC), with 16 random bits against collisions."""
    return f"{now.astimezone(UTC):%Y%m%dT%H%M%SZ}-{secrets.token_hex(2)}"


def is_id(text: str) -> bool:
    """Whether ``text`` has the shape of a snapshot id."""
    return bool(ID_RE.match(text))


def id_time(snapshot_id: str) -> datetime:
    """The UTC time encoded in an id."""
    match = ID_RE.match(snapshot_id)
    if not match:
        raise ValueError(f"not a snapshot id: {snapshot_id!r}")
    return datetime.strptime(match.group(1), "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
