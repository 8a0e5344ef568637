"""An entity's rows: extracted from the staged snapshot, compared with production, merged.

The snapshot's dump is restored into a scratch database on the production server; the closure
(chat_stack/entity_map.py) is selected there into temporary tables and streamed by COPY into
temporary tables of the production session (``_ent_e_<table>``), so every comparison is one
SQL statement inside production's transaction:

- ``_ent_i_<table>``: closure rows whose primary key production lacks (to insert);
- ``_ent_b_<table>``: production's rows whose key the closure has with other values (the
  conflicts, as production holds them: what ``--prefer snapshot`` would replace);
- the rest are identical.

Foreign keys and unique constraints are read from production's live schema: a row to insert
whose parent is neither in production nor among the rows to insert is named (the merge would
break the key), and so is one whose unique value another row already holds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import psycopg
from psycopg import sql

from chat_stack.entity_map import EntityMap
from drtool.errors import NotFound, UsageError

EXAMPLES = 5
CONFLICT_LINES = 20


def loads(text: str) -> Any:
    """JSON from PostgreSQL with exact numbers (numeric stays Decimal, written back as text)."""
    return json.loads(text, parse_float=Decimal)


def temp(kind: str, table: str) -> sql.Identifier:
    """The temporary table of ``kind`` (c: closure in scratch, e/i/b in production)."""
    return sql.Identifier(f"_ent_{kind}_{table}")


def _ident_list(columns: tuple[str, ...] | list[str], alias: str = "") -> sql.Composable:
    if alias:
        return sql.SQL(", ").join(sql.Identifier(alias, c) for c in columns)
    return sql.SQL(", ").join(sql.Identifier(c) for c in columns)


def _match(a: str, a_cols: tuple[str, ...], b: str, b_cols: tuple[str, ...]) -> sql.Composable:
    """``a.x = b.y AND ...`` over two column lists."""
    return sql.SQL(" AND ").join(
        sql.SQL("{} = {}").format(sql.Identifier(a, x), sql.Identifier(b, y))
        for x, y in zip(a_cols, b_cols, strict=True)
    )


@dataclass
class TablePlan:
    """One table of the closure: how its snapshot rows compare with production's."""

    table: str
    snapshot: int = 0
    insert: int = 0
    conflict: int = 0
    identical: int = 0
    conflicts: list[str] = field(default_factory=list)  # "key (..): columns a, b differ"
    missing_parents: list[str] = field(default_factory=list)
    taken_unique: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Schema:
    """What production's live schema says about one closure table."""

    columns: tuple[str, ...]
    key: tuple[str, ...]
    uniques: tuple[tuple[str, ...], ...]
    parents: tuple[tuple[tuple[str, ...], str, tuple[str, ...]], ...]  # (cols, parent, pcols)
    sequences: tuple[tuple[str, str], ...]  # (column, sequence)


_COLUMNS = """
SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute
WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum
"""
_KEY = """
SELECT array(SELECT a.attname FROM unnest(i.indkey) WITH ORDINALITY k(n, o)
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.n ORDER BY k.o)
FROM pg_index i WHERE i.indrelid = %s::regclass AND i.indisprimary
"""
_CONSTRAINTS = """
SELECT c.contype, c.confrelid::regclass::text,
       array(SELECT a.attname FROM unnest(c.conkey) WITH ORDINALITY k(n, o)
             JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.n ORDER BY k.o),
       array(SELECT a.attname FROM unnest(c.confkey) WITH ORDINALITY k(n, o)
             JOIN pg_attribute a ON a.attrelid = c.confrelid AND a.attnum = k.n ORDER BY k.o)
FROM pg_constraint c
WHERE c.conrelid = %s::regclass AND c.contype IN ('u', 'f') AND c.conparentid = 0
ORDER BY c.conname
"""
# Sequences feeding a column: a nextval() default (pg_depend of the default) or an identity.
_SEQUENCES = """
SELECT a.attname, s.oid::regclass::text
FROM pg_attrdef ad
JOIN pg_depend d ON d.classid = 'pg_attrdef'::regclass AND d.objid = ad.oid
 AND d.refclassid = 'pg_class'::regclass
JOIN pg_class s ON s.oid = d.refobjid AND s.relkind = 'S'
JOIN pg_attribute a ON a.attrelid = ad.adrelid AND a.attnum = ad.adnum
WHERE ad.adrelid = %s::regclass
UNION
SELECT a.attname, s.oid::regclass::text
FROM pg_depend d
JOIN pg_class s ON s.oid = d.objid AND s.relkind = 'S'
JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
WHERE d.classid = 'pg_class'::regclass AND d.refobjid = %s::regclass AND d.deptype = 'i'
ORDER BY 1
"""


