"""Memory limits of a docker drill's scratch containers, sized from the snapshot it restores.

A fixed limit fits one size of data: the production defaults (PostgreSQL 512m, Redis 128m,
MinIO 256m) held the seed, but a MinIO container at 256m with 54 MiB of attachments sat at
its limit and stalled the drill for 11 minutes (issue 19.12). A limit the definition leaves
unset (``""``) is therefore derived from what the snapshot's manifest says the restore will
hold, never below today's default (the floor) and never above a ceiling (a damaged or
enormous manifest must not ask the engine for all of the host's memory). A limit set in the
definition always wins: the operator may know better, or want to prove production's limit.

The factors are deliberately generous estimates, not measurements of one workload:

- Redis keeps the whole dataset in memory; its in-memory size is commonly 2-5 × the RDB's
  (the RDB is compact and LZF-compressed): 4 × the RDB plus 64 MiB for the server itself.
- MinIO streams objects, but buffers parts of large uploads and reads each bucket's index
  whole: 4 × the largest object plus 2 × the largest index, on top of the 256m floor.
- PostgreSQL's memory is its shared buffers and the index builds of pg_restore, bounded by
  its own settings, not by the dump: the floor plus a quarter of the dump.

With ``data = "tmpfs"`` the data itself is in memory and counts against the limit: the
restored size (the dump × 3 for PostgreSQL's tables and indexes, the objects' total for
MinIO) is added.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, replace

from drtool.drills.definition import DockerImages
from drtool.repository.manifest import Manifest

log = logging.getLogger(__name__)

MIB = 1024 * 1024
FLOOR_MIB = {"postgres": 512, "redis": 128, "minio": 256}  # the production defaults
CEILING_MIB = {"postgres": 4096, "redis": 8192, "minio": 4096}
REDIS_FACTOR = 4
REDIS_BASE_MIB = 64
MINIO_OBJECT_FACTOR = 4
MINIO_INDEX_FACTOR = 2
PG_DUMP_SHARE = 0.25
PG_TMPFS_FACTOR = 3
STEP_MIB = 16  # limits grow in steps of this
ROLES = ("postgres", "redis", "minio")
_LIMIT = re.compile(r"^(\d+)([bkmg]?)$", re.IGNORECASE)


@dataclass(frozen=True)
class Sized:
    """The limit chosen for one container and why (for the log and the report)."""

    role: str
    limit: str
    why: str


def limit_bytes(limit: str) -> int | None:
    """Bytes of a Docker memory limit such as ``256m``; None when it is not one."""
    match = _LIMIT.match(limit.strip())
    if not match:
        return None
    scale = {"": 1, "b": 1, "k": 1024, "m": MIB, "g": 1024 * MIB}[match.group(2).lower()]
    return int(match.group(1)) * scale


def human_limit(size: int) -> str:
    """A byte count as a Docker limit (``256m``, ``2g``), rounded up to whole MiB."""
    mib = -(-size // MIB)
    return f"{mib // 1024}g" if mib % 1024 == 0 else f"{mib}m"


def _wanted_mib(role: str, manifest: Manifest, tmpfs: bool) -> tuple[float, str]:
    """What the restore of ``role``'s part of the snapshot needs (MiB), and from what."""
    comp = manifest.component(role)
    if comp is None:
        return 0.0, "not in the snapshot"
    if role == "redis":
        rdb = comp.plain_bytes / MIB
        return REDIS_FACTOR * rdb + REDIS_BASE_MIB, f"from the snapshot's {rdb:.0f} MiB RDB"
    if role == "postgres":
        dump = comp.plain_bytes / MIB
        need = FLOOR_MIB["postgres"] + PG_DUMP_SHARE * dump
        if tmpfs:
            need += PG_TMPFS_FACTOR * dump
        return need, f"from the snapshot's {dump:.0f} MiB dump"
    blobs = [o.size for o in comp.objects if o.kind != "minio_index"]
    indexes = [o.size for o in comp.objects if o.kind == "minio_index"]
    largest = max(blobs, default=0) / MIB
    index = max(indexes, default=0) / MIB
    need = FLOOR_MIB["minio"] + MINIO_OBJECT_FACTOR * largest + MINIO_INDEX_FACTOR * index
    if tmpfs:
        need += comp.plain_bytes / MIB
    return need, f"from the snapshot's largest object ({largest:.1f} MiB) and index"


def size_limits(
    images: DockerImages, manifest: Manifest | None
) -> tuple[DockerImages, list[Sized]]:
    """``images`` with every unset memory limit sized from ``manifest`` (floor to ceiling).

    Returns the images to start the containers with and, per container, the limit and why.
    """
    chosen: list[Sized] = []
    values: dict[str, str] = {}
    for role in ROLES:
        explicit = str(getattr(images, f"{role}_memory"))
        if explicit:
            chosen.append(Sized(role, explicit, "set in the definition"))
            continue
        floor, ceiling = FLOOR_MIB[role], CEILING_MIB[role]
        need, why = (
            (0.0, "no manifest")
            if manifest is None
            else (_wanted_mib(role, manifest, images.data == "tmpfs"))
        )
        mib = min(ceiling, max(floor, STEP_MIB * int(-(-need // STEP_MIB))))
        if need < floor + STEP_MIB:  # a few MiB over the floor are the estimate's noise
            mib = floor
        if mib == floor:
            why = f"the floor ({why})"
        elif mib == ceiling:
            why = f"the ceiling ({why}; it wanted {need:.0f} MiB)"
        limit = human_limit(mib * MIB)
        values[f"{role}_memory"] = limit
        chosen.append(Sized(role, limit, why))
    sized = replace(
        images,
        postgres_memory=values.get("postgres_memory", images.postgres_memory),
        redis_memory=values.get("redis_memory", images.redis_memory),
        minio_memory=values.get("minio_memory", images.minio_memory),
    )
    return sized, chosen


def log_sizes(drill_id: str, sized: list[Sized]) -> None:
    """One line naming each container's memory limit and where it came from."""
    log.info(
        "drill %s: scratch memory limits: %s",
        drill_id,
        "; ".join(f"{s.role} {s.limit} ({s.why})" for s in sized),
    )
