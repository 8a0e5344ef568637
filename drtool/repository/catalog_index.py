"""The signed catalog index: a cache of the manifests, so the catalog need not read them all.

``list``, ``restore latest`` and the backup's chain link read every manifest: one GET each,
8,760 a year for an hourly job. The index holds, in a few signed pages, a copy of every
committed manifest body with the sha256, size and MD5 of its stored bytes::

    catalog/<9999999999 - seq>.json   {"body": {...}, "signature": "..."}

Keys count down, so S3's lexicographic listing returns the newest page first. A page is
``full`` (every snapshot known when it was written) or a ``delta`` (snapshots added,
snapshots forgotten) chained to the page before it by that page's sha256; readers read from
the newest page back to the newest full page (at most ``COMPACT_EVERY`` pages). Pages are
signed with the backup host's key, exactly like manifests, and written under the writer lock.

The index is a cache, never the source of truth (docs/decisions/0020-catalog-index.md): the
manifests are. A reader reconciles it with a listing (the days since the index was written,
``tail_manifests``; everything for a full ``list``), reads and checks any manifest it does
not know, and never shows a snapshot whose manifest is gone. An index that is missing,
unsigned or broken is logged and the catalog falls back to reading every manifest. This
module only reads and writes pages and lists the tail; ``catalog`` does the reconciling.
"""

from __future__ import annotations

import hashlib
import json
import logging
import socket
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from drtool import keys
from drtool.errors import ConfigError, IntegrityError, NotFound
from drtool.repository import layout
from drtool.repository.ids import id_time, is_id
from drtool.repository.manifest import Manifest, canonical, manifest_sha256
from drtool.storage.base import ObjectInfo, Storage

log = logging.getLogger(__name__)

PREFIX = "catalog/"
FORMAT = "drtool-catalog/1"
SEQ_TOP = 9_999_999_999  # page keys are SEQ_TOP - seq, 10 digits: newest first in a listing
#: a writer turns its delta into a full page once this many deltas follow the last full one,
#: so a reader never reads more than COMPACT_EVERY + 1 pages
COMPACT_EVERY = 16
#: manifests are looked for this far before the index's listing time (a backup that started
#: before another's listing and committed after it has an id older than that listing)
TAIL_MARGIN = timedelta(days=1)
#: beyond this many days of listing since the index was written, a full listing is cheaper
TAIL_MAX_DAYS = 31


class IndexUnusable(Exception):
    """The index cannot be trusted (a page unsigned, altered, missing): read the manifests."""


@dataclass(frozen=True)
class Entry:
    """One indexed snapshot: its manifest body and what its stored bytes hash and weigh."""

    manifest: Manifest
    sha256: str
    size: int
    md5: str

    @property
    def snapshot_id(self) -> str:
        return self.manifest.snapshot_id

    def matches(self, listed: ObjectInfo) -> bool:
        """Whether a listed manifest object is (as far as a listing can tell) this one.

        Size always; the MD5 too where the listing gives a plain MD5 ETag (S3, one-part
        puts, which a manifest always is). A manifest replaced by one of equal size on a
        store without ETags is found by ``verify`` and ``restore``, which read and hash it.
        """
        if listed.size != self.size:
            return False
        etag = (listed.etag or "").strip('"')
        return not (len(etag) == 32 and "-" not in etag and etag != self.md5)


def entry_for(manifest: Manifest, stored: bytes) -> Entry:
    """The index entry of a manifest stored as ``stored``."""
    md5 = hashlib.md5(stored, usedforsecurity=False).hexdigest()
    return Entry(manifest, manifest_sha256(stored), len(stored), md5)


@dataclass(frozen=True)
class Index:
    """What the pages say, and where the next page goes."""

    entries: dict[str, Entry]  # snapshot id -> entry
    head_seq: int  # the newest page's seq
    head_sha256: str  # the newest page's stored sha256 (the next delta names it)
    deltas: int  # delta pages after the full page the reader stopped at
    covered: datetime  # when the newest page's writer listed the manifests


def page_key(seq: int) -> str:
    """The key of page ``seq`` (counting down, so listings return the newest first)."""
    return f"{PREFIX}{SEQ_TOP - seq:010d}.json"


def page_seqs(storage: Storage) -> list[int]:
    """The seqs of every page, newest first (one listing; order checked, not assumed)."""
    seqs = []
    for obj in storage.list(PREFIX):
        name = obj.key.removeprefix(PREFIX).removesuffix(".json")
        if len(name) == 10 and name.isdigit() and obj.key.endswith(".json"):
            seqs.append(SEQ_TOP - int(name))
    return sorted(seqs, reverse=True)


def read_index(storage: Storage, verify_keys: list[str], repo_id: str) -> Index | None:
    """The index as its pages say, or None when the repository has none yet.

    Reads from the newest page back to the newest full page, checking each page's signature,
    repository, seq and the link of every delta to the page before it. Raises
    ``IndexUnusable`` (the caller warns and reads the manifests) when anything fails.
    """
    seqs = page_seqs(storage)
    if not seqs:
        return None
    pages: list[dict[str, Any]] = []  # bodies, newest first
    shas: list[str] = []
    for position, seq in enumerate(seqs):
        if seq != seqs[0] - position:
            raise IndexUnusable(f"page {seqs[0] - position} is missing")
        key = page_key(seq)
        try:
            stored = storage.get_bytes(key)
        except NotFound:
            raise IndexUnusable(f"{key} vanished while read") from None
        body = open_page(stored, verify_keys, name=key)
        if body["repo_id"] != repo_id or body["seq"] != seq:
            raise IndexUnusable(f"{key}: belongs to another repository or place")
        sha = hashlib.sha256(stored).hexdigest()
        if pages and pages[-1]["previous_sha256"] != sha:
            raise IndexUnusable(f"{page_key(seq + 1)}: does not follow {key} (replaced)")
        pages.append(body)
        shas.append(sha)
        if body["kind"] == "full":
            break
    else:
        raise IndexUnusable("no full page")
    entries: dict[str, Entry] = {}
    for body in reversed(pages):
        for raw in body["added"]:
            entry = _entry_from(raw, repo_id)
            entries[entry.snapshot_id] = entry
        for sid in body["forgotten"]:
            entries.pop(sid, None)
    covered = datetime.fromisoformat(pages[0]["covered"])
    return Index(entries, seqs[0], shas[0], len(pages) - 1, covered)


