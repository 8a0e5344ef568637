"""The row-hash fingerprint scan of formats 1-4: one unit per table or leaf partition, in
parallel, on one exported snapshot (ADR 0029).

Backups no longer scan (format 5 reads the fingerprints off the dump, ADR 0033); this scan
proves a restored copy of a snapshot of formats 1-4. A partitioned table is read one leaf
partition at a time, by ``workers`` connections that each import the same snapshot
(``SET TRANSACTION SNAPSHOT``). Per-unit counts and sums are added up per table and per room
(the digest is a sum modulo 2**64, so it splits over partitions exactly), and each row is
hashed in its table's row type, so the figures are the serial scan's
(:func:`drtool.sources.pg_fingerprint.compute_fingerprints`), bit for bit.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from drtool.errors import SourceError
from drtool.sources.pg_fingerprint import (
    _MOD,
    _NULL_ROOM,
    _PINNED_SETTINGS,
    _TABLES_SQL,
    RECORD,
    SCAN_FORMAT,
    TEXT,
    Fingerprint,
    PartitionPrint,
    PgFingerprints,
    database_props,
    row_hash_sql,
)

log = logging.getLogger(__name__)

# a relation's columns as the row hash sees them (number, name, type, modifier, collation,
# dropped, the value rows written before ADD COLUMN ... DEFAULT read as): equal rows, equal
# rows hashed; read as rows, compared as tuples (a name is never parsed out of a string)
_COLUMNS_SQL = """
SELECT a.attnum, a.attname::text, a.atttypid::int8, a.atttypmod, a.attcollation::int8,
       a.attisdropped, a.attmissingval::text
FROM pg_attribute a WHERE a.attrelid = %s AND a.attnum > 0 ORDER BY a.attnum
"""

# the leaves of a partitioned table as the exported snapshot sees them: pg_inherits read in
# the transaction (pg_partition_tree() reads the current catalog: a partition attached or
# detached since the snapshot would be missed or added)
_LEAVES_SQL = """
WITH RECURSIVE tree(relid) AS (
    SELECT %s::oid
    UNION ALL
    SELECT i.inhrelid FROM pg_inherits i JOIN tree t ON i.inhparent = t.relid
)
SELECT format('%%I.%%I', n.nspname, c.relname), c.oid, c.relfilenode, c.relkind,
       pg_relation_size(c.oid)
FROM tree JOIN pg_class c ON c.oid = tree.relid
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind <> 'p'
"""


@dataclass(frozen=True)
class Unit:
    """One relation the scan reads with ``FROM ONLY``: a plain table or a leaf partition."""

    table: str  # the table whose fingerprint it adds to (the partitioned parent)
    relation: str  # what is read
    oid: int
    relfilenode: int
    columns: str  # _COLUMNS_SQL of the relation and of its table, as JSON
    rooms: bool
    has_id: bool
    partition: bool
    row: sql.Composable | None  # the row in its table's row type; None: as read (same layout)
    size: int = 0
    only: bool = True  # FROM ONLY (a partitioned parent read whole: without)


@dataclass(frozen=True)
class UnitPrint:
    """One unit's figures: rows, sum of row hashes, max(id), per room (rows, sum, max(id)).

    The per-room figures are kept as their compact JSON text (``{"room": [rows, "sum",
    max_id]}``), decoded only to be added up: the scan holds one per (partition, room) pair,
    and text is about a fifth of the memory of the decoded dicts.
    """

    rows: int
    total: int
    max_id: int | None
    row_hash: str
    rooms: str | None = None  # pack_rooms() of the per-room figures; None: not by room

    def room_figures(self) -> dict[str, tuple[int, int, int | None]]:
        """The per-room figures, decoded; ValueError when the text is not theirs."""
        if self.rooms is None:
            return {}
        try:
            return {
                str(r): (int(n), int(t), None if m is None else int(m))
                for r, (n, t, m) in json.loads(self.rooms).items()
            }
        except (TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"malformed room figures: {exc!r}") from None


def pack_rooms(rooms: dict[str, tuple[int, int, int | None]]) -> str:
    """The compact JSON text of per-room figures (see :class:`UnitPrint`)."""
    return json.dumps({r: [n, str(t), m] for r, (n, t, m) in rooms.items()}, separators=(",", ":"))


@dataclass
class ScanResult:
    """The scan's fingerprints and how many units it hashed."""

    fingerprints: PgFingerprints
    scanned: int = 0
    workers: int = 1


Column = tuple[int, str, int, int, int, bool, str | None]


def _columns(cur: psycopg.Cursor[Any], oid: int) -> list[Column]:
    return [tuple(r) for r in cur.execute(_COLUMNS_SQL, (oid,)).fetchall()]


