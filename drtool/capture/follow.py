"""Following ``attachments`` rows by id without missing a late commit.

Ids are taken at insert and become visible at commit, out of order: a transaction holding id
41 may commit after 42 was read. A watermark alone would skip 41. So every id between the
previous ``high`` and the newest id read that was not returned is remembered as missing and
asked for again, by primary key, each round; one found is captured, one still absent after
the gap timeout (a rolled-back insert, a sequence jump) is dropped and counted. Both queries
use the primary key index: a round costs the same whatever the table's size.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import psycopg

from drtool.capture.state import CaptureState

log = logging.getLogger(__name__)

NEW_ROWS = (
    "SELECT id, object_key, size_bytes, sha256, content_type FROM attachments "
    "WHERE id > %(high)s ORDER BY id LIMIT %(limit)s"
)
KNOWN_ROWS = (
    "SELECT id, object_key, size_bytes, sha256, content_type FROM attachments "
    "WHERE id = ANY(%(ids)s) ORDER BY id"
)
MAX_ID = "SELECT coalesce(max(id), 0) FROM attachments"


@dataclass(frozen=True)
class Row:
    """An attachment row as the capture reads it."""

    id: int
    object_key: str
    size: int
    sha256: str
    content_type: str


@dataclass(frozen=True)
class Followed:
    """The rows a round must capture, and what the id bookkeeping dropped."""

    rows: list[Row]
    gaps_dropped: int
    objects_lost: list[int]
    more: bool = False  # the batch was full: more new rows are waiting


def start_high(conn: psycopg.Connection[Any]) -> int:
    """The newest id now: where a first run starts (older objects are the snapshot's)."""
    with conn.cursor() as cur:
        cur.execute(MAX_ID)
        found = cur.fetchone()
    return int(found[0]) if found else 0


def follow(
    conn: psycopg.Connection[Any],
    state: CaptureState,
    now: datetime,
    *,
    gap_timeout: timedelta,
    batch: int = 10_000,
    max_missing: int = 100_000,
) -> Followed:
    """Read the rows after ``state.high`` and the ones still owed; update the bookkeeping.

    ``state.high`` moves to the newest id read; the ids below it that were not returned
    join ``missing``. The caller marks rows whose object was absent (``state.absent``).
    """
    high = state.high or 0
    owed = sorted(set(state.missing) | set(state.absent))
    with conn.cursor() as cur:
        cur.execute(NEW_ROWS, {"high": high, "limit": batch})
        new = [Row(*r) for r in cur.fetchall()]
        found: list[Row] = []
        if owed:
            cur.execute(KNOWN_ROWS, {"ids": owed})
            found = [Row(*r) for r in cur.fetchall()]
    stamp = now.isoformat()
    for row in found:
        state.missing.pop(row.id, None)
    if new:
        returned = {r.id for r in new}
        top = new[-1].id
        first = max(high + 1, top - max_missing)  # a sequence jump: only the nearest ids
        for gap in range(first, top):
            if gap not in returned:
                state.missing.setdefault(gap, stamp)
        state.high = top
    elif state.high is None:
        state.high = high
    gaps_dropped = _expire(state.missing, now, gap_timeout)
    over = len(state.missing) - max_missing
    if over > 0:  # bounded memory: the oldest gaps go first
        for gap in sorted(state.missing)[:over]:
            del state.missing[gap]
        gaps_dropped += over
    found_ids = {r.id for r in found}
    lost = [  # the row itself went away (deleted) and stayed gone
        i
        for i, first in state.absent.items()
        if i not in found_ids and owed_too_long(first, now, gap_timeout)
    ]
    for i in lost:
        del state.absent[i]
    if gaps_dropped:
        log.warning(
            "attachment capture: %d ids never committed within %s (rolled back or skipped)",
            gaps_dropped,
            gap_timeout,
        )
    rows = sorted(found + new, key=lambda r: r.id)
    return Followed(rows, gaps_dropped, lost, more=len(new) >= batch)


def owed_too_long(first: str, now: datetime, timeout: timedelta) -> bool:
    """Whether an id first noticed at ``first`` has been owed longer than ``timeout``."""
    try:
        return now - datetime.fromisoformat(first) > timeout
    except ValueError:
        return True


def _expire(owed: dict[int, str], now: datetime, timeout: timedelta) -> int:
    """Drop the ids owed for longer than ``timeout``; how many."""
    expired = [i for i, first in owed.items() if owed_too_long(first, now, timeout)]
    for i in expired:
        del owed[i]
    return len(expired)