def columns_of(conn: psycopg.Connection[Any], table: str) -> list[tuple[str, str]]:
    """(name, type) of each column; NotFound when the table does not exist."""
    exists = conn.execute("SELECT to_regclass(%s)", (table,)).fetchone()
    if not exists or exists[0] is None:
        raise NotFound(f"table {table}: not in the database")
    return [(n, t) for n, t in conn.execute(_COLUMNS, (table,)).fetchall()]


def schema_of(conn: psycopg.Connection[Any], table: str) -> Schema:
    """Columns, primary key, unique constraints, foreign keys and sequences of ``table``."""
    columns = tuple(n for n, _ in columns_of(conn, table))
    row = conn.execute(_KEY, (table,)).fetchone()
    if row is None:
        raise UsageError(f"table {table}: has no primary key, so rows cannot be matched")
    uniques, parents = [], []
    for kind, parent, cols, pcols in conn.execute(_CONSTRAINTS, (table,)).fetchall():
        if kind == "u":
            uniques.append(tuple(cols))
        else:
            parents.append((tuple(cols), parent, tuple(pcols)))
    sequences = conn.execute(_SEQUENCES, (table, table)).fetchall()
    return Schema(columns, tuple(row[0]), tuple(uniques), tuple(parents), tuple(sequences))


def select_closure(scratch: psycopg.Connection[Any], entity: EntityMap, entity_id: int) -> None:
    """Select the closure into temporary tables ``_ent_c_<table>`` of the scratch session.

    NotFound when the snapshot has no root row with that id.
    """
    root = entity.root
    scratch.execute(
        sql.SQL("CREATE TEMP TABLE {} AS SELECT * FROM {} WHERE {} = %s").format(
            temp("c", root), sql.Identifier(root), sql.Identifier(entity.root_column)
        ),
        (entity_id,),
    )
    found = scratch.execute(sql.SQL("SELECT count(*) FROM {}").format(temp("c", root))).fetchone()
    if not found or not found[0]:
        raise NotFound(f"{entity.kind} {entity_id}: not in the snapshot (nothing changed)")
    for table in entity.tables[1:]:
        exists = sql.SQL(" OR ").join(
            sql.SQL("EXISTS (SELECT 1 FROM {} p WHERE {})").format(
                temp("c", f.parent), _match("p", f.parent_columns, "t", f.columns)
            )
            for f in entity.follows_into(table)
        )
        scratch.execute(
            sql.SQL("CREATE TEMP TABLE {} AS SELECT t.* FROM {} t WHERE {}").format(
                temp("c", table), sql.Identifier(table), exists
            )
        )


