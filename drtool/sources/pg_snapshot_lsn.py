"""The snapshot a logical dump reads, and the WAL position (LSN) whose state it shows exactly.

Why not ``pg_current_wal_lsn()`` read next to ``pg_export_snapshot()``: a committing
transaction writes its commit record first and leaves the proc array after it. A snapshot
taken in between still sees it as running although its commit lies before any LSN read
afterwards, and an LSN read before the snapshot misses commits that became visible meanwhile.
Under traffic such a pair is off by a few transactions, and a PITR-vs-dump equality check built
on it would be flaky.

The server knows a point that matches: creating a logical replication slot builds a snapshot
consistent with a WAL position, the slot's *consistent point*. Every transaction whose commit
record starts before that point is visible in the snapshot the slot exports, none after it —
the guarantee PostgreSQL's own logical replication relies on when it copies a table and then
streams the changes from that point. So: ``CREATE_REPLICATION_SLOT … TEMPORARY LOGICAL
pgoutput (SNAPSHOT 'export')`` on a ``replication=database`` connection, import that snapshot
into the dump's REPEATABLE READ transaction, re-export it from there for ``pg_dump``, and close
the replication connection at once (the temporary slot goes with it: it holds no WAL and no
catalog rows back while a long dump runs).

It needs ``wal_level = logical``, the REPLICATION attribute and a free WAL sender and slot.
Without them the dump takes the plain ``pg_export_snapshot()`` and records **no** LSN, with
the reason — never an approximate one (docs/decisions/0018-consistent-lsn-of-logical-snapshot.md).
"""

from __future__ import annotations

import logging
import secrets
import threading
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from drtool.endpoints import PostgresEndpoint
from drtool.errors import SourceError
from drtool.sources.process import scrub

log = logging.getLogger(__name__)

SLOT_WAIT_S = 60.0
"""How long the slot may wait for running transactions before the dump falls back."""
_CONNECT_TIMEOUT = 10


@dataclass(frozen=True)
class ExportedSnapshot:
    """A snapshot id for ``pg_dump --snapshot``, exported by the dump's open transaction.

    ``consistent_lsn``: the LSN whose database state the snapshot shows exactly (WAL records
    starting before it are in, none from it on), with the server's ``timeline`` and
    ``system_identifier``; all three None when no such point could be had, and
    ``lsn_unavailable`` says why.
    """

    snapshot: str
    consistent_lsn: str | None = None
    timeline: int | None = None
    system_identifier: str | None = None
    lsn_unavailable: str | None = None

    def details(self) -> dict[str, Any]:
        """The manifest's component details (docs/FORMAT.md)."""
        if self.consistent_lsn is None:
            return {"consistent_lsn": None, "consistent_lsn_unavailable": self.lsn_unavailable}
        return {
            "consistent_lsn": self.consistent_lsn,
            "timeline": self.timeline,
            "system_identifier": self.system_identifier,
        }


@dataclass(frozen=True)
class _SlotPoint:
    snapshot: str
    lsn: str
    timeline: int
    system_identifier: str


def _one_line(exc: BaseException, endpoint: PostgresEndpoint) -> str:
    return scrub(" ".join(str(exc).split()), (endpoint.password,) if endpoint.password else ())


def _slot_command(name: str, major: int) -> str:
    # the option list came with 15; the older keyword is still accepted by 15 and later
    if major >= 15:
        return f"CREATE_REPLICATION_SLOT {name} TEMPORARY LOGICAL pgoutput (SNAPSHOT 'export')"
    return f"CREATE_REPLICATION_SLOT {name} TEMPORARY LOGICAL pgoutput EXPORT_SNAPSHOT"


