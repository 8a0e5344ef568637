"""Redis in a snapshot: the server's RDB (as a replica would receive it) and its fingerprints.

Backup fetches the RDB to the scratch dir, validates and fingerprints it, then uploads it;
restore copies its keys online (:mod:`drtool.stores.redis.restore`) or, given a placer, swaps
the server's data file offline (:mod:`drtool.stores.redis.offline`).

Two other shapes share the path (ADR 0021): a server that refuses replication gives a logical
dump (:mod:`drtool.sources.redis_logical`, consistent per key), and a Redis Cluster one RDB
per master (:mod:`drtool.sources.redis_cluster`). Either is loaded into a private server at
restore time, so everything after that — guard, copy, fingerprints — is the RDB's.
"""

from __future__ import annotations

import logging
import tempfile
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

from drtool.endpoints import StackEndpoints
from drtool.errors import IntegrityError, SourceError, UsageError
from drtool.repository.manifest import ComponentEntry, ObjectEntry
from drtool.sources.redis_client import connect, keyspace_dbs, save_as_rdb
from drtool.sources.redis_cluster import combine, discover, fetch_shards
from drtool.sources.redis_fingerprint import fingerprint_rdb, fingerprint_redis
from drtool.sources.redis_logical import FORMAT as LOGICAL_FORMAT
from drtool.sources.redis_logical import dump_logical, logical_redis
from drtool.sources.redis_rdb import ReplicationRefused, fetch_rdb, validate_rdb
from drtool.stores import checks
from drtool.stores.base import (
    BackedUp,
    BackupContext,
    DrillCheck,
    PlanItem,
    Restored,
    SnapshotSource,
    Target,
)
from drtool.stores.redis import offline
from drtool.stores.redis import restore as redis_restore
from drtool.stores.streams import counting, file_chunks, json_chunks

NAME = "redis"

log = logging.getLogger(__name__)


