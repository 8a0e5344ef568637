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
Ranges do not tell two clusters of one shape apart, so the given nodes must also all know the
same masters by id. A target of another shape is refused; the key-level restore takes any.

drtool does not stop or start the nodes (they may be systemd units, pods, containers): the
operator stops them, drtool checks that each is down — no lock held on its ``nodes.conf``, its
client port silent, no process working in or holding a file in its data dir (Redis >= 7.2
renames a new nodes.conf over the locked one, so the lock alone misses a running node) — and
refuses otherwise. It then locks every node's ``nodes.conf`` and holds the locks while it
places the RDBs (a node started meanwhile refuses to start), with the single-node offline
restore's file swap (:mod:`drtool.stores.redis.offline`: ``dump.rdb`` always the whole old or
the whole new file, the old one kept as ``dump.rdb.pre_restore_<time>``); all are put back if
any placement fails or the run is interrupted. The operator then starts the nodes.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import redis

from drtool.endpoints import RedisEndpoint
from drtool.errors import IntegrityError, SourceError, UsageError
from drtool.pipeline.meter import measure
from drtool.sources.redis_fingerprint import RedisFingerprints
from drtool.stores.redis.offline import place_file, put_file_back
from drtool.stores.redis.shards import Ranges, check_shards, format_ranges, masters_by_slots
from drtool.stores.stage import Plain
from drtool.stores.streams import file_chunks

log = logging.getLogger(__name__)

NODES_CONF = "nodes.conf"
RDB_NAME = "dump.rdb"


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
    master_of: str  # its master's id when a replica, '' when a master
    replicas: dict[str, str]  # every replica it knows: id -> host:port

    @property
    def rdb(self) -> Path:
        """The RDB the node loads at start (``dir/dbfilename``, Redis's default name)."""
        return self.directory / RDB_NAME

    @property
    def name(self) -> str:
        """How messages name it."""
        return f"node {self.node_id[:12]} ({self.host}:{self.port}, {self.directory})"


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
    replicas = {
        nid: f"{h}:{p}"
        for nid, (h, p, flags, _, _) in nodes.items()
        if "slave" in flags and "noaddr" not in flags
    }
    host, port, flags, master_of, own = nodes[myself]
    if "master" in flags:
        return NodeDir(directory, myself, host, port, True, own, masters, "", replicas)
    theirs = masters.get(master_of)
    if theirs is None:
        raise UsageError(
            f"{conf}: replica of {master_of[:12]}, which owns no slots there; nothing changed"
        )
    return NodeDir(directory, myself, host, port, False, theirs, masters, master_of, replicas)


def check_loads_rdb(node: NodeDir) -> None:
    """Refuse a node that would not load the placed dump.rdb: one with an append-only file
    (Redis loads the AOF instead when appendonly is on) or another RDB (a ``dbfilename``
    other than dump.rdb), as the single-server offline restore refuses an AOF target. The
    RDBs kept by an earlier restore (``*.pre_restore_*``) are not loaded and pass."""
    try:
        names = sorted(p.name for p in node.directory.iterdir())
    except OSError as exc:
        raise UsageError(f"{node.name}: cannot list its data dir ({exc.strerror})") from None
    found = [
        name
        for name in names
        if name == "appendonlydir"
        or name.endswith(".aof")
        or (name.endswith(".rdb") and name != RDB_NAME and ".pre_restore_" not in name)
    ]
    if found:
        raise UsageError(
            f"{node.name}: its data dir holds {', '.join(found)}, so the node may load that "
            f"and not the placed {RDB_NAME} (appendonly on, or another dbfilename); set "
            f"appendonly no and dbfilename {RDB_NAME}, move those files away, or restore "
            "key-level (--redis-mode online); nothing changed"
        )


