"""The ``postgres-base`` backup component: a physical base backup for point-in-time recovery.

One object, ``snapshots/<id>/postgres-base/base.tar.zst.age`` (kind ``pg_basebackup``: the
tar ``pg_basebackup -Ft -X none`` writes, sealed like every object), and in the manifest's
component details the WAL position it needs: ``start_lsn``, ``start_segment``, ``stop_lsn``,
``timeline``, ``checkpoint_lsn`` and the cluster's ``system_identifier``; like the logical dump,
which server it came from (``source``, ``source_role``, and from a streaming standby the
primary's position it had replayed before and after, ``replayed_lsn_before/after``; ``backup_from``
is what the base's own label says). A standby lagging past ``postgres.max_standby_lag_s`` is
refused before and after, so the primary carries no backup load and a stale replica is never
the newest base unnoticed. Recovery replays the
WAL of ``drtool wal stream`` from ``start_segment`` at least to ``stop_lsn`` (the earliest
consistent moment), then on to the target. The logical dump (``postgres``) stays: it crosses
majors and carries the fingerprints.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from drtool.endpoints import StackEndpoints
from drtool.repository.manifest import ComponentEntry
from drtool.sources import postgres as pg
from drtool.sources.pg_basebackup import base_backup
from drtool.stores.base import (
    BackedUp,
    BackupContext,
    DrillCheck,
    Restoring,
    SnapshotSource,
    Target,
)

NAME = "postgres-base"


def _counting(chunks: Iterable[bytes], progress: Callable[[str, int], None]) -> Iterator[bytes]:
    for chunk in chunks:
        progress(NAME, len(chunk))
        yield chunk


class PostgresBaseStore:
    """Backed up only when asked for by name (registry.OPTIONAL); not restored by itself.

    A base backup is restored together with the WAL, to a moment: ``drtool restore --at|--lsn
    --component postgres --into DIR`` (drtool/services/restore/pitr.py, ADR 0017). A snapshot
    restore passes over this component, and drills do not check it yet.
    """

    name = NAME

    def backup(self, ctx: BackupContext) -> BackedUp:
        """Stream a base backup into the snapshot; the manifest entry records its WAL range."""
        cfg = ctx.cfg
        endpoint = cfg.stack().postgres
        max_lag = cfg.postgres.max_standby_lag_s
        before = pg.checked_role(endpoint, max_lag, "before", "base backup")
        with base_backup(
            endpoint, bin_dir=cfg.postgres.bin_dir, timeout=cfg.backup.timeout_s
        ) as base:
            written = ctx.writer.put_snapshot_object(
                NAME, "base.tar", _counting(base.stream, ctx.progress), kind="pg_basebackup"
            )
            info = base.info()
        after = pg.checked_role(endpoint, max_lag, "after", "base backup")
        details = {
            **info.to_dict(),
            **pg.role_details(endpoint, before, after),
            "plain_sha256": written.plain_sha256,
        }
        entry = ComponentEntry(
            NAME, (written.entry,), written.plain_bytes, 0.0, info.server_version, details
        )
        return BackedUp(entry)

    def load(
        self, source: SnapshotSource, entry: ComponentEntry, target: Target
    ) -> Restoring | None:
        """Nothing to restore logically (see the class docstring)."""
        return None

    def counts(self, endpoints: StackEndpoints) -> list[list[object]]:
        """Counted by the PostgreSQL store."""
        return []

    def drill_checks(self) -> tuple[DrillCheck, ...]:
        """None yet."""
        return ()
