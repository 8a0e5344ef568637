"""PostgreSQL restore: into a new database beside the live one, verified there, switched last.

``pg_restore --exit-on-error -j N`` fills ``<db>_restore_<time>``; its fingerprints must equal
the snapshot's; only then is the live database renamed to ``<db>_pre_restore_<time>`` (dropped
with ``drop_old``, or when it held nothing and still holds nothing) and the copy renamed into its
place. Any failure before the switch drops the copy and leaves the live database as it was
(promise 5).

The switch ends every open connection to the live database (the apps'), and whatever they write
between the start of the restore and the switch lands in the database that becomes
``<db>_pre_restore_<time>``, not in the restored one. The plan counts those connections and
says so; the result names the kept database as where such writes are.

The copy is created with the snapshot's encoding and locale and, once filled, given its
owner, comment, privileges and ``ALTER DATABASE ... SET`` settings (fingerprint format 3
records them; a dump without ``--create`` does not carry them).
"""

from __future__ import annotations

import json
import logging
import re
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import psycopg

from drtool.endpoints import PostgresEndpoint
from drtool.errors import ConfigError, IntegrityError, SourceError, UsageError
from drtool.faults import crash_point
from drtool.repository.access import Repo, read_object, snapshot_header
from drtool.repository.manifest import ComponentEntry, Manifest, ObjectEntry
from drtool.runtime.binaries import pg_major_of
from drtool.sources import postgres as pg
from drtool.sources.pg_archive_stream import ArchiveError, ArchiveStream, write_offsets
from drtool.sources.pg_fingerprint import PgFingerprints, compare
from drtool.sources.pg_scan import PartitionScan
from drtool.stores.stage import Plain, stage
from drtool.timing import Timer, timed

log = logging.getLogger(__name__)

MAX_NAME = 63
_ROLE_LINE = re.compile(r'^(CREATE|ALTER) ROLE ("(?:[^"]|"")*"|[^\s;]+)')


@dataclass(frozen=True)
class PgSnapshot:
    """What a snapshot holds for PostgreSQL."""

    dump: ObjectEntry
    globals_sql: ObjectEntry | None
    fingerprints: PgFingerprints
    dump_plain: Plain
    server_version: str = ""  # the source server's, as the manifest records it

    @property
    def major(self) -> int | None:
        """The source server's PostgreSQL major (None for a manifest that lacks it)."""
        return pg_major_of(self.server_version)


@dataclass(frozen=True)
class PgTarget:
    """The target database and what it holds now."""

    endpoint: PostgresEndpoint
    exists: bool
    empty: bool
    server_major: int = 0
    connections: int = 0  # open client connections to it when inspected (the apps')

    @property
    def where(self) -> str:
        """host:port/db."""
        e = self.endpoint
        return f"{e.host}:{e.port}/{e.dbname}"


@dataclass(frozen=True)
class PgOutcome:
    """What the switch left behind."""

    database: str
    old_database: str | None
    connections_ended: int = 0  # client connections to the live database ended by the switch
    #: the previous database being retired (dropped, or kept when it must be) after the switch,
    #: off the restore's critical path: its result is the name kept, None when dropped
    retiring: Future[str | None] | None = None
    dropped: str | None = None  # the previous database, once dropped after the switch

    def retired(self) -> PgOutcome:
        """The outcome once the previous database's drop (if any) finished."""
        if self.retiring is None:
            return self
        kept = self.retiring.result()
        return replace(
            self, old_database=kept, retiring=None, dropped=None if kept else self.old_database
        )