def check_down(node: NodeDir) -> None:
    """Refuse a node that runs: a lock on its nodes.conf, its port answering, or a process
    working in its data dir.

    The lock alone is not enough: Redis >= 7.2 rewrites nodes.conf to a temp file and renames
    it over, so a running node's lock stays on the old (unlinked) inode and the current file
    is free. A redis-server chdirs into its ``dir`` and keeps the RDB and nodes.conf open, so
    a process whose cwd is the data dir, or with a file open in it (deleted or not), is one.
    """
    running = ""
    try:
        with (node.directory / NODES_CONF).open("rb") as fh:
            if not _try_lock(fh.fileno()):
                running = f"a process holds its {NODES_CONF}"
    except OSError as exc:
        raise UsageError(f"{node.name}: {NODES_CONF}: {exc.strerror}") from None
    if not running:
        running = _port_answers(node) or _process_in(node.directory)
    if running:
        raise UsageError(
            f"{node.name} is running ({running}); an offline restore places RDBs into stopped "
            "nodes only: stop every node of the cluster first (nothing changed)"
        )


def _try_lock(fd: int) -> bool:
    """LOCK_EX|LOCK_NB on ``fd``: True when taken (held until the fd is closed)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return False
        raise
    return True


def _port_answers(node: NodeDir) -> str:
    try:
        with socket.create_connection((node.host, node.port), timeout=2):
            return f"{node.host}:{node.port} accepts connections"
    except OSError:
        return ""


def _process_in(directory: Path) -> str:
    """A process (not this one) whose cwd is ``directory`` or that has a file open in it,
    as /proc shows it ('' when none; processes this user may not inspect are not seen)."""
    root = str(directory.resolve())
    inside = root.rstrip("/") + "/"
    me = os.getpid()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == me:
            continue
        try:
            if os.readlink(proc / "cwd") == root:
                return f"pid {proc.name} ({_comm(proc)}) works in its data dir"
            for fd in (proc / "fd").iterdir():
                target = os.readlink(fd)
                if target.startswith(inside):
                    return f"pid {proc.name} ({_comm(proc)}) has {target} open"
        except OSError:  # gone meanwhile, or not ours to inspect
            continue
    return ""


def _comm(proc: Path) -> str:
    try:
        return (proc / "comm").read_text().strip()
    except OSError:
        return "?"


@contextmanager
def holding_locks(nodes: Sequence[NodeDir]) -> Iterator[None]:
    """Every node's nodes.conf locked (LOCK_EX|LOCK_NB) until the block ends, every node
    checked down: a node started meanwhile finds its nodes.conf locked and refuses to start
    ("already used by a different Redis Cluster node"), so no node runs while its RDB is
    swapped."""
    with ExitStack() as held:
        for node in nodes:
            try:
                fh = held.enter_context((node.directory / NODES_CONF).open("rb"))
                locked = _try_lock(fh.fileno())
            except OSError as exc:
                raise UsageError(f"{node.name}: {NODES_CONF}: {exc.strerror}") from None
            if not locked:
                raise UsageError(
                    f"{node.name} is running (a process holds its {NODES_CONF}); an offline "
                    "restore places RDBs into stopped nodes only: stop every node of the "
                    "cluster first (nothing changed)"
                )
            running = _port_answers(node) or _process_in(node.directory)
            if running:  # (a second open + flock here would collide with our own lock)
                raise UsageError(
                    f"{node.name} is running ({running}); an offline restore places RDBs into "
                    "stopped nodes only: stop every node of the cluster first (nothing changed)"
                )
        yield


def match(snapshot: Sequence[Ranges], nodes: Sequence[NodeDir]) -> list[int]:
    """For each node, the index of the snapshot's shard whose slots it loads.

    Refused, nothing changed, when the cluster's masters (as the nodes' configs know them) do
    not own exactly the snapshot's slot ranges; when the dirs are not all of one cluster
    (every node must know the same masters, by id: two clusters of one shape have the same
    ranges, so a mistyped dir of another cluster would otherwise be overwritten); when two
    dirs are the same node; or when a master or a replica of the cluster has no dir given
    (its shard would keep its old keys; a replica could be promoted with them).
    """
    wanted = sorted(snapshot)
    ids = [n.node_id for n in nodes]
    if len(set(ids)) != len(ids):
        raise UsageError("--redis-node-dir: the same node given twice; nothing changed")
    first = nodes[0]
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
        if node.masters != first.masters:
            theirs = sorted(set(node.masters) ^ set(first.masters))
            raise UsageError(
                f"--redis-node-dir: {node.name} is not of the same cluster as {first.name} "
                f"(their nodes.conf name different masters: {', '.join(i[:12] for i in theirs)})"
                "; give the data dirs of one cluster's nodes only; nothing changed"
            )
    for node in nodes:
        if node.slots not in wanted:
            raise UsageError(
                f"--redis-node-dir: {node.name} owns no shard's slots (a master without "
                "slots?); give the dirs of the masters owning slots and their replicas; "
                "nothing changed"
            )
    given = {n.node_id for n in nodes}
    missing = [
        r for nid, r in sorted(first.masters.items(), key=lambda m: m[1]) if nid not in given
    ]
    if missing:
        raise UsageError(
            f"--redis-node-dir: no master's data dir given for slots "
            f"{'; '.join(format_ranges(r) for r in missing)}; give every master's dir "
            "(its shard would keep its old keys); nothing changed"
        )
    strays = [n for n in nodes if not n.master and n.master_of not in first.masters]
    if strays:
        raise UsageError(
            f"--redis-node-dir: {strays[0].name} replicates {strays[0].master_of[:12]}, not a "
            "master of this cluster; nothing changed"
        )
    known = {nid: where for n in nodes for nid, where in n.replicas.items()}
    absent = sorted(f"{nid[:12]} ({where})" for nid, where in known.items() if nid not in given)
    if absent:
        raise UsageError(
            f"--redis-node-dir: no data dir given for the replicas {', '.join(absent)} (their "
            "nodes.conf lists them: they would keep the old keys and could be promoted with "
            "them); give every node's dir, or remove them from the cluster first; nothing "
            "changed"
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
    with holding_locks(nodes):  # again: a node started since the plan gets no swap
        done: list[tuple[NodeDir, Path | None]] = []
        try:
            for node, shard in zip(nodes, shards, strict=True):
                done.append((node, place_file(rdbs[shard], node.rdb, stamp)))
                if _sha256(node.rdb) != plains[shard].sha256:
                    raise IntegrityError(f"{node.name}: the placed RDB reads back different bytes")
        except BaseException as exc:  # an interrupt too: no node is left half-restored
            left = _put_back(done)
            if not isinstance(exc, OSError | UsageError | IntegrityError):
                raise
            why = exc.message if isinstance(exc, UsageError | IntegrityError) else str(exc)
            if left:
                raise SourceError(
                    f"redis: placing the shards' RDBs failed ({why}), and putting the previous "
                    f"RDBs back failed too: {'; '.join(left)}; fix these by hand before "
                    "starting the nodes (docs/OPERATIONS.md)"
                ) from None
            raise SourceError(
                f"redis: placing the shards' RDBs failed ({why}); every node's previous RDB is back"
            ) from None
    return Placed(len(done), [k for _, k in done if k is not None])


def _put_back(done: Sequence[tuple[NodeDir, Path | None]]) -> list[str]:
    """Every node's previous RDB put back (each attempted, whatever failed before): how
    each one that could not be is left."""
    left = []
    for node, kept in reversed(done):
        try:
            put_file_back(node.rdb, kept)
        except OSError as exc:
            left.append(f"{node.name}: {_left_as(node.rdb, kept)} ({exc.strerror or exc})")
    return left


def _left_as(rdb: Path, kept: Path | None) -> str:
    """How a node whose put-back failed is left, for the operator to fix by hand."""
    old = f", its previous one at {kept}" if kept is not None and kept.exists() else ""
    if not rdb.exists():
        return f"without an RDB{old}"
    if kept is not None and kept.exists() and os.path.samefile(rdb, kept):
        return f"its previous RDB in place ({kept} left beside)"
    return f"the restored RDB still placed{old or ' (it had none before)'}"


def _sha256(path: Path) -> str:
    return measure(file_chunks(path))[1]


def shard_file(directory: Path, index: int, ranges: Ranges) -> Path:
    """Where ``--redis-rdb-dir`` writes a shard's RDB: its index and slots in the name."""
    return directory / f"shard-{index}-slots-{format_ranges(ranges)}.rdb"


