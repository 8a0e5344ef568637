"""Crash points: a TEST-ONLY hook that simulates ``kill -9`` at a precise step of a run.

When the environment variable ``DRTOOL_CRASH_AT`` names a crash point, the process calls
``os._exit(137)`` the moment it reaches that point: no ``finally`` block, no lock release, no
multipart abort runs, exactly as after a SIGKILL. The fault tests (tests/test_backup_faults.py)
use it to prove promise 3 of RELIABILITY.md ("interruptible anywhere"). Production never sets
the variable; drtool only reads it (at call time) and never writes it.
"""

from __future__ import annotations

import os

ENV = "DRTOOL_CRASH_AT"
EXIT_CODE = 137  # what a shell reports for a process killed by SIGKILL (128 + 9)

#: The crash points of a backup, in the order a full backup reaches them.
BACKUP_CRASH_POINTS = (
    "after-postgres",  # the PostgreSQL objects are stored, nothing else
    "after-redis",  # the Redis objects are stored
    "upload-part",  # the first part of a multipart upload (S3) / chunk of a temp file (file)
    "after-minio",  # the MinIO blobs and indexes are stored
    "before-manifest",  # every data object stored and confirmed, the manifest not yet written
    "after-manifest",  # the manifest is written (committed), not yet read back
)
#: The crash points of `drtool keys rotate` (ADR 0023), in the order a batch reaches them.
ROTATE_CRASH_POINTS = (
    "rotate-after-intent",  # a batch's intent record is written, no object rewritten yet
    "rotate-after-object",  # the first object of a batch is rewritten, its done record not
    "rotate-after-done",  # a batch's done record is written (the next batch not started)
    "rotate-before-header",  # every object rewritten, the repository header not yet updated
)
#: Every crash point: a restore's too.
CRASH_POINTS = (
    *BACKUP_CRASH_POINTS,
    "restore-before-switch",  # the PostgreSQL copy is loaded and verified, not yet switched in
    "redis-rdb-swap",  # an offline Redis restore: the old RDB kept, the new one not renamed in
    "entity-before-commit",  # restore-entity: journal written, objects put, rows not committed
    "after-postgres-base",  # the base backup is stored (only with --component postgres-base)
    "wal-after-upload",  # a WAL file is stored, its index chunk not yet committed
    "wal-after-index",  # the index chunk is committed, the files not yet removed from the spool
    "copy-before-manifest",  # `drtool copy`: a snapshot's objects are copied, its manifest not
    *ROTATE_CRASH_POINTS,
)


def crash_point(name: str) -> None:
    """Exit at once with 137 when ``DRTOOL_CRASH_AT`` equals ``name`` (test hook; see above)."""
    if name not in CRASH_POINTS:
        raise ValueError(f"unknown crash point {name!r}")
    if os.environ.get(ENV) == name:
        os._exit(EXIT_CODE)


def store_crash_point(component: str) -> None:
    """The crash point ``after-<component>``: that store's objects are stored, the next not.

    Named after the store, so a store added to the registry has one without an edit here.
    """
    if os.environ.get(ENV) == f"after-{component}":
        os._exit(EXIT_CODE)
