"""Redis restore, online: the checked RDB (or logical dump) is loaded into an ephemeral server,
and its keys are copied over.

Works for any reachable Redis. Into an empty target the copy uses plain RESTORE; with
``force`` it uses RESTORE REPLACE and then removes the target keys the snapshot does not have,
so the target ends equal to the snapshot (while it runs, clients see a mix: a live Redis cannot
be switched atomically; :mod:`drtool.stores.redis.offline` replaces the data file of
a server drtool can stop instead).

Nothing is written before the snapshot is known to fit the target's ``maxmemory`` and the
target's current keys are saved to a pre-restore copy on local disk; a copy that fails
part-way is undone from it (:mod:`drtool.stores.redis.guard`). Errors name keys,
never values.

Verification is a chain: the RDB's sha256 equals the one recorded (and fingerprinted) at
backup time; the target's fingerprints equal those of the ephemeral server holding that RDB,
taken after the copy. The backup-time fingerprints cannot be compared directly: keys with a
TTL (presence, rate limits) expire between the backup and the restore. When the two scans
differ only by keys with a TTL (a burst expired between them), they are taken once more.
"""

from __future__ import annotations

import json
import logging
import threading
from contextlib import AbstractContextManager, closing
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import redis

from drtool.endpoints import RedisEndpoint
from drtool.errors import IntegrityError, SourceError, UsageError
from drtool.repository.access import Repo, read_object, snapshot_header
from drtool.repository.manifest import ComponentEntry, Manifest, ObjectEntry
from drtool.sources.redis_client import (
    CopyFailed,
    client_for_db,
    connect,
    copy_keys,
    ephemeral_redis,
    keyspace_dbs,
    redis_error,
    scan_batches,
)
from drtool.sources.redis_cluster import (
    cluster_client,
    cluster_keys,
    copy_to_cluster,
    fingerprint_cluster,
    is_cluster,
    merged_redis,
    remove_extra_in_cluster,
)
from drtool.sources.redis_fingerprint import RedisFingerprints, compare, fingerprint_redis
from drtool.sources.redis_logical import logical_redis
from drtool.stores.redis.guard import (
    PreRestoreCopy,
    check_fit,
    dataset_bytes,
    measure_target,
    put_back,
    target_memory,
)
from drtool.stores.stage import Plain, stage

BATCH = 1000
SHARD_KIND = "redis_rdb_shard"
"""Object kind of a cluster shard's RDB: ``redis_rdb_shard<i>``, i in slot order."""

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RedisSnapshot:
    """What a snapshot holds for Redis: an RDB, a logical dump, or one RDB per cluster shard
    (``method``: rdb, logical, cluster), and the fingerprints of the whole."""

    data: tuple[ObjectEntry, ...]
    fingerprints: RedisFingerprints
    plain: tuple[Plain, ...]
    method: str = "rdb"  # or "logical" (drtool.sources.redis_logical), "cluster"
    #: a cluster's shards, in object order: each one's slot ranges and fingerprints
    shards: tuple[tuple[tuple[tuple[int, int], ...], RedisFingerprints], ...] = ()

    @property
    def keys(self) -> int:
        """Keys in the snapshot, all dbs."""
        return sum(db.keys for db in self.fingerprints.dbs.values())

    @property
    def size(self) -> int:
        """Plain bytes of the RDB(s) or dump."""
        return sum(p.size or 0 for p in self.plain)

    @property
    def consistency(self) -> str:
        """What the reports say about the snapshot's consistency."""
        if self.method == "logical":
            return "logical dump: consistent per key, not per instant"
        if self.method == "cluster":
            return f"cluster of {len(self.data)} shards: each shard one instant, not across shards"
        return "RDB: one instant"


@dataclass(frozen=True)
class RedisOutcome:
    """Keys written and removed, the loaded snapshot's fingerprints, and the differences."""

    copied: int
    removed: int
    loaded: RedisFingerprints
    problems: list[str]


def load(repo: Repo, m: Manifest, comp: ComponentEntry, identities: list[str]) -> RedisSnapshot:
    """Read the component's fingerprints and find its RDB, logical dump or shard RDBs."""
    by_kind = {o.kind: o for o in comp.objects}
    fp = by_kind.get("fingerprints")
    shards = sorted(
        (o for o in comp.objects if o.kind.startswith(SHARD_KIND)),
        key=lambda o: int(o.kind[len(SHARD_KIND) :]),
    )
    data_kind = next((k for k in ("redis_rdb", "redis_logical") if k in by_kind), None)
    if fp is None or (data_kind is None and not shards):
        raise IntegrityError(
            f"snapshot {m.snapshot_id}: redis has no RDB (or logical dump) or fingerprints"
        )
    doc = json.loads(read_object(repo, fp, snapshot_header(m, "redis", fp.kind), identities))
    prints = RedisFingerprints.from_dict(doc["fingerprints"])
    if shards:
        recorded = {s["kind"]: s for s in doc["shards"]}
        plains = tuple(_plain(recorded[o.kind]["rdb"]) for o in shards)
        layout = tuple(
            (
                tuple((int(a), int(b)) for a, b in recorded[o.kind]["slots"]),
                RedisFingerprints.from_dict(recorded[o.kind]["fingerprints"]),
            )
            for o in shards
        )
        return RedisSnapshot(tuple(shards), prints, plains, "cluster", layout)
    method = "logical" if data_kind == "redis_logical" else "rdb"
    assert data_kind is not None
    return RedisSnapshot((by_kind[data_kind],), prints, (_plain(doc[method]),), method)


