"""A local Redis Cluster: N ``redis-server --cluster-enabled yes`` masters on loopback ports.

Used where a cluster must exist on one machine: a drill restoring a cluster snapshot (its
scratch cluster has the snapshot's slot ranges, so each shard lands on one master and can be
compared with its own fingerprints), the tests, the benchmark. The slots are assigned with
``CLUSTER ADDSLOTSRANGE`` and the nodes joined with ``CLUSTER MEET``, so any ranges work
(``redis-cli --cluster create`` only splits evenly). Each node keeps its ``nodes.conf`` in its
data dir beside ``dump.rdb``, the layout the offline cluster restore expects
(:mod:`drtool.stores.redis.cluster_offline`).
"""

from __future__ import annotations

import json
import secrets
import signal
import time
from collections.abc import Sequence
from pathlib import Path

import redis

from drtool.endpoints import RedisEndpoint
from drtool.errors import SourceError
from drtool.runtime.procs import HOST, Daemon, free_port_block, write_secret
from drtool.runtime.redisserver import RedisServer
from drtool.runtime.server import Launch

BUS_OFFSET = 10000
STATE_FILE = "cluster.json"
Ranges = Sequence[tuple[int, int]]


class ClusterNodeServer(RedisServer):
    """A redis-server in cluster mode; its bus port is its port + 10000."""

    what = "Redis Cluster node"

    @property
    def ports(self) -> tuple[int, ...]:
        """The client port and the cluster bus port."""
        return (self.port, self.port + BUS_OFFSET)

    @property
    def nodes_conf(self) -> Path:
        """The cluster config file (node id, slots, peers), in the data dir."""
        return self.rdb_path.parent / "nodes.conf"

    def _prepare(self) -> Launch:
        launch = super()._prepare()
        conf = self.base_dir / "redis.conf"
        extra = [
            "cluster-enabled yes",
            "cluster-config-file nodes.conf",  # relative to dir: beside dump.rdb
            "cluster-node-timeout 5000",
            f'masterauth "{self.password}"',
            "",
        ]
        write_secret(conf, conf.read_text() + "\n".join(extra))
        return launch


