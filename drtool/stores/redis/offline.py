"""Redis restore, offline: stop the target server, place the checked RDB as its data file, start.

For a server drtool controls: a local stack's redis-server, or the Docker container named by
the target's ``redis.container``. The server then holds exactly the snapshot, TTLs included,
and clients never see old and restored keys mixed (the online copy cannot avoid that).

Before anything stops: the target must not persist with an append-only file (it would load
that instead of the RDB), and the RDB must load into an ephemeral ``redis-server`` (its
fingerprints are what the target must show afterwards). The target's current data is saved
(SAVE) and kept: beside the data file as ``<file>.pre_restore_<time>`` for a local stack, in
the scratch dir for a container. When the server does not come up with the snapshot, that
data is put back and the server started again, and the restore fails saying so.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import tarfile
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import redis

from drtool.endpoints import RedisEndpoint
from drtool.errors import SourceError, UsageError
from drtool.runtime.local import LocalStack
from drtool.sources.redis_client import connect, ephemeral_redis, keyspace_dbs, redis_error
from drtool.sources.redis_fingerprint import compare, fingerprint_redis
from drtool.stores.base import Placer
from drtool.stores.redis.restore import RedisOutcome, only_expired

log = logging.getLogger(__name__)

READY_TIMEOUT = 600.0  # a large RDB takes a while to load
POLL = 0.2


def keep_aside(data_file: Path, stamp: str) -> Path | None:
    """Rename a server's data file to ``<file>.pre_restore_<stamp>`` (None: there was none)."""
    if not data_file.exists():
        return None
    kept = data_file.with_name(f"{data_file.name}.pre_restore_{stamp}")
    data_file.replace(kept)
    return kept


