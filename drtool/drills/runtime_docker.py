"""The ``docker`` drill runtime: a scratch stack of containers on an internal network.

One drill gets one ``internal=True`` bridge network and three containers on it (PostgreSQL,
Redis, MinIO), all labelled ``drtool.drill=<drill id>``, with the definition's memory limits
(sized from the snapshot when unset: :mod:`drtool.drills.sizing`; the production defaults when
started without a snapshot) and their data in the containers' own writable layers,
removed with them (``data = "tmpfs"`` keeps it in memory instead: faster, but tmpfs pages
count against the memory limit, so a production-sized limit cannot hold a large database).
Nothing is published: drtool reaches the containers at their
addresses on that network (the host routes to an internal network's bridge; see ADR 0004).
Publishing a port would attach the container to the default bridge too, which has a route
out. When drtool itself runs in a container of the same engine, that container joins the
network for the drill's duration.

Teardown removes by label, not by remembered ids, so that it also catches a container whose
creation was interrupted after the engine made it. It runs on success, failure, exception
and Ctrl-C (the CLI turns SIGTERM into Ctrl-C), with interrupts held until it is done.
A drill killed outright (SIGKILL) leaves labelled containers: ``drtool drill cleanup``.
Every container and the network also carry ``drtool.drill.owner.*`` labels naming the drill's
process (host, boot id, container, pid, pid start time; see :mod:`drtool.liveness`), so that
cleanup removes only what belongs to dead drills, never a running drill's stack.

Credentials are generated per drill and reach the containers as environment variables,
which is how the official images take them (``docker inspect`` shows them to whoever can
drive the engine, who could read the tmpfs anyway). They never appear on drtool's argv or in
its logs. Per image:

- PostgreSQL: ``POSTGRES_USER`` (``postgres``), ``POSTGRES_PASSWORD``, ``POSTGRES_DB``
  (``cotalk``), ``PGDATA`` pinned to the tmpfs, leading ``-c`` options for a fast
  throw-away server, stop signal SIGINT (PostgreSQL's fast shutdown).
- Redis: the official image has no password variable, the test image
  (``drtool-test/redis``) reads ``REDIS_PASSWORD``. One convention serves both without
  sniffing image names: ``REDIS_PASSWORD`` is set and the command is
  ``sh -c 'exec redis-server --requirepass "$REDIS_PASSWORD" …'``, run as the image's
  ``redis`` user. The container's config (``docker inspect``) holds the literal
  ``$REDIS_PASSWORD``; the expanded value sits only on redis-server's argv inside the
  container, which redis-server overwrites with its process title. No persistence.
- MinIO: ``MINIO_ROOT_USER`` / ``MINIO_ROOT_PASSWORD``, command ``server /data``.

With ``data = "tmpfs"`` the ``*_memory`` settings must hold the restored data as well as the
server's working memory.
"""

from __future__ import annotations

import logging
import re
import secrets
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import docker
import psycopg
from docker.errors import APIError, DockerException, ImageNotFound, NotFound

from drtool import liveness
from drtool.drills.definition import DockerImages
from drtool.drills.sizing import FLOOR_MIB, human_limit
from drtool.drills.watchdog import DrillDeadline
from drtool.endpoints import PostgresEndpoint, RedisEndpoint, S3Endpoint, StackEndpoints
from drtool.errors import DrtoolError, SourceError
from drtool.runtime.procs import deferred_interrupts
from drtool.s3session import s3_client
from drtool.sources.redis_client import connect as connect_redis

log = logging.getLogger(__name__)

LABEL = "drtool.drill"
OWNER = f"{LABEL}.owner"  # label prefix: the process that runs the drill
LEGACY_AFTER = timedelta(hours=12)  # leftovers without owner labels (older drtool) count as dead
BUCKETS = ("attachments",)
PG_USER = "postgres"
PG_DBNAME = "cotalk"
PG_PORT = 5432
PG_DATA = "/var/lib/postgresql/data"
# A throw-away server: durability buys nothing on tmpfs, WAL is kept small (it is in memory).
PG_OPTIONS = ("fsync=off", "full_page_writes=off", "synchronous_commit=off", "max_wal_size=256MB")
REDIS_PORT = 6379
REDIS_COMMAND = (
    'exec redis-server --requirepass "$REDIS_PASSWORD" --save "" --appendonly no --dir /data'
)
S3_PORT = 9000
READY_TIMEOUT = 120.0
POLL_SECONDS = 0.25
LOG_TAIL = 20
NEAR_LIMIT = 0.95  # memory use at or above this share of the limit: exhausted
KILLED = 137  # 128 + SIGKILL: what the kernel's OOM killer leaves as the exit code
_CONTAINER_ID = re.compile(r"(?:docker[-/]|containers/)([0-9a-f]{64})")
_SHORT_ID = re.compile(r"[0-9a-f]{12,64}")


