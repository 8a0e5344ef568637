"""The backup's fingerprint scan: one unit per table or leaf partition, in parallel, on the
dump's exported snapshot, with proved-unchanged partitions reused (ADR 0029).

The serial scan (:func:`drtool.sources.pg_fingerprint.compute_fingerprints`) reads a
partitioned table through its parent in one backend: at 10 M messages that one query is the
backup's critical path. Here every leaf partition is a unit of its own, run by ``workers``
connections that each import the dump's snapshot (``SET TRANSACTION SNAPSHOT``), so all units
see exactly the rows pg_dump writes. Per-unit counts and sums are added up per table and per
room (the digest is a sum modulo 2**64, so it splits over partitions exactly), and each row is
hashed in its table's row type, so the figures are the serial scan's, bit for bit.

A partition whose content the previous committed snapshot recorded, and which this snapshot
provably did not change, is not hashed again: its figures are copied and marked as reused,
with the snapshot that last hashed them. What proves it is in ADR 0029 and
:func:`_unchanged_sql`: a baseline file the last snapshot's signed manifest records, the
same relation file and columns (of built-in types only) on the same database history, the
same row count, no row version written by a transaction the baseline snapshot did not see,
and the same set of row versions (a digest of ``(ctid, xmin)``): a scan of system columns,
no row hashing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
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

BASELINE_FORMAT = "drtool-pg-baseline/2"
#: a baseline older than this many transactions is not trusted (32-bit xid comparisons)
_XID_WINDOW = (1 << 31) - 10_000_000

# a relation's columns as the row hash sees them (number, name, type, modifier, collation,
# dropped, the value rows written before ADD COLUMN ... DEFAULT read as): equal rows, equal
# rows hashed; read as rows, compared as tuples (a name is never parsed out of a string)
_COLUMNS_SQL = """
SELECT a.attnum, a.attname::text, a.atttypid::int8, a.atttypmod, a.attcollation::int8,
       a.attisdropped, a.attmissingval::text
FROM pg_attribute a WHERE a.attrelid = %s AND a.attnum > 0 ORDER BY a.attnum
"""

# columns whose values can change with no new row version: a type or collation that a user can
# ALTER (ADD ATTRIBUTE to a composite, RENAME VALUE of an enum, a domain, a range, an
# extension's type) changes what a row hashes to while xmin and the relation file stay; the
# rule is coarse on purpose (any type or collation not built in, any composite, enum, domain,
# range or multirange, also as an array's element): such a partition is always hashed again
_CUSTOM_TYPES_SQL = """
SELECT count(*) FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
LEFT JOIN pg_type e ON e.oid = t.typelem
WHERE a.attrelid = %s AND a.attnum > 0 AND NOT a.attisdropped
  AND (t.oid >= 16384 OR t.typtype IN ('c', 'e', 'd', 'r', 'm')
       OR e.oid >= 16384 OR e.typtype IN ('c', 'e', 'd', 'r', 'm')
       OR a.attcollation >= 16384)
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

# the timeline is the one WAL is written (primary) or received (standby) on now, not the last
# checkpoint's (pg_control_checkpoint() lags a promotion until its first checkpoint); a standby
# without a WAL receiver, or a login that may not read it, gives NULL: no reuse
_HISTORY_SQL = """
SELECT (SELECT system_identifier::text FROM pg_control_system()),
       CASE WHEN pg_is_in_recovery() THEN (SELECT received_tli FROM pg_stat_wal_receiver)
            ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int
       END,
       (SELECT oid FROM pg_database WHERE datname = current_database()),
       pg_snapshot_xmin(pg_current_snapshot())::text,
       pg_snapshot_xmax(pg_current_snapshot())::text,
       (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn()
        END - '0/0'::pg_lsn)::text
"""

#: a digest of a partition's row versions, (ctid, xmin) of each, summed modulo 2**64: two
#: scans that find the same sum found the same set of row versions (short of a chance 64-bit
#: collision), whatever the history in between; it is what "the same count" alone is not
#: (hash_record_extended over (tid, xid): under half the cost of hashing their text forms)
_VERSIONS = sql.SQL("sum(hash_record_extended(ROW(r.ctid, r.xmin), 0))")


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
    custom_types: bool = False  # a column's type or collation is not built in: no reuse