def copy_closure(
    scratch: psycopg.Connection[Any],
    prod: psycopg.Connection[Any],
    entity: EntityMap,
) -> dict[str, Schema]:
    """Stream each closure table from scratch into ``_ent_e_<table>`` of production's session.

    The snapshot's columns must be production's (a schema changed since the backup is refused,
    naming the table). Returns production's schema of each table.
    """
    schemas = {}
    for table in entity.tables:
        mine, theirs = columns_of(prod, table), columns_of(scratch, table)
        if sorted(mine) != sorted(theirs):
            differ = sorted(set(mine) ^ set(theirs))
            raise UsageError(
                f"table {table}: the snapshot's columns differ from production's "
                f"({', '.join(f'{n} {t}' for n, t in differ)}); nothing changed"
            )
        schemas[table] = schema_of(prod, table)
        cols = _ident_list(schemas[table].columns)
        prod.execute(
            sql.SQL("CREATE TEMP TABLE {} (LIKE {}) ON COMMIT DROP").format(
                temp("e", table), sql.Identifier(table)
            )
        )
        out = sql.SQL("COPY {} ({}) TO STDOUT").format(temp("c", table), cols)
        into = sql.SQL("COPY {} ({}) FROM STDIN").format(temp("e", table), cols)
        with (
            scratch.cursor() as src,
            prod.cursor() as dst,
            src.copy(out) as reader,
            dst.copy(into) as writer,
        ):
            for block in reader:
                writer.write(block)
        # temporary tables have no statistics: without them the comparisons below are planned
        # as if each held a handful of rows (seconds, not milliseconds, for 10 k messages)
        prod.execute(sql.SQL("ANALYZE {}").format(temp("e", table)))
    return schemas


def _count(conn: psycopg.Connection[Any], query: sql.Composed) -> int:
    row = conn.execute(query).fetchone()
    return int(row[0]) if row else 0


def compare(
    prod: psycopg.Connection[Any],
    entity: EntityMap,
    schemas: dict[str, Schema],
    *,
    prefer_snapshot: bool,
) -> list[TablePlan]:
    """Split each table's closure rows into insert / conflict / identical; check keys."""
    plans = []
    for table in entity.tables:
        s = schemas[table]
        t, e, i, b = sql.Identifier(table), temp("e", table), temp("i", table), temp("b", table)
        same_key = _match("p", s.key, "e", s.key)
        prod.execute(
            sql.SQL(
                "CREATE TEMP TABLE {} ON COMMIT DROP AS SELECT e.* FROM {} e "
                "WHERE NOT EXISTS (SELECT 1 FROM {} p WHERE {})"
            ).format(i, e, t, same_key)
        )
        prod.execute(
            sql.SQL(
                "CREATE TEMP TABLE {} ON COMMIT DROP AS SELECT p.* FROM {} p JOIN {} e ON {} "
                "WHERE ROW(p.*) IS DISTINCT FROM ROW(e.*)"
            ).format(b, t, e, same_key)
        )
        prod.execute(sql.SQL("ANALYZE {}, {}").format(i, b))
        plan = TablePlan(table)
        plan.snapshot = _count(prod, sql.SQL("SELECT count(*) FROM {}").format(e))
        plan.insert = _count(prod, sql.SQL("SELECT count(*) FROM {}").format(i))
        plan.conflict = _count(prod, sql.SQL("SELECT count(*) FROM {}").format(b))
        plan.identical = plan.snapshot - plan.insert - plan.conflict
        plan.conflicts = _conflict_lines(prod, table, s)
        plan.taken_unique = _taken(prod, table, s)
        plans.append(plan)
    for plan in plans:
        plan.missing_parents = _missing_parents(
            prod, plan.table, schemas[plan.table], set(entity.tables), prefer_snapshot
        )
    return plans


def _conflict_lines(prod: psycopg.Connection[Any], table: str, s: Schema) -> list[str]:
    """The first conflicts: their key and the columns whose values differ."""
    rows = prod.execute(
        sql.SQL(
            "SELECT to_jsonb(b)::text, to_jsonb(e)::text FROM {} b JOIN {} e ON {} "
            "ORDER BY {} LIMIT %s"
        ).format(
            temp("b", table),
            temp("e", table),
            _match("b", s.key, "e", s.key),
            _ident_list(s.key, "b"),
        ),
        (CONFLICT_LINES,),
    ).fetchall()
    lines = []
    for here, there in rows:
        now, snap = loads(here), loads(there)
        key = ", ".join(f"{c}={now[c]}" for c in s.key)
        differ = [c for c in s.columns if now.get(c) != snap.get(c)]
        lines.append(f"{table} ({key}): {', '.join(differ)} differ")
    return lines


