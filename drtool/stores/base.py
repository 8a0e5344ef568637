"""The store protocol: what each kind of store (PostgreSQL, Redis, MinIO) does for drtool.

Backup, restore, drills and ``stack status`` used to branch on the component name in each path;
a new kind of store (WAL archiving, a Redis Cluster, a PostgreSQL standby) then meant editing
every one of them. Each store now implements :class:`Store` once, in its own module, and is
listed once in :mod:`drtool.stores.registry`; the services loop over the registry.

A store's life in a snapshot:

- ``backup(ctx)`` writes its objects through the snapshot writer and returns its manifest
  entry (plus, optionally, work to do once the manifest is committed and verified);
- ``load(snapshot, entry, target)`` reads its small objects (fingerprints, indexes) and returns
  a :class:`Restoring` (None when there is nothing to restore), which then: ``plan`` (what it
  would replace, without changing anything), ``staged_bytes`` (scratch space it needs),
  ``stage`` (decrypt and check every byte before any target is touched), ``restore`` (write
  the target, fingerprint the restored copy against the snapshot's fingerprints, report the
  differences; PostgreSQL does so before its switch, so a bad copy never goes live);
- ``counts(endpoints)`` says what a running store holds (``drtool stack status``);
- ``drill_checks()`` names the application-level checks it owns in a drill.

See docs/decisions/0006-store-protocol.md.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from drtool.config import Config
from drtool.endpoints import StackEndpoints
from drtool.repository.access import Repo
from drtool.repository.manifest import ComponentEntry, Manifest, ObjectEntry
from drtool.repository.writer import SnapshotWriter
from drtool.storage.base import Storage

if TYPE_CHECKING:  # the checks import psycopg: a store module that runs none need not
    from drtool.stores.checks import CheckResult

Progress = Callable[[str, int], None]


@dataclass(frozen=True)
class BackupContext:
    """What a store's backup may use: the config, the open snapshot and the host's dirs."""

    cfg: Config
    writer: SnapshotWriter
    storage: Storage  # the repository's (MinIO reuses blobs it already holds)
    scratch: Path  # the backup scratch dir (Redis spills its RDB there)
    state: Path  # the backup host's own state (MinIO's index cache)
    progress: Progress
    #: objects a signed verification found damaged: never reused (issue 18.9, healing)
    damaged: frozenset[str] = frozenset()
    #: the newest authentic snapshot's manifest (the chain link): what a store's own state
    #: about the last snapshot (PostgreSQL's partition baseline) must match to be trusted
    previous: Manifest | None = None


@dataclass(frozen=True)
class BackedUp:
    """A store's manifest entry, and what to do once the manifest is committed and verified."""

    entry: ComponentEntry
    after_commit: Callable[[], None] | None = None
    #: counters for monitoring, e.g. {"unprotected_buckets": 2} (metric drtool_backup_<name>)
    figures: dict[str, int] = field(default_factory=dict)
    #: one line for the backup's summary, e.g. which fingerprints were reused, not checked
    detail: str = ""


@dataclass(frozen=True)
class SnapshotSource:
    """The snapshot being restored: where it is, its manifest, the keys to read it."""

    repo: Repo
    manifest: Manifest
    identities: list[str]


class Placer(Protocol):
    """Stops a server, swaps its data file, starts it again (an offline restore)."""

    @property
    def where(self) -> str:
        """How to name the server in messages."""

    def stop(self) -> None:
        """Stop the server (it has just saved its data)."""

    @property
    def kept(self) -> Path | None:
        """Where the previous data file was set aside (None: there was none)."""

    def keep_current(self, stamp: str, keep_dir: Path) -> None:
        """Set the server's current data file aside (if it has one); a copy goes to
        ``keep_dir``, which outlives the restore (never its swept scratch dir)."""

    def place(self, rdb: Path) -> None:
        """Make ``rdb`` the server's data file, atomically."""

    def put_back(self) -> None:
        """Make the data file set aside by :meth:`keep_current` current again."""

    def start(self) -> None:
        """Start the server (it loads its data file)."""

    def alive(self) -> bool:
        """Whether the server process (container) still runs."""


