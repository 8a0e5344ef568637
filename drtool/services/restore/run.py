"""``drtool restore``: verify, plan, stage, restore, and prove it with fingerprints.

Order: the snapshot must be VALID (signed manifest, every object present with its size); an
identity must be configured; the small encrypted objects (fingerprints, bucket indexes) are
read, which proves the key. The plan inspects the target; ``dry_run`` stops there. A non-empty
target needs ``force``; the caller confirms (``yes`` skips it). Then, before any target is
touched, every object the restore reads is hashed and authenticated: the PostgreSQL dump and
the Redis RDB are decrypted into the scratch dir, the MinIO blobs read through. Only then are
PostgreSQL, Redis and MinIO restored, each verified against the snapshot's fingerprints, each
timed (the RTO); Redis online (keys copied) or offline (the server restarted with the RDB).
See docs/decisions/0003-restore-staging-and-swap.md.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from drtool.config import Config
from drtool.endpoints import RedisEndpoint, StackEndpoints
from drtool.errors import ConfigError, NotFound, UsageError
from drtool.repository import catalog
from drtool.repository.access import Repo, identities_of, open_repo
from drtool.repository.manifest import Manifest
from drtool.services.restore import minio as restore_minio
from drtool.services.restore import postgres as restore_postgres
from drtool.services.restore import redis as restore_redis
from drtool.services.restore import redis_offline as restore_redis_offline
from drtool.services.restore.redis_offline import LocalPlacer, Placer, container_placer
from drtool.services.restore.stage import check_free_space, scratch_dir, scratch_error
from drtool.services.stack import stack_load
from drtool.sources.minio import MinioStore

COMPONENTS = ("postgres", "redis", "minio")
PRODUCTION = "production"
WORKERS = 4


@dataclass(frozen=True)
class RestoreOptions:
    """What to restore, where, and how carefully."""

    ref: str = "latest"
    at: datetime | None = None
    components: tuple[str, ...] = ()
    target: str = ""
    dry_run: bool = False
    force: bool = False
    yes: bool = False
    drop_old: bool = False
    jobs: int = 2
    redis_mode: str = "online"  # or "offline": restart the server with the RDB
    prefix: str = ""


@dataclass(frozen=True)
class PlanItem:
    """One component: where it goes, how much, and what it would replace."""

    component: str
    source: str
    target: str
    plain_bytes: int
    holds: str
    replaces: bool
    action: str


@dataclass
class ComponentResult:
    """One restored component: time taken (RTO) and the fingerprint comparison."""

    name: str
    seconds: float
    problems: list[str]
    detail: str

    @property
    def passed(self) -> bool:
        """Fingerprints equal to the snapshot's."""
        return not self.problems


@dataclass
class RestoreResult:
    """The plan and, unless a dry run, what each component's restore found."""

    snapshot_id: str
    target: str
    dry_run: bool
    plan: list[PlanItem]
    components: list[ComponentResult] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """Every restored component verified."""
        return all(c.passed for c in self.components)


@dataclass
class _Loaded:
    """What the snapshot holds for each chosen component (small objects already read)."""

    pg: restore_postgres.PgSnapshot | None = None
    redis: restore_redis.RedisSnapshot | None = None
    buckets: list[restore_minio.BucketSnapshot] = field(default_factory=list)


def target_endpoints(cfg: Config, home: Path, name: str) -> StackEndpoints:
    """``[targets.NAME]`` from the config, else the running local stack NAME; '' = production."""
    if not name:
        return cfg.stack()
    if name in cfg.targets:
        return cfg.targets[name].endpoints()
    try:
        return stack_load(home, name).endpoints
    except NotFound:
        raise NotFound(
            f"target {name}: no [targets.{name}] in the config and no local stack of that name "
            "is up (see `drtool stack up --name NAME`)"
        ) from None