def _taken(prod: psycopg.Connection[Any], table: str, s: Schema) -> list[str]:
    """Unique values of rows to insert that another production row already holds."""
    problems = []
    for cols in s.uniques:
        found = prod.execute(
            sql.SQL("SELECT {} FROM {} i JOIN {} p ON {} LIMIT %s").format(
                _ident_list(cols, "i"),
                temp("i", table),
                sql.Identifier(table),
                _match("p", cols, "i", cols),
            ),
            (EXAMPLES,),
        ).fetchall()
        if found:
            values = "; ".join(", ".join(str(v) for v in row) for row in found)
            problems.append(
                f"{table}({', '.join(cols)}): held by another row in production (e.g. {values})"
            )
    return problems


def _missing_parents(
    prod: psycopg.Connection[Any],
    table: str,
    s: Schema,
    closure: set[str],
    prefer_snapshot: bool,
) -> list[str]:
    """Foreign keys that rows to insert (or to replace) would break, with example values."""
    rows = sql.SQL("SELECT * FROM {}").format(temp("i", table))
    if prefer_snapshot:
        rows = sql.SQL("{} UNION ALL SELECT e.* FROM {} e JOIN {} b ON {}").format(
            rows, temp("e", table), temp("b", table), _match("e", s.key, "b", s.key)
        )
    problems = []
    for cols, parent, pcols in s.parents:
        present = sql.SQL("EXISTS (SELECT 1 FROM {} p WHERE {})").format(
            sql.Identifier(parent), _match("p", pcols, "x", cols)
        )
        if parent in closure:
            present = sql.SQL("{} OR EXISTS (SELECT 1 FROM {} q WHERE {})").format(
                present, temp("i", parent), _match("q", pcols, "x", cols)
            )
        not_null = sql.SQL(" AND ").join(
            sql.SQL("{} IS NOT NULL").format(sql.Identifier("x", c)) for c in cols
        )
        query = sql.SQL(
            "SELECT DISTINCT {} FROM ({}) x WHERE {} AND NOT ({}) ORDER BY 1 LIMIT %s"
        ).format(_ident_list(cols, "x"), rows, not_null, present)
        found = prod.execute(query, (EXAMPLES,)).fetchall()
        if found:
            values = "; ".join(", ".join(str(v) for v in row) for row in found)
            problems.append(
                f"{table}({', '.join(cols)}) -> {parent}({', '.join(pcols)}): "
                f"{parent} {values} missing in production"
            )
    return problems


# --- applying and undoing ------------------------------------------------------------------


def journal_rows(
    prod: psycopg.Connection[Any], table: str, s: Schema
) -> tuple[list[Any], list[dict[str, Any]]]:
    """The rows a merge inserts, and the (before, after) of the rows it would replace."""
    row = prod.execute(
        sql.SQL("SELECT coalesce(jsonb_agg(to_jsonb(i)), '[]')::text FROM {} i").format(
            temp("i", table)
        )
    ).fetchone()
    inserted = loads(row[0]) if row else []
    pairs = prod.execute(
        sql.SQL("SELECT to_jsonb(b)::text, to_jsonb(e)::text FROM {} b JOIN {} e ON {}").format(
            temp("b", table), temp("e", table), _match("b", s.key, "e", s.key)
        )
    ).fetchall()
    replaced = [{"before": loads(a), "after": loads(z)} for a, z in pairs]
    return inserted, replaced


class ChangedMeanwhile(UsageError):
    """Production changed between the plan and the write (the transaction is rolled back)."""


