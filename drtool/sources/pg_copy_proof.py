"""Fingerprints of format 5 (ADR 0033): taken off the dump as it streams, proved by COPY.

Backup: pg_dump runs with the session settings below made explicit (its own DateStyle,
IntervalStyle, extra_float_digits and synchronize_seqscans, plus the TimeZone, bytea_output
and client encoding it would otherwise inherit from the server, the database or the role),
and :class:`~drtool.sources.pg_archive_stream.ArchiveStream` reads each ``TABLE DATA`` block's
COPY text as it passes: rows, bytes, sha256. The database does no work beyond pg_dump's.

Restore: for every table and leaf partition, ``COPY <table> (<the columns pg_dump copied>) TO
STDOUT`` on the restored copy under the same settings, several at a time, hashed the same way.
A freshly restored table's heap holds its rows in the dump's order (one COPY into an empty
table), and with ``synchronize_seqscans = off`` a sequential read starts at its first block,
so an intact copy gives the very same text. ``psql`` writes the COPY text to a pipe, read in
large chunks, so neither side runs Python per row.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from drtool.sources.pg_archive_stream import ArchiveError, ArchiveStream, LineSum, TocEntry
from drtool.sources.pg_fingerprint import (
    COPY,
    FORMAT,
    LINES,
    DatabaseProps,
    Fingerprint,
    PartitionPrint,
    PgFingerprints,
    database_props,
)

log = logging.getLogger(__name__)
_MOD = 1 << 64
_EMPTY = hashlib.sha256(b"").hexdigest()

#: what pg_dump sets in its own session (pg_dump.c, setup_connection): a COPY of the restored
#: copy must run under the same; the settings below it (TIME_ZONE, BYTEA_OUTPUT) pg_dump
#: inherits, so drtool gives them to pg_dump explicitly and records them
PG_DUMP_SESSION = {
    "DateStyle": "ISO",
    "IntervalStyle": "postgres",
    "extra_float_digits": "3",
    "synchronize_seqscans": "off",
    "row_security": "off",  # a policy that would hide rows makes COPY fail, not shrink
}
TIME_ZONE = "UTC"
BYTEA_OUTPUT = "hex"
#: pg_dump sets ``search_path = ''`` (regclass, regtype, regproc... columns then print
#: schema-qualified); the proof sets it too, whatever a snapshot recorded
SEARCH_PATH = ""
#: why a table has a figure of an empty COPY that no dump block gave
NOT_DUMPED_UNLOGGED = "not dumped: unlogged on a standby"


def dump_encoding(database_encoding: str) -> str:
    """The client encoding pg_dump writes (and the proof reads) COPY text and names in.

    UTF8 for every database but SQL_ASCII (whose bytes have no encoding to convert from):
    the TOC's names then decode as UTF-8 and the proof's COPY statement, passed to psql as
    UTF-8 argv, means what it says (a LATIN1 table "café" spelled in UTF-8 under
    ``PGCLIENTENCODING=LATIN1`` is a relation that does not exist). pg_restore reads the
    archive's encoding from it and the server converts back: the dump stays restorable.
    """
    return "SQL_ASCII" if database_encoding.upper() == "SQL_ASCII" else "UTF8"


# every relation pg_dump writes a TABLE DATA block for that the fingerprints cover: tables
# and leaf partitions (not temporary, not an extension's), with the columns COPY writes
# (pg_dump's list: not dropped, not generated, in attnum order) and a partition's root
_UNITS_SQL = """
SELECT format('%I.%I', n.nspname, c.relname), n.nspname::text, c.relname::text,
       CASE WHEN c.relispartition THEN
           (SELECT format('%I.%I', rn.nspname, r.relname) FROM pg_class r
            JOIN pg_namespace rn ON rn.oid = r.relnamespace
            WHERE r.oid = pg_partition_root(c.oid)) END,
       ARRAY(SELECT a.attname::text FROM pg_attribute a
             WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
               AND a.attgenerated = '' ORDER BY a.attnum),
       pg_relation_size(c.oid), c.oid::bigint, c.relpersistence = 'u'
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind = 'r' AND c.relpersistence <> 't'
  AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname !~ '^pg_toast'
  AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
                  AND d.objid = c.oid AND d.deptype = 'e')
"""


@dataclass(frozen=True)
class CopyUnit:
    """One table or leaf partition as the catalog shows it."""

    name: str  # format('%I.%I')
    schema: str
    table: str
    root: str | None  # a partition's partitioned root table
    columns: tuple[str, ...]
    size: int = 0
    oid: int = 0  # pg_class oid: how a TOC entry is matched (its names are in pg_dump's encoding)
    unlogged: bool = False


def copy_units(cur: psycopg.Cursor[Any]) -> dict[tuple[str, str], CopyUnit]:
    """The database's tables and leaf partitions, by (schema, table)."""
    return {
        (schema, table): CopyUnit(
            name, schema, table, root, tuple(columns), int(size or 0), int(oid), bool(unlogged)
        )
        for name, schema, table, root, columns, size, oid, unlogged in cur.execute(
            _UNITS_SQL
        ).fetchall()
    }


