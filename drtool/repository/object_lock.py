"""Object Lock that holds for every object a snapshot needs, not just the ones it wrote.

A snapshot writes its own objects with its retain-until date, but it also references content
blobs written by earlier snapshots, locked only until *their* dates. Once the oldest date
passes, a credential with delete rights (or a lifecycle rule) could remove a blob a current
snapshot still needs. So before a manifest is committed, every reused object is extended to at
least the snapshot's retain-until (``PutObjectRetention``, which the documented backup policy
grants).

Cost is bounded two ways: an extension goes ``margin`` past what is needed, so the next
backups find it long enough and skip it; and the backup host remembers the dates it set or saw
(a cache in its state dir), so an unchanged blob costs no request at all. Without the cache
(a new host) each reused object costs one GetObjectRetention, plus one Put where it is short.
The cache only saves requests: ``drtool verify`` reads the real dates (:func:`short_locked`).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Collection
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from drtool.repository import layout
from drtool.repository.manifest import Manifest
from drtool.storage.base import Storage

log = logging.getLogger(__name__)

#: Parallel retention requests: they are tiny, so latency, not bandwidth, bounds them.
WORKERS = 8


def default_margin(retain_days: int) -> timedelta:
    """How far past the needed date an extension goes: a quarter of the retention, ≥ 1 day.

    With daily backups and 30 days of retention a blob is extended about once a week.
    """
    return timedelta(days=max(1.0, retain_days / 4))


@dataclass
class RetentionCache:
    """Retain-until dates the backup host set or read, by object key (a JSON file)."""

    path: Path
    dates: dict[str, datetime] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> RetentionCache:
        """Read the cache; a missing or unreadable one is empty (it only saves requests)."""
        try:
            raw = json.loads(path.read_text())
            dates = {k: datetime.fromisoformat(v) for k, v in raw.items()}
        except FileNotFoundError:
            dates = {}
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            log.warning("%s: unreadable retention cache, starting a new one (%s)", path, exc)
            dates = {}
        return cls(path, dates)

    def save(self, now: datetime) -> None:
        """Write the dates still in the future (past ones save nothing) atomically, mode 0600."""
        data = {k: d.isoformat() for k, d in sorted(self.dates.items()) if d > now}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
        tmp.replace(self.path)


@dataclass
class ExtendStats:
    """What :func:`protect` did, for the log and the benchmark."""

    objects: int = 0
    read: int = 0
    extended: int = 0
    seconds: float = 0.0

    @property
    def requests(self) -> int:
        """Requests sent: one GetObjectRetention per unknown date, one Put per extension."""
        return self.read + self.extended


def protect(
    storage: Storage,
    keys: Collection[str],
    until: datetime,
    *,
    margin: timedelta,
    cache: RetentionCache,
) -> ExtendStats:
    """Make every object in ``keys`` retained at least until ``until``.

    Raises the storage's error when a date cannot be read or extended: the caller must not
    commit a snapshot whose objects could be deleted before its own retention ends.
    """
    started = time.monotonic()
    stats = ExtendStats(objects=len(keys))
    unknown = [k for k in keys if k not in cache.dates]
    with ThreadPoolExecutor(WORKERS) as pool:
        for key, date in zip(unknown, pool.map(storage.retention, unknown), strict=True):
            stats.read += 1
            if date is not None:
                cache.dates[key] = date
    short = [k for k in keys if k not in cache.dates or cache.dates[k] < until]
    target = until + margin
    _extend_all(storage, short, target)
    for key in short:
        cache.dates[key] = target
    stats.extended = len(short)
    stats.seconds = time.monotonic() - started
    return stats


def _extend_all(storage: Storage, keys: list[str], until: datetime) -> None:
    """Extend ``keys`` in parallel; the first failure is raised after all have finished."""
    with ThreadPoolExecutor(WORKERS) as pool:
        for _ in pool.map(lambda k: storage.extend_retention(k, until), keys):
            pass


def short_locked(storage: Storage, manifest: Manifest) -> list[str] | None:
    """Objects of ``manifest`` locked for less time than its own manifest object (key-less).

    None when the manifest itself carries no retention (no Object Lock in use).
    """
    own = storage.retention(layout.manifest_key(manifest.snapshot_id))
    if own is None:
        return None
    keys = [o.key for o in manifest.objects()]
    with ThreadPoolExecutor(WORKERS) as pool:
        dates = list(pool.map(storage.retention, keys))
    return [k for k, d in zip(keys, dates, strict=True) if d is None or d < own]
