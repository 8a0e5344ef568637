"""Integrity fingerprints of a PostgreSQL database, for the source and a restored copy alike.

Per user table (ordinary tables and partitioned parents; partitions are counted through
their parent only): the row count and an order-independent digest, the sum modulo 2**64 of a
64-bit hash of each row, taken in one sequential scan. For a ``messages`` table with a
``room_id`` column, the same per room plus ``max(id)``; there the table figures are derived
from the per-room ones (still one scan).

The row hash (format 2) is ``hash_record_extended`` (PostgreSQL 14+: each column's own
extended hash function, combined in column order) hashed once more with ``hashint8extended``.
Hash partitioning routes rows by these functions, so PostgreSQL keeps them stable across
versions; they need no text conversion and cost about 60 % of hashing the row's text
(1 M messages grouped by room: 1.2 s vs 1.9 s here). A table with a column type that has
no hash function (json, point, ...) falls back to ``hashtextextended`` of the row's text
form, which was format 1's only method; each table records which one it used, and a
restored copy is fingerprinted with the same one.

Row text depends on a few settings (time zone, date and interval style, float digits, bytea
output); they are pinned for the scan, so the figures match across servers of the same major
version after pg_dump/pg_restore. The digest detects accidents (lost, duplicated or altered
rows), not a forger: it is an additive hash.

Format 3 adds the database's own properties, which a dump without ``--create`` does not
carry: encoding, collation and ctype (and the locale provider), the connection limit, owner,
comment, privileges (``datacl`` exploded; grantors left out: a restore grants as the owner)
and the settings of ``ALTER DATABASE ... SET`` and ``ALTER ROLE ... IN DATABASE ... SET``
(``pg_db_role_setting``). The restore re-creates them and a restored copy must show the same.
Snapshots of formats 1 and 2 have none recorded; they are compared on their tables only.

Format 4 adds ``partitions``: the figures of each leaf partition of a partitioned table (the
backup's parallel scan reads them one by one, :mod:`drtool.sources.pg_scan`), and for a
partition whose figures were reused because it was proved unchanged (ADR 0029), the snapshot
whose scan hashed its rows and the one the proof compared against. Restores still compare the
tables and rooms; the partitions say how the figures were obtained.

Format 5 (ADR 0033) costs the database nothing: the backup reads the figures off the dump as it
streams (:mod:`drtool.sources.pg_archive_stream`). Per table or leaf partition (every relation
pg_dump writes a ``TABLE DATA`` block for): the COPY lines, their bytes and the sha256 of the
COPY text, with row hash ``copy``, and the columns pg_dump copied; ``copy_settings`` are the
session settings that make a restored copy's ``COPY ... TO STDOUT`` write the same text
(:mod:`drtool.sources.pg_copy_proof`). No per-room figures: the drill's room checks read the
restored database, and a figure per room would need the per-row work this format avoids.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from drtool.errors import SourceError

FORMAT = 5
RECORD, TEXT = "record", "text"  # the row hashes, see the module docstring
SCAN_FORMAT = 4  # the figures of a row-hash scan (compute_fingerprints, pg_scan)
COPY = "copy"  # format 5: sha256 of the table's COPY text, see the module docstring
#: format 5, a partition tree pg_dump loads via its root (hash partitioning on an enum):
#: order-independent, the sum mod 2**64 of each COPY line's 8-byte blake2b, at the root
LINES = "copy-lines"
_MOD = 1 << 64
_MAX_ROOM_DIFFS = 10
_PINNED_SETTINGS = {
    "TimeZone": "UTC",
    "DateStyle": "ISO, MDY",
    "IntervalStyle": "postgres",
    "extra_float_digits": "1",
    "bytea_output": "hex",
}
_ROW_HASH_OF = {
    # r.*: a column may be named r. hash_record_extended combines the column hashes linearly
    # (h * 31 + next), so a plain sum over rows would not notice values swapped between rows;
    # hashing its result once more makes each row's term depend on the whole row.
    RECORD: "hashint8extended(hash_record_extended({row}, 0), 0)",
    TEXT: "hashtextextended(({row})::text, 0)",
}
_ROW_HASHES = {
    RECORD: sql.SQL(_ROW_HASH_OF[RECORD]).format(row=sql.SQL("r.*")),
    TEXT: sql.SQL(_ROW_HASH_OF[TEXT]).format(row=sql.SQL("ROW(r.*)")),
}


def row_hash_sql(row_hash: str, row: sql.Composable | None) -> sql.Composable:
    """The row hash of ``row`` (an expression of the table's row type; None: the scanned row)."""
    if row is None:
        return _ROW_HASHES[row_hash]
    return sql.SQL(_ROW_HASH_OF[row_hash]).format(row=row)


_NULL_ROOM = "<null>"

# every user table (not a partition, a temporary table or an extension's): the serial scan
# and the per-partition scan (pg_scan.py) plan from this one query
_TABLES_SQL = """
SELECT format('%I.%I', n.nspname, c.relname), c.oid, n.nspname, c.relname, c.relkind = 'p',
       EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attname = 'room_id'
               AND NOT a.attisdropped),
       EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attname = 'id'
               AND NOT a.attisdropped AND a.atttypid IN ('int2'::regtype, 'int4'::regtype,
                                                          'int8'::regtype))
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition AND c.relpersistence <> 't'
  AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
                  AND d.objid = c.oid AND d.deptype = 'e')
ORDER BY 1
"""


@dataclass(frozen=True)
class Fingerprint:
    """Row count, digest, where known ``max(id)``, row hash; of format 5 also the COPY text's
    size and the columns copied.

    ``row_hash`` ``record``/``text``: the digest is order-independent (16 hex digits, a sum
    of row hashes); ``copy``: the sha256 (64 hex digits) of the COPY text, in pg_dump's order.
    """

    rows: int
    digest: str
    max_id: int | None = None
    row_hash: str = RECORD
    size: int | None = None
    columns: tuple[str, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready form."""
        doc: dict[str, Any] = {
            "rows": self.rows,
            "digest": self.digest,
            "max_id": self.max_id,
            "row_hash": self.row_hash,
        }
        if self.row_hash in (COPY, LINES):
            doc["size"] = self.size
            doc["columns"] = None if self.columns is None else list(self.columns)
        return doc

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, default_hash: str = RECORD) -> Fingerprint:
        """Inverse of ``to_dict``."""
        max_id = data.get("max_id")
        row_hash = str(data.get("row_hash", default_hash))
        if row_hash not in _ROW_HASHES and row_hash not in (COPY, LINES):
            raise ValueError(f"unknown row hash {row_hash!r}")
        size, columns = data.get("size"), data.get("columns")
        return cls(
            int(data["rows"]),
            str(data["digest"]),
            None if max_id is None else int(max_id),
            row_hash,
            None if size is None else int(size),
            None if columns is None else tuple(str(c) for c in columns),
        )


@dataclass(frozen=True)
class PartitionPrint:
    """A leaf partition's part of its table's figures, and where they came from.

    ``hashed_in`` None: this snapshot's scan hashed its rows. Otherwise the figures were copied
    from snapshot ``hashed_in``, the partition having been proved unchanged since snapshot
    ``proved_since`` (ADR 0029): not freshly checked, and reported as such.
    """

    table: str
    rows: int
    digest: str
    max_id: int | None = None
    hashed_in: str | None = None
    proved_since: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready form."""
        return {
            "table": self.table,
            "rows": self.rows,
            "digest": self.digest,
            "max_id": self.max_id,
            "hashed_in": self.hashed_in,
            "proved_since": self.proved_since,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PartitionPrint:
        """Inverse of ``to_dict``."""
        max_id, hashed, since = data.get("max_id"), data.get("hashed_in"), data.get("proved_since")
        return cls(
            str(data["table"]),
            int(data["rows"]),
            str(data["digest"]),
            None if max_id is None else int(max_id),
            None if hashed is None else str(hashed),
            None if since is None else str(since),
        )


@dataclass(frozen=True)
class DatabaseProps:
    """The properties of a database that live outside it (see the module docstring).

    ``acl`` is None for the default privileges, else sorted ``(grantee, privilege,
    grantable)`` with grantee ``PUBLIC`` for everyone; ``settings`` are sorted ``(role,
    "name=value")`` with role ``""`` for the database-wide ones.
    """

    encoding: str
    collate: str
    ctype: str
    locale_provider: str = "libc"
    icu_locale: str | None = None
    connlimit: int = -1
    owner: str = ""
    comment: str | None = None
    acl: tuple[tuple[str, str, bool], ...] | None = None
    settings: tuple[tuple[str, str], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready form."""
        return {
            "encoding": self.encoding,
            "collate": self.collate,
            "ctype": self.ctype,
            "locale_provider": self.locale_provider,
            "icu_locale": self.icu_locale,
            "connlimit": self.connlimit,
            "owner": self.owner,
            "comment": self.comment,
            "acl": None if self.acl is None else [list(a) for a in self.acl],
            "settings": [list(s) for s in self.settings],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DatabaseProps:
        """Inverse of ``to_dict``."""
        acl = data.get("acl")
        return cls(
            str(data["encoding"]),
            str(data["collate"]),
            str(data["ctype"]),
            str(data.get("locale_provider", "libc")),
            None if data.get("icu_locale") is None else str(data["icu_locale"]),
            int(data.get("connlimit", -1)),
            str(data.get("owner", "")),
            None if data.get("comment") is None else str(data["comment"]),
            None if acl is None else tuple((str(g), str(p), bool(o)) for g, p, o in acl),
            tuple((str(r), str(v)) for r, v in data.get("settings", [])),
        )

    def differences(self, actual: DatabaseProps) -> list[str]:
        """What ``actual`` lacks or has otherwise, named (a setting by name and value)."""
        out = []
        for name in ("encoding", "collate", "ctype", "locale_provider", "icu_locale"):
            if getattr(self, name) != getattr(actual, name):
                out.append(f"database {name} {getattr(actual, name)!r}, "
                           f"expected {getattr(self, name)!r}")  # fmt: skip
        if self.connlimit != actual.connlimit:
            out.append(f"database connection limit {actual.connlimit}, expected {self.connlimit}")
        if self.owner != actual.owner:
            out.append(f"database owner {actual.owner}, expected {self.owner}")
        if self.comment != actual.comment:
            out.append("database comment differs" if self.comment else "unexpected comment")
        if (self.acl or ()) != (actual.acl or ()) or (self.acl is None) != (actual.acl is None):
            out.append(f"database privileges {_acl(actual.acl)}, expected {_acl(self.acl)}")
        for role, setting in sorted(set(self.settings) - set(actual.settings)):
            out.append(f"database setting {setting}{f' for role {role}' if role else ''} missing")
        for role, setting in sorted(set(actual.settings) - set(self.settings)):
            out.append(
                f"database setting {setting}{f' for role {role}' if role else ''} unexpected"
            )
        return out


def _acl(acl: tuple[tuple[str, str, bool], ...] | None) -> str:
    if acl is None:
        return "default"
    return ", ".join(f"{g}:{p}{'*' if o else ''}" for g, p, o in acl) or "none"


_DATABASE_SQL = """
SELECT to_jsonb(d) - 'datfrozenxid' - 'datminmxid', pg_encoding_to_char(d.encoding),
       pg_get_userbyid(d.datdba), shobj_description(d.oid, 'pg_database'),
       d.datacl IS NULL,
       ARRAY(SELECT json_build_array(CASE WHEN a.grantee = 0 THEN 'PUBLIC'
                                          ELSE pg_get_userbyid(a.grantee) END,
                                     a.privilege_type, a.is_grantable)::text
             FROM aclexplode(d.datacl) a),
       ARRAY(SELECT json_build_array(COALESCE(r.rolname, ''), c)::text
             FROM pg_db_role_setting s LEFT JOIN pg_roles r ON r.oid = s.setrole,
                  unnest(s.setconfig) c
             WHERE s.setdatabase = d.oid)
FROM pg_database d WHERE d.datname = current_database()
"""


def database_props(cur: psycopg.Cursor[Any]) -> DatabaseProps:
    """The properties of the cursor's database (PostgreSQL 14 to 17 column names)."""
    row = cur.execute(_DATABASE_SQL).fetchone()
    assert row is not None
    raw, encoding, owner, comment, default_acl, acl, settings = row
    provider = {"c": "libc", "i": "icu", "b": "builtin"}.get(raw.get("datlocprovider", "c"), "libc")
    return DatabaseProps(
        encoding=str(encoding),
        collate=str(raw["datcollate"]),
        ctype=str(raw["datctype"]),
        locale_provider=provider,
        icu_locale=raw.get("datlocale", raw.get("daticulocale")),
        connlimit=int(raw["datconnlimit"]),
        owner=str(owner),
        comment=comment,
        acl=None
        if default_acl
        else tuple(sorted((str(g), str(p), bool(o)) for g, p, o in map(json.loads, acl))),
        settings=tuple(sorted((str(r), str(c)) for r, c in map(json.loads, settings))),
    )


@dataclass(frozen=True)
class PgFingerprints:
    """Fingerprints of one database: per table, per room of each ``messages`` table, the
    database's own properties (None in snapshots of formats 1 and 2) and, from format 4, per
    leaf partition (empty when the serial scan made them, or in older snapshots)."""

    tables: dict[str, Fingerprint]
    rooms: dict[str, dict[str, Fingerprint]] = field(default_factory=dict)
    database: DatabaseProps | None = None
    # how the figures were obtained, not what they are: left out of ==
    partitions: dict[str, PartitionPrint] = field(default_factory=dict, compare=False)
    format: int = field(default=SCAN_FORMAT, compare=False)  # FORMAT: read off the dump
    #: format 5: the settings under which the COPY text was written (pg_dump's session)
    copy_settings: dict[str, str] = field(default_factory=dict, compare=False)
    #: format 5: tables pg_dump wrote no data for, and why (an unlogged table dumped from a
    #: standby); each has the figure of an empty COPY, which its restored copy gives
    not_dumped: dict[str, str] = field(default_factory=dict, compare=False)

    @property
    def streamed(self) -> bool:
        """Format 5: figures of the dump's COPY text, proved by COPY on a restored copy."""
        return self.format >= 5

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready form."""
        doc: dict[str, Any] = {
            "format": self.format,
            "tables": {name: fp.to_dict() for name, fp in self.tables.items()},
            "rooms": {
                name: {room: fp.to_dict() for room, fp in rooms.items()}
                for name, rooms in self.rooms.items()
            },
        }
        if self.database is not None:
            doc["database"] = self.database.to_dict()
        if self.partitions:
            doc["partitions"] = {n: p.to_dict() for n, p in self.partitions.items()}
        if self.copy_settings:
            doc["copy_settings"] = dict(self.copy_settings)
        if self.not_dumped:
            doc["not_dumped"] = dict(self.not_dumped)
        return doc

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PgFingerprints:
        """Inverse of ``to_dict`` (format 1 hashed every row's text); ``ValueError`` if unknown."""
        if data.get("format") not in (1, 2, 3, 4, FORMAT):
            raise ValueError(f"unsupported fingerprint format {data.get('format')!r}")
        default = TEXT if data["format"] == 1 else RECORD
        if data["format"] >= 5 and not data.get("copy_settings"):
            raise ValueError("malformed fingerprints: format 5 without its copy_settings")
        try:
            return cls(
                tables={
                    n: Fingerprint.from_dict(fp, default_hash=default)
                    for n, fp in data["tables"].items()
                },
                rooms={
                    n: {r: Fingerprint.from_dict(fp, default_hash=default) for r, fp in rs.items()}
                    for n, rs in data["rooms"].items()
                },
                database=DatabaseProps.from_dict(data["database"]) if "database" in data else None,
                partitions={
                    str(n): PartitionPrint.from_dict(p)
                    for n, p in data.get("partitions", {}).items()
                },
                format=int(data["format"]),
                copy_settings={str(k): str(v) for k, v in data.get("copy_settings", {}).items()},
                not_dumped={str(k): str(v) for k, v in data.get("not_dumped", {}).items()},
            )
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise ValueError(f"malformed fingerprints: {exc!r}") from None


def _hex(total: Any) -> str:
    return f"{int(total or 0) % _MOD:016x}"


def compute_fingerprints(
    conn: psycopg.Connection[Any],
    *,
    tables: Iterable[str] | None = None,
    like: PgFingerprints | None = None,
) -> PgFingerprints:
    """Fingerprint every user table (or only ``tables``, named ``schema.table``) of ``conn``.

    Runs in ``conn``'s open transaction (as a savepoint) or in a new one; for figures that
    match a dump, call it inside the REPEATABLE READ transaction whose snapshot the dump uses.
    Each table is hashed the way ``like`` (a snapshot's fingerprints) recorded for it, else
    with ``hash_record_extended`` where its column types allow, else with its text form.
    """
    result: dict[str, Fingerprint] = {}
    rooms: dict[str, dict[str, Fingerprint]] = {}
    with conn.transaction(), conn.cursor() as cur:
        for setting, value in _PINNED_SETTINGS.items():
            cur.execute("SELECT set_config(%s, %s, true)", (setting, value))
        catalog = {row[0]: row[2:] for row in cur.execute(_TABLES_SQL).fetchall()}
        wanted = sorted(catalog) if tables is None else list(tables)
        for name in wanted:
            if name not in catalog:
                raise SourceError(f"fingerprints: table {name} not found")
            schema, table, partitioned, has_room, has_id = catalog[name]
            source = sql.SQL("{only}{table} AS r").format(
                only=sql.SQL("" if partitioned else "ONLY "), table=sql.Identifier(schema, table)
            )
            recorded = like.tables.get(name) if like else None
            hashes = [recorded.row_hash] if recorded else [RECORD, TEXT]
            if table == "messages" and has_room:
                max_id = sql.SQL("max(r.id)" if has_id else "NULL::bigint")
                query = sql.SQL(
                    "SELECT r.room_id::text, count(*), sum({h}), {max_id} FROM {src} "
                    "GROUP BY r.room_id"
                )
                row_hash, found = _scan(cur, query, hashes, max_id=max_id, src=source)
                per_room = {
                    _NULL_ROOM if room is None else room: (n, total, top)
                    for room, n, total, top in found
                }
                rooms[name] = {
                    room: Fingerprint(n, _hex(total), top, row_hash)
                    for room, (n, total, top) in per_room.items()
                }
                ids = [top for _, _, top in per_room.values() if top is not None]
                result[name] = Fingerprint(
                    sum(n for n, _, _ in per_room.values()),
                    _hex(sum(int(total) for _, total, _ in per_room.values())),
                    max(ids) if ids else None,
                    row_hash,
                )
            else:
                query = sql.SQL("SELECT count(*), sum({h}) FROM {src}")
                row_hash, found = _scan(cur, query, hashes, src=source)
                result[name] = Fingerprint(found[0][0], _hex(found[0][1]), row_hash=row_hash)
        database = database_props(cur)
    return PgFingerprints(tables=result, rooms=rooms, database=database, format=SCAN_FORMAT)


def _scan(
    cur: psycopg.Cursor[Any], query: sql.SQL, hashes: list[str], **parts: sql.Composable
) -> tuple[str, list[Any]]:
    """Run ``query`` with the first row hash of ``hashes`` the table's column types allow."""
    for row_hash in hashes[:-1]:
        try:
            with cur.connection.transaction():
                return row_hash, cur.execute(
                    query.format(h=_ROW_HASHES[row_hash], **parts)
                ).fetchall()
        except psycopg.errors.UndefinedFunction:
            continue  # "could not identify an extended hash function for type ..."
    last = hashes[-1]
    return last, cur.execute(query.format(h=_ROW_HASHES[last], **parts)).fetchall()


def _diff(label: str, expected: Fingerprint, actual: Fingerprint) -> list[str]:
    out = []
    if actual.row_hash != expected.row_hash:
        return [f"{label}: hashed by {actual.row_hash}, the snapshot by {expected.row_hash}"]
    if actual.rows != expected.rows:
        out.append(f"{label}: {actual.rows} rows, expected {expected.rows}")
    elif actual.digest != expected.digest:
        out.append(f"{label}: content digest differs ({actual.rows} rows)")
    if actual.max_id != expected.max_id:
        out.append(f"{label}: max(id) {actual.max_id}, expected {expected.max_id}")
    return out


def compare(expected: PgFingerprints, actual: PgFingerprints) -> list[str]:
    """Human-readable differences between two fingerprint sets; empty means equal.

    The database properties are compared when the expected set records them (format 3).
    """
    out: list[str] = []
    if expected.database is not None and actual.database is not None:
        out += expected.database.differences(actual.database)
    for name in sorted(expected.tables.keys() | actual.tables.keys()):
        exp, act = expected.tables.get(name), actual.tables.get(name)
        if act is None:
            out.append(f"{name}: table missing (expected {exp.rows if exp else 0} rows)")
        elif exp is None:
            out.append(f"{name}: unexpected table ({act.rows} rows)")
        else:
            out += _diff(name, exp, act)
    for name in sorted(expected.rooms.keys() | actual.rooms.keys()):
        exp_rooms, act_rooms = expected.rooms.get(name, {}), actual.rooms.get(name, {})
        room_diffs: list[str] = []
        for room in sorted(exp_rooms.keys() | act_rooms.keys()):
            label = f"{name} room {room}"
            exp_fp, act_fp = exp_rooms.get(room), act_rooms.get(room)
            if act_fp is None:
                expected_rows = exp_fp.rows if exp_fp else 0
                room_diffs.append(f"{label}: missing (expected {expected_rows} rows)")
            elif exp_fp is None:
                room_diffs.append(f"{label}: unexpected ({act_fp.rows} rows)")
            else:
                room_diffs += _diff(label, exp_fp, act_fp)
        out += room_diffs[:_MAX_ROOM_DIFFS]
        if len(room_diffs) > _MAX_ROOM_DIFFS:
            out.append(f"{name}: ... and {len(room_diffs) - _MAX_ROOM_DIFFS} more room differences")
    return out