def load(repo: Repo, m: Manifest, comp: ComponentEntry, identities: list[str]) -> PgSnapshot:
    """Read the component's small objects (fingerprints) and find its dump."""
    by_kind = {o.kind: o for o in comp.objects}
    if "pg_dump" not in by_kind or "fingerprints" not in by_kind:
        raise IntegrityError(f"snapshot {m.snapshot_id}: postgres has no dump or fingerprints")
    fp = by_kind["fingerprints"]
    doc = json.loads(read_object(repo, fp, snapshot_header(m, "postgres", fp.kind), identities))
    return PgSnapshot(
        dump=by_kind["pg_dump"],
        globals_sql=by_kind.get("pg_globals"),
        fingerprints=PgFingerprints.from_dict(doc["fingerprints"]),
        dump_plain=Plain(int(doc["dump"]["size"]), str(doc["dump"]["sha256"])),
        server_version=comp.source_version,
    )


def check_major(snap: PgSnapshot, target_major: int, where: str) -> None:
    """Refuse a target server of an older major than the snapshot's; say so of a newer one.

    A dump restores into the same or a newer major (the documented upgrade path), never
    reliably into an older one. A newer target is allowed but logged: never a silent
    restore into another major. (A drill wants the same major: services/drill.py checks it.)
    """
    if snap.major is None or snap.major == target_major:
        return
    if target_major < snap.major:
        raise UsageError(
            f"restore: the snapshot holds PostgreSQL {snap.major} data but {where} runs "
            f"PostgreSQL {target_major}; a dump restores only into the same or a newer major "
            "(nothing changed)"
        )
    log.warning(
        "postgres: restoring a PostgreSQL %d snapshot into PostgreSQL %d at %s (a major upgrade)",
        snap.major,
        target_major,
        where,
    )


def inspect(endpoint: PostgresEndpoint, snap: PgSnapshot | None = None) -> PgTarget:
    """Whether the target database exists and holds anything; warns of leftover copies.

    With ``snap``, refuses a target server too old for it (:func:`check_major`).
    """
    target = PgTarget(endpoint, False, True, pg.server_version(admin(endpoint)))
    if snap is not None:
        check_major(snap, target.server_major, target.where)
    leftovers = pg.restore_copies(admin(endpoint), endpoint.dbname)
    if leftovers:
        log.warning(
            "restore copies from another or an interrupted restore: %s (drop them with "
            "DROP DATABASE once no restore runs)",
            ", ".join(leftovers),
        )
    exists = pg.database_exists(admin(endpoint), endpoint.dbname)
    empty = not exists or pg.database_is_empty(endpoint, endpoint.dbname)
    connections = pg.open_connections(admin(endpoint), endpoint.dbname) if exists else 0
    return replace(target, exists=exists, empty=empty, connections=connections)


def admin(endpoint: PostgresEndpoint) -> PostgresEndpoint:
    """The same server and login on the ``postgres`` database (the target may not exist yet)."""
    return replace(endpoint, dbname="postgres")


def names(dbname: str, stamp: str) -> tuple[str, str]:
    """The restore copy's and the kept old database's names (ConfigError when too long)."""
    copy, old = f"{dbname}_restore_{stamp}", f"{dbname}_pre_restore_{stamp}"
    if len(old.encode()) > MAX_NAME:
        raise ConfigError(
            f"postgres.dbname: too long to restore beside ({old} exceeds {MAX_NAME} bytes)"
        )
    return copy, old


@dataclass(frozen=True)
class PgStaged:
    """The checked scratch files of one PostgreSQL restore."""

    dump: Path
    globals_sql: Path | None


def stage_files(
    repo: Repo,
    m: Manifest,
    snap: PgSnapshot,
    identities: list[str],
    workdir: Path,
    pg_bin_dir: Path | None,
    cancel: threading.Event | None = None,
) -> PgStaged:
    """Decrypt the dump (and globals) to scratch, fully checked; refuse an old pg_restore (R5).

    The dump's data offsets are found as it is written, by the one archive reader
    (:class:`~drtool.sources.pg_archive_stream.ArchiveStream`) fed each staged piece: one pass
    over it, and the staged file is never read back.
    """
    offsets = OffsetsWhileStaging()
    with timed() as t:
        dump = stage(
            repo,
            snap.dump,
            snapshot_header(m, "postgres", snap.dump.kind),
            identities,
            workdir / "dump.pgdump",
            snap.dump_plain,
            tap=offsets.feed,
            cancel=cancel,
        )
    pg.pg_restore_version_check(dump, pg_bin_dir)
    indexed = offsets.write_into(dump)  # checked above; only its TOC's data offsets are set
    log.debug("postgres: dump staged in %.2f s, %d data offsets indexed", t.seconds, indexed)
    globals_path = None
    if snap.globals_sql is not None:
        header = snapshot_header(m, "postgres", snap.globals_sql.kind)
        globals_path = stage(
            repo, snap.globals_sql, header, identities, workdir / "globals.sql", cancel=cancel
        )
    return PgStaged(dump, globals_path)


