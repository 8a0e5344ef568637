"""The inner header: binds an object's plaintext to its repository slot.

It is a zstd *skippable frame* (magic 0x184D2A50, 4-byte little-endian length, then compact
JSON tagged ``"drtool": "inner-header-1"``) placed before the zstd data frame, inside the
encryption. Stock ``zstd -d`` skips it, so ``age -d | zstd -d`` yields exactly the original
data; drtool reads it first and refuses an object found in the wrong slot.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, fields

from drtool.errors import IntegrityError
from drtool.pipeline.reader import ByteReader

SKIPPABLE_MAGIC = (0x184D2A50).to_bytes(4, "little")
FORMAT_TAG = "inner-header-1"
_MAX_JSON = 4096


@dataclass(frozen=True)
class InnerHeader:
    """Which repository, snapshot and component an object belongs to, and its kind."""

    repo_id: str
    snapshot_id: str
    component: str
    kind: str

    def to_frame(self) -> bytes:
        """The header as a zstd skippable frame."""
        doc = {"drtool": FORMAT_TAG, **asdict(self)}
        body = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
        return SKIPPABLE_MAGIC + len(body).to_bytes(4, "little") + body

    def describe(self) -> str:
        """One-line human description."""
        return (
            f"snapshot {self.snapshot_id} component {self.component}"
            f" (repo {self.repo_id}, kind {self.kind})"
        )


def read_header(
    chunks: Iterable[bytes], *, name: str = "object"
) -> tuple[InnerHeader, Iterator[bytes]]:
    """Parse the leading header frame; return it and the rest of the stream."""
    reader = ByteReader(chunks)
    start = reader.read(8)
    if len(start) < 8 or start[:4] != SKIPPABLE_MAGIC:
        raise IntegrityError(f"{name}: missing drtool inner header")
    length = int.from_bytes(start[4:], "little")
    body = reader.read(length) if length <= _MAX_JSON else b""
    keys = {f.name for f in fields(InnerHeader)}
    try:
        doc = json.loads(body) if len(body) == length else None
    except ValueError:
        doc = None
    if (
        not isinstance(doc, dict)
        or doc.pop("drtool", None) != FORMAT_TAG
        or set(doc) != keys
        or not all(isinstance(v, str) for v in doc.values())
    ):
        raise IntegrityError(f"{name}: malformed drtool inner header")
    return InnerHeader(**doc), reader.rest()


def check_header(found: InnerHeader, expected: InnerHeader, *, name: str = "object") -> None:
    """IntegrityError unless the object's header is the one its slot expects."""
    if found != expected:
        raise IntegrityError(
            f"{name}: belongs to {found.describe()}, expected {expected.describe()}"
        )