def check_writable_dir(directory: Path) -> None:
    """Refuse a ``--redis-rdb-dir`` that is not a directory this process can write a file in
    (checked at plan time: before PostgreSQL or MinIO are restored)."""
    if not directory.is_dir():
        raise UsageError(f"--redis-rdb-dir {directory}: not a directory; nothing changed")
    try:
        with tempfile.TemporaryFile(dir=directory, prefix=".drtool-check-"):
            pass
    except OSError as exc:
        raise UsageError(
            f"--redis-rdb-dir {directory}: cannot write there ({exc.strerror}); nothing changed"
        ) from None


def write_shard_files(
    rdbs: Sequence[Path], plains: Sequence[Plain], layout: Sequence[Ranges], directory: Path
) -> list[Path]:
    """Each shard's RDB into ``directory`` (for nodes that are not on this host: the operator
    copies each to the node owning its slots), read back against the snapshot's sha256; the
    files written are removed again if one fails."""
    check_writable_dir(directory)
    written: list[Path] = []
    try:
        for i, (rdb, plain, ranges) in enumerate(zip(rdbs, plains, layout, strict=True)):
            dest = shard_file(directory, i, ranges)
            place_file(rdb, dest)
            written.append(dest)
            if _sha256(dest) != plain.sha256:
                raise IntegrityError(f"{dest}: the written RDB reads back different bytes")
    except BaseException as exc:  # an interrupt too: no half set of shard files left
        for path in written:
            path.unlink(missing_ok=True)
        if not isinstance(exc, OSError | IntegrityError):
            raise
        why = exc.message if isinstance(exc, IntegrityError) else str(exc)
        raise SourceError(f"redis: writing the shards' RDBs failed ({why}); none left") from None
    return written