def dump_session(encoding: str) -> dict[str, str]:
    """The settings recorded with the fingerprints: pg_dump's and the inherited ones pinned."""
    return {
        **PG_DUMP_SESSION,
        "TimeZone": TIME_ZONE,
        "bytea_output": BYTEA_OUTPUT,
        "client_encoding": encoding,
        "search_path": SEARCH_PATH,
    }


def pg_dump_env(encoding: str) -> dict[str, str]:
    """libpq environment that pins pg_dump's inherited settings (see :func:`dump_session`)."""
    return {
        "PGTZ": TIME_ZONE,
        "PGCLIENTENCODING": encoding,
        "PGOPTIONS": f"-c bytea_output={BYTEA_OUTPUT}",
    }


def streamed_fingerprints(
    stream: ArchiveStream,
    units: Mapping[tuple[str, str], CopyUnit],
    database: DatabaseProps,
    *,
    standby: bool = False,
) -> PgFingerprints:
    """The fingerprints of a fully read archive: one figure per table and leaf partition.

    A ``TABLE DATA`` entry is matched to its catalog unit by the table's oid, never by name
    (the TOC's names are in pg_dump's client encoding). A block of a relation the catalog
    did not list (an extension's table) is left out, as the scan of formats 1 to 4 left it
    out. A unit with no block fails the backup (``ArchiveError``): a table with no figure
    would pass compare() even when the restore lost it. The one exception: on a standby
    pg_dump dumps no data of an unlogged table; it is recorded as such, with the figure of an
    empty COPY (its restored copy is empty), in ``not_dumped``.

    The leaves of a tree pg_dump loads via its root (:func:`loads_via_root`) are recorded at
    the root, order-independent (``LINES``): their rows may land in other leaves on restore.
    """
    tables: dict[str, Fingerprint] = {}
    partitions: dict[str, PartitionPrint] = {}
    not_dumped: dict[str, str] = {}
    trees: dict[str, list[int]] = {}  # root: rows, bytes, line sum
    covered: set[str] = set()
    by_oid = {unit.oid: unit for unit in units.values()}
    for dump_id, figures in stream.tables.items():
        entry = stream.entries[dump_id]
        unit = by_oid.get(entry.oid)
        if unit is None:
            log.debug("TABLE DATA of %s.%s not fingerprinted", entry.namespace, entry.tag)
            continue
        if figures.line_sum is not None and unit.root is not None:
            tree = trees.setdefault(unit.root, [0, 0, 0])
            tree[0] += figures.rows
            tree[1] += figures.size
            tree[2] = (tree[2] + figures.line_sum) % _MOD
            covered.add(unit.name)
            continue
        tables[unit.name] = Fingerprint(
            figures.rows, figures.sha256, None, COPY, figures.size, unit.columns
        )
        if unit.root is not None:
            partitions[unit.name] = PartitionPrint(unit.root, figures.rows, figures.sha256)
    for root, (rows, size, line_sum) in trees.items():
        tables[root] = Fingerprint(rows, f"{line_sum:016x}", None, LINES, size, None)
    for unit in sorted(units.values(), key=lambda u: u.name):
        if unit.name in tables or unit.name in covered:
            continue
        if not (standby and unit.unlogged):
            raise ArchiveError(f"the dump has no data for table {unit.name}")
        log.warning("%s: %s (restored empty)", unit.name, NOT_DUMPED_UNLOGGED)
        tables[unit.name] = Fingerprint(0, _EMPTY, None, COPY, 0, unit.columns)
        not_dumped[unit.name] = NOT_DUMPED_UNLOGGED
        if unit.root is not None:
            partitions[unit.name] = PartitionPrint(unit.root, 0, _EMPTY)
    return PgFingerprints(
        dict(sorted(tables.items())),
        {},
        database,
        dict(sorted(partitions.items())),
        format=FORMAT,
        copy_settings=dump_session(dump_encoding(database.encoding)),
        not_dumped=not_dumped,
    )


def loads_via_root(units: Mapping[tuple[str, str], CopyUnit]) -> Callable[[TocEntry], bool]:
    """Whether a ``TABLE DATA`` entry's COPY statement loads a leaf via its partition root.

    pg_dump (15.3 and later) forces ``--load-via-partition-root`` for hash partitioning on an
    enum column: the leaf's data then reads ``COPY <root> (...) FROM stdin`` and is re-routed
    on restore, so a leaf's rows may land in another leaf. The root's name is quoted the
    same way by pg_dump and by ``format('%I.%I')``.
    """
    by_oid = {unit.oid: unit for unit in units.values()}

    def check(entry: TocEntry) -> bool:
        unit = by_oid.get(entry.oid)
        return bool(unit and unit.root and entry.copy_stmt.startswith(f"COPY {unit.root} "))

    return check