def engine(timeout: int = 60) -> Any:
    """A client of the engine named by the environment (``DOCKER_HOST`` or the socket)."""
    try:
        client = docker.from_env(timeout=timeout)
        client.ping()
    except (DockerException, OSError) as exc:
        raise SourceError(
            f"docker: no engine answers ({type(exc).__name__}); start dockerd or set DOCKER_HOST"
        ) from None
    return client


@dataclass(frozen=True)
class _Service:
    """One container of the scratch stack."""

    role: str
    image: str
    memory: str
    environment: dict[str, str]
    command: list[str]
    tmpfs: str | None  # the data dir, mounted as tmpfs; None: on the container's own layer
    user: str | None = None
    stop_signal: str | None = None


def _services(images: DockerImages, pg: str, rd: str, s3: tuple[str, str]) -> list[_Service]:
    """The three scratch containers of a drill, sized and configured like production.

    PostgreSQL stops on SIGINT (a fast shutdown: nothing to keep); with ``data = "tmpfs"`` each
    store's data directory is in memory and counts against the container's limit.
    """
    options = [arg for opt in PG_OPTIONS for arg in ("-c", opt)]
    in_memory = images.data == "tmpfs"
    memory = {
        role: str(getattr(images, f"{role}_memory")) or f"{floor}m"  # unsized: the floor
        for role, floor in FLOOR_MIB.items()
    }
    return [
        _Service(
            "postgres",
            images.postgres_image,
            memory["postgres"],
            {
                "POSTGRES_USER": PG_USER,
                "POSTGRES_PASSWORD": pg,
                "POSTGRES_DB": PG_DBNAME,
                "PGDATA": PG_DATA,
            },
            options,
            PG_DATA if in_memory else None,
            stop_signal="SIGINT",
        ),
        _Service(
            "redis",
            images.redis_image,
            memory["redis"],
            {"REDIS_PASSWORD": rd},
            ["sh", "-c", REDIS_COMMAND],
            "/data" if in_memory else None,
            user="redis",
        ),
        _Service(
            "minio",
            images.minio_image,
            memory["minio"],
            {"MINIO_ROOT_USER": s3[0], "MINIO_ROOT_PASSWORD": s3[1]},
            ["server", "/data"],
            "/data" if in_memory else None,
        ),
    ]


def ensure_image(client: Any, image: str) -> None:
    """The image exists locally, or is pulled (the SDK's create does not pull)."""
    try:
        client.images.get(image)
        return
    except ImageNotFound:
        log.info("docker: pulling %s", image)
    try:
        client.images.pull(image)
    except DockerException as exc:
        raise SourceError(
            f"docker: image {image} is not on this engine and cannot be pulled "
            f"({type(exc).__name__}); pull or build it first"
        ) from None


def logs_tail(container: Any) -> str:
    try:
        return bytes(container.logs(tail=LOG_TAIL)).decode(errors="replace").strip()
    except DockerException:
        return "(logs unavailable)"


def _wait_ready(role: str, container: Any, probe: Callable[[], object], deadline: float) -> None:
    """Call ``probe`` until it succeeds; SourceError with the logs' tail if it never does."""
    last = ""
    while True:
        try:
            probe()
            return
        except Exception as exc:  # any failure of the probe means "not yet"
            last = type(exc).__name__
        container.reload()
        if container.status in ("exited", "dead") or time.monotonic() > deadline:
            state = container.status
            raise SourceError(
                f"docker: the drill's {role} container ({container.name}, {state}) did not get "
                f"ready (last probe: {last}); its log ends:\n{logs_tail(container)}"
            )
        time.sleep(POLL_SECONDS)


def _probe_postgres(endpoint: PostgresEndpoint) -> Callable[[], object]:
    def probe() -> None:
        kwargs = endpoint.connect_kwargs()
        with psycopg.connect(**kwargs, connect_timeout=2) as conn:
            conn.execute("SELECT 1")

    return probe