@dataclass(frozen=True)
class Started:
    """What the comparison after the nodes were started found."""

    compared: bool  # False: the cluster was not ready in time, nothing compared
    expired: int  # keys with a TTL gone since the staged RDBs were fingerprinted
    problems: list[str]


def compare_started(
    endpoint: RedisEndpoint, loaded: Sequence[tuple[Ranges, RedisFingerprints]], wait_s: float
) -> Started:
    """Wait up to ``wait_s`` for the operator to start the nodes, then compare each master
    with the fingerprints of the shard RDB it loaded (:func:`shards.check_shards`: keys whose
    TTL ran out meanwhile are counted, not failed). Ready means every master says
    ``cluster_state:ok`` and none is loading; a cluster that goes down while being read (a
    node still joining) is read again."""
    where = f"redis cluster {endpoint.host}:{endpoint.port}"
    deadline = time.monotonic() + wait_s
    last = "not answering"
    while time.monotonic() < deadline:
        try:
            masters = masters_by_slots(endpoint, ready=True)
            if masters is not None:
                checks = check_shards(masters, loaded, where)
                problems = [f"{c.name}: {p}" for c in checks for p in c.problems]
                return Started(True, sum(c.expired for c in checks), problems)
            last = "cluster_state not ok, or a master still loading"
        except (redis.RedisError, SourceError) as exc:
            last = exc.message if isinstance(exc, SourceError) else type(exc).__name__
        time.sleep(0.5)
    why = f"{where} not ready within {wait_s:g} s ({last}): the placed RDBs not compared"
    return Started(False, 0, [why])