class RedisStore:
    """Unread counters, recent lists, presence and rate limits."""

    name = NAME

    def backup(self, ctx: BackupContext) -> BackedUp:
        """The RDB via the replication protocol (or a logical dump), checked, fingerprinted,
        uploaded. ``redis.method`` chooses; ``auto`` falls back to the logical dump only when
        the server refuses replication (ADR 0021)."""
        cfg = ctx.cfg
        method = cfg.redis.method
        with tempfile.TemporaryDirectory(dir=ctx.scratch, prefix="drtool-redis-") as tmp:
            if cfg.redis.cluster:
                if method == "logical":
                    raise UsageError(
                        "redis.cluster with redis.method = logical: a logical dump of a "
                        "cluster is not supported yet; use auto or rdb"
                    )
                return self._backup_cluster(ctx, Path(tmp))
            if method != "logical":
                try:
                    return self._backup_rdb(ctx, Path(tmp))
                except ReplicationRefused as exc:
                    if method == "rdb":
                        raise SourceError(
                            f"{exc.message} (redis.method = rdb: no logical fallback; set "
                            "redis.method = auto or logical to take a key-level dump instead)"
                        ) from None
                    log.warning(
                        "redis: replication refused (%s); taking a logical dump instead "
                        "(SCAN + DUMP, consistent per key, not per instant)",
                        exc.message.split(";")[0],
                    )
            return self._backup_logical(ctx, Path(tmp))

    def _backup_rdb(self, ctx: BackupContext, tmp: Path) -> BackedUp:
        cfg, writer = ctx.cfg, ctx.writer
        rdb = tmp / "dump.rdb"
        info = fetch_rdb(cfg.stack().redis, rdb, timeout=cfg.backup.timeout_s)
        validate_rdb(rdb)
        fingerprints = fingerprint_rdb(rdb)
        written = writer.put_snapshot_object(
            NAME, "dump.rdb", counting(file_chunks(rdb), NAME, ctx.progress), kind="redis_rdb"
        )
        if written.plain_sha256 != info.sha256:
            raise IntegrityError(
                "redis: the RDB changed on the scratch disk between fetch and upload"
            )
        prints = {
            "fingerprints": fingerprints.to_dict(),
            "rdb": {"size": info.size, "sha256": info.sha256},
        }
        fp = writer.put_snapshot_object(
            NAME, "fingerprints.json", json_chunks(prints), kind="fingerprints"
        )
        details = {"method": "rdb", "consistency": "instant"}
        entry = ComponentEntry(
            NAME, (written.entry, fp.entry), info.size, 0.0, info.redis_version, details
        )
        return BackedUp(entry)

    def _backup_logical(self, ctx: BackupContext, tmp: Path) -> BackedUp:
        """SCAN + DUMP + PTTL to scratch, loaded into a private server (checks every payload)
        and fingerprinted there exactly as an RDB is, then uploaded."""
        cfg, writer = ctx.cfg, ctx.writer
        dump = tmp / "dump.redislogical"
        info = dump_logical(cfg.stack().redis, dump, timeout=cfg.backup.timeout_s)
        with logical_redis(dump) as loaded:
            fingerprints = fingerprint_redis(loaded)
        written = writer.put_snapshot_object(
            NAME,
            "dump.redislogical",
            counting(file_chunks(dump), NAME, ctx.progress),
            kind="redis_logical",
        )
        if written.plain_sha256 != info.sha256:
            raise IntegrityError(
                "redis: the logical dump changed on the scratch disk between dump and upload"
            )
        prints = {
            "fingerprints": fingerprints.to_dict(),
            "logical": {"size": info.size, "sha256": info.sha256, "records": info.records},
        }
        fp = writer.put_snapshot_object(
            NAME, "fingerprints.json", json_chunks(prints), kind="fingerprints"
        )
        details = {"method": "logical", "consistency": "per-key", "format": LOGICAL_FORMAT}
        entry = ComponentEntry(
            NAME, (written.entry, fp.entry), info.size, 0.0, info.redis_version, details
        )
        return BackedUp(entry)

    def _backup_cluster(self, ctx: BackupContext, tmp: Path) -> BackedUp:
        """Each master's RDB (fetched in parallel, bounded), checked, fingerprinted, uploaded;
        the slot ranges and node ids in the manifest; fingerprints per shard and whole."""
        cfg, writer = ctx.cfg, ctx.writer
        endpoint = cfg.stack().redis
        shards = discover(endpoint)
        fetched = fetch_shards(endpoint, shards, tmp, timeout=cfg.backup.timeout_s)
        objects, recorded, parts = [], [], []
        version = ""
        for i, (shard, (rdb, info)) in enumerate(zip(shards, fetched, strict=True)):
            validate_rdb(rdb)
            prints = fingerprint_rdb(rdb)
            kind = f"{redis_restore.SHARD_KIND}{i}"
            written = writer.put_snapshot_object(
                NAME, f"shard-{i}.rdb", counting(file_chunks(rdb), NAME, ctx.progress), kind=kind
            )
            if written.plain_sha256 != info.sha256:
                raise IntegrityError(
                    f"redis: shard {i}'s RDB changed on the scratch disk between fetch and upload"
                )
            rdb.unlink()
            objects.append(written.entry)
            parts.append(prints)
            version = version or info.redis_version
            recorded.append(
                {
                    **shard.to_dict(),
                    "kind": kind,
                    "rdb": {"size": info.size, "sha256": info.sha256},
                    "fingerprints": prints.to_dict(),
                }
            )
        whole = {"fingerprints": combine(parts).to_dict(), "shards": recorded}
        fp = writer.put_snapshot_object(
            NAME, "fingerprints.json", json_chunks(whole), kind="fingerprints"
        )
        details = {
            "method": "rdb",
            "topology": "cluster",
            "consistency": "per-shard",
            "shards": [{"node_id": s.node_id, "slots": [list(r) for r in s.slots]} for s in shards],
        }
        size = sum(info.size for _, info in fetched)
        entry = ComponentEntry(NAME, (*objects, fp.entry), size, 0.0, version, details)
        return BackedUp(entry)

    def load(self, source: SnapshotSource, entry: ComponentEntry, target: Target) -> RedisRestoring:
        """Read the fingerprints; find the RDB."""
        snap = redis_restore.load(source.repo, source.manifest, entry, source.identities)
        return RedisRestoring(source, snap)

    def counts(self, endpoints: StackEndpoints) -> list[list[object]]:
        """Keys per db."""
        with closing(connect(endpoints.redis)) as client:
            dbs = keyspace_dbs(client)
        return [[NAME, f"keys in db{db}", keys] for db, keys in sorted(dbs.items())]

    def drill_checks(self) -> tuple[DrillCheck, ...]:
        """Counters and recent lists name users, rooms and messages that exist."""
        return (
            DrillCheck(
                frozenset({"postgres", NAME}),
                lambda eps, _rooms: checks.redis_points_to_existing_rows(eps),
            ),
        )