class LocalCluster:
    """Masters on free loopback ports, one per slot-range set, sharing one password."""

    def __init__(self, base_dir: Path, nodes: list[ClusterNodeServer]) -> None:
        self.base_dir = base_dir
        self.nodes = nodes

    @classmethod
    def up(
        cls,
        base_dir: Path,
        shards: Sequence[Ranges],
        *,
        password: str | None = None,
        timeout: float = 60.0,
    ) -> LocalCluster:
        """Start one master per entry of ``shards`` owning those ranges; wait for state ok.

        On any failure the nodes started are stopped before the error propagates.
        """
        password = password or secrets.token_urlsafe(24)
        taken: set[int] = set()
        nodes: list[ClusterNodeServer] = []
        cluster = cls(base_dir, nodes)
        try:
            for i, _ in enumerate(shards):
                port = free_port_block((0, BUS_OFFSET), taken)
                taken |= {port, port + BUS_OFFSET}
                node = ClusterNodeServer(base_dir / f"node{i}", port=port, password=password)
                nodes.append(node)
                node.start(timeout=timeout)
                cluster.record()
            for epoch, (node, ranges) in enumerate(zip(nodes, shards, strict=True), start=1):
                with cls._client(node) as client:
                    for start, end in ranges:
                        client.execute_command("CLUSTER", "ADDSLOTSRANGE", start, end)
                    client.execute_command("CLUSTER", "SET-CONFIG-EPOCH", epoch)
                    for other in nodes[: epoch - 1]:
                        client.execute_command("CLUSTER", "MEET", HOST, other.port)
            cluster.wait_ok(timeout)
        except redis.RedisError as exc:
            cluster.stop()
            raise SourceError(f"local Redis Cluster: {exc}") from None
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def record(self) -> None:
        """The nodes' pids in ``base_dir/cluster.json`` (no secrets), so that another process
        can stop them (:func:`stop_recorded`, e.g. ``drtool drill cleanup`` after a kill -9)."""
        base_dir = self.base_dir
        state = [node.daemon.to_state() for node in self.nodes if node.daemon is not None]
        tmp = base_dir / f".{STATE_FILE}.tmp"
        tmp.write_text(json.dumps(state))
        tmp.replace(base_dir / STATE_FILE)  # a reader sees the old list or the new one

    def add_replica(self, master: int, timeout: float = 60.0) -> ClusterNodeServer:
        """Start a node that replicates master ``master`` (index in :attr:`nodes`); it is
        appended to :attr:`nodes` and its sync waited for."""
        taken = {p for node in self.nodes for p in node.ports}
        port = free_port_block((0, BUS_OFFSET), taken)
        first = self.nodes[0]
        directory = self.base_dir / f"node{len(self.nodes)}"
        node = ClusterNodeServer(directory, port=port, password=first.password)
        self.nodes.append(node)
        node.start(timeout=timeout)
        self.record()
        try:
            with self._client(self.nodes[master]) as leader:
                master_id = leader.execute_command("CLUSTER", "MYID").decode()
            with self._client(node) as client:
                client.execute_command("CLUSTER", "MEET", HOST, first.port)
                deadline = time.monotonic() + timeout
                while True:  # REPLICATE needs the master known first
                    try:
                        client.execute_command("CLUSTER", "REPLICATE", master_id)
                        break
                    except redis.ResponseError:
                        if time.monotonic() > deadline:
                            raise
                        time.sleep(0.1)
                while client.info("replication").get("master_link_status") != "up":
                    if time.monotonic() > deadline:
                        raise SourceError(f"local Redis Cluster: replica {port} never synced")
                    time.sleep(0.1)
            self.wait_ok(timeout)
        except redis.RedisError as exc:
            raise SourceError(f"local Redis Cluster: adding a replica: {exc}") from None
        return node

    @staticmethod
    def _client(node: ClusterNodeServer) -> redis.Redis:
        return redis.Redis(host=HOST, port=node.port, password=node.password, socket_timeout=10)

    @property
    def endpoint(self) -> RedisEndpoint:
        """The first node: a cluster client finds the others from it."""
        return self.nodes[0].endpoint

    def wait_ok(self, timeout: float = 60.0) -> None:
        """Until every node says ``cluster_state:ok`` and knows every master."""
        deadline = time.monotonic() + timeout
        for node in self.nodes:
            with self._client(node) as client:
                while True:
                    try:
                        info = client.cluster("info")
                        if info["cluster_state"] == "ok" and int(
                            info["cluster_known_nodes"]
                        ) == len(self.nodes):
                            break
                    except redis.ConnectionError:
                        pass  # still loading its RDB
                    if time.monotonic() > deadline:
                        raise SourceError(
                            f"local Redis Cluster: node {HOST}:{node.port} not ok after "
                            f"{timeout:g} s"
                        )
                    time.sleep(0.1)

    def stop(self) -> None:
        """Stop every node (no save points: nothing is written but nodes.conf)."""
        for node in self.nodes:
            node.stop()

    def start(self, timeout: float = 60.0) -> None:
        """Start the stopped nodes again (each loads its dump.rdb), then wait for state ok."""
        for node in self.nodes:
            node.start(timeout=timeout)
        self.wait_ok(timeout)


def stop_recorded(base_dir: Path) -> int:
    """Stop the nodes a :class:`LocalCluster` recorded in ``base_dir`` (a reused pid is left
    alone); how many were recorded. For a cluster whose owner died before stopping it."""
    try:
        state = json.loads((base_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return 0
    for entry in state:
        Daemon.from_state(entry).stop(signal.SIGTERM, 15.0, "Redis Cluster node")
    return len(state)
