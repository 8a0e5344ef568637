"""The entity map (chat_stack/entity_map.py) against schema.sql loaded into a real PostgreSQL.

A table or foreign key the map does not cover would make ``drtool restore-entity`` bring a room
back without some of its rows: the map must fail a test, not a restore.
"""

from __future__ import annotations

import psycopg

from chat_stack import entity_map
from chat_stack.entity_map import ENTITIES, ROOM, USER
from chat_stack.schema import TABLES, schema_sql
from drtool.endpoints import PostgresEndpoint
from drtool.services.entity.closure import schema_of

REACTIONS = """
CREATE TABLE reactions (
    message_id          bigint NOT NULL,
    message_created_at  timestamptz NOT NULL,
    user_id             bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    emoji               text   NOT NULL,
    PRIMARY KEY (message_id, message_created_at, user_id, emoji),
    FOREIGN KEY (message_id, message_created_at)
        REFERENCES messages (id, created_at) ON DELETE CASCADE
);
"""


def _load(endpoint: PostgresEndpoint, text: str) -> psycopg.Connection:
    conn = psycopg.connect(**endpoint.connect_kwargs(), autocommit=True)
    conn.execute(text.encode())
    conn.execute(
        "CREATE TABLE IF NOT EXISTS messages_y2025m01 PARTITION OF messages "
        "FOR VALUES FROM ('2025-01-01') TO ('2025-02-01')"
    )
    return conn


def test_the_map_covers_schema_sql(pg_database: PostgresEndpoint) -> None:
    with _load(pg_database, schema_sql()) as conn:
        assert entity_map.uncovered(conn) == []
        assert sorted(entity_map.tables(conn)) == sorted(TABLES)  # partitions are their parent


def test_a_table_the_map_misses_fails_the_map_test(pg_database: PostgresEndpoint) -> None:
    """A copy of schema.sql with one more table referencing messages and users."""
    with _load(pg_database, schema_sql() + REACTIONS) as conn:
        problems = entity_map.uncovered(conn)
    assert "table reactions is in no entity of the map" in problems
    assert any(
        p.startswith("room: foreign key reactions(message_id, message_created_at) -> messages")
        for p in problems
    )
    assert any(p.startswith("user: foreign key reactions(user_id) -> users") for p in problems)


def test_a_foreign_key_the_map_names_but_the_schema_dropped_fails(
    pg_database: PostgresEndpoint,
) -> None:
    changed = schema_sql() + "ALTER TABLE messages DROP CONSTRAINT messages_sender_id_fkey;"
    with _load(pg_database, changed) as conn:
        problems = entity_map.uncovered(conn)
    assert problems == [
        "user: the map names a foreign key the schema lacks: messages(sender_id) -> users"
    ]


def test_closure_tables_are_ordered_parents_first() -> None:
    assert ROOM.tables == (
        "chat_rooms",
        "chat_room_members",
        "messages",
        "attachments",
        "read_receipts",
    )
    assert USER.tables[0] == "users"
    for entity in ENTITIES.values():
        for f in entity.follows:
            assert entity.tables.index(f.parent) < entity.tables.index(f.table)


def test_every_schema_table_is_in_an_entity() -> None:
    owned = {t for e in ENTITIES.values() for t in e.tables} | set(entity_map.OUTSIDE)
    assert owned == set(TABLES)


def test_the_live_schema_names_each_closure_tables_key_parents_and_sequences(
    pg_database: PostgresEndpoint,
) -> None:
    """What the merge reads from production: keys to match, parents to check, ids to advance."""
    with _load(pg_database, schema_sql()) as conn:
        rooms, messages = schema_of(conn, "chat_rooms"), schema_of(conn, "messages")
        users = schema_of(conn, "users")
    assert rooms.key == ("id",) and rooms.sequences == (("id", "chat_rooms_id_seq"),)
    assert rooms.parents == ((("created_by",), "users", ("id",)),)
    assert messages.key == ("id", "created_at")
    assert messages.sequences == (("id", "messages_id_seq"),)  # a nextval() default
    assert users.uniques == (("email",), ("username",))