#: the staging tap buffers an archive's header and TOC until they parse: beyond this (a TOC
#: of ~70,000 tables) it gives up rather than hold up to the reader's own 4 GiB cap in memory
TAP_TOC_LIMIT = 64 << 20
#: the newest archive format (major, minor) the reader knows; a newer one is not guessed at
KNOWN_FORMAT = (1, 16)


class OffsetsWhileStaging:
    """The archive reader (``digest=False``: block positions only) as staging's tap.

    What it cannot read (an :class:`ArchiveError`: an archive format it does not know, a
    stream cut short) stops the feeding and is remembered, not raised: staging must not fail
    for it, because pg_restore still reads an archive without offsets (it scans for each
    table's data, slower). :meth:`write_into` says so in a warning and writes nothing. The
    same for an archive format newer than :data:`KNOWN_FORMAT` and a header and TOC still
    unparsed after :data:`TAP_TOC_LIMIT` bytes: the memory they held is let go at once.
    """

    def __init__(self) -> None:
        self.reader = ArchiveStream(digest=False)
        self.problem = ""
        self._head = b""  # the archive's first bytes, until its format version is known
        self._fed = 0

    def feed(self, piece: bytes) -> None:
        if self.problem:
            return
        if self.reader.header is None:
            self._fed += len(piece)
            if len(self._head) < 8:
                self._head += piece[: 8 - len(self._head)]
            version = tuple(self._head[5:8])
            known = len(version) < 3 or not self._head.startswith(b"PGDMP")
            if not known and (version[0], version[1]) > KNOWN_FORMAT:
                self._give_up(f"archive format {version} is newer than the reader knows")
                return
            if self._fed > TAP_TOC_LIMIT:
                self._give_up(f"header and TOC not parsed after {TAP_TOC_LIMIT >> 20} MiB")
                return
        try:
            self.reader.feed(piece)
        except ArchiveError as exc:
            self.problem = str(exc)

    def _give_up(self, why: str) -> None:
        self.problem = why
        self.reader = ArchiveStream(digest=False)  # the buffered TOC freed

    def write_into(self, path: Path) -> int:
        """Write the offsets into the staged (and checked) ``path``; how many were written."""
        if not self.problem:
            try:
                self.reader.finish()
            except ArchiveError as exc:
                self.problem = str(exc)
        if self.problem:
            log.warning(
                "%s: data offsets not indexed (%s); pg_restore will scan for them",
                path,
                self.problem,
            )
            return 0
        return write_offsets(path, self.reader)


def filter_globals(text: str, existing: set[str], login_user: str) -> str:
    """The globals script without ``CREATE ROLE`` of existing roles or any line about our login.

    Existing roles are kept (their ``ALTER ROLE`` still restores attributes and passwords); the
    role drtool logs in with is never altered, so the restore keeps its own credentials.
    """
    kept = []
    for line in text.splitlines(keepends=True):
        match = _ROLE_LINE.match(line)
        if match:
            role = match.group(2)
            role = role[1:-1].replace('""', '"') if role.startswith('"') else role
            if role == login_user or (match.group(1) == "CREATE" and role in existing):
                continue
        kept.append(line)
    return "".join(kept)


