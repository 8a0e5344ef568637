"""The storage interface every backend implements, and the value types it returns.

Keys are ``/``-separated paths relative to the repository root; the backend adds its bucket
and prefix (S3) or base directory (file). See docs/decisions/0002-storage-interface.md.
"""

from __future__ import annotations

import builtins
import hashlib
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import ClassVar, Literal

from drtool.errors import IntegrityError, NotFound

#: File names with this prefix are in-progress writes of the file backend; no key may use it.
TEMP_PREFIX = ".tmp-"


MiB = 1024 * 1024


@dataclass(frozen=True)
class StorageOptions:
    """How to reach and write to a store; built once from the config. ``repr`` hides secrets."""

    endpoint_url: str | None = None
    region: str = "us-east-1"
    access_key: str | None = field(default=None, repr=False)
    secret_key: str | None = field(default=None, repr=False)
    path_style: bool = True
    part_size: int = 16 * MiB  # S3 grows it to stay within 10,000 parts
    max_concurrency: int = 2  # parts in flight per upload
    #: objects written at once by one caller (backup.minio_workers): each needs its connections
    parallel_puts: int = 1
    retries: int = 6  # attempts per request, the first included
    object_lock_mode: Literal["GOVERNANCE", "COMPLIANCE"] | None = None
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    list_page_size: int = 1000


@dataclass(frozen=True)
class ObjectInfo:
    """What a backend knows about one stored object."""

    key: str
    size: int
    etag: str | None = None
    version_id: str | None = None
    last_modified: datetime | None = None  # tz-aware UTC


def check_key(key: str) -> str:
    """Return ``key`` if it is a clean relative key, else raise ``ValueError`` (a caller bug)."""
    parts = key.split("/")
    if (
        not key
        or "\\" in key
        or "\x00" in key
        or any(p in ("", ".", "..") or p.startswith(TEMP_PREFIX) for p in parts)
    ):
        raise ValueError(f"invalid storage key {key!r}")
    return key


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do beyond the common interface, so callers ask instead of probing.

    ``object_lock``: :meth:`Storage.object_lock_enabled` reports the store's Object Lock.
    ``server_clock``: :meth:`Storage.server_time` reads the server's clock.
    ``access_control``: a credential may lack rights (a delete probe means something).
    """

    object_lock: bool = False
    server_clock: bool = False
    access_control: bool = False


class Storage(ABC):
    """A repository's object store: streaming, atomic puts; listing that never hides errors."""

    url: str  # display URL, no secrets: "s3://bucket/prefix" or "file:///path"
    capabilities: ClassVar[Capabilities] = Capabilities()

    @abstractmethod
    def put(
        self,
        key: str,
        chunks: Iterable[bytes],
        *,
        retain_until: datetime | None = None,
        expected_size: int | None = None,
        confirm: bool = True,
    ) -> ObjectInfo:
        """Store the concatenated ``chunks`` under ``key``, confirmed by a HEAD.

        Memory stays bounded whatever the size. On any exception the object is absent (a
        multipart upload is aborted, a temp file removed). ``expected_size`` is a hint that lets
        S3 pick a part size; ``retain_until`` sets Object Lock retention where configured.
        Raises ``IntegrityError`` when the stored size differs from the bytes sent.

        ``confirm=False`` skips the HEAD of a single-request upload: the result is the size
        sent and the ETag the server answered, and the caller must confirm both later from a
        listing (a snapshot's commit does, one request per 1,000 objects instead of one each).
        """

    def put_buffer(self, size: int) -> int:
        """The most bytes one :meth:`put` of ``size`` bytes holds in memory at once."""
        return min(size, MiB)

    def put_bytes(
        self, key: str, data: bytes, *, retain_until: datetime | None = None
    ) -> ObjectInfo:
        """Store ``data`` under ``key`` (see :meth:`put`)."""
        return self.put(key, [data], retain_until=retain_until, expected_size=len(data))

    def rewrite_head(
        self,
        key: str,
        head: bytes,
        skip: int,
        *,
        source: ObjectInfo,
        retain_until: datetime | None = None,
        expect_sha256: str | None = None,
    ) -> ObjectInfo:
        """Replace the first ``skip`` bytes of ``key`` by ``head``; the rest stays byte-identical.

        Key rotation (ADR 0023) rewrites only an age header this way. Atomic like :meth:`put`:
        readers see the old or the new object. This default streams the object through
        (a directory: temp file + rename); ``expect_sha256`` is checked before the new object
        replaces the old one (on a mismatch nothing is replaced). S3 overrides it to copy large
        payloads server-side.
        """

        def body() -> Iterator[bytes]:
            digest = hashlib.sha256(head)
            seen = 0
            yield head
            for piece in self.get(key, version_id=source.version_id):
                start = max(0, skip - seen)
                seen += len(piece)
                if start < len(piece):
                    rest = piece[start:]
                    digest.update(rest)
                    yield rest
            if expect_sha256 is not None and digest.hexdigest() != expect_sha256:
                raise IntegrityError(f"{key}: changed while its header was rewritten; not replaced")

        size = len(head) + source.size - skip
        return self.put(key, body(), retain_until=retain_until, expected_size=size)

    @abstractmethod
    def get(self, key: str, *, version_id: str | None = None) -> Iterator[bytes]:
        """Stream an object in bounded pieces; ``NotFound`` (raised by the call) when absent."""

    def get_bytes(self, key: str) -> bytes:
        """Read a whole (small) object into memory."""
        return b"".join(self.get(key))

    @abstractmethod
    def head(self, key: str) -> ObjectInfo:
        """Describe an object; ``NotFound`` when absent."""

    def exists(self, key: str) -> bool:
        """Whether ``key`` exists (errors other than absence raise)."""
        try:
            self.head(key)
        except NotFound:
            return False
        return True

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every object whose key starts with ``prefix``; errors raise, never "empty".

        The order is unspecified (AWS sorts keys, SeaweedFS walks directories): sort if it matters.
        """

    @abstractmethod
    def delete(self, key: str, *, version_id: str | None = None) -> None:
        """Delete ``key`` (or one version of it); an absent object is fine."""

    def retention(self, key: str) -> datetime | None:
        """The Object Lock retain-until date of ``key``; None where the backend has no lock.

        Backends without Object Lock (a directory) have nothing to extend or check.
        """
        return None

    def versioned(self) -> bool:
        """Whether a delete keeps the data as an older version (S3 versioning, Object Lock)."""
        return False

    def extend_retention(self, key: str, until: datetime) -> None:
        """Raise ``key``'s Object Lock retention to ``until`` (never lowers it); a no-op here."""
        return None

    @abstractmethod
    def stale_uploads(self, older_than: datetime) -> builtins.list[str]:
        """Keys of unfinished writes (multipart uploads, temp files) begun before ``older_than``."""

    @abstractmethod
    def abort_stale_uploads(self, older_than: datetime) -> int:
        """Remove the unfinished writes :meth:`stale_uploads` reports; return how many."""

    @abstractmethod
    def check(self) -> None:
        """Raise ``StorageError``/``NotFound`` with a clear message unless the store is usable."""

    def create_root(self) -> None:
        """Make the store ready for a new repository (``drtool init``); by default only check.

        A backend whose root is a plain directory creates it; a bucket is never created (its
        Object Lock and policy are the operator's decision, docs/OPERATIONS.md).
        """
        self.check()

    def object_lock_enabled(self) -> bool:
        """Whether the store has Object Lock on (only when ``capabilities.object_lock``)."""
        return False

    def server_time(self) -> datetime | None:
        """The server's clock (only when ``capabilities.server_clock``); None: unknown."""
        return None
