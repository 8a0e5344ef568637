"""``drtool restore-entity``: one room or one user from a snapshot into production, and undo.

Order of a restore:

1. the snapshot resolves to a VALID one (signed manifest, objects present); its PostgreSQL
   dump is decrypted into the scratch dir, fully authenticated against the manifest, and
   ``pg_restore``\\ d into a scratch database on the production server (tables and rows only:
   no indexes, constraints or triggers, no rows of tables outside the closure; dropped
   afterwards);
2. the entity map must cover production's schema, else nothing happens (the snapshot's
   closure tables must have production's columns);
3. the closure is selected in the scratch database and streamed into temporary tables of one
   production transaction, compared row by row (insert / conflict / identical), its foreign
   keys and unique values checked; the attachment objects it names are compared with the
   bucket; the plan is complete here (``dry_run`` applies the rows inside the transaction
   only to count the Redis keys, then rolls back);
4. a terminal confirms (``yes`` otherwise); the journal is written (every row to insert or
   replace, every object to add) **before** anything changes;
5. objects first (an object without its row is harmless, a row without its object is not),
   then the rows in one transaction (a count that differs from the plan rolls it back), the
   sequences moved forward only, commit; then the derived Redis keys rebuilt under WATCH,
   journaled before the MULTI.

Undo reverses a journal: rows deleted (only while equal to what was inserted) and replaced
rows put back (only while equal to what the restore wrote), in one REPEATABLE READ
transaction that is rolled back if deleting would cascade into rows the restore did not add;
then the added objects deleted (only while they hold the restored bytes); then the Redis keys
put back (only while they hold what the restore wrote). See
docs/decisions/0019-entity-restore.md.
"""

from __future__ import annotations

import logging
import secrets
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from redis.exceptions import RedisError

from chat_stack import entity_map
from chat_stack.entity_map import ENTITIES, OBJECTS, EntityMap
from drtool.config import Config
from drtool.endpoints import PostgresEndpoint, StackEndpoints
from drtool.errors import ConfigError, SourceError, UsageError
from drtool.faults import crash_point
from drtool.repository import catalog
from drtool.repository.access import identities_of, open_repo
from drtool.repository.minio_index import IndexEntry
from drtool.services.backup import state_dir
from drtool.services.entity import closure, journal, objects, redis_keys
from drtool.services.entity import scratch as scratch_db
from drtool.sources import postgres as pg
from drtool.sources.minio import MinioStore
from drtool.sources.process import scrub
from drtool.sources.redis_client import connect as redis_connect
from drtool.stores.base import SnapshotSource
from drtool.stores.minio import restore as bucket_restore
from drtool.stores.postgres import restore as pg_restore
from drtool.stores.stage import check_free_space, scratch_dir, scratch_error
from drtool.timing import Timer, timed

log = logging.getLogger(__name__)

WORKERS = 4
PREFER = ("production", "snapshot")


@dataclass(frozen=True)
class EntityOptions:
    """Which entity, from which snapshot, and how carefully."""

    kind: str
    entity_id: int
    ref: str = "latest"
    dry_run: bool = False
    yes: bool = False
    prefer: str = "production"  # or "snapshot": conflicting rows take the snapshot's values
    jobs: int = 2


@dataclass
class EntityPlan:
    """What the restore would change, per table, in the bucket and in Redis."""

    snapshot_id: str
    kind: str
    entity_id: int
    prefer: str
    tables: list[closure.TablePlan]
    objects: objects.ObjectPlan | None
    rooms: list[int]
    keys_to_change: int = -1  # counted by a dry run (-1: not counted)
    keys_checked: int = 0

    @property
    def blocked(self) -> list[str]:
        """Why the merge cannot be applied: missing parents, unique values held by others."""
        return [p for t in self.tables for p in t.missing_parents + t.taken_unique]

    @property
    def changes(self) -> int:
        """Rows and objects the restore would write."""
        rows = sum(t.insert + (t.conflict if self.prefer == "snapshot" else 0) for t in self.tables)
        return rows + (len(self.objects.restore) if self.objects else 0)