def _plain(record: dict[str, object]) -> Plain:
    return Plain(int(str(record["size"])), str(record["sha256"]))


def target_keys(endpoint: RedisEndpoint) -> int:
    """Keys the target holds now, all dbs (all masters of a cluster)."""
    try:
        with closing(connect(endpoint)) as client:
            if is_cluster(client):
                return cluster_keys(endpoint)
            return sum(keyspace_dbs(client).values())
    except redis.RedisError as exc:
        raise SourceError(f"redis {endpoint.host}:{endpoint.port}: {redis_error(exc)}") from None


def stage_data(
    repo: Repo,
    m: Manifest,
    snap: RedisSnapshot,
    identities: list[str],
    workdir: Path,
    cancel: threading.Event | None = None,
) -> list[Path]:
    """Decrypt the RDB(s) or logical dump to scratch, checked against the snapshot's record."""
    names = {"rdb": "dump.rdb", "logical": "dump.redislogical"}
    staged = []
    for i, (obj, plain) in enumerate(zip(snap.data, snap.plain, strict=True)):
        name = names.get(snap.method, f"shard-{i}.rdb")
        header = snapshot_header(m, "redis", obj.kind)
        staged.append(stage(repo, obj, header, identities, workdir / name, plain, cancel=cancel))
    return staged


def holding(data: list[Path], method: str) -> AbstractContextManager[redis.Redis]:
    """A private redis-server holding the snapshot's keys, whichever way they were taken.

    Loading a logical dump checks every payload (the server verifies each DUMP's CRC), so a
    damaged dump is refused here, before any target is touched. A cluster's shards are
    merged into one server.
    """
    if method == "logical":
        return logical_redis(data[0])
    if method == "cluster":
        return merged_redis(data)
    return ephemeral_redis(data[0])


def _restore_into_cluster(
    source: redis.Redis, endpoint: RedisEndpoint, *, force: bool
) -> RedisOutcome:
    """Key-level into a Redis Cluster of any shape: each key to its slot's master now.

    Refused without ``force`` when the cluster holds keys. No ``maxmemory`` guard and no
    pre-restore copy here (per-master budgets): a copy failing part-way leaves the keys
    written so far, and says so.
    """
    where = f"redis cluster {endpoint.host}:{endpoint.port}"
    held = cluster_keys(endpoint)
    if held and not force:
        raise UsageError(
            f"{where}: holds {held} keys now; nothing changed, use --force to replace them"
        )
    try:
        with closing(cluster_client(endpoint)) as cluster:
            copied = copy_to_cluster(source, cluster, replace=force)
        removed = remove_extra_in_cluster(source, endpoint) if force else 0
    except CopyFailed as exc:
        raise SourceError(
            f"{where}: the restore failed part-way ({exc.message}) after writing "
            f"{exc.copied:,} keys; the cluster is CHANGED (no pre-restore copy for a cluster "
            "target): restore again with --force once the cause is fixed"
        ) from None
    except redis.RedisError as exc:
        raise SourceError(f"{where}: {redis_error(exc)}; the cluster may be CHANGED") from None
    loaded, restored = fingerprint_redis(source), fingerprint_cluster(endpoint)
    if only_expired(loaded, restored):
        loaded, restored = fingerprint_redis(source), fingerprint_cluster(endpoint)
    return RedisOutcome(copied, removed, loaded, compare(loaded, restored))