@dataclass(frozen=True)
class UnitPrint:
    """One unit's figures: rows, sum of row hashes, max(id), per room (rows, sum, max(id)).

    The per-room figures are kept as their compact JSON text (``{"room": [rows, "sum",
    max_id]}``), decoded only to be added up: the scan and the baseline hold one per
    (partition, room) pair, and text is about a fifth of the memory of the decoded dicts.
    """

    rows: int
    total: int
    max_id: int | None
    row_hash: str
    rooms: str | None = None  # pack_rooms() of the per-room figures; None: not by room
    versions: int | None = None  # _VERSIONS of a partition (None: not computed, no reuse)

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

    def to_dict(self) -> dict[str, Any]:
        """JSON form (the baseline file; ``rooms`` stays a string in it)."""
        return {
            "rows": self.rows,
            "total": str(self.total),
            "max_id": self.max_id,
            "row_hash": self.row_hash,
            "versions": None if self.versions is None else str(self.versions),
            "rooms": self.rooms,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UnitPrint:
        """Inverse of ``to_dict``."""
        rooms = data.get("rooms")
        if rooms is not None and not isinstance(rooms, str):
            raise ValueError("room figures are not packed")
        return cls(
            int(data["rows"]),
            int(data["total"]),
            None if data.get("max_id") is None else int(data["max_id"]),
            str(data["row_hash"]),
            rooms,
            None if data.get("versions") is None else int(data["versions"]),
        )


def pack_rooms(rooms: dict[str, tuple[int, int, int | None]]) -> str:
    """The compact JSON text of per-room figures (see :class:`UnitPrint`)."""
    return json.dumps({r: [n, str(t), m] for r, (n, t, m) in rooms.items()}, separators=(",", ":"))


@dataclass(frozen=True)
class History:
    """Where and when a snapshot was taken: what a reuse must find unchanged (ADR 0029)."""

    system_identifier: str
    timeline: int
    database_oid: int
    xmin: int  # the snapshot's xmin and xmax as 64-bit transaction ids
    xmax: int
    lsn: int  # the WAL position written (primary) or replayed (standby), in bytes

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "system_identifier": self.system_identifier,
            "timeline": self.timeline,
            "database_oid": self.database_oid,
            "xmin": self.xmin,
            "xmax": self.xmax,
            "lsn": self.lsn,
        }


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True)
class BaselineUnit:
    """A partition as a committed snapshot recorded it."""

    oid: int
    relfilenode: int
    columns: str
    figures: UnitPrint
    hashed_in: str  # the snapshot whose scan hashed these rows
    hashed_at: float  # when (Unix time)


@dataclass(frozen=True)
class Baseline:
    """The partitions of the last committed snapshot, for the next backup to reuse."""

    repo_id: str
    snapshot_id: str
    history: History
    units: dict[str, BaselineUnit]

    def to_dict(self) -> dict[str, Any]:
        """JSON form of the state file."""
        return json.loads("".join(self.chunks()))

    def chunks(self) -> Iterator[str]:
        """The state file's canonical JSON (sorted keys, no spaces), a partition at a time:
        written and hashed without a second copy of every partition's room figures."""
        head = {
            "format": BASELINE_FORMAT,
            "history": self.history.to_dict(),
            "repo_id": self.repo_id,
            "snapshot_id": self.snapshot_id,
        }
        yield _canonical(head)[:-1] + ',"units":{'
        for i, (name, u) in enumerate(sorted(self.units.items())):
            unit = {
                "oid": u.oid,
                "relfilenode": u.relfilenode,
                "columns": u.columns,
                "figures": u.figures.to_dict(),
                "hashed_in": u.hashed_in,
                "hashed_at": u.hashed_at,
            }
            yield ("," if i else "") + _canonical(name) + ":" + _canonical(unit)
        yield "}}"

    def sha256(self) -> str:
        """The hash the snapshot's signed manifest records of it (``baseline_sha256``): a
        baseline file is trusted only when it is the one its snapshot committed."""
        digest = hashlib.sha256()
        for chunk in self.chunks():
            digest.update(chunk.encode())
        return digest.hexdigest()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Baseline:
        """Inverse of ``to_dict``; ValueError when it is not one."""
        if data.get("format") != BASELINE_FORMAT:
            raise ValueError(f"not a {BASELINE_FORMAT} file")
        try:
            h = data["history"]
            return cls(
                str(data["repo_id"]),
                str(data["snapshot_id"]),
                History(
                    str(h["system_identifier"]),
                    int(h["timeline"]),
                    int(h["database_oid"]),
                    int(h["xmin"]),
                    int(h["xmax"]),
                    int(h["lsn"]),
                ),
                {
                    str(name): BaselineUnit(
                        int(u["oid"]),
                        int(u["relfilenode"]),
                        str(u["columns"]),
                        UnitPrint.from_dict(u["figures"]),
                        str(u["hashed_in"]),
                        float(u["hashed_at"]),
                    )
                    for name, u in data["units"].items()
                },
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"malformed baseline: {exc!r}") from None


