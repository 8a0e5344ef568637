"""co-talk's Redis key layout, defined in one place.

The seed, the traffic generator and drtool's drill checks build and parse key names only
through this module. Values are stored as strings of decimal ids.

| key                          | type   | TTL     | content                                        |
|------------------------------|--------|---------|------------------------------------------------|
| ``session:<token>``          | hash   | 30 min  | user_id, created_at, user_agent                |
| ``unread:<user_id>``         | hash   | none    | room_id -> unread count (fields > 0 only)      |
| ``presence:<user_id>``       | string | 60 s    | ``online`` / ``away``                          |
| ``room:<room_id>:recent``    | list   | none    | latest message ids of the room, newest first   |
| ``ratelimit:<user_id>:<w>``  | string | 2 min   | messages sent in the minute window ``w``       |
| ``online_users``             | set    | none    | user ids that reported presence                |
"""

from __future__ import annotations

SESSION_TTL_S = 30 * 60
PRESENCE_TTL_S = 60
RATELIMIT_WINDOW_S = 60
RATELIMIT_TTL_S = 2 * RATELIMIT_WINDOW_S
RECENT_LENGTH = 50

ONLINE_USERS = "online_users"

SESSION_PATTERN = "session:*"
UNREAD_PATTERN = "unread:*"
PRESENCE_PATTERN = "presence:*"
RECENT_PATTERN = "room:*:recent"
RATELIMIT_PATTERN = "ratelimit:*"

ALL_PATTERNS = (
    SESSION_PATTERN,
    UNREAD_PATTERN,
    PRESENCE_PATTERN,
    RECENT_PATTERN,
    RATELIMIT_PATTERN,
    ONLINE_USERS,
)


def session_key(token: str) -> str:
    """The hash holding one login session."""
    return f"session:{token}"


def unread_key(user_id: int) -> str:
    """The hash of a user's unread counters, room_id -> count."""
    return f"unread:{user_id}"


def presence_key(user_id: int) -> str:
    """The short-lived presence flag of a user."""
    return f"presence:{user_id}"


def recent_key(room_id: int) -> str:
    """The list of a room's latest message ids, newest first."""
    return f"room:{room_id}:recent"


def ratelimit_key(user_id: int, window: int) -> str:
    """The message counter of a user in one rate-limit window."""
    return f"ratelimit:{user_id}:{window}"


def ratelimit_window(epoch_seconds: float) -> int:
    """The rate-limit window number that contains a Unix time."""
    return int(epoch_seconds) // RATELIMIT_WINDOW_S


def user_id_of_unread(key: str) -> int:
    """The user id in an ``unread:<user_id>`` key."""
    prefix, _, user_id = key.partition(":")
    if prefix != "unread" or not user_id.isdigit():
        raise ValueError(f"not an unread key: {key!r}")
    return int(user_id)


def room_id_of_recent(key: str) -> int:
    """The room id in a ``room:<room_id>:recent`` key."""
    parts = key.split(":")
    if len(parts) != 3 or parts[0] != "room" or parts[2] != "recent" or not parts[1].isdigit():
        raise ValueError(f"not a recent-messages key: {key!r}")
    return int(parts[1])
