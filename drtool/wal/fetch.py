"""Fetching sealed WAL files back out of the repository into a staging directory, checked.

Each file is streamed (never whole in memory): the stored bytes are hashed against the signed
WAL index, authenticated and decrypted (its inner header binds it to the repository and its
name), the plaintext is hashed against the index, and a segment's first page header must name
the expected cluster (``system_identifier``) and its own position in the WAL. Only then is the
``.part`` file renamed to the name recovery asks for; a damaged or missing file raises
IntegrityError naming it, and nothing of it stays.
"""

from __future__ import annotations

import hashlib
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

from drtool.errors import IntegrityError, NotFound
from drtool.pipeline.seal import unseal
from drtool.storage.base import Storage
from drtool.wal.history import Branch, parse_history, timeline_at
from drtool.wal.index import WalEntry
from drtool.wal.names import is_segment, parse_segment
from drtool.wal.sealer import wal_header

# XLogLongPageHeaderData: magic u16, info u16, tli u32, pageaddr u64, rem_len u32, (pad),
# then sysid u64, seg_size u32, xlog_blcksz u32. Little-endian on every platform drtool runs.
_LONG_HEADER = struct.Struct("<HHIQI4xQII")
XLP_LONG_HEADER = 0x0002


def check_segment_header(
    path: Path,
    name: str,
    segment_size: int,
    system_identifier: str,
    branches: list[Branch] | None = None,
) -> None:
    """The segment's long page header names ``system_identifier``, this segment's position,
    and the timeline its start lies on: its own, or, for the segment a promotion landed in,
    the parent its timeline's history (``branches``) says it branched from."""
    with path.open("rb") as f:
        head = f.read(_LONG_HEADER.size)
    if len(head) < _LONG_HEADER.size:
        raise IntegrityError(f"WAL segment {name}: too short for a page header")
    _magic, info, tli, pageaddr, _rem, sysid, seg_size, _blck = _LONG_HEADER.unpack(head)
    seg = parse_segment(name, segment_size)
    if (
        not info & XLP_LONG_HEADER
        or pageaddr != seg.segno * segment_size
        or seg_size != (segment_size)
    ):
        raise IntegrityError(f"WAL segment {name}: its page header does not match its name")
    expected = timeline_at(seg.segno * segment_size, seg.timeline, branches or [])
    if tli != expected:
        raise IntegrityError(
            f"WAL segment {name}: its page header names timeline {tli}, its timeline's "
            f"history says {expected}"
        )
    if str(sysid) != system_identifier:
        raise IntegrityError(
            f"WAL segment {name} belongs to the cluster with system identifier {sysid}, the "
            f"base backup to {system_identifier}: the WAL of another cluster"
        )


def fetch(
    storage: Storage,
    repo_id: str,
    entry: WalEntry,
    identities: list[str],
    recipients_hint: list[str],
    dest_dir: Path,
) -> Path:
    """Stream ``entry`` into ``dest_dir/<name>``, fully checked; IntegrityError names it."""
    part = dest_dir / f"{entry.name}.part"
    stored, plain = hashlib.sha256(), hashlib.sha256()
    stored_size = plain_size = 0

    def counted() -> Iterator[bytes]:
        nonlocal stored_size
        for chunk in storage.get(entry.key):
            stored.update(chunk)
            stored_size += len(chunk)
            yield chunk

    try:
        with part.open("wb") as out:
            for piece in unseal(
                counted(),
                identities=identities,
                expected=wal_header(repo_id, entry.name),
                name=entry.key,
                recipients_hint=recipients_hint,
            ):
                plain.update(piece)
                plain_size += len(piece)
                out.write(piece)
        problem = entry.mismatch(stored_size, stored.hexdigest())
        if problem is None and (plain_size, plain.hexdigest()) != (
            entry.plain_size,
            entry.plain_sha256,
        ):
            problem = f"{entry.key}: decrypted content differs from the WAL index"
        if problem is not None:
            raise IntegrityError(f"WAL {entry.name}: {problem}")
    except NotFound:
        part.unlink(missing_ok=True)
        raise IntegrityError(
            f"WAL segment {entry.name} is missing from the repository ({entry.key}), although "
            "the signed WAL index records it"
        ) from None
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    done = dest_dir / entry.name
    part.rename(done)
    return done


def fetch_checked(
    storage: Storage,
    repo_id: str,
    entry: WalEntry,
    identities: list[str],
    recipients_hint: list[str],
    dest_dir: Path,
    *,
    segment_size: int,
    system_identifier: str,
    branches: list[Branch] | None = None,
) -> Path:
    """:func:`fetch`, then (for a segment) its page header; the file is removed if wrong.

    ``branches``: the parsed history of the segment's timeline (none for timeline 1).
    """
    path = fetch(storage, repo_id, entry, identities, recipients_hint, dest_dir)
    if is_segment(entry.name):
        try:
            check_segment_header(path, entry.name, segment_size, system_identifier, branches)
        except IntegrityError:
            path.unlink(missing_ok=True)
            raise
    return path


def read_histories(
    storage: Storage,
    repo_id: str,
    entries: list[WalEntry],
    identities: list[str],
    recipients_hint: list[str],
) -> dict[int, list[Branch]]:
    """The history files ``entries``, fetched and checked as :func:`fetch` does, parsed (by
    timeline): what a plan needs to know which timeline's WAL recovery will read."""
    out: dict[int, list[Branch]] = {}
    with tempfile.TemporaryDirectory(prefix="drtool-history-") as tmp:
        for entry in entries:
            path = fetch(storage, repo_id, entry, identities, recipients_hint, Path(tmp))
            out[entry.timeline] = parse_history(path.read_text(errors="replace"), name=entry.name)
            path.unlink()
    return out