def run_restore(
    cfg: Config,
    *,
    home: Path,
    options: RestoreOptions,
    confirm: Callable[[RestoreResult], bool],
    now: datetime | None = None,
) -> RestoreResult:
    """Restore one snapshot into the target; see the module docstring for the order."""
    started = time.monotonic()
    _check_options(options)
    identities = identities_of(cfg)
    if not identities:
        raise ConfigError("keys.identity_file: restore needs the operators' identity (got none)")
    repo = open_repo(cfg)
    records = catalog.list_snapshots(repo.storage, repo.verify_keys, repo.info.repo_id)
    wanted = options.components or COMPONENTS  # `latest` of nothing named: of every store
    record = catalog.resolve(records, options.ref, at=options.at, components=wanted)
    m = record.manifest
    assert m is not None  # resolve returns VALID records only
    chosen = _components(m, options.components)
    endpoints = target_endpoints(cfg, home, options.target)
    loaded = _load(repo, m, chosen, identities, endpoints, options.prefix)
    placer = None
    if loaded.redis is not None and options.redis_mode == "offline":
        placer = redis_placer(cfg, home, options.target, endpoints.redis)
    result = RestoreResult(m.snapshot_id, options.target or PRODUCTION, options.dry_run, [])
    targets = _inspect(loaded, endpoints, options, placer)
    result.plan = [item for item, _ in targets]
    if options.dry_run:
        return result
    busy = [item for item in result.plan if item.replaces]
    if busy and not options.force:
        raise UsageError(
            "restore: the target is not empty ("
            + "; ".join(f"{i.component} {i.target} holds {i.holds}" for i in busy)
            + "); nothing changed, use --force to replace it"
        )
    if not options.yes and not confirm(result):
        raise UsageError("restore: not confirmed; nothing changed")
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%d_%H%M%S")
    scratch = scratch_dir(cfg)
    check_free_space(scratch, _staged_bytes(loaded, WORKERS))
    pg_inspected = next((t for _, t in targets if isinstance(t, restore_postgres.PgTarget)), None)
    try:
        with tempfile.TemporaryDirectory(dir=scratch, prefix="drtool-restore-") as work:
            _Run(cfg, repo, m, identities, Path(work), options, result, placer).all(
                loaded, endpoints, pg_inspected, stamp
            )
    except OSError as exc:
        raise scratch_error(scratch, exc) from None
    result.seconds = time.monotonic() - started
    return result


def _check_options(options: RestoreOptions) -> None:
    unknown = [c for c in options.components if c not in COMPONENTS]
    if unknown:
        raise UsageError(
            f"--component: unknown {', '.join(unknown)} (known: postgres, redis, minio)"
        )
    if options.jobs < 1:
        raise UsageError(f"--jobs: must be at least 1 (got {options.jobs})")
    if options.at is not None and options.ref != "latest":
        raise UsageError(f"--at: picks among snapshots, not with a snapshot id (got {options.ref})")


def _components(m: Manifest, wanted: tuple[str, ...]) -> tuple[str, ...]:
    present = [c.name for c in m.components]
    missing = [c for c in wanted if c not in present]
    if missing:
        raise NotFound(f"snapshot {m.snapshot_id}: has no {', '.join(missing)} component")
    return tuple(c for c in COMPONENTS if c in present and (not wanted or c in wanted))


def _load(
    repo: Repo,
    m: Manifest,
    chosen: tuple[str, ...],
    identities: list[str],
    endpoints: StackEndpoints,
    prefix: str,
) -> _Loaded:
    loaded = _Loaded()
    for comp in m.components:
        if comp.name not in chosen:
            continue
        if comp.name == "postgres":
            loaded.pg = restore_postgres.load(repo, m, comp, identities)
        elif comp.name == "redis":
            loaded.redis = restore_redis.load(repo, m, comp, identities)
        else:
            loaded.buckets = restore_minio.load(
                repo, m, comp, identities, target_buckets=endpoints.buckets, prefix=prefix
            )
    return loaded