def copy_env(settings: Mapping[str, str]) -> dict[str, str]:
    """libpq environment for a ``psql`` that reads COPY text as the recorded session wrote it."""
    options = {k: v for k, v in settings.items() if k != "client_encoding"}
    options["statement_timeout"] = "0"
    options["search_path"] = SEARCH_PATH  # snapshots made before it was recorded need it too
    return {
        "PGOPTIONS": " ".join(f"-c {k}={v}" for k, v in options.items()),
        "PGCLIENTENCODING": settings.get("client_encoding", "UTF8"),
    }


CopyRunner = Callable[[str], Iterator[bytes]]
"""Runs one ``COPY ... TO STDOUT`` statement and yields its text in large chunks."""


class _Cancelled(Exception):
    """Another COPY of the proof failed, or the proof was interrupted: stop this one."""


_Figures = tuple[int, int, str, int | None]  # rows, bytes, sha256, line sum (LINES only)


def _digest(chunks: Iterable[bytes], cancel: threading.Event, lines: bool) -> _Figures:
    """Rows, bytes, sha256 (and with ``lines`` the :class:`LineSum`) of one COPY's text;
    stops (closing ``chunks``, which kills its psql) at the next chunk once ``cancel`` is
    set."""
    digest, rows, size = hashlib.sha256(), 0, 0
    line_sum = LineSum() if lines else None
    try:
        for chunk in chunks:
            if cancel.is_set():
                raise _Cancelled
            digest.update(chunk)
            rows += chunk.count(b"\n")
            size += len(chunk)
            if line_sum is not None:
                line_sum.feed(chunk)
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()
    return rows, size, digest.hexdigest(), None if line_sum is None else line_sum.done()


def prove_by_copy(
    conn: psycopg.Connection[Any],
    like: PgFingerprints,
    run_copy: CopyRunner,
    *,
    workers: int,
) -> PgFingerprints:
    """The restored copy's figures, taken the way ``like`` (a format-5 snapshot's) were.

    ``conn`` reads the copy's catalog and properties; ``run_copy`` runs each COPY (in
    ``workers`` threads, largest first). The first COPY that fails, or an exception in the
    caller's thread (Ctrl-C, SIGTERM), ends the proof at once: the queued COPYs never start
    and the running ones stop at their next chunk, their psql killed (each runs in its own
    session, so nothing else would stop it before the largest table was read). A table the
    snapshot names but the copy lacks is left out (compare() says missing); one the copy has
    and the snapshot not is figured with all its columns (compare() says unexpected). A
    tree the snapshot recorded at its root (``LINES``) is proved the same way: each of its
    leaves copied, their line sums added up at the root.
    """
    with conn.cursor() as cur:
        units = {u.name: u for u in copy_units(cur).values()}
        database = database_props(cur)
    by_lines = {name for name, fp in like.tables.items() if fp.row_hash == LINES}
    statements: list[tuple[str, int, str]] = []
    tree_of: dict[str, str] = {}  # leaf: its root, for the leaves proved at the root
    for name, unit in units.items():
        if unit.root in by_lines and name not in like.tables:
            tree_of[name] = unit.root
        recorded = like.tables.get(name)
        columns = recorded.columns if recorded and recorded.columns is not None else unit.columns
        statement = sql.SQL("COPY {} ({}) TO STDOUT").format(
            sql.Identifier(unit.schema, unit.table),
            sql.SQL(", ").join(sql.Identifier(c) for c in columns),
        )
        if not columns:  # a table with no columns: COPY t () is not SQL
            statement = sql.SQL("COPY {} TO STDOUT").format(sql.Identifier(unit.schema, unit.table))
        statements.append((name, unit.size, statement.as_string(conn)))
    statements.sort(key=lambda s: -s[1])
    cancel = threading.Event()

    def one(name: str, statement: str) -> _Figures:
        if cancel.is_set():
            raise _Cancelled
        try:
            return _digest(run_copy(statement), cancel, name in tree_of)
        except BaseException:
            cancel.set()  # here, before this worker takes the next queued COPY
            raise

    found: dict[str, _Figures] = {}
    pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="drtool-copy")
    try:
        futures: dict[Future[_Figures], str] = {
            pool.submit(one, name, statement): name for name, _, statement in statements
        }
        for future in as_completed(futures):
            found[futures[future]] = future.result()  # the first failure is raised
    except BaseException:
        cancel.set()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    tables: dict[str, Fingerprint] = {}
    trees: dict[str, list[int]] = {}
    for name, (rows, size, digest, line_sum) in found.items():
        root = tree_of.get(name)
        if root is None or line_sum is None:
            tables[name] = Fingerprint(rows, digest, None, COPY, size, units[name].columns)
            continue
        tree = trees.setdefault(root, [0, 0, 0])
        tree[0] += rows
        tree[1] += size
        tree[2] = (tree[2] + line_sum) % _MOD
    for root, (rows, size, total) in trees.items():
        tables[root] = Fingerprint(rows, f"{total:016x}", None, LINES, size, None)
    return PgFingerprints(
        dict(sorted(tables.items())),
        {},
        database,
        format=FORMAT,
        copy_settings=dict(like.copy_settings),
        not_dumped=dict(like.not_dumped),
    )
