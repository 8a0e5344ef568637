"""Restore staging: stored objects are checked and decrypted into scratch, never into a target.

Every object a restore reads passes through :func:`read_through`: its stored bytes are measured
against the manifest (size, sha256) and authenticated chunk by chunk (``unseal``), and the
plaintext is measured against what the snapshot recorded. Only a fully checked scratch file is
ever handed to a restore target (promise 4).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import socket
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from drtool.config import Config
from drtool.errors import ConfigError, IntegrityError
from drtool.pipeline.header import InnerHeader
from drtool.pipeline.meter import Meter
from drtool.pipeline.seal import unseal
from drtool.repository.access import Repo
from drtool.repository.manifest import ObjectEntry


@dataclass(frozen=True)
class Plain:
    """The plaintext an object must decrypt to: size and sha256 (either may be unknown)."""

    size: int | None = None
    sha256: str | None = None


class Cancelled(Exception):
    """Staging stopped because another store's staging failed (or the restore was interrupted).

    Raised by :func:`read_through` when the restore's shared cancel event is set: a store's
    download stops within one chunk instead of running to its end while the first real failure
    waits for it. The restore reports that first failure, never this.
    """


def _check(cancel: threading.Event | None, key: str) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled(f"{key}: staging cancelled")


def scratch_dir(cfg: Config) -> Path:
    """The directory restores stage decrypted data in (``backup.scratch_dir`` or the temp dir)."""
    return Path(cfg.backup.scratch_dir or tempfile.gettempdir())


SCRATCH_PREFIX = "drtool-restore-"
#: in each scratch dir: "<pid> <pid namespace> <hostname> <boot id>" of the restore that made
#: it, which holds an exclusive flock on it for the dir's lifetime
OWNER_FILE = "owner"
log = logging.getLogger(__name__)


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _whoami() -> list[str]:
    """This process's owner record: pid, pid namespace, host, boot (each without spaces)."""
    host = socket.gethostname().replace(" ", "_") or "-"
    return [str(os.getpid()), _pid_namespace() or "-", host, _boot_id() or "-"]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


