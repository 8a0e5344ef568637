"""Redis restore, offline: stop the target server, place the checked RDB as its data file, start.

For a server drtool controls: a local stack's redis-server, or the Docker container named by
the target's ``redis.container``. The server then holds exactly the snapshot, TTLs included,
and clients never see old and restored keys mixed (the online copy cannot avoid that).

Before anything stops: the target must not persist with an append-only file (it would load
that instead of the RDB), and the RDB must load into an ephemeral ``redis-server`` (its
fingerprints are what the target must show afterwards). The target's current data is saved
(SAVE) and kept: beside the data file as ``<file>.pre_restore_<time>`` for a local stack, in
the keep dir (the scratch dir itself, never a restore's swept ``drtool-restore-*`` dir) for a
container: it may be the only copy of the previous data. When the server does not come up
with the snapshot, that data is put back and the server started again, and the restore fails
saying so.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import shutil
import stat
import tarfile
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import redis

from drtool.endpoints import RedisEndpoint
from drtool.errors import SourceError, UsageError
from drtool.faults import crash_point
from drtool.runtime.local import LocalStack
from drtool.sources.redis_client import connect, ephemeral_redis, keyspace_dbs, redis_error
from drtool.sources.redis_fingerprint import compare, fingerprint_redis
from drtool.stores.base import Placer
from drtool.stores.redis.restore import RedisOutcome, only_expired

log = logging.getLogger(__name__)

READY_TIMEOUT = 600.0  # a large RDB takes a while to load
POLL = 0.2


def place_file(rdb: Path, data_file: Path, keep_stamp: str | None = None) -> Path | None:
    """Swap ``rdb`` in as ``data_file``, so that ``data_file`` is at every moment the whole old
    file or the whole new one, never part of one nor missing (a node started meanwhile, or a
    crash, finds a loadable file).

    The new bytes are copied beside (with the old file's mode and owner) and fsynced; with
    ``keep_stamp`` the old file gets a second name, ``<file>.pre_restore_<stamp>`` (a hard
    link: no copy; a copy where links are not supported), returned; then the new file is
    renamed over ``data_file``, after which the kept name is the old bytes' only one. The
    temp file (and a kept name not yet needed) is removed when anything fails, an interrupt
    too.
    """
    tmp = data_file.with_name(f".{data_file.name}.restoring")
    kept: Path | None = None
    try:
        shutil.copyfile(rdb, tmp)
        _same_mode_and_owner(data_file, tmp)
        with tmp.open("rb") as fh:
            os.fsync(fh.fileno())
        if keep_stamp is not None and data_file.exists():
            kept = data_file.with_name(f"{data_file.name}.pre_restore_{keep_stamp}")
            _second_name(data_file, kept)
        crash_point("redis-rdb-swap")
        os.replace(tmp, data_file)
    except BaseException:
        if not tmp.is_dir():
            tmp.unlink(missing_ok=True)
        if kept is not None:
            kept.unlink(missing_ok=True)  # data_file is still the old file
        raise
    _fsync_dir(data_file.parent)
    return kept


def _second_name(data_file: Path, kept: Path) -> None:
    kept.unlink(missing_ok=True)  # a restore of the same second before: its file is the same
    try:
        os.link(data_file, kept)
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        shutil.copy2(data_file, kept)


def _same_mode_and_owner(old: Path, new: Path) -> None:
    """The new file as readable as the old one: drtool may run as root with umask 077 while
    the server runs as ``redis``, which must still read its RDB."""
    try:
        st = old.stat()
    except FileNotFoundError:
        return
    os.chmod(new, stat.S_IMODE(st.st_mode))
    if (st.st_uid, st.st_gid) != (os.geteuid(), os.getegid()):
        os.chown(new, st.st_uid, st.st_gid)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def put_file_back(data_file: Path, kept: Path | None) -> None:
    """Undo :func:`place_file`: the kept file renamed back over the data file (atomically),
    or the placed one removed when there was none."""
    if kept is not None:
        if data_file.exists() and os.path.samefile(kept, data_file):
            kept.unlink()  # not replaced yet: both names are the old file (rename is a no-op)
        else:
            os.replace(kept, data_file)
    else:
        data_file.unlink(missing_ok=True)


@dataclass
class LocalPlacer:
    """The redis-server of a local stack (``drtool stack``)."""

    stack: LocalStack
    kept: Path | None = None
    stamp: str = ""

    @property
    def where(self) -> str:
        """How to name the server in messages."""
        return f"the Redis of local stack {self.stack.name}"

    def stop(self) -> None:
        """Stop redis-server."""
        self.stack.redis.stop()

    def keep_current(self, stamp: str, keep_dir: Path) -> None:
        """Nothing yet: :meth:`place` keeps the data file as ``<file>.pre_restore_<stamp>``
        while it swaps the new one in (the data file never missing)."""
        self.stamp = stamp

    def place(self, rdb: Path) -> None:
        """Copy beside the data file, keep the old one, rename the new one over it."""
        self.kept = place_file(rdb, self.stack.redis.rdb_path, self.stamp)

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

    def keep_current(self, stamp: str, keep_dir: Path) -> None:
        """Copy the data file out of the stopped container into ``keep_dir``.

        Not the restore's own scratch dir: that is removed after the restore (or swept after
        a crash), and this may be the only copy of the previous data."""
        from docker.errors import NotFound

        try:
            stream, _ = self._get().get_archive(str(self.data_file))
        except NotFound:
            return  # no data file yet
        self.kept = keep_dir / f"redis-{self.data_file.name}.pre_restore_{stamp}.tar"
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
    keep_dir: Path,
) -> RedisOutcome:
    """Replace the target's data with ``rdb`` (see the module docstring); a container's
    previous data file is kept in ``keep_dir`` (``placer.kept``)."""
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
    placer.keep_current(stamp, keep_dir)
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
