"""A repository in a local directory (``file:///abs/path``): a NAS share, a USB disk, tests.

Writes go to a ``.tmp-<token>-<name>`` file in the target's directory, are fsynced, renamed
into place and the directory fsynced, so a key is either absent or complete, also after a crash.
"""

from __future__ import annotations

import builtins
import os
import secrets
import stat
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from drtool.errors import IntegrityError, NotFound, StorageError
from drtool.faults import crash_point
from drtool.storage.base import TEMP_PREFIX, ObjectInfo, Storage, check_key

READ_SIZE = 1024 * 1024
_TOKEN_HEX = 12


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _stream(f: BinaryIO) -> Iterator[bytes]:
    with f:
        while piece := f.read(READ_SIZE):
            yield piece


class FileStorage(Storage):
    """Objects as files under ``root``; the directory must exist (it plays the bucket)."""

    def __init__(self, root: Path) -> None:
        if not root.is_absolute():
            raise ValueError(f"file storage needs an absolute path, got {root}")
        self.root = root
        self.url = root.as_uri()

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*check_key(key).split("/"))

    def _error(self, key: str, action: str, exc: OSError) -> StorageError:
        cause = exc.strerror or type(exc).__name__
        return StorageError(f"{self.url} key {key}: cannot {action} ({cause})")

    def _require_root(self) -> None:
        if not self.root.is_dir():
            raise NotFound(f"{self.url}: directory does not exist")

    def create_root(self) -> None:
        """Create the repository directory (and its parents) if missing; the leaf is 0700.

        ``drtool init file:///srv/drtool-repo`` on a new disk should not need a mkdir first,
        and the repository holds nothing others need to read.
        """
        if not self.root.is_dir():
            try:
                self.root.mkdir(parents=True, mode=0o700)
                self.root.chmod(0o700)  # whatever the umask
            except OSError as exc:
                raise StorageError(
                    f"{self.url}: cannot create the directory ({exc.strerror})"
                ) from None
            _fsync_dir(self.root.parent)
        self.check()

    def _makedirs(self, path: Path) -> None:
        """Create ``path`` and missing parents below the root, fsyncing each new entry's dir."""
        missing = []
        while path != self.root and not path.is_dir():
            missing.append(path)
            path = path.parent
        for d in reversed(missing):
            d.mkdir(exist_ok=True)
            _fsync_dir(d.parent)

    def put(
        self,
        key: str,
        chunks: Iterable[bytes],
        *,
        retain_until: datetime | None = None,
        expected_size: int | None = None,
        confirm: bool = True,
    ) -> ObjectInfo:
        """Write via a temp file, fsync, rename, fsync the dir; ``retain_until`` is ignored.

        ``confirm`` changes nothing: the size is read from the renamed file either way.
        """
        path = self._path(key)
        self._require_root()
        sent = 0
        try:
            self._makedirs(path.parent)
            tmp = path.parent / f"{TEMP_PREFIX}{secrets.token_hex(_TOKEN_HEX // 2)}-{path.name}"
            try:
                with open(tmp, "xb") as f:
                    for chunk in chunks:
                        f.write(chunk)
                        if not sent:
                            crash_point("upload-part")
                        sent += len(chunk)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            _fsync_dir(path.parent)
        except OSError as e:
            raise self._error(key, "write", e) from e
        info = self.head(key)
        if info.size != sent:
            path.unlink(missing_ok=True)
            raise IntegrityError(
                f"{self.url} key {key}: stored size {info.size} differs from {sent} bytes written"
            )
        return info

    def get(self, key: str, *, version_id: str | None = None) -> Iterator[bytes]:
        """Stream the file in 1 MiB pieces; a ``version_id`` is never found (no versions here)."""
        path = self._path(key)
        if version_id is not None:
            raise NotFound(f"{self.url}: key {key} version {version_id} not found (no versions)")
        try:
            f = open(path, "rb")  # noqa: SIM115 - closed by _stream
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise NotFound(f"{self.url}: key {key} not found") from None
        except OSError as e:
            raise self._error(key, "read", e) from e
        return _stream(f)

    def head(self, key: str) -> ObjectInfo:
        """Size and mtime of the file."""
        try:
            st = self._path(key).stat()
        except (FileNotFoundError, NotADirectoryError):
            st = None
        except OSError as e:
            raise self._error(key, "stat", e) from e
        if st is None or not stat.S_ISREG(st.st_mode):
            self._require_root()
            raise NotFound(f"{self.url}: key {key} not found")
        return ObjectInfo(key, st.st_size, last_modified=datetime.fromtimestamp(st.st_mtime, UTC))

    def _walk(self, top: Path, start: str = "") -> Iterator[tuple[Path, str]]:
        """Every file under ``top`` with its key; an unreadable directory raises.

        Only the subdirectories of ``top`` whose names begin with ``start`` are entered (a
        listing of ``snapshots/20261205`` does not walk every snapshot's directory).
        """

        def fail(e: OSError) -> None:
            where = Path(e.filename or top).relative_to(self.root).as_posix()
            raise self._error(where, "list", e)

        for dirpath, dirs, files in os.walk(top, onerror=fail):
            if start and Path(dirpath) == top:
                dirs[:] = [d for d in dirs if d.startswith(start)]
            rel = Path(dirpath).relative_to(self.root).as_posix()
            for name in files:
                yield Path(dirpath, name), name if rel == "." else f"{rel}/{name}"

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Walk the directory under ``prefix`` (sorted by key), ignoring temp files."""
        self._require_root()
        top = self.root.joinpath(*prefix.split("/")[:-1])
        try:  # not Path.is_dir()/exists(): they read errors (a symlink loop) as "absent"
            present = stat.S_ISDIR(top.stat().st_mode)
        except FileNotFoundError:
            present = False
        except OSError as exc:
            raise self._error(prefix or ".", "list", exc) from None
        keys = sorted(
            key
            for _p, key in (self._walk(top, prefix.split("/")[-1]) if present else ())
            if key.startswith(prefix) and not key.rsplit("/", 1)[-1].startswith(TEMP_PREFIX)
        )
        for key in keys:
            try:
                yield self.head(key)
            except NotFound:  # deleted while listing
                continue

    def delete(self, key: str, *, version_id: str | None = None) -> None:
        """Remove the file and its now-empty parent directories; absent is fine."""
        path = self._path(key)
        try:
            path.unlink(missing_ok=True)
            parent = path.parent
            while parent != self.root and parent.is_dir() and not any(parent.iterdir()):
                parent.rmdir()
                parent = parent.parent
            if parent.is_dir():
                _fsync_dir(parent)
        except OSError as e:
            raise self._error(key, "delete", e) from e

    def _temp_files(self, older_than: datetime) -> Iterator[tuple[Path, str]]:
        self._require_root()
        cutoff = older_than.timestamp()
        for path, key in self._walk(self.root):
            if path.name.startswith(TEMP_PREFIX) and path.stat().st_mtime < cutoff:
                head = key.rpartition("/")[0]
                target = path.name[len(TEMP_PREFIX) + _TOKEN_HEX + 1 :]
                yield path, f"{head}/{target}" if head else target

    def stale_uploads(self, older_than: datetime) -> builtins.list[str]:
        """Target keys of temp files last written before ``older_than``."""
        return sorted(key for _p, key in self._temp_files(older_than))

    def abort_stale_uploads(self, older_than: datetime) -> int:
        """Delete the stale temp files; return how many."""
        stale = builtins.list(self._temp_files(older_than))
        for path, key in stale:
            try:
                path.unlink(missing_ok=True)
            except OSError as e:
                raise self._error(key, "remove temp file of", e) from e
        return len(stale)

    def check(self) -> None:
        """The directory exists and can be read."""
        self._require_root()
        if not os.access(self.root, os.R_OK | os.X_OK):
            raise StorageError(f"{self.url}: permission denied")
