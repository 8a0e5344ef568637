"""MinIO in a snapshot: one index per bucket and content blobs shared across snapshots.

Backup is incremental (:mod:`drtool.stores.minio.backup`); restore puts every object back with
its content type and metadata and reads each one back (:mod:`drtool.stores.minio.restore`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from drtool import keys
from drtool.endpoints import StackEndpoints
from drtool.repository import catalog, layout, rotation
from drtool.repository.manifest import ComponentEntry, ObjectEntry
from drtool.repository.minio_index import IndexEntry
from drtool.sources import minio as s3_source
from drtool.stores.base import (
    BackedUp,
    BackupContext,
    DrillCheck,
    PlanItem,
    Restored,
    SnapshotSource,
    Target,
)
from drtool.stores.minio import backup as bucket_backup
from drtool.stores.minio import restore as bucket_restore

log = logging.getLogger(__name__)

NAME = "minio"


class MinioStore:
    """The attachment buckets."""

    name = NAME

    def backup(self, ctx: BackupContext) -> BackedUp:
        """Every bucket: new or changed objects uploaded as blobs, the rest reused; an index each.

        The host's index cache is written only after the manifest is committed and verified:
        a failed run must not make the next one reuse blobs no snapshot references.
        """
        endpoints = ctx.cfg.stack()
        workers = ctx.cfg.backup.minio_workers  # 1..64, checked when the config was loaded
        store = s3_source.MinioStore(endpoints.minio, max_pool=max(8, workers))
        stored_blobs = {o.key: o.size for o in ctx.storage.list(layout.BLOBS)}
        rotated = _rotation_map(ctx)
        objects: list[ObjectEntry] = []
        blobs: dict[str, ObjectEntry] = {}
        caches: list[tuple[Path, list[IndexEntry]]] = []
        plain = 0
        healed: set[str] = set()  # damaged blob keys whose objects this backup re-uploaded
        details: dict[str, Any] = {}
        coverage = s3_source.bucket_coverage(
            store,
            endpoints.buckets,
            repository=s3_source.repository_bucket(
                ctx.cfg.repository.url,
                ctx.cfg.repository.endpoint_url,
                endpoints.minio.endpoint_url,
            ),
        )
        if (left_out := coverage.warning()) is not None:
            log.warning("%s", left_out)
        for bucket in coverage.protected:
            path = bucket_backup.cache_path(ctx.state, ctx.writer.repo.repo_id, bucket)
            captured = bucket_backup.captured_path(ctx.state, ctx.writer.repo.repo_id, bucket)
            result = bucket_backup.snapshot_bucket(
                store,
                bucket,
                ctx.writer,
                # objects `drtool capture` stored since: their blobs are reused, not uploaded
                previous=_rotated(
                    bucket_backup.read_cache(path) | bucket_backup.read_cache(captured), rotated
                ),
                stored_blobs=stored_blobs,
                damaged=ctx.damaged,
                workers=workers,
                on_object=lambda n: ctx.progress(NAME, n),
            )
            objects.append(result.index)
            for e in result.entries:
                blobs.setdefault(e.blob, e.blob_entry())
            caches.append((path, result.entries))
            plain += result.plain_bytes
            details[bucket] = {"uploaded": result.uploaded, "reused": result.reused}
            if result.healed:
                details[bucket]["healed"] = result.healed
            log.info(
                "minio bucket %s: %d objects uploaded (%d of them replacing a damaged blob), "
                "%d reused",
                bucket,
                result.uploaded,
                len(result.healed),
                result.reused,
            )
            healed.update(result.healed)
        objects.extend(blobs[b] for b in sorted(blobs))
        damaged_blobs = {k for k in ctx.damaged if k.startswith(layout.BLOBS)}
        for key in sorted(damaged_blobs - healed):
            log.warning(
                "%s is damaged and was not uploaded again: its object is no longer in the "
                "source (this snapshot does not reference it; older ones still do)",
                key,
            )

        def write_caches() -> None:
            for path, entries in caches:
                bucket_backup.write_cache(path, entries)

        entry = ComponentEntry(NAME, tuple(objects), plain, 0.0, "", details)
        figures = {"unprotected_buckets": len(coverage.unprotected)}
        return BackedUp(entry, after_commit=write_caches, figures=figures)

    def load(
        self, source: SnapshotSource, entry: ComponentEntry, target: Target
    ) -> MinioRestoring | None:
        """Read every bucket index; map the snapshot's buckets onto the target's."""
        buckets = bucket_restore.load(
            source.repo,
            source.manifest,
            entry,
            source.identities,
            target_buckets=target.endpoints.buckets,
            prefix=target.prefix,
        )
        return MinioRestoring(source, buckets) if buckets else None

    def counts(self, endpoints: StackEndpoints) -> list[list[object]]:
        """Objects and bytes per bucket."""
        store = s3_source.MinioStore(endpoints.minio)
        rows: list[list[object]] = []
        for bucket in endpoints.buckets:
            objects = list(store.list_objects(bucket))
            rows.append([NAME, f"objects in {bucket}", len(objects)])
            rows.append([NAME, f"bytes in {bucket}", sum(o.size for o in objects)])
        return rows

    def drill_checks(self) -> tuple[DrillCheck, ...]:
        """None of its own: PostgreSQL's checks read the objects its rows name."""
        return ()


