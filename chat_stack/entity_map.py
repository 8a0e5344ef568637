"""Which rows, objects and Redis keys belong to one room or one user: the entity map.

``drtool restore-entity`` brings one entity back from a snapshot into production. What "one
room" means across the three stores is decided here, declaratively, beside ``schema.sql``:

- **rows**: the closure starts at a root row (``chat_rooms.id = ID``, ``users.id = ID``) and
  follows foreign keys *from child to parent*: a table's rows belong to the entity when their
  foreign-key columns point at rows already in the closure (:class:`Follow`). A table reached
  by several follows takes the union.
- **foreign keys the closure does not follow** (:class:`NotFollowed`) are named with the
  reason: rows of another entity that merely point at this one (a room's creator is a user,
  the room is not part of the user).
- every other foreign key of a closure table points *out* of the closure at a parent that
  must exist in production (``chat_rooms.created_by -> users``): the restore's plan checks
  them from the live schema and names a missing parent.
- **objects**: each ``attachments`` row names an object (``object_key``) in the attachments
  bucket, with its size and sha256 (:data:`OBJECTS`).
- **Redis** (``redis_layout.py``): which key kinds are derived from which rows and what a
  restore does with each (:data:`REDIS_KEYS`).

:func:`uncovered` compares the map with a live schema (a database loaded with ``schema.sql``,
or the snapshot's staged copy): a table or a foreign key the map does not mention is reported,
so a schema change that would make a restore silently incomplete fails a test (and the
restore refuses to run). See docs/decisions/0019-entity-restore.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg


@dataclass(frozen=True)
class Follow:
    """Rows of ``table`` whose ``columns`` equal ``parent_columns`` of closure rows of ``parent``.

    The pair is one foreign key of the schema (child -> parent).
    """

    table: str
    columns: tuple[str, ...]
    parent: str
    parent_columns: tuple[str, ...]

    @property
    def fk(self) -> tuple[str, tuple[str, ...], str, tuple[str, ...]]:
        """The foreign key as (child, columns, parent, parent columns)."""
        return (self.table, self.columns, self.parent, self.parent_columns)


@dataclass(frozen=True)
class NotFollowed:
    """A foreign key into the closure that the closure deliberately does not follow, and why."""

    table: str
    columns: tuple[str, ...]
    parent: str
    parent_columns: tuple[str, ...]
    why: str

    @property
    def fk(self) -> tuple[str, tuple[str, ...], str, tuple[str, ...]]:
        """The foreign key as (child, columns, parent, parent columns)."""
        return (self.table, self.columns, self.parent, self.parent_columns)


@dataclass(frozen=True)
class EntityMap:
    """One kind of entity: its root row, the foreign keys its closure follows, those it does not.

    ``tables`` is the closure's tables, parents before children (the order rows are inserted
    in; undo deletes in reverse). ``room_columns``: per closure table, the column naming the
    room whose derived Redis keys (recent list, unread counters) a changed row affects.
    """

    kind: str
    root: str
    root_column: str
    follows: tuple[Follow, ...]
    not_followed: tuple[NotFollowed, ...]
    room_columns: tuple[tuple[str, str], ...]

    @property
    def tables(self) -> tuple[str, ...]:
        """The closure's tables, the root first, each after every table it follows."""
        order = [self.root]
        wanted = list(dict.fromkeys(f.table for f in self.follows))
        while wanted:
            ready = [t for t in wanted if all(f.parent in order for f in self.follows_into(t))]
            if not ready:
                raise ValueError(
                    f"entity {self.kind}: {', '.join(wanted)} not reached from {self.root}"
                )
            order.append(ready[0])
            wanted.remove(ready[0])
        return tuple(order)

    def follows_into(self, table: str) -> tuple[Follow, ...]:
        """The follows that select rows of ``table``."""
        return tuple(f for f in self.follows if f.table == table)


ROOM = EntityMap(
    kind="room",
    root="chat_rooms",
    root_column="id",
    follows=(
        Follow("chat_room_members", ("room_id",), "chat_rooms", ("id",)),
        Follow("messages", ("room_id",), "chat_rooms", ("id",)),
        Follow(
            "attachments", ("message_id", "message_created_at"), "messages", ("id", "created_at")
        ),
        Follow(
            "read_receipts", ("room_id", "user_id"), "chat_room_members", ("room_id", "user_id")
        ),
    ),
    not_followed=(
        NotFollowed(
            "attachments",
            ("room_id",),
            "chat_rooms",
            ("id",),
            "an attachment belongs to the room through its message (same room by construction)",
        ),
    ),
    room_columns=(
        ("chat_rooms", "id"),
        ("chat_room_members", "room_id"),
        ("messages", "room_id"),
        ("read_receipts", "room_id"),
    ),
)