def _probe_redis(endpoint: RedisEndpoint) -> Callable[[], object]:
    def probe() -> None:
        with connect_redis(endpoint, timeout=2.0) as client:
            client.ping()

    return probe


def _own_container(client: Any) -> Any | None:
    """The container drtool runs in, when it is one of this engine's; else None."""
    if not Path("/.dockerenv").exists():
        return None
    candidates: list[str] = []
    hostname = socket.gethostname()
    if _SHORT_ID.fullmatch(hostname):  # a container's default hostname is its short id
        candidates.append(hostname)
    for path in ("/proc/self/cgroup", "/proc/self/mountinfo"):
        try:
            candidates += _CONTAINER_ID.findall(Path(path).read_text())
        except OSError:
            continue
    for candidate in dict.fromkeys(candidates):
        try:
            container = client.containers.get(candidate)
        except NotFound:
            continue
        if str(container.id).startswith(candidate):
            return container
    log.debug("docker: running in a container this engine does not know; not joining")
    return None


class _Scratch:
    """The containers and network of one drill, on one engine."""

    def __init__(self, client: Any, drill_id: str) -> None:
        self.client = client
        self.drill_id = drill_id
        self.name = f"drtool-drill-{drill_id.lower()}"
        self.labels = {LABEL: drill_id}
        self.own = _own_container(client)
        started = str(self.own.attrs.get("State", {}).get("StartedAt", "")) if self.own else ""
        self.labels |= owner_labels(liveness.current(), started)

    def up(self, images: DockerImages, timeout: float) -> StackEndpoints:
        pg_password = secrets.token_urlsafe(24)
        redis_password = secrets.token_urlsafe(24)
        s3_keys = (f"drtool{secrets.token_hex(6)}", secrets.token_urlsafe(24))
        services = _services(images, pg_password, redis_password, s3_keys)
        for service in services:
            ensure_image(self.client, service.image)
        network = self.client.networks.create(
            self.name, driver="bridge", internal=True, labels=dict(self.labels)
        )
        containers = {s.role: self._start(s, network.name) for s in services}
        own = self.own
        if own is not None:
            network.connect(own)
            log.info("docker: joined container %s to the drill network", own.short_id)
        address = {role: self._address(c, network.name) for role, c in containers.items()}
        endpoints = StackEndpoints(
            PostgresEndpoint(address["postgres"], PG_PORT, PG_USER, PG_DBNAME, pg_password),
            RedisEndpoint(address["redis"], REDIS_PORT, password=redis_password),
            S3Endpoint(f"http://{address['minio']}:{S3_PORT}", *s3_keys),
            BUCKETS,
        )
        deadline = time.monotonic() + timeout
        s3 = s3_client(endpoints.minio, timeout=2.0, attempts=1)
        probes = {
            "postgres": _probe_postgres(endpoints.postgres),
            "redis": _probe_redis(endpoints.redis),
            "minio": s3.list_buckets,
        }
        for role, probe in probes.items():
            _wait_ready(role, containers[role], probe, deadline)
        for bucket in BUCKETS:
            _wait_ready("minio", containers["minio"], partial(_create, s3, bucket), deadline)
        log.info(
            "docker: drill %s stack up on network %s (postgres %s, redis %s, minio %s)",
            self.drill_id,
            self.name,
            address["postgres"],
            address["redis"],
            address["minio"],
        )
        return endpoints

    def _start(self, service: _Service, network: str) -> Any:
        """Create and start one labelled container: the label is how cleanup finds it again."""
        container = self.client.containers.create(
            service.image,
            service.command,
            name=f"{self.name}-{service.role}",
            labels={**self.labels, f"{LABEL}.role": service.role},
            environment=service.environment,
            network=network,
            tmpfs={service.tmpfs: "rw"} if service.tmpfs else None,
            mem_limit=service.memory,
            user=service.user,
            stop_signal=service.stop_signal,
            detach=True,
        )
        container.start()
        return container

    @staticmethod
    def _address(container: Any, network: str) -> str:
        container.reload()
        address = container.attrs["NetworkSettings"]["Networks"][network]["IPAddress"]
        if not address:
            raise SourceError(f"docker: {container.name} got no address on {network}")
        return str(address)


def _create(s3: Any, bucket: str) -> None:
    existing = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
    if bucket not in existing:
        s3.create_bucket(Bucket=bucket)