@dataclass
class EntityResult:
    """A plan and, unless a dry run, what was written (and where the journal is)."""

    plan: EntityPlan
    dry_run: bool
    journal: Path | None = None
    rows_inserted: int = 0
    rows_replaced: int = 0
    objects_added: int = 0
    keys_changed: int = 0
    sequences: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class UndoResult:
    """What an undo put back, and what it left because it changed since the restore."""

    journal: Path
    rows_deleted: int = 0
    rows_put_back: int = 0
    objects_deleted: int = 0
    keys_put_back: int = 0
    left: list[str] = field(default_factory=list)


def _check(options: EntityOptions) -> EntityMap:
    if options.kind not in ENTITIES:
        raise UsageError(f"restore-entity: room or user (got {options.kind})")
    if options.entity_id < 1:
        raise UsageError(
            f"restore-entity: the id must be a positive integer (got {options.entity_id})"
        )
    if options.prefer not in PREFER:
        raise UsageError(f"--prefer: production or snapshot (got {options.prefer})")
    if options.jobs < 1:
        raise UsageError(f"--jobs: must be at least 1 (got {options.jobs})")
    return ENTITIES[options.kind]


def _connect(endpoint: PostgresEndpoint, dbname: str | None = None) -> psycopg.Connection[Any]:
    try:
        return psycopg.connect(
            **endpoint.connect_kwargs(dbname), connect_timeout=10, application_name="drtool"
        )
    except psycopg.Error as exc:
        where = f"{endpoint.host}:{endpoint.port}/{dbname or endpoint.dbname}"
        why = scrub(_first_line(exc), (endpoint.password,) if endpoint.password else ())
        raise SourceError(f"cannot connect to PostgreSQL {where}: {why}") from None