def plan_units(cur: psycopg.Cursor[Any]) -> list[Unit]:
    """Every unit of the database, the biggest first (they are handed out in this order)."""
    units: list[Unit] = []
    for name, oid, _, relname, partitioned, has_room, has_id in cur.execute(_TABLES_SQL).fetchall():
        rooms = relname == "messages" and bool(has_room)
        whole = Unit(name, name, oid, 0, "", rooms, has_id, False, None, only=not partitioned)
        if not partitioned:
            units.append(whole)
            continue
        leaves = cur.execute(_LEAVES_SQL, (oid,)).fetchall()
        if not leaves or any(kind != "r" for _, _, _, kind, _ in leaves):
            units.append(whole)  # no partitions, or foreign ones: the parent, as the serial scan
            continue
        parent_columns = _columns(cur, oid)
        parent_names = [
            r[0]
            for r in cur.execute(
                "SELECT attname FROM pg_attribute WHERE attrelid = %s AND attnum > 0 "
                "AND NOT attisdropped ORDER BY attnum",
                (oid,),
            ).fetchall()
        ]
        parent_type = sql.SQL(name)  # format('%I.%I') quoted it already
        for leaf, leaf_oid, relfilenode, _, size in leaves:
            columns = _columns(cur, leaf_oid)
            same_layout = [c[:3] for c in columns] == [c[:3] for c in parent_columns] and not any(
                c[5] for c in columns + parent_columns
            )
            row: sql.Composable | None = (
                None
                if same_layout
                else sql.SQL("ROW({})::{}").format(
                    sql.SQL(", ").join(sql.SQL("r.") + sql.Identifier(c) for c in parent_names),
                    parent_type,
                )
            )
            units.append(
                Unit(
                    name,
                    leaf,
                    leaf_oid,
                    relfilenode,
                    json.dumps([columns, parent_columns]),
                    rooms,
                    has_id,
                    True,
                    row,
                    size,
                )
            )
    return sorted(units, key=lambda u: -u.size)


def _hash_unit(cur: psycopg.Cursor[Any], unit: Unit, hashes: list[str]) -> UnitPrint:
    """Hash every row of ``unit`` (first of ``hashes`` its column types allow)."""
    src = sql.SQL("{}{} AS r").format(sql.SQL("ONLY " if unit.only else ""), sql.SQL(unit.relation))
    for i, row_hash in enumerate(hashes):
        expr = row_hash_sql(row_hash, unit.row)
        if unit.rooms:
            max_id = sql.SQL("max(r.id)" if unit.has_id else "NULL::bigint")
            query = sql.SQL(
                "SELECT r.room_id::text, count(*), sum({h}), {m} FROM {src} GROUP BY r.room_id"
            ).format(h=expr, m=max_id, src=src)
        else:
            query = sql.SQL("SELECT NULL, count(*), sum({h}), NULL FROM {src}").format(
                h=expr, src=src
            )
        try:
            with cur.connection.transaction():
                found = cur.execute(query).fetchall()
        except psycopg.errors.UndefinedFunction:
            if i == len(hashes) - 1:
                raise
            continue  # "could not identify an extended hash function for type ..."
        if not unit.rooms:
            _, n, total, _ = found[0]
            return UnitPrint(int(n), int(total or 0) % _MOD, None, row_hash)
        rooms = {
            _NULL_ROOM if room is None else str(room): (
                int(n),
                int(total or 0) % _MOD,
                None if top is None else int(top),
            )
            for room, n, total, top in found
        }
        ids = [top for _, _, top in rooms.values() if top is not None]
        return UnitPrint(
            sum(n for n, _, _ in rooms.values()),
            sum(t for _, t, _ in rooms.values()) % _MOD,
            max(ids) if ids else None,
            row_hash,
            pack_rooms(rooms),
        )
    raise AssertionError("no row hash")  # pragma: no cover


@contextmanager
def _pool(
    connect: Callable[[], psycopg.Connection[Any]], snapshot: str, workers: int
) -> Iterator[tuple[queue.Queue[psycopg.Connection[Any]], list[psycopg.Connection[Any]]]]:
    """``workers`` connections, each in a read-only transaction on ``snapshot``."""
    conns: list[psycopg.Connection[Any]] = []
    free: queue.Queue[psycopg.Connection[Any]] = queue.Queue()
    try:
        for _ in range(workers):
            conn = connect()
            conns.append(conn)
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            conn.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot)))
            for setting, value in _PINNED_SETTINGS.items():
                conn.execute("SELECT set_config(%s, %s, true)", (setting, value))
            # beside pg_dump: the workers are the parallelism; a gather would only compete
            conn.execute("SET LOCAL max_parallel_workers_per_gather = 0")
            free.put(conn)
        yield free, conns
    finally:
        for conn in conns:
            conn.close()


