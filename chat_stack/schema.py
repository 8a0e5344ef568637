"""Apply co-talk's schema (schema.sql) and the monthly partitions of ``messages``."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import date
from importlib.resources import files

import psycopg
from psycopg import sql

# Every table of the schema, parents before children.
TABLES = (
    "users",
    "friendships",
    "chat_rooms",
    "chat_room_members",
    "messages",
    "attachments",
    "read_receipts",
)


def schema_sql() -> str:
    """The text of schema.sql."""
    return files("chat_stack").joinpath("schema.sql").read_text(encoding="utf-8")


def month_start(day: date, offset: int = 0) -> date:
    """The first day of the month ``offset`` months after the one containing ``day``."""
    index = day.year * 12 + day.month - 1 + offset
    return date(index // 12, index % 12 + 1, 1)


def partition_name(month: date) -> str:
    """The name of the ``messages`` partition of one month, e.g. ``messages_y2025m01``."""
    return f"messages_y{month.year:04d}m{month.month:02d}"


def ensure_partitions(conn: psycopg.Connection, start: date, months: int) -> list[str]:
    """Create the missing monthly partitions for ``months`` months from ``start``'s month.

    Existing partitions are left alone (and not even locked). Returns the names created.
    """
    if months < 0:
        raise ValueError(f"months must be >= 0 (got {months})")
    wanted = [month_start(start, i) for i in range(months)]
    existing = {
        row[0]
        for row in conn.execute(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = 'messages'::regclass"
        )
    }
    created = []
    for month in wanted:
        name = partition_name(month)
        if name in existing:
            continue
        conn.execute(
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} PARTITION OF messages FOR VALUES FROM ({}) TO ({})"
            ).format(
                sql.Identifier(name),
                sql.Literal(f"{month.isoformat()} 00:00:00+00"),
                sql.Literal(f"{month_start(month, 1).isoformat()} 00:00:00+00"),
            )
        )
        created.append(name)
    return created


def apply_schema(conn: psycopg.Connection, start: date, months: int) -> list[str]:
    """Apply schema.sql and the partitions for ``months`` months from ``start``; idempotent.

    Runs in its own transaction (a savepoint if one is open). Returns the partitions created.
    """
    with conn.transaction():
        conn.execute(schema_sql().encode())
        return ensure_partitions(conn, start, months)


@contextmanager
def deferred_indexes_and_foreign_keys(conn: psycopg.Connection, table: str) -> Iterator[None]:
    """Bulk-load helper: drop a table's non-unique indexes and foreign keys, restore them after.

    Rebuilding an index and validating a foreign key once is far cheaper than maintaining them
    row by row. Use inside a transaction so that a failed load restores nothing half-way.
    """
    indexes = [
        (name, definition.replace(" ON ONLY ", " ON ", 1))
        for name, definition in conn.execute(
            "SELECT c.relname, pg_get_indexdef(i.indexrelid) FROM pg_index i "
            "JOIN pg_class c ON c.oid = i.indexrelid "
            "WHERE i.indrelid = %s::regclass AND NOT i.indisunique ORDER BY c.relname",
            (table,),
        )
    ]
    foreign_keys = conn.execute(
        "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint "
        "WHERE conrelid = %s::regclass AND contype = 'f' AND conparentid = 0 ORDER BY conname",
        (table,),
    ).fetchall()
    for name, _ in foreign_keys:
        conn.execute(
            sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(
                sql.Identifier(table), sql.Identifier(name)
            )
        )
    for name, _ in indexes:
        conn.execute(sql.SQL("DROP INDEX {}").format(sql.Identifier(name)))
    yield
    for _, definition in indexes:
        conn.execute(definition.encode())
    for name, definition in foreign_keys:
        conn.execute(
            sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} ").format(
                sql.Identifier(table), sql.Identifier(name)
            )
            + sql.SQL(definition)
        )