@contextlib.contextmanager
def owned_scratch(directory: Path) -> Iterator[Path]:
    """A fresh ``drtool-restore-*`` dir in ``directory`` that names its owner, removed after.

    A restore killed by SIGKILL or the OOM killer cannot remove its dir, which may hold a whole
    bucket's decrypted plaintext: the owner file lets the next restore (:func:`sweep_stale`)
    tell such a leftover from a restore still running. The owner holds an exclusive flock on
    that file while the dir lives: the kernel releases it when the process dies, whatever the
    pid namespace or host (a pid alone is ambiguous across hosts sharing the scratch dir).
    """
    with tempfile.TemporaryDirectory(dir=directory, prefix=SCRATCH_PREFIX) as work:
        fd = os.open(Path(work) / OWNER_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # a fresh file: nobody else holds it
            os.write(fd, (" ".join(_whoami()) + "\n").encode())
            yield Path(work)
        finally:
            os.close(fd)  # releases the lock


def _unlocked(owner: Path) -> int | None:
    """The owner file opened and flock'ed (an fd to close), or None: a live process holds it
    (or it cannot be opened)."""
    try:
        fd = os.open(owner, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def sweep_stale(directory: Path) -> list[Path]:
    """Remove the ``drtool-restore-*`` dirs in ``directory`` whose owner process is gone.

    Only a dir whose owner file names this host, this boot and this pid namespace (all
    known), a pid that no longer exists, and whose flock nobody holds: a dir without one
    (being created, or made by an older drtool), from another namespace, host or boot (a
    container or another machine sharing the scratch dir) is left alone, and so is a dir
    holding kept data (``*pre_restore*``). Each removal is logged.
    """
    removed: list[Path] = []
    _, here, host, boot = _whoami()
    if "-" in (here, boot):  # cannot tell this namespace or boot: never sweep
        return removed
    try:
        candidates = sorted(directory.glob(f"{SCRATCH_PREFIX}*"))
    except OSError:
        return removed
    for d in candidates:
        try:
            pid_text, namespace, owner_host, owner_boot = (d / OWNER_FILE).read_text().split()
            pid = int(pid_text)
        except (OSError, ValueError):
            continue
        if (namespace, owner_host, owner_boot) != (here, host, boot) or _alive(pid):
            continue
        if _holds_kept_data(d):
            continue
        fd = _unlocked(d / OWNER_FILE)
        if fd is None:  # its owner still runs (the pid was reused, or it is not this pid)
            continue
        try:
            shutil.rmtree(d, ignore_errors=True)
        finally:
            os.close(fd)
        if not d.exists():
            log.warning("removed scratch dir %s of restore process %d, which is gone", d, pid)
            removed.append(d)
    return removed


def _holds_kept_data(d: Path) -> bool:
    """A previous target's data set aside (``*pre_restore*``) is never swept: it may be its
    only copy (an older drtool kept a Redis container's data file in the scratch dir)."""
    try:
        kept = next(iter(sorted(d.rglob("*pre_restore*"))), None)
    except OSError:
        kept = d  # unreadable: cannot tell, keep it
    if kept is None:
        return False
    log.warning("left scratch dir %s of a gone restore: it holds kept data (%s)", d, kept.name)
    return True


def check_free_space(directory: Path, needed: int) -> None:
    """ConfigError naming ``directory`` unless it has ``needed`` bytes free."""
    try:
        free = shutil.disk_usage(directory).free
    except OSError as exc:
        raise ConfigError(f"backup.scratch_dir: cannot use {directory} ({exc.strerror})") from None
    if free < needed:
        raise ConfigError(
            f"backup.scratch_dir: {directory} has {free:,} bytes free but the restore stages "
            f"{needed:,}; free space there or set backup.scratch_dir to a larger disk"
        )


def scratch_error(directory: Path, exc: OSError) -> ConfigError:
    """A write to the scratch dir failed (usually: the disk filled up meanwhile)."""
    return ConfigError(
        f"backup.scratch_dir: writing to {directory} failed ({exc.strerror}); "
        "nothing was restored, free space there or set backup.scratch_dir to a larger disk"
    )


def blob_header(repo: Repo, entry: ObjectEntry) -> InnerHeader:
    """The inner header a MinIO blob must carry."""
    blob_id = entry.key.rsplit("/", 1)[-1].split(".")[0]
    return InnerHeader(repo.info.repo_id, blob_id, "minio", "blob")


def read_through(
    repo: Repo,
    entry: ObjectEntry,
    header: InnerHeader,
    identities: list[str],
    sink: Callable[[bytes], object],
    plain: Plain = Plain(),
    *,
    cancel: threading.Event | None = None,
) -> Meter:
    """Stream one object into ``sink``, checking stored and plaintext size and sha256.

    Each chunk reaches ``sink`` only once authenticated; a sink must still treat its bytes as
    unverified until this returns. Returns the plaintext meter. ``cancel`` set: raises
    :class:`Cancelled` before the next chunk (the restore's other stores failed).
    """
    _check(cancel, entry.key)
    stored, out = Meter(), Meter()
    chunks: Iterable[bytes] = unseal(
        stored.wrap(repo.storage.get(entry.key)),
        identities=identities,
        expected=header,
        name=entry.key,
        recipients_hint=list(repo.info.recipients),
    )
    for chunk in out.wrap(chunks):
        _check(cancel, entry.key)
        sink(chunk)
    problem = entry.mismatch(stored.size, stored.sha256)
    if problem:
        raise IntegrityError(problem)
    if (plain.size is not None and out.size != plain.size) or (
        plain.sha256 is not None and out.sha256 != plain.sha256
    ):
        raise IntegrityError(
            f"{entry.key}: decrypted data differ from the snapshot's record "
            f"({out.size} bytes, expected {plain.size})"
        )
    return out


def stage(
    repo: Repo,
    entry: ObjectEntry,
    header: InnerHeader,
    identities: list[str],
    dest: Path,
    plain: Plain = Plain(),
    *,
    tap: Callable[[bytes], object] | None = None,
    cancel: threading.Event | None = None,
) -> Path:
    """Decrypt one object into the scratch file ``dest``, fully checked (see read_through).

    ``tap`` sees each piece as it is written (unverified until this returns): what a store
    learns from its file in the same pass, so the file need not be read back.
    """
    try:
        with dest.open("wb") as out:
            write = out.write
            sink: Callable[[bytes], object] = write
            if tap is not None:
                see = tap

                def sink(chunk: bytes) -> None:
                    write(chunk)
                    see(chunk)

            read_through(repo, entry, header, identities, sink, plain, cancel=cancel)
    except OSError as exc:
        raise scratch_error(dest.parent, exc) from None
    return dest


def check_all(
    repo: Repo,
    items: list[tuple[ObjectEntry, InnerHeader]],
    identities: list[str],
    *,
    workers: int = 4,
    cancel: threading.Event | None = None,
) -> None:
    """Read, hash and authenticate every object (plaintext discarded); the first failure raises.

    ``cancel`` is checked before each object and each chunk (see :class:`Cancelled`).
    """

    def one(item: tuple[ObjectEntry, InnerHeader]) -> None:
        read_through(repo, item[0], item[1], identities, lambda chunk: None, cancel=cancel)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        try:
            for _ in pool.map(one, items):
                pass
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
