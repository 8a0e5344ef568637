"""Byte-stream helpers the stores' backups share: JSON objects, files, progress counting."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from drtool.stores.base import Progress


def json_chunks(data: Any) -> list[bytes]:
    """``data`` as one chunk of canonical JSON (sorted keys), as fingerprints are stored."""
    return [json.dumps(data, sort_keys=True, ensure_ascii=False).encode()]


def file_chunks(path: Path, size: int = 1 << 20) -> Iterator[bytes]:
    """A file's bytes in chunks of ``size``: streamed, never whole in memory."""
    with path.open("rb") as fh:
        while chunk := fh.read(size):
            yield chunk


def counting(chunks: Iterable[bytes], component: str, progress: Progress) -> Iterator[bytes]:
    """Pass ``chunks`` through, reporting each one's size to ``progress``."""
    for chunk in chunks:
        progress(component, len(chunk))
        yield chunk