USER = EntityMap(
    kind="user",
    root="users",
    root_column="id",
    follows=(
        Follow("friendships", ("user_id",), "users", ("id",)),
        Follow("friendships", ("friend_id",), "users", ("id",)),
        Follow("chat_room_members", ("user_id",), "users", ("id",)),
        Follow("messages", ("sender_id",), "users", ("id",)),
        Follow(
            "attachments", ("message_id", "message_created_at"), "messages", ("id", "created_at")
        ),
        Follow(
            "read_receipts", ("room_id", "user_id"), "chat_room_members", ("room_id", "user_id")
        ),
    ),
    not_followed=(
        NotFollowed(
            "chat_rooms",
            ("created_by",),
            "users",
            ("id",),
            "a room belongs to the room entity, not to its creator: restore it as a room",
        ),
        NotFollowed(
            "attachments",
            ("uploader_id",),
            "users",
            ("id",),
            "an attachment belongs to its message (the uploader is the message's sender)",
        ),
    ),
    room_columns=(
        ("chat_room_members", "room_id"),
        ("messages", "room_id"),
        ("read_receipts", "room_id"),
    ),
)

ENTITIES: dict[str, EntityMap] = {"room": ROOM, "user": USER}

#: Tables of the schema that no entity owns, and why (none today: every table is in a closure).
OUTSIDE: dict[str, str] = {}


@dataclass(frozen=True)
class ObjectRef:
    """Closure rows of ``table`` name an object of the attachments bucket."""

    table: str
    key_column: str
    size_column: str
    sha256_column: str


OBJECTS = ObjectRef("attachments", "object_key", "size_bytes", "sha256")

#: What a restore does with each Redis key kind of redis_layout.py, and why.
REDIS_KEYS: dict[str, str] = {
    "room:<room_id>:recent": "rebuilt from the merged rows (latest 50 message ids) for every "
    "room whose messages, members or receipts the restore changed",
    "unread:<user_id> field <room_id>": "rebuilt from the merged rows (messages after the "
    "member's read receipt) for every member of every such room; a count of 0 removes the field",
    "session:<token>": "untouched: ephemeral login state, never restored (the user logs in again)",
    "presence:<user_id>": "untouched: ephemeral (60 s TTL), the app sets it on the next request",
    "ratelimit:<user_id>:<window>": "untouched: ephemeral (2 min TTL)",
    "online_users": "untouched: the app adds a user when it reports presence",
}

ForeignKey = tuple[str, tuple[str, ...], str, tuple[str, ...]]

_FOREIGN_KEYS = """
SELECT c.conrelid::regclass::text, c.confrelid::regclass::text,
       array(SELECT a.attname FROM unnest(c.conkey) WITH ORDINALITY k(n, i)
             JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.n ORDER BY k.i),
       array(SELECT a.attname FROM unnest(c.confkey) WITH ORDINALITY k(n, i)
             JOIN pg_attribute a ON a.attrelid = c.confrelid AND a.attnum = k.n ORDER BY k.i)
FROM pg_constraint c JOIN pg_class r ON r.oid = c.conrelid
JOIN pg_namespace n ON n.oid = r.relnamespace
WHERE c.contype = 'f' AND c.conparentid = 0 AND n.nspname = 'public'
ORDER BY 1, 2, 3
"""

# Ordinary and partitioned tables, partitions left out (their rows are their parent's).
_TABLES = """
SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p') AND NOT c.relispartition
ORDER BY 1
"""


def foreign_keys(conn: psycopg.Connection[Any]) -> list[ForeignKey]:
    """Every foreign key of the ``public`` schema (declared on a table, not inherited)."""
    return [
        (child, tuple(cols), parent, tuple(pcols))
        for child, parent, cols, pcols in conn.execute(_FOREIGN_KEYS).fetchall()
    ]


def tables(conn: psycopg.Connection[Any]) -> list[str]:
    """Every table of the ``public`` schema (partitions counted as their parent)."""
    return [row[0] for row in conn.execute(_TABLES).fetchall()]


def uncovered(conn: psycopg.Connection[Any]) -> list[str]:
    """What the live schema has that the map does not cover ([] when the map is complete).

    A table must be in some entity's closure or in :data:`OUTSIDE`. Per entity, every foreign
    key between two closure tables, and every foreign key from another table into the closure,
    must be a follow or a not-followed (a foreign key from a closure table to a table outside
    it is a parent the restore checks and needs no entry). And every declared foreign key must
    exist, so a dropped or renamed one is noticed too.
    """
    problems = []
    live = foreign_keys(conn)
    owned = {t for e in ENTITIES.values() for t in e.tables} | set(OUTSIDE)
    problems += [f"table {t} is in no entity of the map" for t in tables(conn) if t not in owned]
    for entity in ENTITIES.values():
        closure = set(entity.tables)
        named = {f.fk for f in entity.follows} | {n.fk for n in entity.not_followed}
        for fk in live:
            child, cols, parent, _ = fk
            if parent in closure and fk not in named:
                problems.append(
                    f"{entity.kind}: foreign key {child}({', '.join(cols)}) -> {parent} is "
                    "neither followed nor named as not followed"
                )
        problems += [
            f"{entity.kind}: the map names a foreign key the schema lacks: "
            f"{fk[0]}({', '.join(fk[1])}) -> {fk[2]}"
            for fk in sorted(named - set(live))
        ]
    return problems