def apply_table(
    prod: psycopg.Connection[Any], plan: TablePlan, s: Schema, *, prefer_snapshot: bool
) -> None:
    """Insert the missing rows and, with ``prefer_snapshot``, replace the conflicting ones.

    A row inserted or changed by someone else since the plan makes the counts differ: the
    caller's transaction is then rolled back (ChangedMeanwhile).
    """
    table, cols = sql.Identifier(plan.table), _ident_list(s.columns)
    done = prod.execute(
        sql.SQL("INSERT INTO {} ({}) SELECT {} FROM {} ON CONFLICT DO NOTHING").format(
            table, cols, cols, temp("i", plan.table)
        )
    ).rowcount
    if done != plan.insert:
        raise ChangedMeanwhile(
            f"{plan.table}: {plan.insert - done} of {plan.insert} rows appeared in production "
            "since the plan; nothing changed, run the restore again"
        )
    if not prefer_snapshot or not plan.conflict:
        return
    updated = prod.execute(
        sql.SQL(
            "UPDATE {} p SET ({}) = ROW({}) FROM {} e, {} b "
            "WHERE {} AND {} AND ROW(p.*) IS NOT DISTINCT FROM ROW(b.*)"
        ).format(
            table,
            cols,
            _ident_list(s.columns, "e"),
            temp("e", plan.table),
            temp("b", plan.table),
            _match("p", s.key, "e", s.key),
            _match("p", s.key, "b", s.key),
        )
    ).rowcount
    if updated != plan.conflict:
        raise ChangedMeanwhile(
            f"{plan.table}: {plan.conflict - updated} of {plan.conflict} conflicting rows "
            "changed in production since the plan; nothing changed, run the restore again"
        )


def advance_sequences(prod: psycopg.Connection[Any], table: str, s: Schema) -> list[dict[str, Any]]:
    """Move the table's sequences past the inserted ids; never backwards. What moved."""
    moved = []
    for column, sequence in s.sequences:
        row = prod.execute(
            sql.SQL("SELECT max({}) FROM {}").format(sql.Identifier(column), temp("i", table))
        ).fetchone()
        top = row[0] if row else None
        if top is None:
            continue
        state = prod.execute(
            sql.SQL("SELECT last_value, is_called FROM {}").format(
                sql.Identifier(*sequence.split("."))
            )
        ).fetchone()
        assert state is not None
        last, called = int(state[0]), bool(state[1])
        high = last if called else last - 1
        if int(top) > high:
            prod.execute("SELECT setval(%s, %s, true)", (sequence, int(top)))
            moved.append(
                {"sequence": sequence, "last_value": last, "is_called": called, "set": int(top)}
            )
    return moved


def undo_table(
    prod: psycopg.Connection[Any], table: str, inserted: list[Any], replaced: list[dict[str, Any]]
) -> tuple[int, int, int, int]:
    """Delete the rows a merge inserted and put back the ones it replaced, where unchanged since.

    Returns (deleted, left because changed, put back, left because changed).
    """
    s = schema_of(prod, table)
    payload = json.dumps(inserted, default=str)
    j = sql.SQL("jsonb_populate_recordset(NULL::{}, %s::jsonb) j").format(sql.Identifier(table))
    deleted = prod.execute(
        sql.SQL(
            "DELETE FROM {} p USING {} WHERE {} AND ROW(p.*) IS NOT DISTINCT FROM ROW(j.*)"
        ).format(sql.Identifier(table), j, _match("p", s.key, "j", s.key)),
        (payload,),
    ).rowcount
    put_back = 0
    if replaced:
        befores = json.dumps([r["before"] for r in replaced], default=str)
        afters = json.dumps([r["after"] for r in replaced], default=str)
        a = sql.SQL("jsonb_populate_recordset(NULL::{}, %s::jsonb) a").format(sql.Identifier(table))
        put_back = prod.execute(
            sql.SQL(
                "UPDATE {} p SET ({}) = ROW({}) FROM {}, {} WHERE {} AND {} "
                "AND ROW(p.*) IS NOT DISTINCT FROM ROW(a.*)"
            ).format(
                sql.Identifier(table),
                _ident_list(s.columns),
                _ident_list(s.columns, "j"),
                j,
                a,
                _match("p", s.key, "j", s.key),
                _match("p", s.key, "a", s.key),
            ),
            (befores, afters),
        ).rowcount
    return deleted, len(inserted) - deleted, put_back, len(replaced) - put_back


def table_counts(prod: psycopg.Connection[Any], tables: tuple[str, ...]) -> dict[str, int]:
    """Rows per table (undo compares them to notice a cascade into rows it did not add)."""
    return {
        t: _count(prod, sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(t)))
        for t in tables
    }
