"""Redis Cluster restore, offline: each shard's RDB into the data dir of the stopped node that
owns the same slots (issue 16.1; ADR 0021, cluster addendum).

The key-level restore (:mod:`drtool.stores.redis.restore`) copies into a running cluster of
any shape, but clients see a mix while it runs and it rewrites every key through the network.
When the target has the snapshot's shape, the exact way is the one a single server gets from
the offline restore: each master loads its shard's RDB at start. Node ids differ between
clusters (a rebuilt cluster gets new ones), so nodes are matched to shards by their slot
ranges, read from each node's cluster config file (``nodes.conf``, in its data dir beside the
RDB): a node that is a master owning exactly a shard's slots gets that shard; a replica gets
the RDB of its master's shard (it full-syncs anyway, but cannot be promoted with old data).
A target of another shape is refused; the key-level restore takes any shape.

drtool does not stop or start the nodes (they may be systemd units, pods, containers): the
operator stops them, drtool checks that each is down — the ``nodes.conf`` lock a running node
holds (``flock``), and its client port — and refuses otherwise, places the RDBs with the
single-node offline restore's file swap (:func:`drtool.stores.redis.offline.place_file`: the
current RDB kept as ``dump.rdb.pre_restore_<time>``, the new one written beside and renamed
over it), and all are put back if any placement fails. The operator then starts the nodes.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import redis

from drtool.endpoints import RedisEndpoint
from drtool.errors import IntegrityError, SourceError, UsageError
from drtool.sources.redis_client import connect
from drtool.sources.redis_cluster import discover, node_endpoint
from drtool.sources.redis_fingerprint import RedisFingerprints, compare, fingerprint_redis
from drtool.stores.redis.offline import keep_aside, place_file, put_file_back
from drtool.stores.stage import Plain

log = logging.getLogger(__name__)

NODES_CONF = "nodes.conf"
RDB_NAME = "dump.rdb"
Ranges = tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class NodeDir:
    """One stopped node as its ``nodes.conf`` describes it."""

    directory: Path
    node_id: str
    host: str
    port: int
    master: bool
    slots: Ranges  # its own when a master, its master's when a replica
    masters: dict[str, Ranges]  # every master of the cluster as this node last knew it

    @property
    def rdb(self) -> Path:
        """The RDB the node loads at start (``dir/dbfilename``, Redis's default name)."""
        return self.directory / RDB_NAME

    @property
    def name(self) -> str:
        """How messages name it."""
        return f"node {self.node_id[:12]} ({self.host}:{self.port}, {self.directory})"


def format_ranges(ranges: Ranges) -> str:
    """``0-5460,5461-10922``."""
    return ",".join(f"{a}-{b}" for a, b in ranges)


def _parse_slots(fields: Sequence[str], where: str) -> Ranges:
    ranges = []
    for field in fields:
        if field.startswith("["):
            raise UsageError(
                f"{where}: a slot is migrating ({field}); finish or cancel the resharding "
                "first (redis-cli --cluster fix); nothing changed"
            )
        start, _, end = field.partition("-")
        ranges.append((int(start), int(end or start)))
    return tuple(sorted(ranges))


def read_node_dir(directory: Path) -> NodeDir:
    """The node whose data dir is ``directory``: its id, address, role and slots.

    A dir without a readable ``nodes.conf`` is refused (it is not a cluster node's data dir,
    or not this host's).
    """
    conf = directory / NODES_CONF
    try:
        lines = conf.read_text().splitlines()
    except OSError as exc:
        raise UsageError(
            f"--redis-node-dir {directory}: no readable {NODES_CONF} ({exc.strerror}); give "
            "each node's data dir, where its cluster-config-file and dump.rdb are"
        ) from None
    nodes: dict[str, tuple[str, int, set[str], str, Ranges]] = {}
    myself = ""
    for line in lines:
        parts = line.split()
        if len(parts) < 8 or parts[0] == "vars":
            continue
        node_id, address, flags, master_of = parts[0], parts[1], set(parts[2].split(",")), parts[3]
        host, _, port_text = address.split(",")[0].split("@")[0].rpartition(":")
        try:
            slots = _parse_slots(parts[8:], str(conf))
            nodes[node_id] = (host, int(port_text), flags, master_of, slots)
        except ValueError:
            raise UsageError(f"{conf}: unreadable line for node {node_id[:12]}") from None
        if "myself" in flags:
            myself = node_id
    if not myself:
        raise UsageError(f"{conf}: no line for the node itself (myself); not a cluster config")
    masters = {
        nid: slots
        for nid, (_, _, flags, _, slots) in nodes.items()
        if "master" in flags and slots and "noaddr" not in flags
    }
    host, port, flags, master_of, own = nodes[myself]
    if "master" in flags:
        return NodeDir(directory, myself, host, port, True, own, masters)
    theirs = masters.get(master_of)
    if theirs is None:
        raise UsageError(
            f"{conf}: replica of {master_of[:12]}, which owns no slots there; nothing changed"
        )
    return NodeDir(directory, myself, host, port, False, theirs, masters)


def check_down(node: NodeDir) -> None:
    """Refuse a node that runs: it holds a lock on its nodes.conf, or its port answers."""
    running = ""
    try:
        with (node.directory / NODES_CONF).open("rb") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
    except OSError as exc:
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise UsageError(f"{node.name}: {NODES_CONF}: {exc.strerror}") from None
        running = f"a process holds its {NODES_CONF}"
    if not running:
        try:
            with socket.create_connection((node.host, node.port), timeout=2):
                running = f"{node.host}:{node.port} accepts connections"
        except OSError:
            pass
    if running:
        raise UsageError(
            f"{node.name} is running ({running}); an offline restore places RDBs into stopped "
            "nodes only: stop every node of the cluster first (nothing changed)"
        )


def match(snapshot: Sequence[Ranges], nodes: Sequence[NodeDir]) -> list[int]:
    """For each node, the index of the snapshot's shard whose slots it loads.

    Refused, nothing changed, when the cluster's masters (as the nodes' configs know them) do
    not own exactly the snapshot's slot ranges, when two dirs are the same node, or when a
    master of the cluster has no dir given (its shard would keep its old keys).
    """
    wanted = sorted(snapshot)
    ids = [n.node_id for n in nodes]
    if len(set(ids)) != len(ids):
        raise UsageError("--redis-node-dir: the same node given twice; nothing changed")
    for node in nodes:
        shape = sorted(node.masters.values())
        if shape != wanted:
            raise UsageError(
                f"redis: the target cluster's shape differs from the snapshot's (snapshot: "
                f"{len(wanted)} masters {'; '.join(format_ranges(r) for r in wanted)}; "
                f"{node.name} knows {len(shape)} masters "
                f"{'; '.join(format_ranges(r) for r in shape)}): an offline RDB-per-node "
                "restore needs the same slot ranges; restore key-level into the running "
                "cluster instead (--redis-mode online); nothing changed"
            )
    for node in nodes:
        if node.slots not in wanted:
            raise UsageError(
                f"--redis-node-dir: {node.name} owns no shard's slots (a master without "
                "slots?); give the dirs of the masters owning slots and their replicas; "
                "nothing changed"
            )
    given = {n.slots for n in nodes if n.master}
    missing = [r for r in wanted if r not in given]
    if missing:
        raise UsageError(
            f"--redis-node-dir: no master's data dir given for slots "
            f"{'; '.join(format_ranges(r) for r in missing)}; give every master's dir "
            "(its shard would keep its old keys); nothing changed"
        )
    return [wanted.index(n.slots) for n in nodes]


@dataclass(frozen=True)
class Placed:
    """Where each RDB went, and the RDBs the nodes had (kept beside)."""

    nodes: int
    kept: list[Path]


def place_all(
    rdbs: Sequence[Path], plains: Sequence[Plain], nodes: Sequence[NodeDir], shards: list[int],
    stamp: str,
) -> Placed:  # fmt: skip
    """Each node's shard RDB into its data dir; all put back if one fails.

    Each placed file is read back and must have the snapshot's sha256 (a short write on the
    nodes' disk must not pass as a restore).
    """
    done: list[tuple[NodeDir, Path | None]] = []
    try:
        for node, shard in zip(nodes, shards, strict=True):
            check_down(node)  # again: a node started since the plan must not get a file swap
            kept = keep_aside(node.rdb, stamp)
            done.append((node, kept))
            place_file(rdbs[shard], node.rdb)
            if _sha256(node.rdb) != plains[shard].sha256:
                raise IntegrityError(f"{node.name}: the placed RDB reads back different bytes")
    except (OSError, UsageError, IntegrityError) as exc:
        for node, kept in reversed(done):
            put_file_back(node.rdb, kept)
        why = exc.message if isinstance(exc, UsageError | IntegrityError) else str(exc)
        raise SourceError(
            f"redis: placing the shards' RDBs failed ({why}); every node's previous RDB is back"
        ) from None
    return Placed(len(done), [k for _, k in done if k is not None])


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def shard_file(directory: Path, index: int, ranges: Ranges) -> Path:
    """Where ``--redis-rdb-dir`` writes a shard's RDB: its index and slots in the name."""
    return directory / f"shard-{index}-slots-{format_ranges(ranges)}.rdb"


def write_shard_files(
    rdbs: Sequence[Path], plains: Sequence[Plain], layout: Sequence[Ranges], directory: Path
) -> list[Path]:
    """Each shard's RDB into ``directory`` (for nodes that are not on this host: the operator
    copies each to the node owning its slots), read back against the snapshot's sha256; the
    files written are removed again if one fails."""
    if not directory.is_dir():
        raise UsageError(f"--redis-rdb-dir {directory}: not a directory; nothing changed")
    written: list[Path] = []
    try:
        for i, (rdb, plain, ranges) in enumerate(zip(rdbs, plains, layout, strict=True)):
            dest = shard_file(directory, i, ranges)
            place_file(rdb, dest)
            written.append(dest)
            if _sha256(dest) != plain.sha256:
                raise IntegrityError(f"{dest}: the written RDB reads back different bytes")
    except (OSError, IntegrityError) as exc:
        for path in written:
            path.unlink(missing_ok=True)
        why = exc.message if isinstance(exc, IntegrityError) else str(exc)
        raise SourceError(f"redis: writing the shards' RDBs failed ({why}); none left") from None
    return written


def compare_started(
    endpoint: RedisEndpoint, loaded: Sequence[tuple[Ranges, RedisFingerprints]], wait_s: float
) -> list[str]:
    """Wait up to ``wait_s`` for the operator to start the nodes, then compare each master
    with the fingerprints of the shard RDB it loaded: the differences (or why none could be
    taken). Ready means every master says ``cluster_state:ok`` and none is loading; a
    cluster that goes down while being read (a node still joining) is read again."""
    where = f"redis cluster {endpoint.host}:{endpoint.port}"
    deadline = time.monotonic() + wait_s
    last = "not answering"
    while time.monotonic() < deadline:
        try:
            masters = _ready_masters(endpoint)
            if masters is not None:
                return _differences(where, masters, loaded)
            last = "cluster_state not ok, or a master still loading"
        except (redis.RedisError, SourceError) as exc:
            last = exc.message if isinstance(exc, SourceError) else type(exc).__name__
        time.sleep(0.5)
    return [f"{where} not ready within {wait_s:g} s ({last}): the placed RDBs not compared"]


def _differences(
    where: str,
    masters: dict[Ranges, RedisEndpoint],
    loaded: Sequence[tuple[Ranges, RedisFingerprints]],
) -> list[str]:
    problems = []
    for i, (ranges, prints) in enumerate(loaded):
        master = masters.get(tuple(sorted(ranges)))
        name = f"shard {i} (slots {format_ranges(ranges)})"
        if master is None:
            problems.append(f"{name}: no master of {where} owns exactly these slots now")
            continue
        problems += [f"{name}: {p}" for p in compare(prints, fingerprint_redis(master))]
    return problems


def _ready_masters(endpoint: RedisEndpoint) -> dict[Ranges, RedisEndpoint] | None:
    masters = {}
    for shard in discover(endpoint, timeout=5):
        node = node_endpoint(endpoint, shard)
        with connect(node, timeout=5, decode=True) as client:
            if client.cluster("info")["cluster_state"] != "ok":
                return None
            if int(client.info("persistence")["loading"]):
                return None
        masters[tuple(sorted(shard.slots))] = node
    return masters