def _remove(client: Any, label: str) -> list[str]:
    """Force-remove the containers, then the networks, carrying ``label`` (key or key=value).

    Raises the first failure after trying everything.
    """
    removed: list[str] = []
    failures: list[str] = []
    for container in client.containers.list(
        all=True, filters={"label": label}, ignore_removed=True
    ):
        try:
            container.remove(force=True, v=True)
            removed.append(f"container {container.name}")
        except NotFound:
            continue
        except APIError as exc:
            failures.append(f"container {container.name}: {exc.explanation or exc}")
    for network in client.networks.list(filters={"label": label}):
        try:
            network.reload()
            for attached in network.containers:
                network.disconnect(attached, force=True)
            network.remove()
            removed.append(f"network {network.name}")
        except NotFound:
            continue
        except APIError as exc:
            failures.append(f"network {network.name}: {exc.explanation or exc}")
    if failures:
        raise SourceError(f"docker: teardown incomplete: {'; '.join(failures)}")
    return removed


@dataclass(frozen=True)
class Exhaustion:
    """A scratch container that ran out of memory (or stopped), said as the operator fixes it.

    A container at its memory limit does not fail loudly: the server inside stalls or is
    killed, and the step talking to it fails with a network error that blames the wrong
    thing (issue 19.12). This names the container and the setting to raise instead.
    """

    role: str
    cause: str  # e.g. "was killed for memory (OOM) at its 256m limit"
    memory: bool  # raising the container's memory limit is the fix
    final: bool = True  # the container is gone for this drill (killed, stopped), not just full

    def message(self) -> str:
        fix = f"; raise docker.{self.role}_memory" if self.memory else ""
        return f"the {self.role} scratch container {self.cause}{fix}"


# drill id -> role -> memory at its limit, seen by the watchdog's ticks while the drill ran
_SEEN: dict[str, dict[str, Exhaustion]] = {}


def memory_use(container: Any) -> tuple[int, int] | None:
    """(bytes in use, limit) of a running container from one stats sample, or None.

    Page cache the kernel can drop (inactive files) does not count, as in ``docker stats``:
    with ``data = "disk"`` the restored files pass through the cache without exhausting it.
    """
    try:
        stats = container.stats(stream=False, one_shot=True)
    except (DockerException, OSError):
        return None
    memory = stats.get("memory_stats") or {}
    usage, limit = int(memory.get("usage") or 0), int(memory.get("limit") or 0)
    if not usage or not limit:
        return None
    detail = memory.get("stats") or {}
    cache = int(detail.get("total_inactive_file", detail.get("inactive_file", 0)) or 0)
    return max(0, usage - cache), limit


def _exhaustion(container: Any, *, sample: bool) -> Exhaustion | None:
    """What exhausted ``container``: killed for memory, stopped, or (``sample``) at its limit."""
    role = str(container.labels.get(f"{LABEL}.role", container.name))
    state = container.attrs.get("State", {})
    limit = int(container.attrs.get("HostConfig", {}).get("Memory") or 0)
    at = f" at its {human_limit(limit)} limit" if limit else ""
    code = int(state.get("ExitCode") or 0)
    if state.get("OOMKilled"):
        return Exhaustion(role, f"was killed for memory (OOM){at}", True)
    if state.get("Status") in ("exited", "dead"):
        if code == KILLED:
            return Exhaustion(role, f"was killed (exit code {KILLED}, as for memory){at}", True)
        return Exhaustion(role, f"stopped (exit code {code})", False)
    if sample and state.get("Running"):
        use = memory_use(container)
        if use is not None and use[0] >= NEAR_LIMIT * use[1]:
            share = 100 * use[0] / use[1]
            return Exhaustion(
                role,
                f"was at {share:.0f} % of its {human_limit(use[1])} memory limit",
                True,
                final=False,
            )
    return None


def watch_memory(drill_id: str) -> str | None:
    """One look at a running drill's containers (the watchdog's progress tick).

    Each one at >= 95 % of its memory limit, killed or stopped, gets a warning now (not
    minutes later as a network timeout) and is remembered for the failure's message.
    Returns why the drill cannot pass any more (a container killed or stopped), else None.
    """
    fatal: list[str] = []
    client = engine(timeout=10)
    try:
        for container in client.containers.list(
            all=True, filters={"label": f"{LABEL}={drill_id}"}, ignore_removed=True
        ):
            found = _exhaustion(container, sample=True)
            if found is None:
                continue
            seen = _SEEN.setdefault(drill_id, {})
            if seen.get(found.role) != found:  # once per state, not on every tick
                log.warning("drill %s: %s", drill_id, found.message())
            seen[found.role] = found
            if found.final:
                fatal.append(found.message())
    finally:
        client.close()
    return "; ".join(fatal) or None