def baseline_path(state: Path, repo_id: str, dbname: str) -> Path:
    """The backup host's baseline file of one repository and database."""
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in dbname)
    return state / f"pg-partitions-{repo_id}-{safe}.json"


def load_baseline(path: Path, repo_id: str) -> Baseline | None:
    """The baseline in ``path``, or None (missing, unreadable or another repository's)."""
    try:
        baseline = Baseline.from_dict(json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("%s: ignored (%s); every partition is hashed", path, exc)
        return None
    return baseline if baseline.repo_id == repo_id else None


def save_baseline(path: Path, baseline: Baseline) -> None:
    """Write the baseline atomically, mode 0600 (it holds per-room row counts)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        for chunk in baseline.chunks():
            fh.write(chunk)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


@dataclass
class ScanResult:
    """The scan's fingerprints, what was reused, and what the next backup may reuse."""

    fingerprints: PgFingerprints
    scanned: int = 0
    reused: int = 0
    baseline: str | None = None  # the snapshot the reused partitions were proved unchanged since
    hashed_in: dict[str, int] = field(default_factory=dict)  # reused: snapshot that hashed -> n
    not_reused: dict[str, str] = field(default_factory=dict)  # partition -> why hashed again
    workers: int = 1
    history: History | None = None
    units: dict[str, tuple[Unit, UnitPrint, str | None, float | None]] = field(
        default_factory=dict
    )  # partition -> (unit, figures, hashed in (None: this snapshot), hashed at)

    def details(self) -> dict[str, Any]:
        """The manifest's summary (docs/FORMAT.md): counts and baseline ids, no content."""
        return {
            "fingerprint_scan": {
                "workers": self.workers,
                "units_hashed": self.scanned,
                "partitions_reused": self.reused,
                "proved_unchanged_since": self.baseline if self.reused else None,
                "reused_hashed_in": dict(sorted(self.hashed_in.items())),
            }
        }

    def summary(self) -> str:
        """The backup summary's line: what was hashed now and what was reused, from where."""
        if not self.reused:
            return f"fingerprints: {self.scanned} tables or partitions hashed"
        sources = ", ".join(f"{n} hashed in {s}" for s, n in sorted(self.hashed_in.items()))
        return (
            f"fingerprints: {self.scanned} tables or partitions hashed; {self.reused} partitions "
            f"proved unchanged since snapshot {self.baseline} and reused, not hashed again "
            f"({sources})"
        )

    def next_baseline(self, repo_id: str, snapshot_id: str, now: float) -> Baseline | None:
        """What the next backup may reuse once ``snapshot_id`` is committed (None: nothing)."""
        if self.history is None:
            return None
        return Baseline(
            repo_id,
            snapshot_id,
            self.history,
            {
                name: BaselineUnit(
                    unit.oid,
                    unit.relfilenode,
                    unit.columns,
                    figures,
                    hashed_in or snapshot_id,
                    now if hashed_at is None else hashed_at,
                )
                for name, (unit, figures, hashed_in, hashed_at) in self.units.items()
            },
        )


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
                    custom_types=_has_custom_types(cur, leaf_oid),
                )
            )
    return sorted(units, key=lambda u: -u.size)


def _has_custom_types(cur: psycopg.Cursor[Any], oid: int) -> bool:
    row = cur.execute(_CUSTOM_TYPES_SQL, (oid,)).fetchone()
    return bool(row and row[0])


