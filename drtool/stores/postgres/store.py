"""PostgreSQL in a snapshot: a custom-format dump, the globals, and fingerprints of every table.

Backup streams ``pg_dump`` into the writer and fingerprints the same snapshot of the database
(one transaction); restore goes through :mod:`drtool.stores.postgres.restore`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import psycopg

from drtool.endpoints import StackEndpoints
from drtool.repository.manifest import ComponentEntry, ObjectEntry
from drtool.sources import postgres as pg
from drtool.sources.pg_fingerprint import compute_fingerprints
from drtool.stores import checks
from drtool.stores.base import (
    BackedUp,
    BackupContext,
    DrillCheck,
    PlanItem,
    Restored,
    SnapshotSource,
    Target,
)
from drtool.stores.postgres import restore as pg_restore
from drtool.stores.streams import counting, json_chunks

NAME = "postgres"
log = logging.getLogger(__name__)


class PostgresStore:
    """The chat database."""

    name = NAME

    def backup(self, ctx: BackupContext) -> BackedUp:
        """Dump, globals (when the login may read them), then the fingerprints object."""
        cfg, writer = ctx.cfg, ctx.writer
        endpoint = cfg.stack().postgres
        bin_dir = Path(cfg.postgres.bin_dir) if cfg.postgres.bin_dir else None
        objects: list[ObjectEntry] = []
        max_lag = cfg.postgres.max_standby_lag_s
        before = pg.checked_role(endpoint, max_lag, "before", "dump")
        with pg.dump(endpoint, pg_bin_dir=bin_dir, timeout=cfg.backup.timeout_s) as dump:
            written = writer.put_snapshot_object(
                NAME, "dump.pgdump", counting(dump.stream, NAME, ctx.progress), kind="pg_dump"
            )
            fingerprints = dump.fingerprints  # read off the stream (format 5, ADR 0033)
            server_version = dump.server_version
            details = dump.exported.details()  # the LSN the dump matches, or why none
        after = pg.checked_role(endpoint, max_lag, "after", "dump")
        rows = sum(fp.rows for fp in fingerprints.tables.values())
        summary = f"fingerprints of {len(fingerprints.tables)} tables and partitions, {rows} rows"
        log.info("postgres %s (read from the dump stream)", summary)
        details = {
            **details,
            "fingerprint_format": fingerprints.format,
            **pg.role_details(endpoint, before, after),
        }
        objects.append(written.entry)
        plain = written.plain_bytes
        globals_sql = pg.dump_globals(endpoint, pg_bin_dir=bin_dir, timeout=cfg.backup.timeout_s)
        if globals_sql is not None:
            g = writer.put_snapshot_object(NAME, "globals.sql", [globals_sql], kind="pg_globals")
            objects.append(g.entry)
        prints = {
            "fingerprints": fingerprints.to_dict(),
            "dump": {"size": written.plain_bytes, "sha256": written.plain_sha256},
        }
        fp = writer.put_snapshot_object(
            NAME, "fingerprints.json", json_chunks(prints), kind="fingerprints"
        )
        objects.append(fp.entry)

        entry = ComponentEntry(NAME, tuple(objects), plain, 0.0, server_version, details)
        return BackedUp(entry, detail=summary)

    def load(
        self, source: SnapshotSource, entry: ComponentEntry, target: Target
    ) -> PostgresRestoring:
        """Read the fingerprints; find the dump."""
        snap = pg_restore.load(source.repo, source.manifest, entry, source.identities)
        return PostgresRestoring(source, snap)

    def counts(self, endpoints: StackEndpoints) -> list[list[object]]:
        """Rows per table."""
        kwargs = endpoints.postgres.connect_kwargs()
        with psycopg.connect(**kwargs) as conn:
            prints = compute_fingerprints(conn)
        return [[NAME, f"rows in {t}", fp.rows] for t, fp in sorted(prints.tables.items())]

    def drill_checks(self) -> tuple[DrillCheck, ...]:
        """Attachment rows have their objects; the latest messages read as the app reads them."""
        with_files = frozenset({NAME, "minio"})
        return (
            DrillCheck(with_files, lambda eps, _rooms: checks.attachments_have_objects(eps)),
            DrillCheck(
                with_files, lambda eps, rooms: checks.latest_messages_readable(eps, sample=rooms)
            ),
        )


@dataclass
class PostgresRestoring:
    """One PostgreSQL restore: the target inspected by the plan is the one restored."""

    source: SnapshotSource
    snap: pg_restore.PgSnapshot
    inspected: pg_restore.PgTarget | None = None
    staged: pg_restore.PgStaged | None = None

    def reads(self) -> list[ObjectEntry]:
        """The dump and, when the snapshot has them, the roles."""
        return [self.snap.dump] + ([self.snap.globals_sql] if self.snap.globals_sql else [])

    def plan(self, target: Target) -> list[PlanItem]:
        """The target database, what it holds, and what happens to it."""
        t = self.inspected = pg_restore.inspect(target.endpoints.postgres, self.snap)
        copy, old = pg_restore.names(target.endpoints.postgres.dbname, "<time>")
        tables = len(self.snap.fingerprints.tables)
        rows = sum(fp.rows for fp in self.snap.fingerprints.tables.values())
        holds = "nothing" if not t.exists else "an empty database" if t.empty else "data"
        keep = (
            "dropped (--drop-old)"
            if target.drop_old
            else f"dropped if still empty at the switch, else kept as {old}"
            if t.empty
            else f"kept as {old}"
        )
        action = f"pg_restore -j {target.jobs} into {copy}, verify, switch"
        action += f"; the current database {keep}" if t.exists else ""
        return [
            PlanItem(
                NAME,
                f"{tables} tables{' and partitions' if self.snap.fingerprints.streamed else ''}, "
                f"{rows:,} rows",
                t.where,
                self.snap.dump_plain.size or 0,
                holds,
                not t.empty,
                action,
                _switch_notes(t, old, drop_old=target.drop_old),
            )
        ]

    def staged_bytes(self, workers: int) -> int:
        """The dump and the globals."""
        globals_size = self.snap.globals_sql.size if self.snap.globals_sql else 0
        return (self.snap.dump_plain.size or 0) + globals_size

    def stage(self, target: Target, work: Path) -> None:
        """Decrypt the dump (and globals), checked; refuse a pg_restore too old for it."""
        s = self.source
        self.staged = pg_restore.stage_files(
            s.repo, s.manifest, self.snap, s.identities, work, target.pg_bin_dir, target.cancel
        )

    def restore(self, target: Target, work: Path, stamp: str) -> Restored:
        """Restore beside the live database, verify the copy's fingerprints, then switch."""
        assert self.staged is not None and self.inspected is not None  # plan, stage came first
        outcome = pg_restore.restore(
            self.staged,
            self.snap,
            self.inspected,
            stamp=stamp,
            jobs=target.jobs,
            drop_old=target.drop_old,
            pg_bin_dir=target.pg_bin_dir,
            timeout=target.timeout,
        )
        self.staged.dump.unlink()
        counts = {"connections_ended": outcome.connections_ended}
        if outcome.retiring is None:
            return _restored(outcome, counts)
        return Restored([], _detail(outcome), counts, lambda: _restored(outcome.retired(), counts))