def _diagnose(client: Any, drill_id: str, *, sample: bool) -> list[Exhaustion]:
    """The drill's exhausted containers, from their state now (and a stats sample when
    ``sample``) and what the watchdog saw while it ran; one per container, by role."""
    found = _SEEN.pop(drill_id, {})
    for container in client.containers.list(
        all=True, filters={"label": f"{LABEL}={drill_id}"}, ignore_removed=True
    ):
        now = _exhaustion(container, sample=sample)
        if now is not None:
            found[now.role] = now  # its state at the end says more than an earlier sample
            if not now.memory:  # stopped for another reason: what it said last tells why
                log.warning("docker: the drill's %s container stopped; its log ends:\n%s",
                            now.role, logs_tail(container))  # fmt: skip
    return [found[role] for role in sorted(found)]


def _teardown(drill_id: str, *, failed: bool = False) -> list[Exhaustion]:
    """Remove the drill's containers and network, with Ctrl-C held until done.

    Before removing, finds the containers that ran out of memory or stopped (after a
    failure also those sitting at their memory limit) and returns them.
    """
    label = f"{LABEL}={drill_id}"
    with deferred_interrupts():
        client = engine()
        try:
            found = _diagnose(client, drill_id, sample=failed)
            removed = _remove(client, label)
        except DockerException as exc:
            raise SourceError(f"docker: teardown failed ({type(exc).__name__})") from None
        finally:
            client.close()
    for exhausted in found:
        log.warning("docker: %s", exhausted.message())
    log.info("docker: drill %s torn down (%s)", drill_id, ", ".join(removed) or "nothing left")
    return found


@contextmanager
def docker_scratch(
    drill_id: str, images: DockerImages, *, timeout: float = READY_TIMEOUT
) -> Iterator[StackEndpoints]:
    """A fresh container stack for one drill, always torn down (also when startup fails)."""
    client = engine()
    try:
        endpoints = _Scratch(client, drill_id).up(images, timeout)
    except DockerException as exc:
        exc_type = type(exc).__name__
        detail = exc.explanation if isinstance(exc, APIError) else exc_type
        failure: BaseException = SourceError(f"docker: drill stack did not start: {detail}")
        raise _teardown_after(drill_id, failure, client) or failure from None
    except BaseException as exc:
        if (replaced := _teardown_after(drill_id, exc, client)) is not None:
            raise replaced from None
        raise
    client.close()
    try:
        yield endpoints
    except BaseException as exc:
        if (replaced := _teardown_after(drill_id, exc, None)) is not None:
            raise replaced from None
        raise
    _teardown(drill_id)


def _teardown_after(drill_id: str, exc: BaseException, client: Any | None) -> DrtoolError | None:
    """Tear down while ``exc`` propagates; a teardown failure becomes a note on it.

    When a container ran out of memory or stopped, that is the cause the operator can fix
    and the failure's message (which goes into the report) leads with it; the step's own
    error (often a network timeout) follows. A failure that is not drtool's own (a client
    library's exception) is replaced by a SourceError naming the cause (returned).
    """
    if client is not None:
        client.close()
    try:
        found = _teardown(drill_id, failed=True)
    except DrtoolError as cleanup:
        exc.add_note(f"teardown after the failure also failed: {cleanup.message}")
        log.warning("%s", cleanup.message)
        return None
    if not found:
        return None
    said = str(exc) if isinstance(exc, DrillDeadline) else ""
    found = [e for e in found if e.message() not in said]  # the watchdog's stop names some
    if not found:
        return None
    cause = "docker: " + "; ".join(e.message() for e in found)
    if isinstance(exc, DrtoolError):
        exc.message = f"{cause} (the step failed with: {exc.message})"
        exc.args = (exc.message,)
        return None
    if isinstance(exc, DrillDeadline):
        exc.args = (f"{exc}; {cause}",)
        return None
    if isinstance(exc, Exception):
        return SourceError(f"{cause} (the step failed with {type(exc).__name__})")
    return None  # Ctrl-C / SIGTERM: the operator's own stop, said as such