def _hash_unit(cur: psycopg.Cursor[Any], unit: Unit, hashes: list[str]) -> UnitPrint:
    """Hash every row of ``unit`` (first of ``hashes`` its column types allow); of a partition
    also the digest of its row versions, in the same pass (what a later reuse compares)."""
    src = sql.SQL("{}{} AS r").format(sql.SQL("ONLY " if unit.only else ""), sql.SQL(unit.relation))
    versions = _VERSIONS if unit.partition else sql.SQL("NULL::numeric")
    for i, row_hash in enumerate(hashes):
        expr = row_hash_sql(row_hash, unit.row)
        if unit.rooms:
            max_id = sql.SQL("max(r.id)" if unit.has_id else "NULL::bigint")
            query = sql.SQL(
                "SELECT r.room_id::text, count(*), sum({h}), {m}, {v} FROM {src} GROUP BY r.room_id"
            ).format(h=expr, m=max_id, v=versions, src=src)
        else:
            query = sql.SQL("SELECT NULL, count(*), sum({h}), NULL, {v} FROM {src}").format(
                h=expr, v=versions, src=src
            )
        try:
            with cur.connection.transaction():
                found = cur.execute(query).fetchall()
        except psycopg.errors.UndefinedFunction:
            if i == len(hashes) - 1:
                raise
            continue  # "could not identify an extended hash function for type ..."
        digest = sum(int(v or 0) for *_, v in found) % _MOD if unit.partition else None
        if not unit.rooms:
            _, n, total, _, _ = found[0]
            return UnitPrint(int(n), int(total or 0) % _MOD, None, row_hash, versions=digest)
        rooms = {
            _NULL_ROOM if room is None else str(room): (
                int(n),
                int(total or 0) % _MOD,
                None if top is None else int(top),
            )
            for room, n, total, top, _ in found
        }
        ids = [top for _, _, top in rooms.values() if top is not None]
        return UnitPrint(
            sum(n for n, _, _ in rooms.values()),
            sum(t for _, t, _ in rooms.values()) % _MOD,
            max(ids) if ids else None,
            row_hash,
            pack_rooms(rooms),
            digest,
        )
    raise AssertionError("no row hash")  # pragma: no cover


def _unchanged_sql(unit: Unit, baseline_xmin32: int) -> sql.Composed:
    """Rows, rows written by a transaction the baseline snapshot may not have seen, and the
    digest of the row versions (the set of (ctid, xmin) must be the baseline's).

    ``age(xmin)`` is the distance from the next transaction id to the row version's inserting
    transaction (raw: freezing keeps it). A version the baseline could not see was inserted by
    a transaction at or after the baseline's xmin, so its age is at most the baseline xmin's
    age; ids that wrapped or are not normal give an age <= that too or INT_MAX (frozen long
    ago) — the former only cost a rescan.
    """
    return sql.SQL(
        "SELECT count(*), count(*) FILTER (WHERE age(r.xmin) <= age({x}::xid)), {v} "
        "FROM ONLY {t} AS r"
    ).format(x=sql.Literal(str(baseline_xmin32)), v=_VERSIONS, t=sql.SQL(unit.relation))


def _why_not_reusable(
    unit: Unit,
    old: BaselineUnit | None,
    baseline: Baseline,
    history: History,
    max_age_s: float,
    now: float,
) -> str | None:
    """Why ``unit`` must be hashed again before any row is read, or None (then check rows)."""
    if old is None:
        return "not in the baseline"
    b = baseline.history
    if (b.system_identifier, b.timeline, b.database_oid) != (
        history.system_identifier,
        history.timeline,
        history.database_oid,
    ):
        return "another server, timeline or database"
    if history.lsn < b.lsn:
        return "the WAL position is behind the baseline's (a standby behind, or a rewound server)"
    if history.xmin < b.xmax:
        # this snapshot might not see every transaction the baseline saw (a standby behind
        # the baseline's server, a transaction still open): the proof needs it to
        return "a transaction older than the baseline runs"
    if history.xmax - b.xmin > _XID_WINDOW:
        return "too many transactions since the baseline"
    if unit.custom_types:
        return "a column's type is not built in (it can change with no new row version)"
    if (old.oid, old.relfilenode, old.columns) != (unit.oid, unit.relfilenode, unit.columns):
        return "the relation was rewritten or its columns changed"
    if not 0.0 <= now - old.hashed_at <= max_age_s:  # a time in the future: not trusted either
        return "last hashed too long ago"
    return None