def _restored(outcome: pg_restore.PgOutcome, counts: dict[str, int]) -> Restored:
    """The outcome once settled: its detail, and the previous database if it was kept."""
    return Restored([], _detail(outcome), counts, previous_kept=outcome.old_database or "")


def _detail(outcome: pg_restore.PgOutcome) -> str:
    """The restored database, the previous one if kept, the connections the switch ended."""
    name = outcome.database
    detail = f"database {name}"
    if outcome.retiring is not None:
        detail += f"; previous ({outcome.old_database}) being dropped"
    elif outcome.dropped:
        detail += f"; previous dropped ({outcome.dropped})"
    elif outcome.old_database:
        detail += (
            f"; previous kept as {outcome.old_database} (anything written to {name} "
            "between the start of the restore and the switch is there, not in the restored "
            "database)"
        )
    return detail + f"; {outcome.connections_ended} open connections ended at the switch"


def _switch_notes(t: pg_restore.PgTarget, old: str, *, drop_old: bool) -> tuple[str, ...]:
    """What the switch does to the apps: their connections end, and where their writes go."""
    if not t.exists:
        return ()
    db = t.endpoint.dbname
    fate = (
        "is dropped with it (--drop-old)"
        if drop_old
        else f"stays in the kept database {old}, not in the restored one"
    )
    return (
        f"the switch ends every open connection to {db} ({t.connections} open now, drtool's "
        "own not counted); the apps must reconnect",
        f"whatever is written to {db} between the start of the restore and the switch {fate}",
    )