@dataclass
class RedisRestoring:
    """One Redis restore, online (keys copied) or offline (``target.placer`` set)."""

    source: SnapshotSource
    snap: redis_restore.RedisSnapshot
    data: list[Path] | None = None

    def reads(self) -> list[ObjectEntry]:
        """The RDB, logical dump or shard RDBs."""
        return list(self.snap.data)

    def plan(self, target: Target) -> list[PlanItem]:
        """The target server, the keys it holds, and how they are replaced."""
        r = target.endpoints.redis
        held = redis_restore.target_keys(r)
        action = "copy keys (RESTORE REPLACE), remove keys not in the snapshot" if held else ""
        if target.placer is not None:
            action = f"stop {target.placer.where}, replace its RDB (the current one kept), start it"
        notes = (self.snap.consistency,) if self.snap.method != "rdb" else ()
        return [
            PlanItem(
                NAME,
                f"{self.snap.keys:,} keys",
                f"{r.host}:{r.port}",
                self.snap.size,
                f"{held:,} keys",
                held > 0,
                action or "copy keys (DUMP/RESTORE with TTLs)",
                notes,
            )
        ]

    def staged_bytes(self, workers: int) -> int:
        """The RDB(s) or dump (twice when placed offline from a dump or shards: a new RDB)."""
        return self.snap.size * (2 if self.snap.method != "rdb" else 1)

    def stage(self, target: Target, work: Path) -> None:
        """Decrypt the RDB(s) or logical dump, checked against the snapshot's record."""
        s = self.source
        self.data = redis_restore.stage_data(s.repo, s.manifest, self.snap, s.identities, work)

    def restore(self, target: Target, work: Path, stamp: str) -> Restored:
        """Copy the keys (or swap the data file), then compare fingerprints with the snapshot's."""
        assert self.data is not None  # stage came first
        endpoint = target.endpoints.redis
        if target.placer is None:
            r = redis_restore.restore(
                self.data,
                endpoint,
                force=target.force,
                keep_dir=target.keep_dir or work.parent,
                stamp=stamp,
                method=self.snap.method,
            )
            done = f"{r.copied:,} keys copied, {r.removed:,} removed"
        else:
            rdb = self.data[0]
            if self.snap.method != "rdb":  # an offline restore places one RDB
                with redis_restore.holding(self.data, self.snap.method) as held:
                    rdb = save_as_rdb(held, work / "placed.rdb")
            r = offline.restore(
                rdb, endpoint, target.placer, force=target.force, stamp=stamp, workdir=work
            )
            done = f"RDB of {r.copied:,} keys placed, {r.removed:,} keys replaced"
        expired = redis_restore.expired_since_backup(self.snap, r)
        return Restored(r.problems, f"{done}, {expired:,} expired (TTL); {self.snap.consistency}")