def _history(cur: psycopg.Cursor[Any]) -> History | None:
    """This snapshot's history, or None when the login may not read it (no reuse then)."""
    try:
        with cur.connection.transaction():
            row = cur.execute(_HISTORY_SQL).fetchone()
    except psycopg.errors.InsufficientPrivilege as exc:
        log.info("partition fingerprints are not reused: %s", " ".join(str(exc).split()))
        return None
    assert row is not None
    sysid, timeline, db_oid, xmin, xmax, lsn = row
    if sysid is None or timeline is None or lsn is None:
        return None
    return History(str(sysid), int(timeline), int(db_oid), int(xmin), int(xmax), int(lsn))


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
        baseline: Baseline | None = None,
        max_reuse_age_s: float = 7 * 86400.0,
        like: PgFingerprints | None = None,
    ) -> None:
        """``like``: hash each table the way these (a snapshot's) fingerprints recorded, as
        :func:`~drtool.sources.pg_fingerprint.compute_fingerprints` does for a restored copy."""
        self._like = like
        self._connect, self._snapshot = connect, snapshot
        self._workers = max(1, workers)
        self._baseline, self._max_age = baseline, max_reuse_age_s
        self._conns: list[psycopg.Connection[Any]] = []
        self._cancelled = threading.Event()
        self._lock = threading.Lock()

    def cancel(self) -> None:
        """Stop the running queries (an aborted backup need not finish the scan)."""
        self._cancelled.set()
        for conn in list(self._conns):
            with suppress(Exception):  # best effort: the connection may be closing
                conn.cancel_safe(timeout=5)

    def run(self) -> ScanResult:
        """Plan, scan (or prove unchanged) every unit, add them up."""
        with _pool(self._connect, self._snapshot, self._workers) as (free, conns):
            self._conns = conns
            main = free.get()
            with main.cursor() as cur:
                units = plan_units(cur)
                history = _history(cur)
                database = database_props(cur)
            free.put(main)
            result = ScanResult(
                PgFingerprints({}, format=SCAN_FORMAT), workers=self._workers, history=history
            )
            result.baseline = self._baseline.snapshot_id if self._baseline else None
            now = time.time()

            first_error: list[BaseException] = []

            def one(unit: Unit) -> tuple[Unit, UnitPrint, str | None, float | None, str | None]:
                if self._cancelled.is_set():
                    raise SourceError("fingerprint scan cancelled")
                conn = free.get()
                try:
                    with conn.cursor() as cur:
                        return self._unit(cur, unit, history, now)
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
        for unit, figures, hashed_in, hashed_at, why in done:
            per_table.setdefault(unit.table, []).append(figures)
            if unit.partition:
                result.units[unit.relation] = (unit, figures, hashed_in, hashed_at)
            if hashed_in is None:
                result.scanned += 1
                if why is not None and unit.partition:
                    result.not_reused[unit.relation] = why
            else:
                result.reused += 1
                result.hashed_in[hashed_in] = result.hashed_in.get(hashed_in, 0) + 1
        result.fingerprints = _merge(per_table, database, result)
        return result

    def _unit(
        self, cur: psycopg.Cursor[Any], unit: Unit, history: History | None, now: float
    ) -> tuple[Unit, UnitPrint, str | None, float | None, str | None]:
        baseline = self._baseline
        recorded = self._like.tables.get(unit.table) if self._like else None
        hashes = [recorded.row_hash] if recorded else [RECORD, TEXT]
        why: str | None = "no baseline"
        if unit.partition and baseline is not None and history is not None:
            old = baseline.units.get(unit.relation)
            why = _why_not_reusable(unit, old, baseline, history, self._max_age, now)
            if why is None and old is not None:
                row = cur.execute(_unchanged_sql(unit, baseline.history.xmin % (1 << 32)))
                rows, newer, versions = row.fetchone() or (0, 0, None)
                same = old.figures.versions == int(versions or 0) % _MOD
                if rows == old.figures.rows and newer == 0 and same:
                    return unit, old.figures, old.hashed_in, old.hashed_at, None
                why = (
                    "rows were written since"
                    if newer
                    else "rows were deleted since"
                    if rows != old.figures.rows
                    else "other row versions than the baseline's (a rewound history?)"
                )
        return unit, _hash_unit(cur, unit, hashes), None, None, why


def _merge(
    per_table: dict[str, list[UnitPrint]], database: Any, result: ScanResult
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
                figures = p.room_figures()  # decoded once, here (reused: the baseline's)
            except ValueError as exc:  # the baseline is bound to its manifest: a bug, not data
                raise SourceError(f"fingerprints of {table}: {exc}") from None
            for room, (n, total, top) in figures.items():
                m_n, m_total, m_top = merged.get(room, (0, 0, None))
                tops = [t for t in (m_top, top) if t is not None]
                merged[room] = (m_n + n, (m_total + total) % _MOD, max(tops) if tops else None)
        rooms[table] = {
            room: Fingerprint(n, f"{total:016x}", top, row_hash)
            for room, (n, total, top) in merged.items()
        }
    partitions = {
        name: PartitionPrint(
            unit.table,
            figures.rows,
            f"{figures.total:016x}",
            figures.max_id,
            hashed_in,
            None if hashed_in is None else result.baseline,
        )
        for name, (unit, figures, hashed_in, _) in sorted(result.units.items())
    }
    return PgFingerprints(tables, rooms, database, partitions, format=SCAN_FORMAT)