def apply_globals(
    path: Path, endpoint: PostgresEndpoint, pg_bin_dir: Path | None, timeout: float
) -> None:
    """Create the snapshot's roles on the target server; any failing statement fails the run."""
    script = filter_globals(
        path.read_text(encoding="utf-8"), pg.role_names(endpoint), endpoint.user
    )
    filtered = path.with_name("globals.filtered.sql")
    filtered.write_text(script, encoding="utf-8")
    pg.run_sql_file(filtered, endpoint, "postgres", pg_bin_dir=pg_bin_dir, timeout=timeout)


def fingerprints_of(
    endpoint: PostgresEndpoint,
    dbname: str,
    like: PgFingerprints,
    *,
    workers: int = 1,
    pg_bin_dir: Path | None = None,
    timeout: float = 3600.0,
) -> PgFingerprints:
    """Fingerprints recomputed on database ``dbname`` of the target server, taken as ``like``.

    Format 5 (ADR 0033): one ``COPY ... TO STDOUT`` per table or partition, ``workers`` at a
    time, hashed as the backup hashed the dump's COPY text. Formats 1 to 4: the row-hash scan,
    one unit per table or partition on ``workers`` connections sharing one exported snapshot
    (:mod:`drtool.sources.pg_scan`).
    """
    if like.streamed:
        return pg.copy_proof(
            endpoint, dbname, like, workers=max(1, workers), pg_bin_dir=pg_bin_dir, timeout=timeout
        )
    kwargs = endpoint.connect_kwargs(dbname)
    try:
        with psycopg.connect(**kwargs) as conn:
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            row = conn.execute("SELECT pg_export_snapshot()").fetchone()
            assert row is not None
            scan = PartitionScan(
                lambda: psycopg.connect(**kwargs), str(row[0]), workers=max(1, workers), like=like
            )
            return scan.run().fingerprints
    except psycopg.Error as exc:
        raise SourceError(f"fingerprints of {dbname}: {' '.join(str(exc).split())}") from None


def restore(
    staged: PgStaged,
    snap: PgSnapshot,
    target: PgTarget,
    *,
    stamp: str,
    jobs: int,
    drop_old: bool,
    pg_bin_dir: Path | None,
    timeout: float,
) -> PgOutcome:
    """Restore beside the live database, verify the copy, then switch names."""
    endpoint, name = admin(target.endpoint), target.endpoint.dbname
    copy, old = names(name, stamp)
    if staged.globals_sql is not None:
        apply_globals(staged.globals_sql, endpoint, pg_bin_dir, timeout)
    pg.create_database(endpoint, copy, snap.fingerprints.database)
    will_drop = target.exists and (drop_old or target.empty)
    # DROP DATABASE forces an immediate checkpoint, which would then write and fsync the whole
    # freshly restored copy while nothing else runs. A CHECKPOINT started beside the (CPU-bound)
    # fingerprint scan and the switch does that disk work meanwhile; it only flushes, and a
    # login that may not run it skips it.
    flusher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="drtool-pg-retire")
    clock = Timer()
    try:
        pg.restore_dump(
            staged.dump,
            endpoint,
            copy,
            jobs=jobs,
            pg_bin_dir=pg_bin_dir,
            timeout=timeout,
            version_checked=True,  # by stage_files, on this file
        )
        if snap.fingerprints.database is not None:
            pg.apply_database_props(endpoint, copy, snap.fingerprints.database)
        log.debug("postgres: pg_restore -j %d into %s: %.2f s", jobs, copy, clock.elapsed())
        if will_drop:
            flusher.submit(pg.checkpoint, endpoint)
        restored = fingerprints_of(
            endpoint, copy, snap.fingerprints, workers=jobs, pg_bin_dir=pg_bin_dir, timeout=timeout
        )
        problems = compare(snap.fingerprints, restored)
        log.debug("postgres: %s proved (fingerprints): %.2f s", copy, clock.elapsed())
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise IntegrityError(
                f"postgres: the restored copy differs from the snapshot: {problems[0]}{more}"
                f"{_across_majors(snap, target, problems)}; the live database {name} is unchanged"
            )
        ended = _switch(endpoint, copy, name, old if target.exists else None)
        log.debug("postgres: switched: %.2f s", clock.elapsed())
    except BaseException:
        flusher.shutdown(wait=True)
        _drop_quietly(endpoint, copy)
        raise
    if not target.exists:
        flusher.shutdown(wait=True)
        log.info("postgres: %s switched in (there was no database %s before)", name, name)
        return PgOutcome(name, None, ended)
    if not will_drop:
        flusher.shutdown(wait=True)
        log.info("postgres: %s switched in; the previous one kept as %s", name, old)
        return PgOutcome(name, old, ended)
    # the restored database is live: the previous one is dropped after the CHECKPOINT (same
    # worker), while the caller goes on; the caller waits for it before it reports
    # said now, not only once the drop ended: a later store may fail meanwhile, and the
    # operator must know the live database was already replaced
    log.info("postgres: %s switched in; the previous one, %s, is being dropped", name, old)
    retiring = flusher.submit(_retire, endpoint, name, old, drop_old=drop_old)
    flusher.shutdown(wait=False)
    return PgOutcome(name, old, ended, retiring)


