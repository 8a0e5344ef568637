"""The Redis keys derived from an entity's rows: rebuilt from production after the merge.

Per chat_stack/entity_map.py's REDIS_KEYS: for every room whose messages, members or read
receipts the merge changed, ``room:<id>:recent`` is rebuilt (the latest 50 message ids, newest
first) and each member's ``unread:<user>`` field for the room is set to the number of messages
after the member's read receipt (removed at 0). Ephemeral keys (sessions, presence, rate
limits, online users) are not touched.

The rebuild reads each key's current value under WATCH, has the caller journal (before,
after) of every key, then writes all of them in one MULTI; a key the app changed meanwhile
aborts the MULTI and the whole step is retried. Undo puts a key's journaled "before" back only
while it still holds the restore's "after".
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg
import redis

from chat_stack import redis_layout
from drtool.errors import SourceError

ATTEMPTS = 5

_READ = """
SELECT m.user_id, coalesce(r.last_read_message_id, 0)
FROM chat_room_members m
LEFT JOIN read_receipts r ON r.room_id = m.room_id AND r.user_id = m.user_id
WHERE m.room_id = %s ORDER BY m.user_id
"""
_IDS = "SELECT id FROM messages WHERE room_id = %s ORDER BY id"


@dataclass(frozen=True)
class KeyChange:
    """One list key or one hash field: what it held before the restore and what it gets."""

    key: str
    field: str | None  # None: the whole key (a list)
    before: Any  # list of str / str / None (absent)
    after: Any

    def to_dict(self) -> dict[str, Any]:
        """For the journal."""
        return {"key": self.key, "field": self.field, "before": self.before, "after": self.after}

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> KeyChange:
        """From the journal."""
        return cls(str(doc["key"]), doc.get("field"), doc.get("before"), doc.get("after"))


def wanted_values(
    conn: psycopg.Connection[Any], rooms: list[int]
) -> dict[tuple[str, str | None], Any]:
    """What each derived key of ``rooms`` must hold, as production's rows say now."""
    wanted: dict[tuple[str, str | None], Any] = {}
    for room in rooms:
        # one scan of the room's ids, then a bisection per member: a count per member in SQL
        # is members x messages (minutes for a big room)
        ids = [int(r[0]) for r in conn.execute(_IDS, (room,))]
        latest = ids[-redis_layout.RECENT_LENGTH :][::-1]
        wanted[(redis_layout.recent_key(room), None)] = [str(i) for i in latest] or None
        for user, read in conn.execute(_READ, (room,)).fetchall():
            count = len(ids) - bisect.bisect_right(ids, int(read))
            wanted[(redis_layout.unread_key(int(user)), str(room))] = str(count) if count else None
    return wanted


def current(client: Any, key: str, field: str | None) -> Any:
    """What a list key, or one hash field, holds now (None: absent)."""
    if field is None:
        values = client.lrange(key, 0, -1)
        return list(values) if values else None
    return client.hget(key, field)


def _write(pipe: Any, key: str, field: str | None, value: Any) -> None:
    if field is None:
        pipe.delete(key)
        if value:
            pipe.rpush(key, *value)
    elif value is None:
        pipe.hdel(key, field)
    else:
        pipe.hset(key, field, value)


def rebuild(
    client: redis.Redis,
    wanted: dict[tuple[str, str | None], Any],
    journal: Callable[[list[KeyChange]], None],
) -> list[KeyChange]:
    """Set every key to its wanted value in one MULTI, after ``journal`` recorded the changes.

    Returns the changes (keys already right are journaled with before == after).
    """
    keys = sorted({key for key, _ in wanted})
    for _ in range(ATTEMPTS):
        with client.pipeline(transaction=True) as pipe:
            try:
                if keys:
                    pipe.watch(*keys)
                changes = [
                    KeyChange(key, field, current(pipe, key, field), value)
                    for (key, field), value in sorted(
                        wanted.items(), key=lambda kv: (kv[0][0], kv[0][1] or "")
                    )
                ]
                journal(changes)
                pipe.multi()
                for c in changes:
                    if c.before != c.after:
                        _write(pipe, c.key, c.field, c.after)
                pipe.execute()
                return changes
            except redis.WatchError:
                continue
    raise SourceError(
        f"redis: the entity's keys kept changing during {ATTEMPTS} attempts; the rows and "
        "objects are restored, run `drtool restore-entity` again to rebuild the keys"
    )


def put_back(client: redis.Redis, changes: list[KeyChange]) -> tuple[int, list[str]]:
    """Undo: each changed key gets its before value while it still holds the after value.

    Returns (put back, keys left because they changed since).
    """
    changed = [c for c in changes if c.before != c.after]
    keys = sorted({c.key for c in changed})
    for _ in range(ATTEMPTS):
        with client.pipeline(transaction=True) as pipe:
            try:
                if keys:
                    pipe.watch(*keys)
                ok = [c for c in changed if current(pipe, c.key, c.field) == c.after]
                left = [
                    f"{c.key}" + (f" field {c.field}" if c.field else "")
                    for c in changed
                    if c not in ok
                ]
                pipe.multi()
                for c in ok:
                    _write(pipe, c.key, c.field, c.before)
                pipe.execute()
                return len(ok), left
            except redis.WatchError:
                continue
    raise SourceError(f"redis: the keys kept changing during {ATTEMPTS} attempts; undo them again")