class PartitionScan:
    """The parallel scan of one exported snapshot (run it once; ``cancel`` from any thread)."""

    def __init__(
        self,
        connect: Callable[[], psycopg.Connection[Any]],
        snapshot: str,
        *,
        workers: int = 2,
        like: PgFingerprints | None = None,
    ) -> None:
        """``like``: hash each table the way these (a snapshot's) fingerprints recorded, as
        :func:`~drtool.sources.pg_fingerprint.compute_fingerprints` does for a restored copy."""
        self._like = like
        self._connect, self._snapshot = connect, snapshot
        self._workers = max(1, workers)
        self._conns: list[psycopg.Connection[Any]] = []
        self._cancelled = threading.Event()
        self._lock = threading.Lock()

    def cancel(self) -> None:
        """Stop the running queries (an aborted proof need not finish the scan)."""
        self._cancelled.set()
        for conn in list(self._conns):
            with suppress(Exception):  # best effort: the connection may be closing
                conn.cancel_safe(timeout=5)

    def run(self) -> ScanResult:
        """Plan, scan every unit, add them up."""
        with _pool(self._connect, self._snapshot, self._workers) as (free, conns):
            self._conns = conns
            main = free.get()
            with main.cursor() as cur:
                units = plan_units(cur)
                database = database_props(cur)
            free.put(main)

            first_error: list[BaseException] = []

            def one(unit: Unit) -> tuple[Unit, UnitPrint]:
                if self._cancelled.is_set():
                    raise SourceError("fingerprint scan cancelled")
                conn = free.get()
                try:
                    with conn.cursor() as cur:
                        recorded = self._like.tables.get(unit.table) if self._like else None
                        hashes = [recorded.row_hash] if recorded else [RECORD, TEXT]
                        return unit, _hash_unit(cur, unit, hashes)
                except BaseException as exc:
                    with self._lock:
                        if not first_error:
                            first_error.append(exc)
                    self._cancelled.set()  # no other unit starts (the queue is the scan)
                    raise
                finally:
                    free.put(conn)

            with ThreadPoolExecutor(self._workers, thread_name_prefix="drtool-fp") as pool:
                futures = [pool.submit(one, unit) for unit in units]
                wait(futures, return_when=FIRST_EXCEPTION)
                if first_error:
                    # the first failure fails the scan: queued units never start, running
                    # queries are cancelled (not waited for, which is the whole scan)
                    for f in futures:
                        f.cancel()
                    self.cancel()
                    raise first_error[0]
                done = [f.result() for f in futures]
        per_table: dict[str, list[UnitPrint]] = {}
        for unit, figures in done:
            per_table.setdefault(unit.table, []).append(figures)
        partitions = {unit.relation: (unit, figures) for unit, figures in done if unit.partition}
        prints = _merge(per_table, database, partitions)
        return ScanResult(prints, scanned=len(done), workers=self._workers)


def _merge(
    per_table: dict[str, list[UnitPrint]],
    database: Any,
    partitions: dict[str, tuple[Unit, UnitPrint]],
) -> PgFingerprints:
    """Add the units up per table and per room, as the serial scan reports them."""
    tables: dict[str, Fingerprint] = {}
    rooms: dict[str, dict[str, Fingerprint]] = {}
    for table, prints in sorted(per_table.items()):
        hashes = {p.row_hash for p in prints}
        if len(hashes) != 1:
            raise SourceError(f"fingerprints: partitions of {table} hashed differently")
        row_hash = hashes.pop()
        ids = [p.max_id for p in prints if p.max_id is not None]
        tables[table] = Fingerprint(
            sum(p.rows for p in prints),
            f"{sum(p.total for p in prints) % _MOD:016x}",
            max(ids) if ids else None,
            row_hash,
        )
        if prints[0].rooms is None:
            continue
        merged: dict[str, tuple[int, int, int | None]] = {}
        for p in prints:
            try:
                figures = p.room_figures()  # decoded once, here
            except ValueError as exc:  # packed by _hash_unit: a bug, not data
                raise SourceError(f"fingerprints of {table}: {exc}") from None
            for room, (n, total, top) in figures.items():
                m_n, m_total, m_top = merged.get(room, (0, 0, None))
                tops = [t for t in (m_top, top) if t is not None]
                merged[room] = (m_n + n, (m_total + total) % _MOD, max(tops) if tops else None)
        rooms[table] = {
            room: Fingerprint(n, f"{total:016x}", top, row_hash)
            for room, (n, total, top) in merged.items()
        }
    by_partition = {
        name: PartitionPrint(unit.table, figures.rows, f"{figures.total:016x}", figures.max_id)
        for name, (unit, figures) in sorted(partitions.items())
    }
    return PgFingerprints(tables, rooms, database, by_partition, format=SCAN_FORMAT)
