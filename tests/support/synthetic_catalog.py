"""Many signed snapshots, fast, and a storage wrapper that counts requests (ADR 0020 tests).

``write_history`` writes N chained, signed manifests (Redis-only, one small object each) in
the repository's real layout. A directory repository is written straight to the files (10,000
fsynced puts would take minutes and test nothing the catalog reads); a bucket through the
storage, in parallel. Listing treats them like any snapshot: the objects exist with the sizes
the manifests record. They are not restorable (the object is not an age file).

``CountingStorage`` counts what reaches the store: each GET, PUT, HEAD, DELETE, and each LIST
page (one per 1,000 keys, as S3 pages them).
"""

from __future__ import annotations

import builtins
import hashlib
import json
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from datetime import datetime, timedelta
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from drtool import keys
from drtool.repository import layout, verifications
from drtool.repository.ids import new_id
from drtool.repository.manifest import (
    ComponentEntry,
    Manifest,
    ObjectEntry,
    canonical,
    manifest_sha256,
    sign_manifest,
)
from drtool.storage.base import ObjectInfo, Storage

LIST_PAGE = 1000


def write_history(
    storage: Storage,
    info: layout.RepoInfo,
    signing_key: Ed25519PrivateKey,
    count: int,
    *,
    newest: datetime,
    step: timedelta = timedelta(hours=1),
    root: Path | None = None,
    previous: tuple[str, str] | None = None,
    verified: datetime | None = None,
) -> list[tuple[str, bytes]]:
    """Write ``count`` snapshots ending at ``newest``, ``step`` apart; (id, stored manifest).

    ``root`` is the directory of a ``file://`` repository (written directly); None writes
    through ``storage``. ``previous`` (id, manifest sha256) chains the first one. With
    ``verified``, each snapshot also gets a signed verification record (intact) of that time,
    as a nightly ``verify --all`` leaves.
    """
    out: list[tuple[str, bytes]] = []
    files: list[tuple[str, bytes]] = []
    for i in range(count):
        when = newest - step * (count - 1 - i)
        sid = new_id(when)
        data = sid.encode() * 4
        key = f"{layout.snapshot_prefix(sid)}redis/dump.rdb.zst.age"
        entry = ObjectEntry(key, "rdb", len(data), hashlib.sha256(data).hexdigest())
        manifest = Manifest(
            repo_id=info.repo_id,
            snapshot_id=sid,
            started=when.isoformat(timespec="seconds"),
            finished=(when + timedelta(seconds=30)).isoformat(timespec="seconds"),
            host="nas",
            stack="co-talk",
            drtool_version="0.1.0",
            components=(ComponentEntry("redis", (entry,), len(data), 0.1, "7.2"),),
            previous_id=previous[0] if previous else None,
            previous_sha256=previous[1] if previous else None,
        )
        stored = sign_manifest(manifest, signing_key)
        previous = (sid, manifest_sha256(stored))
        files += [(key, data), (layout.manifest_key(sid), stored)]
        if verified is not None:
            files.append(_record(info.repo_id, sid, signing_key, verified))
        out.append((sid, stored))
    if root is not None:
        for key, data in files:
            path = root / key
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
    else:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda kv: storage.put_bytes(kv[0], kv[1]), files))
    return out


def _record(
    repo_id: str, snapshot_id: str, signing_key: Ed25519PrivateKey, when: datetime
) -> tuple[str, bytes]:
    """A signed, intact verification record as ``verifications.write_record`` stores it."""
    record = verifications.Verification(
        repo_id, snapshot_id, verifications.now_text(when), verifications.HASHES, 1
    )
    body = {"format": verifications.FORMAT, **asdict(record), "damaged": []}
    stored = {"body": body, "signature": keys.sign(signing_key, canonical(body))}
    key = verifications.record_key(snapshot_id, when)
    return key, json.dumps(stored, indent=1, sort_keys=True).encode()


class CountingStorage(Storage):
    """Another storage, with every request it makes counted in ``calls``."""

    def __init__(self, inner: Storage) -> None:
        self.inner = inner
        self.url = inner.url
        self.calls: Counter[str] = Counter()

    @property
    def requests(self) -> int:
        return sum(self.calls.values())

    def reset(self) -> None:
        self.calls.clear()

    def put(
        self,
        key: str,
        chunks: Iterable[bytes],
        *,
        retain_until: datetime | None = None,
        expected_size: int | None = None,
        confirm: bool = True,
    ) -> ObjectInfo:
        self.calls["put"] += 1
        return self.inner.put(
            key, chunks, retain_until=retain_until, expected_size=expected_size, confirm=confirm
        )

    def get(self, key: str, *, version_id: str | None = None) -> Iterator[bytes]:
        self.calls["get"] += 1
        return self.inner.get(key, version_id=version_id)

    def head(self, key: str) -> ObjectInfo:
        self.calls["head"] += 1
        return self.inner.head(key)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        self.calls["list"] += 1
        for n, obj in enumerate(self.inner.list(prefix), 1):
            if n % LIST_PAGE == 0:
                self.calls["list"] += 1  # the next page (S3 pages by 1,000 keys)
            yield obj

    def delete(self, key: str, *, version_id: str | None = None) -> None:
        self.calls["delete"] += 1
        self.inner.delete(key, version_id=version_id)

    def stale_uploads(self, older_than: datetime) -> builtins.list[str]:
        return self.inner.stale_uploads(older_than)

    def abort_stale_uploads(self, older_than: datetime) -> int:
        return self.inner.abort_stale_uploads(older_than)

    def check(self) -> None:
        self.inner.check()
