"""Copying stored objects, as they are, from one repository's store to another's.

A copy needs no key: it moves the age-encrypted objects byte for byte and checks them
against the stored size and sha256 the signed manifests (or WAL index chunks) record. Every
object is checked twice: on the way (the source's bytes must hash to what the manifest says,
else the upload is aborted and nothing is stored) and on the destination (read back and
hashed, so a snapshot is committed there only over bytes that are provably the signed ones).

An object the destination already holds is not uploaded again: when a snapshot or chunk the
destination has committed names it, its listed size is enough (it was read back when that
was committed); otherwise (the leftover of a killed copy) it is read back and hashed, and
uploaded again only when it differs. See docs/decisions/0022-repository-copy.md.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Collection, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime

from drtool.errors import IntegrityError, NotFound
from drtool.storage.base import ObjectInfo, Storage

log = logging.getLogger(__name__)


class SourceDamaged(IntegrityError):
    """A source object is missing or does not hash to what its manifest records (exit 5).

    Its own class so a copy passes over that snapshot (it is not copyable) but stops at a
    storage error (the next run resumes).
    """


@dataclass(frozen=True)
class Wanted:
    """An object to have on the destination: its key and its recorded stored size and sha256."""

    key: str
    size: int
    sha256: str

    def mismatch(self, size: int, sha256: str) -> str | None:
        """Why bytes of ``size``/``sha256`` are not this object, or None when they are."""
        if size != self.size:
            return f"{self.key}: {size} bytes, the manifest records {self.size}"
        if sha256 != self.sha256:
            return f"{self.key}: sha256 differs from the manifest"
        return None


@dataclass
class CopyStats:
    """What the copy did with objects (counted once per object per run)."""

    uploaded: int = 0
    uploaded_bytes: int = 0
    checked: int = 0  # already on the destination, read back, identical: not uploaded
    checked_bytes: int = 0
    trusted: int = 0  # named by what the destination committed: listed size only
    keys_uploaded: set[str] = field(default_factory=set)


def stored_digest(storage: Storage, key: str) -> tuple[int, str]:
    """Stream ``key`` and return its size and sha256 (``NotFound`` when absent)."""
    digest = hashlib.sha256()
    size = 0
    for chunk in storage.get(key):
        digest.update(chunk)
        size += len(chunk)
    return size, digest.hexdigest()


def _checked(chunks: Iterable[bytes], want: Wanted, source: Storage) -> Iterator[bytes]:
    """Pass ``chunks`` on; at their end raise SourceDamaged unless they are ``want``.

    Raised inside the upload's own read of the stream, so the put is aborted (a multipart
    upload aborted, a temp file removed) and nothing of a damaged source is stored.
    """
    digest = hashlib.sha256()
    size = 0
    for chunk in chunks:
        digest.update(chunk)
        size += len(chunk)
        yield chunk
    problem = want.mismatch(size, digest.hexdigest())
    if problem:
        raise SourceDamaged(f"source {source.url}: {problem}; not copied")


class ObjectCopier:
    """Puts objects on the destination once each, checked, with bounded parallelism.

    ``present`` is one listing of the destination taken at the start; ``trusted`` the keys
    named by snapshots or chunks the destination committed (their listed size suffices).
    Memory: ``workers`` uploads at a time, each holding at most the destination's
    ``put_buffer`` (one part in the making plus the parts in flight).
    """

    def __init__(
        self,
        source: Storage,
        dest: Storage,
        present: dict[str, ObjectInfo],
        *,
        retain_until: datetime | None,
        workers: int,
    ) -> None:
        self.source = source
        self.dest = dest
        self.present = present
        self.retain_until = retain_until
        self.workers = workers
        self.trusted: set[str] = set()
        self.done: set[str] = set()  # on the destination, checked in this run
        self.stats = CopyStats()
        self._guard = threading.Lock()

    def trust(self, keys: Collection[str]) -> None:
        """Keys the destination committed: present with the listed size, nothing is read."""
        self.trusted.update(keys)

    def ensure(self, wanted: Iterable[Wanted]) -> None:
        """Have every object of ``wanted`` on the destination, checked; the first error raises.

        The other workers finish the object they are on (each is complete or absent), so a
        failed run leaves only whole objects for the next one to find.
        """
        todo = list({w.key: w for w in wanted if w.key not in self.done}.values())
        if not todo:
            return
        with ThreadPoolExecutor(self.workers, thread_name_prefix="drtool-copy") as pool:
            for _ in pool.map(self._one, todo):
                pass

    def _one(self, want: Wanted) -> None:
        """One object: trusted, or read back and found identical, or uploaded and read back."""
        listed = self.present.get(want.key)
        if listed is not None and listed.size == want.size:
            if want.key in self.trusted:
                self._finish(want, "trusted")
                return
            try:
                size, sha256 = stored_digest(self.dest, want.key)
            except NotFound:
                size, sha256 = -1, ""
            problem = want.mismatch(size, sha256)
            if problem is None:
                self._finish(want, "checked")
                return
            log.warning("destination %s: %s; uploading it again", self.dest.url, problem)
        self._upload(want)
        self._finish(want, "uploaded")

    def _upload(self, want: Wanted) -> None:
        """Stream the source object into the destination, then read it back and compare."""
        try:
            source = self.source.get(want.key)  # raises at the call when absent
        except NotFound as exc:
            raise SourceDamaged(f"source: {exc}; not copied") from None
        info = self.dest.put(
            want.key,
            _checked(source, want, self.source),
            retain_until=self.retain_until,
            expected_size=want.size,
        )
        if info.size != want.size:
            raise IntegrityError(
                f"destination {self.dest.url}: {want.key} stored as {info.size} bytes, "
                f"sent {want.size}"
            )
        size, sha256 = stored_digest(self.dest, want.key)
        problem = want.mismatch(size, sha256)
        if problem:
            raise IntegrityError(
                f"destination {self.dest.url}: {problem} after the upload (read back)"
            )

    def _finish(self, want: Wanted, how: str) -> None:
        with self._guard:
            self.done.add(want.key)
            if how == "trusted":
                self.stats.trusted += 1
            elif how == "checked":
                self.stats.checked += 1
                self.stats.checked_bytes += want.size
            else:
                self.stats.uploaded += 1
                self.stats.uploaded_bytes += want.size
                self.stats.keys_uploaded.add(want.key)
        log.debug("%s %s (%d bytes)", how, want.key, want.size)


def put_small(
    dest: Storage, key: str, data: bytes, *, retain_until: datetime | None = None
) -> None:
    """Put a small object (a manifest, an index chunk) and read it back: it must be ``data``."""
    dest.put_bytes(key, data, retain_until=retain_until)
    if dest.get_bytes(key) != data:
        raise IntegrityError(f"destination {dest.url}: {key} reads back other bytes than written")