def _first_line(exc: BaseException) -> str:
    return next(
        (line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__
    )


@contextmanager
def _scratch_database(
    source: SnapshotSource,
    snap: pg_restore.PgSnapshot,
    endpoint: PostgresEndpoint,
    work: Path,
    cfg: Config,
    jobs: int,
    stamp: str,
    others: frozenset[str],
) -> Iterator[str]:
    """The snapshot's dump, authenticated and restored into a scratch database; dropped after.

    Only what extraction reads is restored (see :mod:`drtool.services.entity.scratch`);
    ``others``: tables whose rows it does not need.
    """
    bin_dir = Path(cfg.postgres.bin_dir) if cfg.postgres.bin_dir else None
    with timed() as t:
        staged = pg_restore.stage_files(
            source.repo,
            source.manifest,
            replace(snap, globals_sql=None),
            source.identities,
            work,
            bin_dir,
        )
    log.debug("restore-entity: dump decrypted and checked in %.1f s", t.seconds)
    admin = pg_restore.admin(endpoint)
    prefix = f"{endpoint.dbname[:30]}_entity_"
    leftovers = _databases_like(prod_admin=admin, prefix=prefix)
    if leftovers:
        log.warning(
            "scratch databases of another or an interrupted restore-entity: %s (drop them with "
            "DROP DATABASE once no restore-entity runs)",
            ", ".join(leftovers),
        )
    name = f"{prefix}{stamp}_{secrets.token_hex(2)}"  # two runs in one second do not collide
    toc = pg.archive_list(staged.dump, bin_dir, timeout=float(cfg.backup.timeout_s))
    wanted = work / "extraction.list"
    wanted.write_text(scratch_db.extraction_list(toc, others), encoding="utf-8")
    pg.create_database(admin, name, snap.fingerprints.database)
    flusher = ThreadPoolExecutor(max_workers=1)
    try:
        with timed() as t:
            pg.restore_dump(
                staged.dump,
                admin,
                name,
                jobs=jobs,
                pg_bin_dir=bin_dir,
                timeout=float(cfg.backup.timeout_s),
                keep_owners=False,
                version_checked=True,
                use_list=wanted,
            )
        log.debug("restore-entity: tables and rows loaded into %s in %.1f s", name, t.seconds)
        staged.dump.unlink()
        # DROP DATABASE waits for a checkpoint, which would then write the whole scratch load
        # while nothing else runs; one started now does that disk work beside the extraction
        # (the same trick as the full restore's; a login that may not run it skips it)
        flusher.submit(pg.checkpoint, admin)
        yield name
    finally:
        flusher.shutdown(wait=True)
        with suppress(SourceError):
            pg.drop_database(admin, name)


def _databases_like(*, prod_admin: PostgresEndpoint, prefix: str) -> list[str]:
    """Databases whose name starts with ``prefix`` (leftovers of killed runs)."""
    with _connect(prod_admin) as conn:
        rows = conn.execute(
            "SELECT datname FROM pg_database WHERE starts_with(datname, %s) ORDER BY 1", (prefix,)
        ).fetchall()
    return [str(r[0]) for r in rows]


def _bucket_index(
    source: SnapshotSource, endpoints: StackEndpoints
) -> tuple[str, dict[str, IndexEntry]] | None:
    """The production attachments bucket and the snapshot's index of it (None: no MinIO)."""
    comp = next((c for c in source.manifest.components if c.name == "minio"), None)
    if comp is None or not endpoints.buckets:
        return None
    bucket = endpoints.buckets[0]
    snaps = bucket_restore.load(
        source.repo,
        source.manifest,
        comp,
        source.identities,
        target_buckets=endpoints.buckets,
        prefix="",
    )
    chosen = next((b for b in snaps if b.target == bucket), None)
    if chosen is None:
        return None
    return bucket, {e.key: e for e in chosen.entries}


def _rooms(prod: psycopg.Connection[Any], entity: EntityMap) -> list[int]:
    """The rooms whose derived Redis keys the closure's rows feed."""
    parts = [
        sql.SQL("SELECT {} FROM {}").format(sql.Identifier(column), closure.temp("e", table))
        for table, column in entity.room_columns
    ]
    query = sql.SQL("SELECT DISTINCT r FROM ({}) x(r) ORDER BY 1").format(
        sql.SQL(" UNION ").join(parts)
    )
    return [int(row[0]) for row in prod.execute(query).fetchall()]


def _coverage(conn: psycopg.Connection[Any], which: str) -> None:
    problems = entity_map.uncovered(conn)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise UsageError(
            f"restore-entity: the entity map (chat_stack/entity_map.py) does not cover the "
            f"{which} schema: {problems[0]}{more}; nothing changed"
        )


def run_restore_entity(
    cfg: Config,
    *,
    home: Path,
    options: EntityOptions,
    confirm: Callable[[EntityPlan], bool],
    now: datetime | None = None,
) -> EntityResult:
    """Restore one entity; see the module docstring for the order."""
    clock = Timer()
    entity = _check(options)
    identities = identities_of(cfg)
    if not identities:
        raise ConfigError(
            "keys.identity_file: restore-entity needs the operators' identity (got none)"
        )
    repo = open_repo(cfg)
    records = catalog.list_snapshots(repo.storage, repo.verify_keys, repo.info.repo_id)
    record = catalog.resolve(records, options.ref, components=("postgres",))
    m = record.manifest
    assert m is not None  # resolve returns VALID records only
    comp = next(c for c in m.components if c.name == "postgres")
    source = SnapshotSource(repo, m, identities)
    snap = pg_restore.load(repo, m, comp, identities)  # reads the fingerprints: proves the key
    endpoints = cfg.stack()
    bucket = _bucket_index(source, endpoints)
    pg_restore.check_major(
        snap, pg.server_version(pg_restore.admin(endpoints.postgres)), "production"
    )
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%d_%H%M%S")
    scratch = scratch_dir(cfg)
    check_free_space(scratch, snap.dump_plain.size or 0)
    prod = _connect(endpoints.postgres)
    try:
        with prod:
            _coverage(prod, "production")
            prod.rollback()  # no transaction open in production while the snapshot is staged
            try:
                with tempfile.TemporaryDirectory(dir=scratch, prefix="drtool-entity-") as work:
                    result = _restore_in(
                        cfg,
                        home,
                        options,
                        confirm,
                        entity,
                        source,
                        snap,
                        endpoints,
                        bucket,
                        prod,
                        Path(work),
                        stamp,
                    )
            except OSError as exc:
                raise scratch_error(scratch, exc) from None
    except psycopg.Error as exc:
        raise SourceError(
            f"restore-entity: PostgreSQL: {_first_line(exc)}; nothing changed"
        ) from None
    except RedisError as exc:
        r = endpoints.redis
        raise SourceError(
            f"restore-entity: Redis at {r.host}:{r.port}: {_first_line(exc)}; nothing changed"
        ) from None
    result.seconds = clock.elapsed()
    return result


def _restore_in(
    cfg: Config,
    home: Path,
    options: EntityOptions,
    confirm: Callable[[EntityPlan], bool],
    entity: EntityMap,
    source: SnapshotSource,
    snap: pg_restore.PgSnapshot,
    endpoints: StackEndpoints,
    bucket: tuple[str, dict[str, IndexEntry]] | None,
    prod: psycopg.Connection[Any],
    work: Path,
    stamp: str,
) -> EntityResult:
    """Plan inside production's transaction, then (unless a dry run) journal and apply."""
    prefer = options.prefer == "snapshot"
    others = frozenset(t for e in ENTITIES.values() for t in e.tables) - set(entity.tables)
    staged = _scratch_database(
        source, snap, endpoints.postgres, work, cfg, options.jobs, stamp, others
    )
    with staged as db, _connect(endpoints.postgres, db) as scratch, timed() as t:
        closure.select_closure(scratch, entity, options.entity_id)
        schemas = closure.copy_closure(scratch, prod, entity)
    log.debug("restore-entity: closure extracted in %.1f s", t.seconds)
    with timed() as t:
        tables = closure.compare(prod, entity, schemas, prefer_snapshot=prefer)
    log.debug("restore-entity: rows compared with production in %.1f s", t.seconds)
    object_plan = None
    store = MinioStore(endpoints.minio, max_pool=WORKERS * 2)
    if bucket is not None and OBJECTS.table in entity.tables:
        keys = [
            str(row[0])
            for row in prod.execute(
                sql.SQL("SELECT {} FROM {}").format(
                    sql.Identifier(OBJECTS.key_column), closure.temp("e", OBJECTS.table)
                )
            )
        ]
        object_plan = objects.plan_objects(store, bucket[0], bucket[1], keys, WORKERS)
    plan = EntityPlan(
        source.manifest.snapshot_id,
        entity.kind,
        options.entity_id,
        options.prefer,
        tables,
        object_plan,
        _rooms(prod, entity),
    )
    result = EntityResult(plan, options.dry_run)
    redis = redis_connect(endpoints.redis, decode=True)
    try:
        if options.dry_run:
            _count_keys(prod, plan, schemas, redis, prefer)
            prod.rollback()
            return result
        if plan.blocked:
            more = f" (and {len(plan.blocked) - 1} more)" if len(plan.blocked) > 1 else ""
            raise UsageError(
                f"restore-entity: {plan.blocked[0]}{more}; restore the parent first "
                "(see --dry-run); nothing changed"
            )
        if not plan.changes and not plan.rooms:
            prod.rollback()
            return result
        if not options.yes and not confirm(plan):
            raise UsageError("restore-entity: not confirmed; nothing changed")
        redis.ping()  # an unreachable Redis fails here, before any change
        _apply(cfg, home, plan, entity, schemas, source, store, prod, redis, work, stamp, result)
    finally:
        redis.close()
    return result


def _count_keys(
    prod: psycopg.Connection[Any],
    plan: EntityPlan,
    schemas: dict[str, closure.Schema],
    redis: Any,
    prefer: bool,
) -> None:
    """Dry run: apply the rows inside the transaction to see which derived keys would change."""
    if plan.blocked:
        return  # the rows could not be applied, so neither can the keys be computed
    for t in plan.tables:
        with suppress(closure.ChangedMeanwhile):
            closure.apply_table(prod, t, schemas[t.table], prefer_snapshot=prefer)
    wanted = redis_keys.wanted_values(prod, plan.rooms)
    plan.keys_checked = len(wanted)
    plan.keys_to_change = sum(
        1 for (key, fld), value in wanted.items() if redis_keys.current(redis, key, fld) != value
    )


def _apply(
    cfg: Config,
    home: Path,
    plan: EntityPlan,
    entity: EntityMap,
    schemas: dict[str, closure.Schema],
    source: SnapshotSource,
    store: MinioStore,
    prod: psycopg.Connection[Any],
    redis: Any,
    work: Path,
    stamp: str,
    result: EntityResult,
) -> None:
    """Journal, objects, rows (one transaction), sequences, commit, Redis; journal each step."""
    prefer = plan.prefer == "snapshot"
    clock = Timer()
    rows = {}
    for t in plan.tables:
        inserted, replaced = closure.journal_rows(prod, t.table, schemas[t.table])
        rows[t.table] = {"inserted": inserted, "replaced": replaced if prefer else []}
    path = journal.journal_dir(state_dir(cfg, home)) / f"{stamp}-{plan.kind}-{plan.entity_id}.json"
    if path.exists():
        path = path.with_name(f"{path.stem}-{datetime.now(UTC):%f}.json")
    doc = _journal_doc(plan, entity, rows)
    journal.write(path, doc)
    result.journal = path
    log.debug("restore-entity: journal %s written in %.1f s", path, clock.elapsed())
    added: list[dict[str, object]] = []
    try:
        if plan.objects and plan.objects.restore:
            added = objects.restore_objects(source, store, plan.objects, work, WORKERS)
        for t in plan.tables:
            closure.apply_table(prod, t, schemas[t.table], prefer_snapshot=prefer)
        for t in plan.tables:
            result.sequences += closure.advance_sequences(prod, t.table, schemas[t.table])
        doc["sequences"] = result.sequences
        doc["objects"]["added"] = added
        journal.write(path, doc)
        crash_point("entity-before-commit")
        prod.commit()
        log.debug("restore-entity: objects put and rows committed at %.1f s", clock.elapsed())
    except BaseException:
        with suppress(Exception):
            prod.rollback()
        if plan.objects and added:
            with suppress(Exception):
                objects.remove_objects(store, plan.objects.bucket, added, WORKERS)
        doc["status"] = "failed"
        with suppress(Exception):
            journal.write(path, doc)
        raise
    result.rows_inserted = sum(t.insert for t in plan.tables)
    result.rows_replaced = sum(t.conflict for t in plan.tables) if prefer else 0
    result.objects_added = len(added)
    doc["status"] = "rows committed"
    journal.write(path, doc)
    changes = _rebuild_keys(prod, redis, plan, doc, path)
    result.keys_changed = sum(1 for c in changes if c.before != c.after)
    log.debug("restore-entity: Redis keys rebuilt at %.1f s", clock.elapsed())
    doc["status"] = "applied"
    journal.write(path, doc)


def _journal_doc(plan: EntityPlan, entity: EntityMap, rows: dict[str, Any]) -> dict[str, Any]:
    """The journal before anything changes: every row to write, every object to put."""
    return {
        "format": journal.FORMAT,
        "status": "applying",
        "kind": plan.kind,
        "id": plan.entity_id,
        "snapshot": plan.snapshot_id,
        "prefer": plan.prefer,
        "created": datetime.now(UTC).isoformat(),
        "tables": list(entity.tables),
        "rows": rows,
        "sequences": [],
        "objects": {
            "bucket": plan.objects.bucket if plan.objects else "",
            "added": [
                {"key": e.key, "size": e.size, "sha256": e.sha256}
                for e in (plan.objects.restore if plan.objects else [])
            ],
        },
        "redis": [],
    }


def _rebuild_keys(
    prod: psycopg.Connection[Any], redis: Any, plan: EntityPlan, doc: dict[str, Any], path: Path
) -> list[redis_keys.KeyChange]:
    """After the commit: the derived keys from the merged rows, journaled before the MULTI."""

    def record(changes: list[redis_keys.KeyChange]) -> None:
        doc["redis"] = [c.to_dict() for c in changes]
        journal.write(path, doc)

    try:
        with prod.transaction():
            wanted = redis_keys.wanted_values(prod, plan.rooms)
        return redis_keys.rebuild(redis, wanted, record)
    except (psycopg.Error, RedisError, SourceError) as exc:
        raise SourceError(
            f"restore-entity: the rows and objects are restored (journal {path}) but the Redis "
            f"keys were not rebuilt ({_first_line(exc)}); run the same restore again to rebuild "
            "them, or undo it with --undo"
        ) from None


def run_undo(
    cfg: Config, *, path: Path, confirm: Callable[[dict[str, Any]], bool], yes: bool
) -> UndoResult:
    """Undo the restore a journal describes; see the module docstring."""
    doc = journal.read(path)
    if doc.get("status") == "undone":
        raise UsageError(f"--undo: {path} was already undone; nothing changed")
    if not yes and not confirm(doc):
        raise UsageError("restore-entity --undo: not confirmed; nothing changed")
    endpoints = cfg.stack()
    result = UndoResult(path)
    tables = [t for t in doc.get("tables", []) if t in doc["rows"]]
    prod = _connect(endpoints.postgres)
    try:
        with prod:
            prod.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            everything = tuple(entity_map.tables(prod))
            before = closure.table_counts(prod, everything)
            expected = dict.fromkeys(everything, 0)
            for table in reversed(tables):
                part = doc["rows"][table]
                deleted, changed, put, changed_too = closure.undo_table(
                    prod, table, part.get("inserted", []), part.get("replaced", [])
                )
                expected[table] = deleted
                result.rows_deleted += deleted
                result.rows_put_back += put
                if changed:
                    result.left.append(f"{table}: {changed} inserted rows changed since, kept")
                if changed_too:
                    result.left.append(f"{table}: {changed_too} replaced rows changed since, kept")
            after = closure.table_counts(prod, everything)
            cascaded = [
                f"{t} ({before[t] - after[t] - expected[t]})"
                for t in everything
                if before[t] - after[t] > expected[t]
            ]
            if cascaded:
                prod.rollback()
                raise UsageError(
                    "--undo: rows written since the restore depend on the restored rows and "
                    f"would be deleted with them: {', '.join(cascaded)}; nothing changed"
                )
            prod.commit()
    except psycopg.Error as exc:
        raise SourceError(f"--undo: PostgreSQL: {_first_line(exc)}; nothing changed") from None
    added = doc.get("objects", {}).get("added", [])
    if added:
        store = MinioStore(endpoints.minio, max_pool=WORKERS * 2)
        deleted, kept = objects.remove_objects(store, doc["objects"]["bucket"], added, WORKERS)
        result.objects_deleted = deleted
        result.left += [f"object {k} changed since, kept" for k in kept]
    changes = [redis_keys.KeyChange.from_dict(c) for c in doc.get("redis", [])]
    if changes:
        client = redis_connect(endpoints.redis, decode=True)
        try:
            result.keys_put_back, kept_keys = redis_keys.put_back(client, changes)
        finally:
            client.close()
        result.left += [f"redis {k} changed since, kept" for k in kept_keys]
    doc["status"] = "undone"
    doc["undone"] = datetime.now(UTC).isoformat()
    journal.write(path, doc)
    return result
