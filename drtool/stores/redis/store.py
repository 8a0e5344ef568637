"""Redis in a snapshot: the server's RDB (as a replica would receive it) and its fingerprints.

Backup fetches the RDB to the scratch dir, validates and fingerprints it, then uploads it;
restore copies its keys online (:mod:`drtool.stores.redis.restore`) or, given a placer, swaps
the server's data file offline (:mod:`drtool.stores.redis.offline`); a cluster snapshot goes
offline an RDB per stopped node of a cluster of its shape
(:mod:`drtool.stores.redis.cluster_offline`).

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
from drtool.sources.redis_client import connect, ephemeral_redis, keyspace_dbs, save_as_rdb
from drtool.sources.redis_cluster import combine, discover, fetch_shards
from drtool.sources.redis_fingerprint import (
    RedisFingerprints,
    compare,
    fingerprint_rdb,
    fingerprint_redis,
)
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
from drtool.stores.redis import cluster_offline, offline
from drtool.stores.redis import restore as redis_restore
from drtool.stores.redis.cluster_offline import NodeDir
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
                lambda eps, _rooms: checks.redis_points_to_existing_rows(eps, redis_older=True),
            ),
        )


@dataclass
class RedisRestoring:
    """One Redis restore, online (keys copied) or offline (``target.placer`` set)."""

    source: SnapshotSource
    snap: redis_restore.RedisSnapshot
    data: list[Path] | None = None
    nodes: tuple[list[NodeDir], list[int]] | None = None  # offline into a cluster's node dirs

    def reads(self) -> list[ObjectEntry]:
        """The RDB, logical dump or shard RDBs."""
        return list(self.snap.data)

    def _require_cluster(self, option: str) -> None:
        if self.snap.method != "cluster":
            raise UsageError(
                f"{option}: snapshot {self.source.manifest.snapshot_id} holds one Redis "
                "server, not a cluster; restore it with --redis-mode offline into a local "
                "stack or container, or online; nothing changed"
            )

    def _node_dirs(self, target: Target) -> tuple[list[NodeDir], list[int]]:
        """The stopped nodes of an offline cluster restore, each matched to its shard."""
        if self.nodes is None:
            self._require_cluster("--redis-node-dir")
            nodes = [cluster_offline.read_node_dir(d) for d in target.redis_node_dirs]
            for node in nodes:
                cluster_offline.check_down(node)
                cluster_offline.check_loads_rdb(node)
            shards = cluster_offline.match([r for r, _ in self.snap.shards], nodes)
            self.nodes = (nodes, shards)
        return self.nodes

    def _plan_nodes(self, target: Target) -> PlanItem:
        nodes, _ = self._node_dirs(target)
        had = sum(1 for n in nodes if n.rdb.exists())
        masters = sum(1 for n in nodes if n.master)
        return PlanItem(
            NAME,
            f"{self.snap.keys:,} keys in {len(self.snap.shards)} shards",
            f"{masters} masters + {len(nodes) - masters} replicas, stopped",
            self.snap.size,
            f"{had} of {len(nodes)} nodes have an RDB",
            had > 0,
            "place each shard's RDB in the data dir of the node owning its slots (the current "
            "one kept as dump.rdb.pre_restore_<time>); start the nodes afterwards",
            (self.snap.consistency,),
        )

    def _plan_files(self, directory: Path) -> PlanItem:
        self._require_cluster("--redis-rdb-dir")
        cluster_offline.check_writable_dir(directory)  # before any store is restored
        files = [
            cluster_offline.shard_file(directory, i, ranges)
            for i, (ranges, _) in enumerate(self.snap.shards)
        ]
        there = sum(1 for f in files if f.exists())
        return PlanItem(
            NAME,
            f"{self.snap.keys:,} keys in {len(files)} shards",
            str(directory),
            self.snap.size,
            f"{there} of the {len(files)} files",
            there > 0,
            "write each shard's RDB as shard-<i>-slots-<ranges>.rdb, to be placed by you "
            "into the stopped node owning those slots",
            (self.snap.consistency,),
        )

    def plan(self, target: Target) -> list[PlanItem]:
        """The target server, the keys it holds, and how they are replaced."""
        if target.redis_node_dirs:
            return [self._plan_nodes(target)]
        if target.redis_rdb_dir is not None:
            return [self._plan_files(target.redis_rdb_dir)]
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
        self.data = redis_restore.stage_data(
            s.repo, s.manifest, self.snap, s.identities, work, target.cancel
        )

    def restore(self, target: Target, work: Path, stamp: str) -> Restored:
        """Copy the keys (or swap the data file), then compare fingerprints with the snapshot's."""
        assert self.data is not None  # stage came first
        endpoint = target.endpoints.redis
        if target.redis_node_dirs:
            return self._restore_nodes(target, stamp)
        if target.redis_rdb_dir is not None:
            return self._restore_files(target.redis_rdb_dir)
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
            placer = target.placer
            keep = target.keep_dir or work.parent
            r = offline.restore(
                rdb, endpoint, placer, force=target.force, stamp=stamp, keep_dir=keep
            )
            done = f"RDB of {r.copied:,} keys placed, {r.removed:,} keys replaced"
            if placer.kept is not None:
                done += f" (the previous data kept as {placer.kept})"
        expired = redis_restore.expired_since_backup(self.snap, r)
        return Restored(r.problems, f"{done}, {expired:,} expired (TTL); {self.snap.consistency}")

    def _check_shards(self) -> tuple[list[str], int, list[RedisFingerprints]]:
        """Each staged shard RDB loaded in a private server and compared with its recorded
        fingerprints: (differences, keys whose TTL ran out since the backup, the loaded
        fingerprints)."""
        assert self.data is not None  # stage came first
        problems: list[str] = []
        expired = 0
        prints = []
        pairs = zip(self.data, self.snap.shards, strict=True)
        for i, (rdb, (ranges, recorded)) in enumerate(pairs):
            with ephemeral_redis(rdb) as server:
                loaded = fingerprint_redis(server)
            prints.append(loaded)
            expired += sum(d.keys for d in recorded.dbs.values())
            expired -= sum(d.keys for d in loaded.dbs.values())
            if not redis_restore.only_expired(recorded, loaded):
                where = f"shard {i} (slots {cluster_offline.format_ranges(ranges)})"
                problems += [f"{where}: {p}" for p in compare(recorded, loaded)]
        return problems, expired, prints

    def _restore_nodes(self, target: Target, stamp: str) -> Restored:
        """Each shard's staged RDB checked, then placed into its stopped node(s)
        (cluster_offline.py)."""
        assert self.data is not None
        nodes, shards = self._node_dirs(target)
        problems, expired, loaded = self._check_shards()
        if problems:
            return Restored(problems, "nothing placed: a shard's RDB differs from its record")
        placed = cluster_offline.place_all(self.data, self.snap.plain, nodes, shards, stamp)
        done = (
            f"RDBs of {len(self.snap.shards)} shards, each loaded and equal to its record, "
            f"placed into {placed.nodes} stopped nodes ({len(placed.kept)} previous RDBs kept "
            f"as dump.rdb.pre_restore_{stamp}), {expired:,} expired (TTL)"
        )
        if not target.redis_wait_s:
            return Restored(
                [],
                f"{done}; start the nodes now (not started nor compared by this run: "
                f"docs/OPERATIONS.md); {self.snap.consistency}",
            )
        r = target.endpoints.redis
        log.warning(
            "redis: the RDBs are placed; start the nodes now (waiting up to %g s for the "
            "cluster at %s:%s to compare it)",
            target.redis_wait_s,
            r.host,
            r.port,
        )
        pairs = zip(self.snap.shards, loaded, strict=True)
        layout = [(ranges, prints) for (ranges, _), prints in pairs]
        started = cluster_offline.compare_started(r, layout, target.redis_wait_s)
        if not started.compared:
            checked = "not compared (the cluster was not ready in time)"
        else:
            checked = (
                f"started, each master's fingerprints compared with its shard's, "
                f"{started.expired:,} more expired (TTL) since"
            )
        return Restored(started.problems, f"{done}; {checked}; {self.snap.consistency}")

    def _restore_files(self, directory: Path) -> Restored:
        """Each shard's staged RDB checked, then written into ``directory`` for the operator."""
        assert self.data is not None
        problems, expired, _ = self._check_shards()
        if problems:
            return Restored(problems, "nothing written: a shard's RDB differs from its record")
        layout = [ranges for ranges, _ in self.snap.shards]
        files = cluster_offline.write_shard_files(self.data, self.snap.plain, layout, directory)
        return Restored(
            [],
            f"RDBs of {len(files)} shards, each loaded and equal to its record, written to "
            f"{directory} ({', '.join(f.name for f in files)}), {expired:,} expired (TTL); "
            "copy each as dump.rdb into the stopped node owning its slots, then start them "
            f"(docs/OPERATIONS.md); {self.snap.consistency}",
        )