def owner_labels(owner: liveness.Owner, container_started: str = "") -> dict[str, str]:
    """The labels naming a drill's process (and the start of the container it runs in)."""
    return {
        f"{OWNER}.host": owner.host,
        f"{OWNER}.boot": owner.boot_id,
        f"{OWNER}.container": owner.container,
        f"{OWNER}.container-started": container_started,
        f"{OWNER}.pid": str(owner.pid),
        f"{OWNER}.start": "" if owner.started is None else str(owner.started),
    }


def _created(attrs: dict[str, Any]) -> datetime | None:
    try:
        return datetime.fromisoformat(str(attrs.get("Created", ""))[:19]).replace(tzinfo=UTC)
    except ValueError:
        return None


def drill_is_dead(
    client: Any, labels: dict[str, str], created: datetime | None, now: datetime
) -> tuple[bool, str]:
    """(dead, why) for the drill whose resources carry ``labels``.

    Its process is looked up when it ran in this pid namespace; from elsewhere, the container
    it ran in tells: gone, stopped or restarted since means dead. Otherwise it is kept.
    """
    if f"{OWNER}.pid" not in labels:
        age = now - created if created else None
        if age is not None and age > LEGACY_AFTER:
            return (
                True,
                f"no owner recorded (an older drtool), {age.total_seconds() / 3600:.0f} h old",
            )
        return False, (
            "no owner recorded (an older drtool) and less than 12 h old; if no drill runs, "
            f"`docker rm -f` its containers (label {LABEL}={labels.get(LABEL, '')})"
        )
    start = labels.get(f"{OWNER}.start", "")
    owner = liveness.Owner(
        labels.get(f"{OWNER}.host", ""),
        labels.get(f"{OWNER}.boot", ""),
        labels.get(f"{OWNER}.container", ""),
        int(labels[f"{OWNER}.pid"]),
        int(start) if start.isdigit() else None,
    )
    alive, why = liveness.process_verdict(owner)
    if alive is not None:
        return (not alive), (f"its drill runs ({owner.describe()})" if alive else why)
    if owner.container:
        try:
            holder = client.containers.get(owner.container)
        except NotFound:
            return True, f"the container {owner.container[:12]} that ran it is gone"
        state = holder.attrs.get("State", {})
        if not state.get("Running"):
            return True, f"the container {owner.container[:12]} that ran it is stopped"
        recorded = labels.get(f"{OWNER}.container-started", "")
        if recorded and state.get("StartedAt") != recorded:
            return True, f"the container {owner.container[:12]} that ran it has restarted since"
        return False, (
            f"its drill may run in container {owner.container[:12]}, which runs: run "
            "`drtool drill cleanup` in that container to check its process"
        )
    return False, f"its drill ran on {owner.describe()}: run `drtool drill cleanup` there"


def cleanup_docker() -> tuple[list[str], list[str]]:
    """Remove the containers and networks of dead drills; keep every running drill's.

    Returns (what was removed, each kept drill with why); ([], []) when no engine answers.
    """
    try:
        client = engine(timeout=10)
    except SourceError as exc:
        log.info("%s; no containers to clean up", exc.message)
        return [], []
    removed: list[str] = []
    kept: list[str] = []
    now = datetime.now(UTC)
    try:
        drills: dict[str, tuple[dict[str, str], datetime | None]] = {}
        for container in client.containers.list(
            all=True, filters={"label": LABEL}, ignore_removed=True
        ):
            labels = dict(container.labels)
            drills.setdefault(labels.get(LABEL, ""), (labels, _created(container.attrs)))
        for network in client.networks.list(filters={"label": LABEL}):
            labels = dict(network.attrs.get("Labels") or {})
            drills.setdefault(labels.get(LABEL, ""), (labels, _created(network.attrs)))
        for drill_id, (labels, created) in sorted(drills.items()):
            dead, why = drill_is_dead(client, labels, created, now)
            if not dead:
                kept.append(f"drill {drill_id}: {why}")
                continue
            log.info("docker: drill %s is dead (%s); removing its containers", drill_id, why)
            removed += _remove(client, f"{LABEL}={drill_id}")
        return removed, kept
    except DockerException as exc:
        raise SourceError(f"docker: cleanup failed ({type(exc).__name__})") from None
    finally:
        client.close()