def open_page(stored: bytes, verify_keys: list[str], *, name: str) -> dict[str, Any]:
    """A page's body once its signature verifies against a trusted key; else IndexUnusable."""
    try:
        doc = json.loads(stored)
        body, signature = doc["body"], doc["signature"]
        if body.get("format") != FORMAT or body.get("kind") not in ("full", "delta"):
            raise IndexUnusable(f"{name}: unknown format")
        missing = {"repo_id", "seq", "previous_sha256", "added", "forgotten", "covered"} - set(body)
        if missing:
            raise IndexUnusable(f"{name}: lacks {', '.join(sorted(missing))}")
    except (ValueError, KeyError, TypeError, AttributeError):
        raise IndexUnusable(f"{name}: not a catalog page") from None
    for verify_key in verify_keys:
        try:
            keys.verify_signature(
                keys.parse_verify_key(verify_key), canonical(body), signature, name=name
            )
            return dict(body)
        except (IntegrityError, ConfigError):
            continue
    raise IndexUnusable(f"{name}: signature does not verify against a trusted key")


def _entry_from(raw: dict[str, Any], repo_id: str) -> Entry:
    try:
        manifest = Manifest.from_dict(raw["body"])
        entry = Entry(manifest, str(raw["sha256"]), int(raw["size"]), str(raw["md5"]))
    except (IntegrityError, KeyError, TypeError, ValueError):
        raise IndexUnusable("an entry is malformed") from None
    if manifest.repo_id != repo_id or not is_id(manifest.snapshot_id):
        raise IndexUnusable(f"entry {manifest.snapshot_id}: belongs to another repository")
    return entry


def write_page(
    storage: Storage,
    signing_key: Ed25519PrivateKey,
    *,
    repo_id: str,
    seq: int,
    full: bool,
    previous_sha256: str | None,
    added: list[Entry],
    forgotten: list[str],
    covered: datetime,
) -> str:
    """Sign and store page ``seq``; return its stored sha256."""
    body = {
        "format": FORMAT,
        "repo_id": repo_id,
        "seq": seq,
        "kind": "full" if full else "delta",
        "previous_sha256": previous_sha256,
        "covered": covered.astimezone(UTC).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "added": [
            {"sha256": e.sha256, "size": e.size, "md5": e.md5, "body": e.manifest.to_dict()}
            for e in sorted(added, key=lambda e: e.snapshot_id)
        ],
        "forgotten": sorted(forgotten),
    }
    stored = json.dumps(
        {"body": body, "signature": keys.sign(signing_key, canonical(body))},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    ).encode()
    storage.put_bytes(page_key(seq), stored)
    return hashlib.sha256(stored).hexdigest()


def manifests_listed(objects: list[ObjectInfo]) -> dict[str, ObjectInfo]:
    """Snapshot id -> its listed manifest object, from a listing under ``snapshots/``."""
    found = {}
    for obj in objects:
        parts = obj.key.split("/")
        if len(parts) == 3 and parts[2] == "manifest.json" and is_id(parts[1]):
            found[parts[1]] = obj
    return found


def tail_since(index: Index) -> datetime:
    """Where the tail starts: the index's listing time, or its newest snapshot if older.

    A manifest whose id is older than both and that no page names (a crash between manifest
    and page, by a host whose clock was far behind) is found by the full listing of ``list``,
    ``verify`` and ``prune`` (which then adds it to the index), not by the bounded paths.
    """
    newest = max(index.entries, default=None)
    if newest is None:
        return index.covered
    return min(index.covered, id_time(newest))


def tail_manifests(
    storage: Storage, since: datetime, now: datetime
) -> tuple[str, dict[str, ObjectInfo]] | None:
    """The first day listed (``YYYYMMDD``) and the manifests of the days since ``since``.

    One listing per day (``snapshots/<YYYYMMDD>``) from ``since - TAIL_MARGIN`` to tomorrow:
    a snapshot committed after the index was written, or whose page was never written (a
    crash between manifest and page), is there. None when that is more than
    ``TAIL_MAX_DAYS`` days (list everything instead).
    """
    first = (since - TAIL_MARGIN).astimezone(UTC).date()
    last = (now + TAIL_MARGIN).astimezone(UTC).date()
    if (last - first).days > TAIL_MAX_DAYS:
        return None
    found: dict[str, ObjectInfo] = {}
    day: date = first
    while day <= last:
        found.update(manifests_listed(list(storage.list(f"{layout.SNAPSHOTS}{day:%Y%m%d}"))))
        day += timedelta(days=1)
    return f"{first:%Y%m%d}", found


def drop_pages_before(storage: Storage, seq: int) -> int:
    """Delete the pages older than full page ``seq`` (prune, which may delete); how many."""
    old = [s for s in page_seqs(storage) if s < seq]
    for s in old:
        storage.delete(page_key(s))
    return len(old)