@dataclass
class MinioRestoring:
    """One restore of the snapshot's buckets into the target's."""

    source: SnapshotSource
    buckets: list[bucket_restore.BucketSnapshot]
    #: each blob's checked plaintext in the scratch dir, kept by ``stage`` when safe
    staged: bucket_restore.KeptBlobs | None = None

    def reads(self) -> list[ObjectEntry]:
        """Every distinct blob of the restored buckets."""
        return bucket_restore.blobs_needed(self.buckets)

    def plan(self, target: Target) -> list[PlanItem]:
        """Per bucket: the objects restored and what the target bucket holds."""
        store = s3_source.MinioStore(target.endpoints.minio)
        items = []
        for b in self.buckets:
            held_objects = bucket_restore.held_objects(store, b.target)
            holds = "no bucket" if held_objects is None else f"{held_objects:,} objects"
            action = "create the bucket, put objects" if held_objects is None else "put objects"
            extra = len(bucket_restore.extra_keys(store, b)) if held_objects else 0
            if held_objects:
                action += " (identical ones skipped)"
            if extra:
                under = f" under {b.prefix!r}" if b.prefix else ""
                fate = (
                    "removed (--minio-mode mirror)"
                    if target.minio_mode == "mirror"
                    else "kept (--minio-mode mirror removes them)"
                )
                action += f"; {extra:,} objects{under} not in the snapshot {fate}"
            items.append(
                PlanItem(
                    NAME,
                    f"bucket {b.bucket}: {len(b.entries):,} objects"
                    + (f" under {target.prefix!r}" if target.prefix else ""),
                    f"{target.endpoints.minio.endpoint_url} bucket {b.target}",
                    b.size,
                    holds,
                    bool(held_objects),
                    action,
                )
            )
        return items

    def staged_bytes(self, workers: int) -> int:
        """At least one object per worker, each the largest (the stage pass keeps every blob's
        plaintext instead only when the scratch dir has room for it beside everything else,
        see ``bucket_restore.keep_decision``)."""
        largest = max((e.size for b in self.buckets for e in b.entries), default=0)
        return workers * largest

    def stage(self, target: Target, work: Path) -> None:
        """Read, hash and authenticate every blob needed; keep the plaintext if all fit."""
        s = self.source
        self.staged = bucket_restore.stage_blobs(
            s.repo,
            self.buckets,
            s.identities,
            work,
            target.workers,
            others=target.scratch_others,
            cancel=target.cancel,
        )

    def restore(self, target: Target, work: Path, stamp: str) -> Restored:
        """Put every object, count (mirror: remove) the extra ones, read every one back."""
        s = self.source
        store = s3_source.MinioStore(target.endpoints.minio, max_pool=target.workers * 2)
        problems: list[str] = []
        parts: list[str] = []
        extra = {"kept": 0, "removed": 0}
        for b in self.buckets:
            o = bucket_restore.restore(
                s.repo,
                store,
                b,
                s.identities,
                work,
                force=target.force,
                workers=target.workers,
                mirror=target.minio_mode == "mirror",
                staged=self.staged,
            )
            problems += bucket_restore.verify(store, b, target.workers)
            fate = "removed" if o.removed else "kept"
            extra[fate] += o.extra
            if o.removed and (left := bucket_restore.extra_keys(store, b)):
                problems.append(
                    f"minio {o.bucket}: {len(left):,} extra objects remain, e.g. {left[0]}"
                )
            parts.append(
                f"{o.bucket}: {o.uploaded:,} put, {o.skipped:,} identical skipped, "
                f"extra objects {fate}: {o.extra:,}"
            )
        counts = {f"extra_objects_{fate}": n for fate, n in extra.items()}
        return Restored(problems, "; ".join(parts), counts)


def _rotation_map(ctx: BackupContext) -> rotation.RotationMap:
    """The blobs a key rotation re-wrapped (ADR 0023), from records this host's key trusts."""
    own = keys.verify_key_text(ctx.writer.signing_key.public_key())
    trusted = catalog.trusted_verify_keys(ctx.writer.repo, "", own)
    return rotation.load_map(ctx.storage, trusted, ctx.writer.repo.repo_id)


def _rotated(
    previous: dict[str, IndexEntry], rotated: rotation.RotationMap
) -> dict[str, IndexEntry]:
    """The host's cached index with each blob's stored size and sha256 as rotated.

    A rotation rewrites a blob's header, so its size and hash change: without this the next
    backup would see every blob as changed and upload every attachment again.
    """
    if not rotated:
        return previous
    out = {}
    for key, entry in previous.items():
        size, sha256 = rotated.current(
            layout.blob_key(entry.blob), entry.blob_size, entry.blob_sha256
        )
        out[key] = replace(entry, blob_size=size, blob_sha256=sha256)
    return out