def restore(
    data: list[Path],
    endpoint: RedisEndpoint,
    *,
    force: bool,
    keep_dir: Path,
    stamp: str,
    method: str = "rdb",
) -> RedisOutcome:
    """Copy every key of the RDB (or logical dump) to the target (see the module docstring).

    Before the target is touched: its keys are saved to a pre-restore copy in ``keep_dir``
    and the snapshot must fit its ``maxmemory`` (:mod:`drtool.stores.redis.guard`). A copy
    that fails part-way is undone from that copy; the error says what the target holds.
    """
    where = f"redis {endpoint.host}:{endpoint.port}"
    with holding(data, method) as source, closing(connect(endpoint)) as target:
        try:
            into_cluster = is_cluster(target)
        except redis.RedisError as exc:
            raise SourceError(f"{where}: {redis_error(exc)}; nothing changed") from None
        if into_cluster:
            return _restore_into_cluster(source, endpoint, force=force)
        pre: PreRestoreCopy | None = None
        try:
            held = sum(keyspace_dbs(target).values())
            if held and not force:
                raise UsageError(
                    f"{where}: holds {held} keys now; nothing changed, use --force to replace them"
                )
            before = target_memory(target)
            if held:
                pre = measure_target(source, target, keep_dir / f"redis-pre_restore_{stamp}.keys")
            check_fit(where, before, dataset_bytes(source), pre)
        except redis.RedisError as exc:
            _discard(pre)
            raise SourceError(f"{where}: {redis_error(exc)}; nothing changed") from None
        except BaseException:
            _discard(pre)
            raise
        try:
            copied = copy_keys(source, target, replace=force)
            removed = _remove_extra(source, target) if force else 0
        except (CopyFailed, redis.RedisError) as exc:
            _undo(where, source, target, pre, exc)
        except BaseException:  # interrupted (SIGTERM, Ctrl-C): no undo, but say where things are
            log.error(
                "%s: restore interrupted part-way; the target holds part of the snapshot%s",
                where,
                f"; its previous keys are saved in {pre.path}" if pre else "",
            )
            raise
        try:
            evicted = target_memory(target).evicted - before.evicted
        except redis.RedisError:
            evicted = 0
        loaded, restored = fingerprint_redis(source), fingerprint_redis(target)
        if only_expired(loaded, restored):
            loaded, restored = fingerprint_redis(source), fingerprint_redis(target)
    problems = compare(loaded, restored)
    if evicted > 0:
        problems.insert(
            0, f"the target evicted {evicted:,} keys meanwhile (maxmemory-policy {before.policy})"
        )
    if problems and pre is not None:  # the target is changed and not as it should be
        problems.append(f"the target's previous {pre.keys:,} keys are saved in {pre.path}")
    else:
        _discard(pre)
    return RedisOutcome(copied, removed, loaded, problems)


def _undo(
    where: str,
    source: redis.Redis,
    target: redis.Redis,
    pre: PreRestoreCopy | None,
    exc: BaseException,
) -> NoReturn:
    """Put the target back after a part-way failure, and say exactly what it holds now."""
    cause = exc.message if isinstance(exc, CopyFailed) else redis_error(exc)
    written = f"{exc.copied:,}" if isinstance(exc, CopyFailed) else "some"
    log.error("%s: restore failed part-way (%s); putting the previous keys back", where, cause)
    try:
        back = put_back(source, target, pre)
    except (redis.RedisError, SourceError) as undo:
        why = undo.message if isinstance(undo, SourceError) else redis_error(undo)
        kept = (
            f"its previous {pre.keys:,} keys are saved in {pre.path} (DUMP payloads; format "
            "in drtool.stores.redis.guard.py)"
            if pre
            else "it held no keys before"
        )
        raise SourceError(
            f"{where}: the restore failed part-way ({cause}) after writing {written} of the "
            f"snapshot's keys, and putting the previous keys back failed too ({why}). The "
            f"target is CHANGED: it holds part of the snapshot; {kept}. Fix the cause, then "
            "restore again with --force"
        ) from None
    _discard(pre)
    raise SourceError(
        f"{where}: the restore failed part-way ({cause}) after writing {written} of the "
        f"snapshot's keys; the target was put back: the snapshot's keys removed and its "
        f"previous {back:,} keys restored (keys other clients wrote meanwhile are as they left "
        "them)"
    ) from None


def _discard(pre: PreRestoreCopy | None) -> None:
    if pre is not None:
        pre.path.unlink(missing_ok=True)


def only_expired(loaded: RedisFingerprints, restored: RedisFingerprints) -> bool:
    """The target lacks keys, and exactly as many keys with a TTL: they expired meanwhile."""
    dbs = loaded.dbs.keys() | restored.dbs.keys()
    gone = {
        db: (
            (loaded.dbs[db].keys if db in loaded.dbs else 0)
            - (restored.dbs[db].keys if db in restored.dbs else 0),
            (loaded.dbs[db].with_ttl if db in loaded.dbs else 0)
            - (restored.dbs[db].with_ttl if db in restored.dbs else 0),
        )
        for db in dbs
    }
    return any(n > 0 for n, _ in gone.values()) and all(n == t for n, t in gone.values())


def _remove_extra(source: redis.Redis, target: redis.Redis) -> int:
    """Unlink the target's keys that the source does not have; return how many."""
    removed = 0
    for db in keyspace_dbs(target):
        with client_for_db(source, db) as src, client_for_db(target, db) as dst:
            for keys in scan_batches(dst, BATCH):
                check = src.pipeline(transaction=False)
                for key in keys:
                    check.exists(key)
                extra = [k for k, found in zip(keys, check.execute(), strict=True) if not found]
                if extra:
                    removed += int(dst.unlink(*extra))
    return removed


def expired_since_backup(snap: RedisSnapshot, outcome: RedisOutcome) -> int:
    """Keys the snapshot recorded that had expired (TTL) by the time it was loaded."""
    return snap.keys - sum(db.keys for db in outcome.loaded.dbs.values())