def redis_placer(cfg: Config, home: Path, name: str, endpoint: RedisEndpoint) -> Placer:
    """How to restart the target's Redis for an offline restore: a local stack or a container."""
    if name and name not in cfg.targets:
        return LocalPlacer(stack_load(home, name))
    container = (cfg.targets[name].redis if name else cfg.redis).container
    if not container:
        section = f"targets.{name}.redis" if name else "redis"
        raise UsageError(
            f"--redis-mode offline: drtool can only restart the Redis of a local stack or a "
            f"Docker container; set {section}.container (nothing changed)"
        )
    return container_placer(container, endpoint)


def _inspect(
    loaded: _Loaded, endpoints: StackEndpoints, options: RestoreOptions, placer: Placer | None
) -> list[tuple[PlanItem, object]]:
    """Plan items (and the PostgreSQL inspection, reused by the restore)."""
    items: list[tuple[PlanItem, object]] = []
    if loaded.pg is not None:
        t = restore_postgres.inspect(endpoints.postgres)
        copy, old = restore_postgres.names(endpoints.postgres.dbname, "<time>")
        tables = len(loaded.pg.fingerprints.tables)
        rows = sum(fp.rows for fp in loaded.pg.fingerprints.tables.values())
        holds = "nothing" if not t.exists else "an empty database" if t.empty else "data"
        keep = "dropped (--drop-old)" if options.drop_old or t.empty else f"kept as {old}"
        action = f"pg_restore -j {options.jobs} into {copy}, verify, switch"
        action += f"; the current database {keep}" if t.exists else ""
        item = PlanItem(
            "postgres",
            f"{tables} tables, {rows:,} rows",
            t.where,
            loaded.pg.dump_plain.size or 0,
            holds,
            not t.empty,
            action,
        )
        items.append((item, t))
    if loaded.redis is not None:
        r = endpoints.redis
        held = restore_redis.target_keys(r)
        action = "copy keys (RESTORE REPLACE), remove keys not in the snapshot" if held else ""
        if placer is not None:
            action = f"stop {placer.where}, replace its RDB (the current one kept), start it"
        items.append(
            (
                PlanItem(
                    "redis",
                    f"{loaded.redis.keys:,} keys",
                    f"{r.host}:{r.port}",
                    loaded.redis.rdb_plain.size or 0,
                    f"{held:,} keys",
                    held > 0,
                    action or "copy keys (DUMP/RESTORE with TTLs)",
                ),
                None,
            )
        )
    store = MinioStore(endpoints.minio) if loaded.buckets else None
    for b in loaded.buckets:
        assert store is not None
        held_objects = restore_minio.held_objects(store, b.target)
        holds = "no bucket" if held_objects is None else f"{held_objects:,} objects"
        action = "create the bucket, put objects" if held_objects is None else "put objects"
        if held_objects:
            action += " (identical ones skipped, others kept)"
        item = PlanItem(
            "minio",
            f"bucket {b.bucket}: {len(b.entries):,} objects"
            + (f" under {options.prefix!r}" if options.prefix else ""),
            f"{endpoints.minio.endpoint_url} bucket {b.target}",
            b.size,
            holds,
            bool(held_objects),
            action,
        )
        items.append((item, None))
    return items


def _staged_bytes(loaded: _Loaded, workers: int) -> int:
    """Scratch space the restore needs: dump + globals + RDB, and one blob per worker."""
    total = 0
    if loaded.pg is not None:
        total += (loaded.pg.dump_plain.size or 0) + (
            loaded.pg.globals_sql.size if loaded.pg.globals_sql else 0
        )
    if loaded.redis is not None:
        total += loaded.redis.rdb_plain.size or 0
    largest = max((e.size for b in loaded.buckets for e in b.entries), default=0)
    return total + workers * largest