@dataclass(frozen=True)
class Target:
    """Where a restore goes and how carefully (from the restore's options and config)."""

    endpoints: StackEndpoints
    force: bool = False
    jobs: int = 2
    drop_old: bool = False
    prefix: str = ""
    workers: int = 4
    pg_bin_dir: Path | None = None
    timeout: float = 3600.0
    placer: Placer | None = None  # set for an offline Redis restore
    #: an offline Redis Cluster restore: the stopped nodes' data dirs (RDB per node)
    redis_node_dirs: tuple[Path, ...] = ()
    #: or the directory its shards' RDBs are written to, for nodes on other hosts
    redis_rdb_dir: Path | None = None
    #: with redis_node_dirs: seconds to wait for the operator to start the nodes and compare
    redis_wait_s: float = 0.0
    minio_mode: str = "merge"  # or "mirror": remove objects under the prefix the snapshot lacks
    keep_dir: Path | None = None  # where copies that outlive the restore are kept (scratch)
    #: scratch bytes the OTHER stores of this restore stage and write (their staged_bytes):
    #: a store that may use spare scratch space (MinIO keeping plaintext) leaves them room
    scratch_others: int = 0
    #: set by the restore when one store's staging failed or it was interrupted: the other
    #: stores' staging stops at its next chunk (stage.Cancelled) instead of running to the end
    cancel: threading.Event | None = None


@dataclass(frozen=True)
class PlanItem:
    """One component: where it goes, how much, and what it would replace."""

    component: str
    source: str
    target: str
    plain_bytes: int
    holds: str
    replaces: bool
    action: str
    notes: tuple[str, ...] = ()  # what the operator must know before saying yes


@dataclass(frozen=True)
class Restored:
    """What a store's restore did, and how its restored copy differs from the snapshot."""

    problems: list[str]
    detail: str
    counts: dict[str, int] = field(default_factory=dict)  # e.g. extra_objects_kept (JSON)
    #: work the store left running once its target was usable again (e.g. dropping the
    #: replaced database): the restore waits for it before it reports, and this returns the
    #: final outcome (its ``detail``, ``previous_kept``); the store's time (its RTO) ends
    #: before it
    finish: Callable[[], Restored] | None = None
    #: the replaced data kept beside the restored one (PostgreSQL: the previous database's
    #: name), "" when none: in the JSON, so a script sees a drop that did not happen
    previous_kept: str = ""


class Restoring(Protocol):
    """One store's part of one restore, from the snapshot's small objects to a verified copy."""

    def plan(self, target: Target) -> list[PlanItem]:
        """What the restore would put where, and what the target holds now (changes nothing)."""

    def staged_bytes(self, workers: int) -> int:
        """Scratch bytes that staging and restoring need at most."""

    def reads(self) -> list[ObjectEntry]:
        """The stored objects staging reads (a dry run hash-checks exactly these)."""

    def stage(self, target: Target, work: Path) -> None:
        """Decrypt and check every byte the restore reads, before any target is touched."""

    def restore(self, target: Target, work: Path, stamp: str) -> Restored:
        """Write the target, fingerprint the restored copy, return the differences."""


@dataclass(frozen=True)
class DrillCheck:
    """An application-level drill check, run when every store in ``needs`` was restored."""

    needs: frozenset[str]
    run: Callable[[StackEndpoints, int], CheckResult]  # (restored stack, rooms to sample)
    #: a restore to a moment runs this instead, when given: its stores are not copied in the
    #: snapshot's order (Redis is older than PostgreSQL there), which changes what is skew
    at_moment: Callable[[StackEndpoints, int], CheckResult] | None = None


class Store(Protocol):
    """One kind of store: how it is backed up, restored, verified and checked in drills."""

    @property
    def name(self) -> str:
        """The component name in manifests, options and reports."""

    def backup(self, ctx: BackupContext) -> BackedUp:
        """Write this store's objects into the snapshot; return its manifest entry."""

    def load(
        self, source: SnapshotSource, entry: ComponentEntry, target: Target
    ) -> Restoring | None:
        """Read this store's small objects of the snapshot (proves the key).

        None: the snapshot holds nothing of this store to restore (a MinIO entry without
        buckets); the restore then plans and reports nothing for it.
        """

    def counts(self, endpoints: StackEndpoints) -> list[list[object]]:
        """What the running store holds: ``[store, what, count]`` rows."""

    def drill_checks(self) -> tuple[DrillCheck, ...]:
        """The application-level checks this store owns in a drill."""
