"""The attachment objects an entity's rows name: from the snapshot's MinIO component, never
over an existing object with other bytes.

Each object key of the closure's ``attachments`` rows (as the snapshot holds them) is looked up
in the snapshot's bucket index and in the production bucket:

- missing in production: restored (its blob decrypted to scratch, checked against the index's
  size and sha256, uploaded with its content type and metadata);
- present with the snapshot's size and sha256 (read back): identical, left alone;
- present with other bytes: a conflict, never overwritten (not even with --prefer snapshot: an
  object key names one content, and the row that names it decides which);
- absent from the snapshot's index: reported (the backup did not hold it).

Undo deletes an added object only while it still has the bytes the restore put there.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from drtool.repository.minio_index import IndexEntry
from drtool.sources.minio import MinioStore, ObjectMeta
from drtool.stores.base import SnapshotSource
from drtool.stores.stage import Plain, blob_header, stage

EXAMPLES = 5


@dataclass
class ObjectPlan:
    """The closure's objects against the production bucket."""

    bucket: str
    restore: list[IndexEntry] = field(default_factory=list)
    identical: int = 0
    conflicts: list[str] = field(default_factory=list)  # keys holding other bytes
    not_in_snapshot: list[str] = field(default_factory=list)

    @property
    def restore_bytes(self) -> int:
        """Bytes the restore uploads."""
        return sum(e.size for e in self.restore)


def plan_objects(
    store: MinioStore,
    bucket: str,
    index: dict[str, IndexEntry],
    keys: Iterable[str],
    workers: int,
) -> ObjectPlan:
    """Compare the closure's object keys with the snapshot's index and the bucket."""
    plan = ObjectPlan(bucket)
    wanted = sorted(set(keys))
    in_snapshot = [k for k in wanted if k in index]
    plan.not_in_snapshot = [k for k in wanted if k not in index]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        found = list(pool.map(lambda k: store.digest(bucket, k), in_snapshot))
    for key, got in zip(in_snapshot, found, strict=True):
        entry = index[key]
        if got is None:
            plan.restore.append(entry)
        elif got == (entry.size, entry.sha256):
            plan.identical += 1
        else:
            plan.conflicts.append(key)
    return plan


def restore_objects(
    source: SnapshotSource,
    store: MinioStore,
    plan: ObjectPlan,
    work: Path,
    workers: int,
) -> list[dict[str, object]]:
    """Upload every object of ``plan.restore`` that is still missing; what was added.

    An object that appeared since the plan is not overwritten (and not reported as added).
    """
    counter = itertools.count()
    repo, identities = source.repo, source.identities

    def one(e: IndexEntry) -> dict[str, object] | None:
        if store.head(plan.bucket, e.key) is not None:
            return None
        path = work / f"object-{next(counter)}"
        try:
            blob = e.blob_entry()
            stage(repo, blob, blob_header(repo, blob), identities, path, Plain(e.size, e.sha256))
            store.upload(plan.bucket, e.key, path, ObjectMeta(e.content_type, e.metadata))
        finally:
            path.unlink(missing_ok=True)
        return {"key": e.key, "size": e.size, "sha256": e.sha256}

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        done = list(pool.map(one, plan.restore))
    return [d for d in done if d is not None]


def remove_objects(
    store: MinioStore, bucket: str, added: list[dict[str, object]], workers: int
) -> tuple[int, list[str]]:
    """Delete the objects a restore added, each only while it holds the bytes it was given.

    Returns (deleted, keys left because they changed since).
    """

    def one(item: dict[str, object]) -> str | None:
        key = str(item["key"])
        got = store.digest(bucket, key)
        if got is None:
            return None
        if got != (item["size"], item["sha256"]):
            return key
        store.delete(bucket, key)
        return ""

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = list(pool.map(one, added))
    return sum(1 for r in results if r == ""), [r for r in results if r]
