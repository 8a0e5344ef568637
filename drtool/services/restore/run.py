"""``drtool restore``: verify, plan, stage, restore, and prove it with fingerprints.

Order: the snapshot must be VALID (signed manifest, every object present with its size, not
found damaged by a verification); an identity must be configured; the small encrypted objects
(fingerprints, bucket indexes) are read, which proves the key. The plan inspects the target;
``dry_run`` stops there, after a key-less hash check of every object the restore would read.
A non-empty target needs ``force``; the caller confirms (``yes`` skips it). Then, before any
target is touched, every object the restore reads is hashed and authenticated: the PostgreSQL
dump and the Redis RDB are decrypted into the scratch dir, the MinIO blobs read through. Only
then are PostgreSQL, Redis and MinIO restored, each verified against the snapshot's
fingerprints, each timed (the RTO); Redis online (keys copied) or offline (the server
restarted with the RDB). Each store does its part behind the store protocol
(drtool.stores); this module orders them. See docs/decisions/0003-restore-staging-and-swap.md
and 0006-store-protocol.md.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

from drtool.config import Config
from drtool.endpoints import RedisEndpoint, StackEndpoints
from drtool.errors import ConfigError, DrtoolError, IntegrityError, NotFound, UsageError
from drtool.repository import catalog
from drtool.repository.access import Repo, identities_of, open_repo, stored_problem
from drtool.repository.manifest import Manifest
from drtool.services.stack import stack_load
from drtool.stores import registry
from drtool.stores.base import Placer, PlanItem, Restored, Restoring, SnapshotSource, Target
from drtool.stores.redis.offline import LocalPlacer, container_placer
from drtool.stores.stage import (
    Cancelled,
    check_free_space,
    owned_scratch,
    scratch_dir,
    scratch_error,
    sweep_stale,
)
from drtool.timing import Timer, timed

PRODUCTION = "production"
log = logging.getLogger(__name__)
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
    minio_mode: str = "merge"  # or "mirror": remove objects under the prefix the snapshot lacks
    #: offline into a stopped Redis Cluster: each node's data dir (an RDB per node)
    redis_node_dirs: tuple[str, ...] = ()
    redis_rdb_dir: str = ""  # or: write each shard's RDB there, for the operator to place
    redis_wait_started: float = 0.0  # node dirs: wait for the nodes to be started, compare


@dataclass
class ComponentResult:
    """One restored component: time taken (RTO) and the fingerprint comparison."""

    name: str
    seconds: float
    problems: list[str]
    detail: str
    counts: dict[str, int] = field(default_factory=dict)  # e.g. extra_objects_kept
    #: the replaced data kept (PostgreSQL: the previous database), "" when none: a refused
    #: --drop-old shows here, not only in ``detail``'s free text
    previous_kept: str = ""

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
    hash_checked: int = 0  # dry run: objects whose stored sha256 was checked

    @property
    def ok(self) -> bool:
        """Every restored component verified."""
        return all(c.passed for c in self.components)


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
    clock = Timer()
    _check_options(options)
    identities = identities_of(cfg)
    if not identities:
        raise ConfigError("keys.identity_file: restore needs the operators' identity (got none)")
    repo = open_repo(cfg)
    # `latest` of nothing named: of every store; found through the catalog index (ADR 0020)
    wanted = options.components or registry.COMPONENTS
    record = catalog.find(
        repo.storage,
        repo.verify_keys,
        repo.info.repo_id,
        options.ref,
        at=options.at,
        components=wanted,
    )
    m = record.manifest
    assert m is not None  # resolve returns VALID records only
    log.debug(
        "restore: repository opened, snapshot %s found: %.2f s", m.snapshot_id, clock.elapsed()
    )
    chosen = _components(m, options.components)
    target = Target(
        target_endpoints(cfg, home, options.target),
        force=options.force,
        jobs=options.jobs,
        drop_old=options.drop_old,
        prefix=options.prefix,
        minio_mode=options.minio_mode,
        workers=WORKERS,
        pg_bin_dir=Path(cfg.postgres.bin_dir) if cfg.postgres.bin_dir else None,
        timeout=float(cfg.backup.timeout_s),
        keep_dir=scratch_dir(cfg),
        redis_node_dirs=tuple(Path(d).absolute() for d in options.redis_node_dirs),
        redis_rdb_dir=Path(options.redis_rdb_dir).absolute() if options.redis_rdb_dir else None,
        redis_wait_s=options.redis_wait_started,
    )
    restoring = _load(SnapshotSource(repo, m, identities), chosen, target)
    per_node = options.redis_node_dirs or options.redis_rdb_dir
    if per_node and "redis" not in restoring:
        raise UsageError(
            f"--redis-node-dir/--redis-rdb-dir: snapshot {m.snapshot_id} has no Redis to "
            "restore; nothing changed"
        )
    if "redis" in restoring and options.redis_mode == "offline" and not per_node:
        placer = redis_placer(cfg, home, options.target, target.endpoints.redis)
        target = replace(target, placer=placer)
    result = RestoreResult(m.snapshot_id, options.target or PRODUCTION, options.dry_run, [])
    result.plan = [item for r in restoring.values() for item in r.plan(target)]
    log.debug("restore: small objects read, targets inspected: %.2f s", clock.elapsed())
    if options.dry_run:
        result.hash_checked = _hash_check(repo, restoring)
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
    sweep_stale(scratch)  # a killed restore's leftovers (decrypted data) first: their space too
    check_free_space(scratch, sum(r.staged_bytes(WORKERS) for r in restoring.values()))
    try:
        with owned_scratch(scratch) as work:
            result.components = _stage_then_restore(restoring, target, work, stamp)
    except OSError as exc:
        raise scratch_error(scratch, exc) from None
    result.seconds = clock.elapsed()
    return result


def _hash_check(repo: Repo, restoring: dict[str, Restoring]) -> int:
    """Dry run: the key-less check of exactly the objects the restore would read.

    A size-only catalog cannot see a flipped byte; a dry run that exits 0 must mean the bytes
    it would restore are the ones the manifest signed. The small objects (fingerprints,
    indexes) were already read whole and checked by ``_load``. IntegrityError names each
    damaged object.
    """
    wanted = [entry for r in restoring.values() for entry in r.reads()]
    problems = [p for p in (stored_problem(repo, e) for e in wanted) if p]
    if problems:
        raise IntegrityError(
            f"restore --dry-run: {len(problems)} of {len(wanted)} objects damaged: "
            + "; ".join(problems)
        )
    return len(wanted)


def _check_options(options: RestoreOptions) -> None:
    unknown = [c for c in options.components if c not in registry.COMPONENTS]
    if unknown:
        raise UsageError(
            f"--component: unknown {', '.join(unknown)} (known: {', '.join(registry.COMPONENTS)})"
        )
    if options.minio_mode not in ("merge", "mirror"):
        raise UsageError(f"--minio-mode: merge or mirror (got {options.minio_mode})")
    if options.jobs < 1:
        raise UsageError(f"--jobs: must be at least 1 (got {options.jobs})")
    if options.redis_wait_started and not options.redis_node_dirs:
        raise UsageError("--redis-wait-started: with --redis-node-dir only")
    if options.redis_wait_started < 0:
        raise UsageError(f"--redis-wait-started: seconds, >= 0 (got {options.redis_wait_started})")
    if options.redis_node_dirs and options.redis_rdb_dir:
        raise UsageError("--redis-node-dir or --redis-rdb-dir, not both")
    if (options.redis_node_dirs or options.redis_rdb_dir) and options.redis_mode != "offline":
        raise UsageError(
            "--redis-node-dir/--redis-rdb-dir: an RDB per cluster node, add --redis-mode "
            "offline (online copies keys into the running cluster)"
        )
    per_node = options.redis_node_dirs or options.redis_rdb_dir
    if per_node and options.components and "redis" not in options.components:
        raise UsageError(
            "--redis-node-dir/--redis-rdb-dir: for a Redis restore, and redis is not "
            f"among --component {','.join(options.components)}; nothing changed"
        )
    if options.at is not None and options.ref != "latest":
        raise UsageError(f"--at: picks among snapshots, not with a snapshot id (got {options.ref})")


def _components(m: Manifest, wanted: tuple[str, ...]) -> tuple[str, ...]:
    present = [c.name for c in m.components]
    missing = [c for c in wanted if c not in present]
    if missing:
        raise NotFound(f"snapshot {m.snapshot_id}: has no {', '.join(missing)} component")
    return tuple(c for c in registry.COMPONENTS if c in present and (not wanted or c in wanted))


def _load(source: SnapshotSource, chosen: tuple[str, ...], target: Target) -> dict[str, Restoring]:
    """Each chosen store's small objects read (in the registry's order), ready to plan."""
    entries = {c.name: c for c in source.manifest.components}
    restoring: dict[str, Restoring] = {}
    for store in registry.STORES:
        if store.name in chosen:
            r = store.load(source, entries[store.name], target)
            if r is not None:
                restoring[store.name] = r
    return restoring


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


def _stage_then_restore(
    restoring: dict[str, Restoring], target: Target, work: Path, stamp: str
) -> list[ComponentResult]:
    """Stage every store (side by side) before touching any target; then restore and verify
    each in turn.

    A store's time (its RTO) is its staging plus its restore up to the moment its target is
    usable; what it left running then (PostgreSQL: dropping the replaced database) overlaps
    the next stores and is waited for, and its outcome reported, before this returns. Each
    store stages knowing what the others need of the scratch dir (``Target.scratch_others``),
    so one that may keep extra data there (MinIO's plaintext) never takes the room a later
    restore step writes in.
    """
    staged_s = _stage_all(restoring, target, work)
    results: list[ComponentResult] = []
    pending: list[tuple[ComponentResult, Callable[[], Restored]]] = []
    try:
        for name, r in restoring.items():
            with timed() as t:
                done = r.restore(target, work, stamp)
            seconds = round(staged_s[name] + t.seconds, 3)
            result = ComponentResult(
                name, seconds, done.problems, done.detail, done.counts, done.previous_kept
            )
            results.append(result)
            if done.finish is not None:
                pending.append((result, done.finish))
    except BaseException as exc:
        _finish(pending)
        if not results or not isinstance(exc, DrtoolError):
            raise
        # a later store failed after an earlier one replaced its target (PostgreSQL switched
        # in): those are not put back, so the error must say what already changed
        # (said on the error itself: its subclass, exit code and fields stay as they were)
        changed = "; ".join(f"{c.name} ({c.detail})" for c in results)
        exc.message = f"{exc.message}; already restored before the failure: {changed}"
        exc.args = (exc.message,)
        raise
    _finish(pending)
    return results


def _finish(pending: list[tuple[ComponentResult, Callable[[], Restored]]]) -> None:
    """Wait for the work the stores left running (dropping the replaced database); each
    result's final outcome. Also on a failure: no drop runs on after the restore returned."""
    for result, finish in pending:
        final = finish()
        result.detail, result.previous_kept = final.detail, final.previous_kept


def _stage_all(restoring: dict[str, Restoring], target: Target, work: Path) -> dict[str, float]:
    """Stage the stores side by side; each one's staging seconds.

    Staging only reads the repository and writes the scratch dir, so the stores' staging
    overlap (the PostgreSQL dump decrypts while the MinIO blobs are read and checked). No
    target is touched unless all of them staged. The first failure (a damaged blob found
    after a second) or an interruption of this thread (Ctrl-C, SIGTERM, a drill's deadline)
    sets the shared ``cancel`` event: the other stores stop at their next chunk
    (``stage.Cancelled``) instead of downloading to the end, and are waited for (no thread
    writes the scratch dir after this returns). Then the first real failure, in the stores'
    order, is raised; a store's Cancelled is only the echo of it.
    """

    needs = {name: r.staged_bytes(target.workers) for name, r in restoring.items()}
    cancel = target.cancel or threading.Event()

    def one(name: str, r: Restoring) -> float:
        others = sum(n for other, n in needs.items() if other != name)
        with timed() as t:
            r.stage(replace(target, scratch_others=others, cancel=cancel), work)
        return t.seconds

    if len(restoring) == 1:
        return {name: one(name, r) for name, r in restoring.items()}
    pool = ThreadPoolExecutor(len(restoring), thread_name_prefix="drtool-stage")
    futures = {}
    try:
        futures = {name: pool.submit(one, name, r) for name, r in restoring.items()}
        wait(futures.values(), return_when=FIRST_EXCEPTION)
        if any(f.done() and f.exception() is not None for f in futures.values()):
            cancel.set()
        wait(futures.values())
    except BaseException:
        cancel.set()
        raise
    finally:
        pool.shutdown(wait=True)
    failures = [e for f in futures.values() if (e := f.exception()) is not None]
    real = [e for e in failures if not isinstance(e, Cancelled)]
    if real or failures:
        raise (real or failures)[0]
    return {name: future.result() for name, future in futures.items()}