def _create_slot(
    repl: psycopg.Connection[Any], major: int, wait: float
) -> tuple[str, str, int, str]:
    """IDENTIFY_SYSTEM, then the temporary slot; (snapshot, consistent LSN, timeline, sysid).

    The slot waits until every transaction running at its start has ended; a cancel after
    ``wait`` seconds keeps a forgotten open transaction from holding the backup up.
    """
    ident = repl.execute("IDENTIFY_SYSTEM").fetchone()
    assert ident is not None  # systemid, timeline, xlogpos, dbname
    name = f"drtool_snapshot_{secrets.token_hex(6)}"
    timer = threading.Timer(wait, repl.cancel_safe)
    timer.daemon = True
    timer.start()
    try:
        row = repl.execute(_slot_command(name, major)).fetchone()
    finally:
        timer.cancel()
    assert row is not None  # slot_name, consistent_point, snapshot_name, output_plugin
    return str(row[2]), str(row[1]), int(ident[1]), str(ident[0])


def _slot_point(
    conn: psycopg.Connection[Any], endpoint: PostgresEndpoint, major: int, wait: float
) -> _SlotPoint | str:
    """Import a slot-exported snapshot into ``conn``'s new transaction; the reason if not.

    ``conn`` is idle with REPEATABLE READ set: ``SET TRANSACTION SNAPSHOT`` must be the first
    statement of its transaction. The replication connection closes before this returns.
    """
    try:
        repl = psycopg.connect(
            **endpoint.connect_kwargs(),
            replication="database",
            autocommit=True,
            connect_timeout=_CONNECT_TIMEOUT,
            application_name="drtool-snapshot",
        )
    except psycopg.Error as exc:
        return f"no replication connection ({_one_line(exc, endpoint)})"
    with repl:
        try:
            snapshot, lsn, timeline, sysid = _create_slot(repl, major, wait)
        except psycopg.errors.QueryCanceled:
            return (
                f"the temporary logical slot waited over {wait:.0f} s for transactions "
                "running at its start to end"
            )
        except psycopg.Error as exc:
            return f"no temporary logical slot ({_one_line(exc, endpoint)})"
        try:
            conn.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot)))
        except psycopg.Error as exc:
            conn.rollback()
            return f"the slot's snapshot could not be imported ({_one_line(exc, endpoint)})"
    return _SlotPoint(snapshot, lsn, timeline, sysid)


def _wal_level(conn: psycopg.Connection[Any]) -> str:
    row = conn.execute("SELECT current_setting('wal_level')").fetchone()
    conn.rollback()  # leave the connection idle: the snapshot transaction starts next
    assert row is not None
    return str(row[0])


def export_snapshot(
    conn: psycopg.Connection[Any],
    endpoint: PostgresEndpoint,
    major: int,
    *,
    wait: float = SLOT_WAIT_S,
) -> ExportedSnapshot:
    """Start ``conn``'s REPEATABLE READ, READ ONLY transaction on a snapshot and export it.

    With ``wal_level = logical``: the snapshot of a temporary logical slot and its consistent
    point. Otherwise, or when the slot cannot be had: ``pg_export_snapshot()`` of a fresh
    snapshot and no LSN (the reason is logged and returned). ``conn`` must be idle and not in
    autocommit; its transaction must stay open until ``pg_dump`` has imported the snapshot.
    """
    try:
        level = _wal_level(conn)
    except psycopg.Error as exc:
        raise SourceError(f"PostgreSQL wal_level: {_one_line(exc, endpoint)}") from None
    conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
    conn.read_only = True
    point: _SlotPoint | str
    if level != "logical":
        point = f"wal_level is {level}, not logical"
        log.info("no consistent LSN recorded with the dump: %s", point)
    else:
        point = _slot_point(conn, endpoint, major, wait)
        if isinstance(point, str):
            log.warning("no consistent LSN recorded with the dump: %s", point)
    try:
        row = conn.execute("SELECT pg_export_snapshot()").fetchone()
    except psycopg.Error as exc:
        raise SourceError(f"PostgreSQL snapshot: {_one_line(exc, endpoint)}") from None
    assert row is not None
    if isinstance(point, str):
        return ExportedSnapshot(str(row[0]), lsn_unavailable=point)
    return ExportedSnapshot(str(row[0]), point.lsn, point.timeline, point.system_identifier)
