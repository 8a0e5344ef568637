"""Repository storage: one interface (:class:`Storage`), backends chosen by URL scheme."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from urllib.parse import SplitResult, unquote, urlsplit

from drtool.errors import ConfigError
from drtool.storage.base import ObjectInfo, Storage, StorageOptions

__all__ = ["ObjectInfo", "Storage", "StorageOptions", "open_storage"]


def _open_file(url: SplitResult, options: StorageOptions) -> Storage:
    from drtool.storage.file import FileStorage

    if url.netloc not in ("", "localhost") or not url.path.startswith("/"):
        raise ConfigError(
            f"repository: file URLs need an absolute path, file:///... (got {url.geturl()})"
        )
    return FileStorage(Path(unquote(url.path)))


def _open_s3(url: SplitResult, options: StorageOptions) -> Storage:
    from drtool.storage.s3 import S3Storage  # boto3 is slow to import: only when needed

    if not url.hostname or url.username or url.password or url.port:
        raise ConfigError("repository: S3 URLs look like s3://bucket/prefix")
    return S3Storage(url.hostname, unquote(url.path), options)


_OPENERS: dict[str, Callable[[SplitResult, StorageOptions], Storage]] = {
    "file": _open_file,
    "s3": _open_s3,
}


def open_storage(url: str, options: StorageOptions) -> Storage:
    """The backend for ``url`` (``file:///abs/path`` or ``s3://bucket/prefix``)."""
    parts = urlsplit(url)
    opener = _OPENERS.get(parts.scheme)
    if opener is None or parts.query or parts.fragment:
        raise ConfigError(
            f"repository: unsupported storage URL scheme {parts.scheme!r} "
            f"(use {', '.join(f'{s}://' for s in _OPENERS)})"
        )
    return opener(parts, options)