@dataclass
class _Run:
    """One restore in progress: stage everything, then restore and verify each component."""

    cfg: Config
    repo: Repo
    m: Manifest
    identities: list[str]
    work: Path
    options: RestoreOptions
    result: RestoreResult
    redis_placer: Placer | None = None

    def all(
        self,
        loaded: _Loaded,
        endpoints: StackEndpoints,
        pg_target: restore_postgres.PgTarget | None,
        stamp: str,
    ) -> None:
        bin_dir = Path(self.cfg.postgres.bin_dir) if self.cfg.postgres.bin_dir else None
        timeout = float(self.cfg.backup.timeout_s)
        staged_pg, staged_rdb = None, None
        stage_s: dict[str, float] = {}
        t0 = time.monotonic()
        if loaded.pg is not None:
            staged_pg = restore_postgres.stage_files(
                self.repo, self.m, loaded.pg, self.identities, self.work, bin_dir
            )
            stage_s["postgres"] = time.monotonic() - t0
        t0 = time.monotonic()
        if loaded.redis is not None:
            staged_rdb = restore_redis.stage_rdb(
                self.repo, self.m, loaded.redis, self.identities, self.work
            )
            stage_s["redis"] = time.monotonic() - t0
        t0 = time.monotonic()
        if loaded.buckets:
            restore_minio.check_blobs(self.repo, loaded.buckets, self.identities, WORKERS)
            stage_s["minio"] = time.monotonic() - t0
        if loaded.pg is not None and staged_pg is not None and pg_target is not None:
            t0 = time.monotonic()
            outcome = restore_postgres.restore(
                staged_pg,
                loaded.pg,
                pg_target,
                stamp=stamp,
                jobs=self.options.jobs,
                drop_old=self.options.drop_old,
                pg_bin_dir=bin_dir,
                timeout=timeout,
            )
            staged_pg.dump.unlink()
            detail = f"database {outcome.database}" + (
                f"; previous kept as {outcome.old_database}" if outcome.old_database else ""
            )
            self._done("postgres", stage_s["postgres"] + time.monotonic() - t0, [], detail)
        if loaded.redis is not None and staged_rdb is not None:
            t0 = time.monotonic()
            if self.redis_placer is None:
                r = restore_redis.restore(
                    staged_rdb,
                    endpoints.redis,
                    force=self.options.force,
                    keep_dir=scratch_dir(self.cfg),
                    stamp=stamp,
                )
                done = f"{r.copied:,} keys copied, {r.removed:,} removed"
            else:
                r = restore_redis_offline.restore(
                    staged_rdb,
                    endpoints.redis,
                    self.redis_placer,
                    force=self.options.force,
                    stamp=stamp,
                    workdir=self.work,
                )
                done = f"RDB of {r.copied:,} keys placed, {r.removed:,} keys replaced"
            expired = restore_redis.expired_since_backup(loaded.redis, r)
            detail = f"{done}, {expired:,} expired (TTL)"
            self._done("redis", stage_s["redis"] + time.monotonic() - t0, r.problems, detail)
        if loaded.buckets:
            t0 = time.monotonic()
            store = MinioStore(endpoints.minio, max_pool=WORKERS * 2)
            problems: list[str] = []
            parts: list[str] = []
            for b in loaded.buckets:
                o = restore_minio.restore(
                    self.repo,
                    store,
                    b,
                    self.identities,
                    self.work,
                    force=self.options.force,
                    workers=WORKERS,
                )
                problems += restore_minio.verify(store, b, WORKERS)
                parts.append(f"{o.bucket}: {o.uploaded:,} put, {o.skipped:,} identical skipped")
            self._done(
                "minio", stage_s["minio"] + time.monotonic() - t0, problems, "; ".join(parts)
            )

    def _done(self, name: str, seconds: float, problems: list[str], detail: str) -> None:
        self.result.components.append(ComponentResult(name, round(seconds, 3), problems, detail))