def place_file(rdb: Path, data_file: Path) -> None:
    """Copy ``rdb`` beside ``data_file`` (fsynced), then rename it over: the server finds the
    old file or the new one, never part of one."""
    tmp = data_file.with_name(f".{data_file.name}.restoring")
    shutil.copyfile(rdb, tmp)
    with tmp.open("rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, data_file)


def put_file_back(data_file: Path, kept: Path | None) -> None:
    """Undo :func:`keep_aside` + :func:`place_file`: the kept file back, or none at all."""
    if kept is not None:
        kept.replace(data_file)
    else:
        data_file.unlink(missing_ok=True)


@dataclass
class LocalPlacer:
    """The redis-server of a local stack (``drtool stack``)."""

    stack: LocalStack
    kept: Path | None = None

    @property
    def where(self) -> str:
        """How to name the server in messages."""
        return f"the Redis of local stack {self.stack.name}"

    def stop(self) -> None:
        """Stop redis-server."""
        self.stack.redis.stop()

    def keep_current(self, stamp: str, workdir: Path) -> None:
        """Rename the data file to ``<file>.pre_restore_<stamp>``."""
        self.kept = keep_aside(self.stack.redis.rdb_path, stamp)

    def place(self, rdb: Path) -> None:
        """Copy beside the data file, then rename over it."""
        place_file(rdb, self.stack.redis.rdb_path)

    def put_back(self) -> None:
        """Rename the kept file back (or remove the placed one when there was none)."""
        put_file_back(self.stack.redis.rdb_path, self.kept)

    def start(self) -> None:
        """Start redis-server and record its new pid in the stack's state."""
        self.stack.redis.start(timeout=READY_TIMEOUT)
        self.stack.save()

    def alive(self) -> bool:
        """Whether redis-server runs."""
        return self.stack.redis.running


@dataclass
class ContainerPlacer:
    """A Redis in a Docker container: its data file is ``dir/dbfilename`` inside it."""

    name: str
    data_file: PurePosixPath
    kept: Path | None = None
    _container: Any = None

    @property
    def where(self) -> str:
        """How to name the server in messages."""
        return f"container {self.name}"

    def _get(self) -> Any:
        if self._container is None:
            import docker  # the docker SDK only for this path
            from docker.errors import DockerException, NotFound

            try:
                self._container = docker.from_env().containers.get(self.name)
            except NotFound:
                raise UsageError(f"redis.container: no container {self.name}") from None
            except DockerException as exc:
                raise SourceError(f"docker: {' '.join(str(exc).split())[:200]}") from None
        return self._container

    def stop(self) -> None:
        """``docker stop`` (Redis saves on SIGTERM when it has save points)."""
        self._get().stop(timeout=60)

    def keep_current(self, stamp: str, workdir: Path) -> None:
        """Copy the data file out of the stopped container into the scratch dir."""
        from docker.errors import NotFound

        try:
            stream, _ = self._get().get_archive(str(self.data_file))
        except NotFound:
            return  # no data file yet
        self.kept = workdir / f"{self.data_file.name}.pre_restore_{stamp}.tar"
        with self.kept.open("wb") as out:
            for chunk in stream:
                out.write(chunk)

    def place(self, rdb: Path) -> None:
        """Write ``rdb`` into the container's data dir (an archive is extracted atomically)."""
        info = tarfile.TarInfo(self.data_file.name)
        info.size, info.mode, info.mtime = rdb.stat().st_size, 0o644, int(time.time())
        buf = io.BytesIO()  # put_archive takes bytes; an RDB of a 128 MB Redis fits
        with tarfile.open(fileobj=buf, mode="w") as tar, rdb.open("rb") as fh:
            tar.addfile(info, fh)
        if not self._get().put_archive(str(self.data_file.parent), buf.getvalue()):
            raise SourceError(f"{self.where}: could not write {self.data_file}")

    def put_back(self) -> None:
        """Extract the kept archive back into the data dir."""
        if self.kept is not None:
            self._get().put_archive(str(self.data_file.parent), self.kept.read_bytes())

    def start(self) -> None:
        """``docker start``."""
        self._get().start()

    def alive(self) -> bool:
        """Whether the container is running (Redis exits when it cannot load its data)."""
        container = self._get()
        container.reload()
        return bool(container.status == "running")


def container_placer(name: str, endpoint: RedisEndpoint) -> ContainerPlacer:
    """A placer for container ``name``, its data file as the running server reports it."""
    with closing(connect(endpoint, timeout=10, decode=True)) as client:
        try:
            directory = str(client.config_get("dir")["dir"])
            filename = str(client.config_get("dbfilename")["dbfilename"])
        except (redis.RedisError, KeyError) as exc:
            why = redis_error(exc) if isinstance(exc, redis.RedisError) else f"no {exc}"
            raise SourceError(f"redis {endpoint.host}:{endpoint.port}: CONFIG GET: {why}") from None
    return ContainerPlacer(name, PurePosixPath(directory) / filename)


def restore(
    rdb: Path,
    endpoint: RedisEndpoint,
    placer: Placer,
    *,
    force: bool,
    stamp: str,
    workdir: Path,
) -> RedisOutcome:
    """Replace the target's data with ``rdb`` (see the module docstring)."""
    where = f"redis {endpoint.host}:{endpoint.port} ({placer.where})"
    with closing(connect(endpoint, timeout=30, decode=True)) as client:
        try:
            held = sum(keyspace_dbs(client).values())
            if held and not force:
                raise UsageError(
                    f"{where}: holds {held} keys now; nothing changed, use --force to replace them"
                )
            if client.config_get("appendonly").get("appendonly") == "yes":
                raise UsageError(
                    f"{where}: appendonly is on, so it would load its AOF and not the snapshot; "
                    "nothing changed, use --redis-mode online"
                )
            with ephemeral_redis(rdb) as source:
                loaded = fingerprint_redis(source)
            client.save()  # the current data, to put back if the snapshot does not come up
        except redis.RedisError as exc:
            raise SourceError(f"{where}: {redis_error(exc)}") from None
    placer.stop()
    placer.keep_current(stamp, workdir)
    placer.place(rdb)
    try:
        placer.start()
        _wait_ready(endpoint, where, placer)
    except (SourceError, redis.RedisError) as exc:
        _roll_back(placer, endpoint, where, exc)
    restored = fingerprint_redis(endpoint)
    if only_expired(loaded, restored):
        restored = fingerprint_redis(endpoint)
    copied = sum(db.keys for db in loaded.dbs.values())
    return RedisOutcome(copied, held, loaded, compare(loaded, restored))


def _roll_back(placer: Placer, endpoint: RedisEndpoint, where: str, cause: BaseException) -> None:
    log.error("%s did not come up with the snapshot (%s); putting its data back", where, cause)
    placer.stop()
    placer.put_back()
    placer.start()
    _wait_ready(endpoint, where, placer)
    raise SourceError(
        f"{where}: did not come up with the snapshot ({cause}); its previous data is back"
    )


def _wait_ready(endpoint: RedisEndpoint, where: str, placer: Placer) -> None:
    """INFO persistence answers that the data file is loaded; the server must keep running."""
    deadline = time.monotonic() + READY_TIMEOUT
    last: Exception | None = None
    while time.monotonic() < deadline:
        if not placer.alive():
            raise SourceError(f"{where}: the server exited while loading ({last})")
        try:
            with closing(connect(endpoint, timeout=5)) as client:
                if client.info("persistence")["loading"] == 0:
                    return
        except redis.RedisError as exc:
            last = exc
        time.sleep(POLL)
    raise SourceError(f"{where}: not ready after {READY_TIMEOUT:g} s ({last})")