def _retire(endpoint: PostgresEndpoint, name: str, old: str, *, drop_old: bool) -> str | None:
    """Drop the previous database when it must go; the name kept (None: dropped). Never raises:
    it runs after every store restored, so an error here would lose the whole restore's
    results; a drop (or the emptiness check) that fails for any reason, a driver error
    included, leaves it kept, and says so."""
    try:
        why = _drop_reason(endpoint, old, drop_old=drop_old, was_empty=True)
        if why:
            pg.drop_database(endpoint, old)
            log.info("postgres: %s switched in; the previous one dropped (%s)", name, why)
            return None
    except Exception as exc:
        why = str(exc) if isinstance(exc, SourceError) else f"{type(exc).__name__}: {exc}"
        log.warning("postgres: %s switched in; the previous one kept as %s: %s", name, old, why)
        return old
    log.info("postgres: %s switched in; the previous one kept as %s", name, old)
    return old


def _across_majors(snap: PgSnapshot, target: PgTarget, problems: list[str]) -> str:
    """A note when only COPY digests differ after a restore into another major: the text
    output of a type may have changed there (ADR 0033; not seen for 15 into 16 and 18)."""
    if not snap.fingerprints.streamed or snap.major in (None, target.server_major):
        return ""
    if not all(p.endswith(" rows)") and "content digest differs" in p for p in problems):
        return ""
    return (
        f" (restored from PostgreSQL {snap.major} into {target.server_major}: with equal row "
        "counts, a type whose text output changed between the majors would also do this)"
    )


def _drop_reason(endpoint: PostgresEndpoint, old: str, *, drop_old: bool, was_empty: bool) -> str:
    """Why the previous database is dropped ('' = it is kept).

    An empty one is dropped only if it is still empty after the switch: an app may have written
    into it while the restore ran, and those writes are kept, never dropped unasked.
    """
    if drop_old:
        return "--drop-old"
    if not was_empty:
        return ""
    if pg.database_is_empty(endpoint, old):
        return "it held nothing"
    log.warning(
        "postgres: %s was empty when the restore started but holds data now (written meanwhile); "
        "kept",
        old,
    )
    return ""


def _switch(endpoint: PostgresEndpoint, copy: str, name: str, old: str | None) -> int:
    """Rename live -> old and copy -> live in one transaction; the connections ended."""
    crash_point("restore-before-switch")
    return pg.switch_databases(endpoint, copy, name, old)


def _drop_quietly(endpoint: PostgresEndpoint, name: str) -> None:
    try:
        pg.drop_database(endpoint, name)
    except SourceError as exc:
        log.warning("could not drop the unfinished restore copy %s: %s", name, exc)
