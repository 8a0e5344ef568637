"""PostgreSQL: a snapshot-consistent streaming dump with fingerprints, and restore primitives.

Dump: a REPEATABLE READ, READ ONLY transaction exports its snapshot; the fingerprints are
computed on that snapshot and ``pg_dump -Fc -Z0 --snapshot=ID`` dumps the same snapshot,
so the recorded figures describe exactly the rows in the archive, whatever writers do
meanwhile. With ``wal_level = logical`` that snapshot is a temporary logical slot's, and the
slot's consistent point is recorded as the LSN the dump matches (pg_snapshot_lsn). The
password reaches child processes only through ``PGPASSWORD``.

Restore: ``pg_restore --exit-on-error`` into a database the caller created (restore beside
the live one, switch by renaming last). Owners and privileges are kept by default (restore the
globals first so the roles exist); ``keep_owners=False`` gives a bare copy owned by the
restoring user, for drills into a server without the production roles.
"""

from __future__ import annotations

import logging
import mmap
import os
import re
import shutil
import struct
from collections.abc import Generator, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import closing, contextmanager
from dataclasses import dataclass
from inspect import GEN_CREATED, getgeneratorstate
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from drtool.endpoints import PostgresEndpoint
from drtool.errors import SourceError
from drtool.sources.pg_fingerprint import DatabaseProps, PgFingerprints
from drtool.sources.pg_scan import Baseline, PartitionScan, ScanResult
from drtool.sources.pg_snapshot_lsn import SLOT_WAIT_S, ExportedSnapshot, export_snapshot
from drtool.sources.process import CommandFailed, child_env, command_stream, run_checked, scrub

log = logging.getLogger(__name__)

DUMP_MAGIC = b"PGDMP"
_CONNECT_TIMEOUT = 10
_VERSION_TIMEOUT = 30.0
_SESSION_OPTIONS = "-c statement_timeout=0 -c idle_in_transaction_session_timeout=0"
_GLOBALS_MARK = b"PostgreSQL database cluster dump"
_HEADER_READ = 64 * 1024
_ARCH_CUSTOM = 1
_USER_NS = (
    "n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname !~ '^pg_(toast|temp)'"
)
_EMPTY_SQL = f"""
SELECT (SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE {_USER_NS})
     + (SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
        WHERE {_USER_NS})
     + (SELECT count(*) FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
        WHERE {_USER_NS})
     + (SELECT count(*) FROM pg_namespace n WHERE {_USER_NS} AND n.nspname <> 'public')
     + (SELECT count(*) FROM pg_extension WHERE extname <> 'plpgsql')
"""


# --- connections and versions -------------------------------------------------------------


def _secrets(endpoint: PostgresEndpoint) -> tuple[str, ...]:
    return (endpoint.password,) if endpoint.password else ()


def _one_line(exc: BaseException, endpoint: PostgresEndpoint) -> str:
    return scrub(" ".join(str(exc).split()), _secrets(endpoint))


def _connect(
    endpoint: PostgresEndpoint, dbname: str | None = None, *, autocommit: bool = False
) -> psycopg.Connection[Any]:
    """A connection, or ``SourceError`` naming the server and the cause."""
    try:
        return psycopg.connect(
            **endpoint.connect_kwargs(dbname),
            autocommit=autocommit,
            connect_timeout=_CONNECT_TIMEOUT,
            application_name="drtool",
            options=_SESSION_OPTIONS,
        )
    except psycopg.Error as exc:
        where = f"{endpoint.host}:{endpoint.port}/{dbname or endpoint.dbname}"
        raise SourceError(
            f"cannot connect to PostgreSQL {where} as {endpoint.user}: {_one_line(exc, endpoint)}"
        ) from None


def _binary(name: str, pg_bin_dir: Path | None) -> str:
    if pg_bin_dir is not None:
        path = Path(pg_bin_dir) / name
        if not path.is_file():
            raise SourceError(f"{name} not found in {pg_bin_dir}")
        return str(path)
    found = shutil.which(name)
    if found is None:
        raise SourceError(f"{name} not found on PATH; install a PostgreSQL client")
    return found


def _major(version: str) -> int:
    match = re.match(r"(\d+)", version)
    if match is None:
        raise SourceError(f"cannot parse PostgreSQL version {version!r}")
    return int(match.group(1))


def _tool_version(binary: str) -> str:
    out = run_checked(
        [binary, "--version"], env=child_env({}), timeout=_VERSION_TIMEOUT, name=Path(binary).name
    )
    match = re.search(r"\(PostgreSQL\) (\d+(?:\.\d+)*)", out)
    if match is None:
        raise SourceError(f"{binary} --version printed no PostgreSQL version: {out.strip()[:100]}")
    return match.group(1)


def _server_version(conn: psycopg.Connection[Any]) -> str:
    return conn.info.parameter_status("server_version") or str(conn.info.server_version)


def server_version(endpoint: PostgresEndpoint) -> int:
    """The server's major version (e.g. 16)."""
    with _connect(endpoint) as conn:
        return _major(_server_version(conn))


@dataclass(frozen=True)
class ServerRole:
    """Whether the source is a primary or a streaming standby, and how far behind it is.

    A standby's lag is 0 while its WAL receiver streams and it has replayed all it received;
    otherwise (replay behind, or the receiver not streaming) it is the age of the last
    transaction it replayed, since nothing says the primary is idle.
    """

    standby: bool
    replayed_lsn: str | None = None  # the primary's WAL position the standby had replayed
    lag_s: float = 0.0

    def details(self, when: str) -> dict[str, Any]:
        """Manifest details of one check (``when``: before / after the dump)."""
        if not self.standby:
            return {}
        return {f"replayed_lsn_{when}": self.replayed_lsn, f"standby_lag_s_{when}": self.lag_s}


_ROLE_SQL = """
SELECT pg_is_in_recovery(),
       pg_last_wal_replay_lsn()::text,
       pg_last_wal_receive_lsn() IS NOT NULL
         AND pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn()
         AND EXISTS (SELECT 1 FROM pg_stat_wal_receiver WHERE status = 'streaming'),
       extract(epoch FROM clock_timestamp() - pg_last_xact_replay_timestamp())
"""


def server_role(endpoint: PostgresEndpoint) -> ServerRole:
    """Primary or standby, with the standby's replayed position and lag (a short session)."""
    with _connect(endpoint, autocommit=True) as conn:
        row = conn.execute(_ROLE_SQL).fetchone()
    assert row is not None
    in_recovery, replayed, caught_up, age = row
    if not in_recovery:
        return ServerRole(False)
    lag = 0.0 if caught_up else float(age) if age is not None else float("inf")
    return ServerRole(True, replayed, round(lag, 1))


def checked_role(endpoint: PostgresEndpoint, max_lag_s: float, when: str, what: str) -> ServerRole:
    """The source's role; a standby lagging more than ``max_lag_s`` fails the backup.

    Checked before and after the dump and the base backup (``what``): a standby is a fine
    source (the primary carries no backup load) only while it is close to the primary; a
    stale copy must not be stored as the newest state without anyone noticing.
    """
    role = server_role(endpoint)
    if role.standby and role.lag_s > max_lag_s:
        raise SourceError(
            f"postgres {endpoint.host}:{endpoint.port} is a standby whose replay lags "
            f"{role.lag_s:.0f} s {when} the {what} (postgres.max_standby_lag_s = "
            f"{max_lag_s:.0f}); nothing stored"
        )
    return role


def role_details(
    endpoint: PostgresEndpoint, before: ServerRole, after: ServerRole
) -> dict[str, Any]:
    """The manifest details naming the server a component came from (docs/FORMAT.md)."""
    return {
        "source": f"{endpoint.host}:{endpoint.port}",
        "source_role": "standby" if before.standby else "primary",
        **before.details("before"),
        **after.details("after"),
    }


def client_version(binary: str | Path) -> int:
    """The major version a PostgreSQL client binary reports with ``--version``."""
    return _major(_tool_version(str(binary)))


def _require_client(tool: str, client: int, server: int) -> None:
    if client < server:
        raise SourceError(
            f"{tool} {client} is older than the server ({server}); "
            f"install a PostgreSQL {server} client"
        )


def preflight(endpoint: PostgresEndpoint, pg_bin_dir: Path | None = None) -> None:
    """Refuse (``SourceError``) an unreachable server or a ``pg_dump`` older than it."""
    _require_client(
        "pg_dump", client_version(_binary("pg_dump", pg_bin_dir)), server_version(endpoint)
    )


def _dbname_arg(dbname: str) -> str:
    """``--dbname`` as a conninfo string, so a name containing ``=`` is not misparsed."""
    quoted = dbname.replace("\\", "\\\\").replace("'", "\\'")
    return f"--dbname=dbname='{quoted}'"


def _tool_env(endpoint: PostgresEndpoint, app: str) -> dict[str, str]:
    extra = endpoint.libpq_env()
    extra.update(PGAPPNAME=app, PGCONNECT_TIMEOUT=str(_CONNECT_TIMEOUT))
    return child_env(extra)


# --- dump ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PgDump:
    """One snapshot-consistent dump: its fingerprints and its ``-Fc`` archive stream.

    The fingerprint scan (:mod:`drtool.sources.pg_scan`: one unit per table or partition,
    ``fingerprint_workers`` backends that import the exported snapshot) runs in a thread while
    pg_dump streams: ``fingerprints`` waits for it and stays valid after the block. ``stream``
    must be consumed inside the ``dump()`` block; it raises ``SourceError`` at its end if
    pg_dump failed, timed out or wrote no archive.
    """

    scan: Future[ScanResult]
    stream: Generator[bytes, None, None]
    exported: ExportedSnapshot
    server_version: str
    pg_dump_version: str

    @property
    def snapshot(self) -> str:
        """The snapshot id pg_dump imports (valid inside the ``dump()`` block)."""
        return self.exported.snapshot

    @property
    def fingerprints(self) -> PgFingerprints:
        """The snapshot's fingerprints (waits for the scan; raises its SourceError)."""
        return self.scan.result().fingerprints

    @property
    def scanned(self) -> ScanResult:
        """The scan: fingerprints, what was reused, the next baseline (waits for it)."""
        return self.scan.result()


def _archive_stream(
    conn: psycopg.Connection[Any],
    argv: list[str],
    endpoint: PostgresEndpoint,
    *,
    timeout: float,
    read_size: int,
) -> Generator[bytes, None, None]:
    """pg_dump's stream, refused unless it starts with the custom-format magic."""
    if conn.closed:
        raise SourceError("pg_dump stream read after its dump() block: the snapshot is gone")
    chunks = command_stream(
        argv,
        env=_tool_env(endpoint, "drtool-pg_dump"),
        timeout=timeout,
        name="pg_dump",
        min_bytes=len(DUMP_MAGIC),
        read_size=read_size,
        secrets=_secrets(endpoint),
    )
    with closing(chunks):
        first = True
        for chunk in chunks:
            if first and not chunk.startswith(DUMP_MAGIC):
                raise SourceError("pg_dump output is not a custom-format archive (no PGDMP header)")
            first = False
            yield chunk


@contextmanager
def dump(
    endpoint: PostgresEndpoint,
    *,
    pg_bin_dir: Path | None = None,
    timeout: float,
    read_size: int = 1 << 20,
    slot_wait: float = SLOT_WAIT_S,
    fingerprint_workers: int = 2,
    baseline: Baseline | None = None,
    reuse_max_age_s: float = 7 * 86400.0,
) -> Iterator[PgDump]:
    """Open a snapshot and yield a ``PgDump`` streaming ``pg_dump`` of it, fingerprinted.

    On entry the exporting transaction opens; its fingerprint scan starts in a thread at once
    (``fingerprint_workers`` connections on the exported snapshot; partitions ``baseline``
    proves unchanged are not hashed again, see ADR 0029) and pg_dump starts on the first read
    of ``stream``, so they run side by side. The transaction stays open until the block ends
    and the scan is done. On exit an unfinished pg_dump is killed. ``timeout`` bounds the
    stream (pg_dump's run time). The snapshot comes from a temporary logical slot when the
    server allows one, and then ``exported.consistent_lsn`` is the LSN whose state the dump
    shows exactly (:mod:`drtool.sources.pg_snapshot_lsn`; ``slot_wait`` bounds the slot's wait
    for running transactions); otherwise it is None and the reason is in
    ``exported.lsn_unavailable``.
    """
    pg_dump = _binary("pg_dump", pg_bin_dir)
    pg_dump_version = _tool_version(pg_dump)
    with _connect(endpoint) as conn:
        version = _server_version(conn)
        _require_client("pg_dump", _major(pg_dump_version), _major(version))
        exported = export_snapshot(conn, endpoint, _major(version), wait=slot_wait)
        argv = [pg_dump, "--format=custom", "--compress=0", f"--snapshot={exported.snapshot}"]
        argv += ["--no-password", _dbname_arg(endpoint.dbname)]
        stream = _archive_stream(conn, argv, endpoint, timeout=timeout, read_size=read_size)
        scanner = PartitionScan(
            lambda: _connect(endpoint),
            exported.snapshot,
            workers=fingerprint_workers,
            baseline=baseline,
            max_reuse_age_s=reuse_max_age_s,
        )
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="drtool-fingerprint") as pool:
            scan = pool.submit(_fingerprints_in_snapshot, scanner, endpoint)
            try:
                yield PgDump(scan, stream, exported, version, pg_dump_version)
            except BaseException:
                if not scan.cancel() and not scan.done():
                    scanner.cancel()  # an aborted backup need not finish the scan
                raise
            finally:
                if getgeneratorstate(stream) != GEN_CREATED:
                    stream.close()
                wait([scan])  # the exported snapshot must outlive the scan that imports it


def _fingerprints_in_snapshot(scanner: PartitionScan, endpoint: PostgresEndpoint) -> ScanResult:
    try:
        return scanner.run()
    except psycopg.Error as exc:
        raise SourceError(f"PostgreSQL fingerprints: {_one_line(exc, endpoint)}") from None


def dump_globals(
    endpoint: PostgresEndpoint, *, pg_bin_dir: Path | None = None, timeout: float
) -> bytes | None:
    """``pg_dumpall --globals-only`` (roles, tablespaces) as SQL bytes, or None if not permitted.

    Role password hashes are kept (the dump is stored encrypted; never log it). A role that
    may not read them gets the roles without passwords and a warning; one that may not read
    the roles at all gets None and a warning.
    """
    base = [_binary("pg_dumpall", pg_bin_dir), "--globals-only", "--no-password"]
    _connect(endpoint).close()  # pg_dumpall -l hides why a connection failed; psycopg says
    base.append(f"--database={endpoint.dbname}")
    for extra in ([], ["--no-role-passwords"]):
        try:
            out = b"".join(
                command_stream(
                    base + extra,
                    env=_tool_env(endpoint, "drtool-pg_dumpall"),
                    timeout=timeout,
                    name="pg_dumpall",
                    secrets=_secrets(endpoint),
                )
            )
        except CommandFailed as exc:
            if "permission denied" not in exc.stderr_tail:
                raise
            log.warning("pg_dumpall %s: %s", " ".join(extra) or "--globals-only", exc.stderr_tail)
            continue
        if _GLOBALS_MARK not in out[:4096]:
            raise SourceError("pg_dumpall output is not a globals dump (no cluster dump header)")
        if extra:
            log.warning("globals dumped without role passwords: reset them after a restore")
        return out
    log.warning("globals not dumped: %s may not read the roles", endpoint.user)
    return None


# --- archives and restore -----------------------------------------------------------------


@dataclass(frozen=True)
class ArchiveHeader:
    """What a ``pg_dump -Fc`` archive says about itself."""

    format_version: tuple[int, int, int]
    dbname: str
    server_version: str
    dump_version: str


class _HeaderReader:
    def __init__(self, data: bytes, path: Path) -> None:
        self._data, self._pos, self._path = data, 0, path
        self.int_size = 4

    def byte(self) -> int:
        if self._pos >= len(self._data):
            raise SourceError(f"{self._path}: truncated pg_dump archive header")
        self._pos += 1
        return self._data[self._pos - 1]

    def int(self) -> int:
        negative = self.byte()
        value = sum(self.byte() << (8 * i) for i in range(self.int_size))
        return -value if negative else value

    def str(self) -> str:
        raw = bytes(self.byte() for _ in range(max(self.int(), 0)))
        return raw.decode("utf-8", "replace")


def read_archive_header(path: Path) -> ArchiveHeader:
    """Parse the header of a custom-format archive (``SourceError`` if it is not one)."""
    with open(path, "rb") as fh:
        data = fh.read(_HEADER_READ)
    if not data.startswith(DUMP_MAGIC):
        raise SourceError(f"{path} is not a pg_dump custom-format archive (no PGDMP header)")
    rd = _HeaderReader(data[len(DUMP_MAGIC) :], path)
    version = (rd.byte(), rd.byte(), rd.byte())
    rd.int_size = rd.byte()
    rd.byte()  # offset size
    if version < (1, 10, 0) or rd.byte() != _ARCH_CUSTOM:
        raise SourceError(f"{path}: unsupported archive (format {version}, not custom or too old)")
    if version >= (1, 15, 0):
        rd.byte()  # compression algorithm
    else:
        rd.int()  # compression level
    for _ in range(7):
        rd.int()  # creation time fields
    return ArchiveHeader(version, rd.str(), rd.str(), rd.str())


# Custom-format archive internals (pg_backup_archiver.h, pg_backup_custom.c).
_OFFSET_NOT_SET, _OFFSET_SET, _OFFSET_NO_DATA = 1, 2, 3
_BLK_DATA, _BLK_BLOBS = 1, 3
_INDEXED_SINCE = (1, 12, 0)  # archives this parser reads (PostgreSQL 9.5 and later)


class _ArchiveCursor:
    """Reads the archive's integers and strings from a buffer (``IndexError`` at its end)."""

    def __init__(self, data: bytes | mmap.mmap, pos: int) -> None:
        self.data, self.pos = data, pos
        self.int_size = 4
        self.offset_size = 8
        self._int: struct.Struct | None = None

    def set_int_size(self, size: int) -> None:
        self.int_size = size
        self._int = struct.Struct("<BI") if size == 4 else None

    def byte(self) -> int:
        self.pos += 1
        return self.data[self.pos - 1]

    def int(self) -> int:
        if self._int is not None:
            sign, value = self._int.unpack_from(self.data, self.pos)
            self.pos += 5
        else:
            sign = self.byte()
            value = int.from_bytes(self.data[self.pos : self.pos + self.int_size], "little")
            self.pos += self.int_size
        return -value if sign else value

    def skip_str(self) -> bool:
        """Skip a string; False when it was NULL."""
        length = self.int()
        if length < 0:
            return False
        self.pos += length
        return True

    def str(self) -> str:
        length = self.int()
        raw = bytes(self.data[self.pos : self.pos + max(length, 0)])
        self.pos += max(length, 0)
        return raw.decode("utf-8", "replace")

    def skip_chunks(self) -> None:
        """Skip length-prefixed data chunks up to the zero-length end marker."""
        unpack, data, pos = self._int, self.data, self.pos
        if unpack is None:
            while (length := self.int()) != 0:
                self.pos += length
            return
        unpack_from = unpack.unpack_from
        while True:
            sign, length = unpack_from(data, pos)
            pos += 5
            if length == 0:
                break
            if sign:
                raise ValueError(f"negative chunk length at {pos - 5}")
            pos += length
        self.pos = pos


def _toc_offsets(cur: _ArchiveCursor, version: tuple[int, int, int]) -> dict[int, tuple[int, int]]:
    """Read the TOC: dumpId -> (offset flag, position of the flag) of each entry."""
    entries: dict[int, tuple[int, int]] = {}
    for _ in range(cur.int()):
        dump_id = cur.int()
        cur.int()  # hadDumper
        for _ in range(4):
            cur.skip_str()  # tableoid, oid, tag, desc
        cur.int()  # section
        for _ in range(5):
            cur.skip_str()  # defn, dropStmt, copyStmt, namespace, tablespace
        if version >= (1, 14, 0):
            cur.skip_str()  # tableam
        if version >= (1, 16, 0):
            cur.int()  # relkind
        cur.skip_str()  # owner
        cur.skip_str()  # "false" (WITH OIDS, >= 1.9)
        while cur.skip_str():  # dependencies, NULL-terminated
            pass
        flag_at = cur.pos
        flag = cur.byte()
        cur.pos += cur.offset_size
        if dump_id <= 0 or dump_id in entries or flag not in (1, 2, 3):  # NOT_SET, SET, NO_DATA
            raise ValueError(f"TOC entry {dump_id}")
        entries[dump_id] = (flag, flag_at)
    return entries


def index_archive(path: Path) -> int:
    """Record the data offsets in a custom-format archive that lacks them; return how many.

    ``pg_dump -Fc`` writing to a pipe (as a streaming backup does) cannot seek back to fill in
    where each table's data starts, and ``pg_restore -j`` then makes every worker scan the file
    for each table (4x slower here). This walks the data blocks once and writes each one's
    position into its TOC entry, in place: the same fixed-size fields pg_dump fills when it
    writes to a file; nothing else changes. An archive that already has its offsets, or one
    this parser does not understand, is left as it is (0) — pg_restore still reads it; a
    file that is not a custom-format archive at all raises SourceError.
    """
    with open(path, "r+b") as fh:
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
            try:
                patches = _offset_patches(data, path)
            except (ValueError, IndexError, struct.error) as exc:
                log.warning(
                    "%s: data offsets not indexed (%s); pg_restore will scan for them", path, exc
                )
                return 0
        for flag_at, value in patches:
            os.pwrite(fh.fileno(), value, flag_at)
    return len(patches)


def _offset_patches(data: mmap.mmap, path: Path) -> list[tuple[int, bytes]]:
    """The (position, bytes) writes that fill in each data block's offset in the TOC.

    Reads the archive header and TOC, then walks the data blocks once to find where each
    starts. Empty when the archive already has its offsets or predates them; ValueError on
    anything this parser does not understand (the caller then leaves the file alone).
    """
    version = read_archive_header(path).format_version
    if version < _INDEXED_SINCE:
        return []
    cur = _ArchiveCursor(data, len(DUMP_MAGIC) + 3)
    cur.set_int_size(cur.byte())
    cur.offset_size = cur.byte()
    cur.byte()  # format
    if version >= (1, 15, 0):
        cur.byte()  # compression algorithm
    else:
        cur.int()  # compression level
    for _ in range(7):
        cur.int()  # creation time
    for _ in range(3):
        cur.skip_str()  # dbname, server version, pg_dump version
    entries = _toc_offsets(cur, version)
    if not any(flag == _OFFSET_NOT_SET for flag, _ in entries.values()):
        return []
    found: dict[int, int] = {}
    while cur.pos < len(data):
        start = cur.pos
        kind = cur.byte()
        dump_id = cur.int()
        if dump_id not in entries or dump_id in found or entries[dump_id][0] == _OFFSET_NO_DATA:
            raise ValueError(f"data block for unexpected entry {dump_id} at {start}")
        if kind == _BLK_DATA:
            cur.skip_chunks()
        elif kind == _BLK_BLOBS:
            while cur.int() != 0:  # large object oid; 0 ends the list
                cur.skip_chunks()
        else:
            raise ValueError(f"unknown block type {kind} at {start}")
        found[dump_id] = start
        # the pages walked so far would stay in this process's resident size (a 117 MB dump
        # showed as a 204 MiB restore): they are page cache, let them go
        data.madvise(mmap.MADV_DONTNEED, 0, cur.pos - cur.pos % mmap.PAGESIZE)
    if cur.pos != len(data):
        raise ValueError("the last data block runs past the end of the file")
    patches = []
    for dump_id, (flag, flag_at) in entries.items():
        if flag == _OFFSET_NOT_SET and dump_id in found:
            value = bytes([_OFFSET_SET]) + found[dump_id].to_bytes(cur.offset_size, "little")
            patches.append((flag_at, value))
    return patches


def pg_restore_version_check(archive_path: Path, pg_bin_dir: Path | None = None) -> ArchiveHeader:
    """Refuse a ``pg_restore`` older than the ``pg_dump`` that wrote the archive (R5)."""
    header = read_archive_header(archive_path)
    restore_version = client_version(_binary("pg_restore", pg_bin_dir))
    dump_major = _major(header.dump_version)
    if restore_version < dump_major:
        raise SourceError(
            f"pg_restore {restore_version} is older than the dump (pg_dump "
            f"{header.dump_version}); install a PostgreSQL {dump_major} client"
        )
    return header


def restore_dump(
    archive_path: Path,
    endpoint: PostgresEndpoint,
    dbname: str,
    *,
    jobs: int = 1,
    pg_bin_dir: Path | None = None,
    timeout: float,
    keep_owners: bool = True,
    version_checked: bool = False,
    use_list: Path | None = None,
) -> None:
    """``pg_restore --exit-on-error -j jobs`` of a seekable archive file into ``dbname``.

    Checks the versions first (``version_checked``: the caller already ran
    :func:`pg_restore_version_check` on this file). ``use_list``: only the entries of this
    table of contents (``pg_restore -L``; see :func:`archive_list`). Failures raise
    ``SourceError`` with pg_restore's stderr tail; warnings of a successful run are logged.
    """
    if not version_checked:
        pg_restore_version_check(archive_path, pg_bin_dir)
    argv = [_binary("pg_restore", pg_bin_dir), "--exit-on-error", f"--jobs={jobs}"]
    argv += ["--no-password", _dbname_arg(dbname)]
    if not keep_owners:
        argv += ["--no-owner", "--no-privileges"]
    if use_list is not None:
        argv += [f"--use-list={use_list}"]
    run_checked(
        [*argv, str(archive_path)],
        env=_tool_env(endpoint, "drtool-pg_restore"),
        timeout=timeout,
        name="pg_restore",
        secrets=_secrets(endpoint),
    )


def archive_list(archive_path: Path, pg_bin_dir: Path | None = None, *, timeout: float) -> str:
    """``pg_restore -l``: the archive's table of contents, one entry a line (for ``use_list``)."""
    argv = [_binary("pg_restore", pg_bin_dir), "--list", str(archive_path)]
    return run_checked(argv, env=child_env({}), timeout=timeout, name="pg_restore --list")


# --- databases ----------------------------------------------------------------------------


@contextmanager
def _admin_conn(
    endpoint: PostgresEndpoint, action: str, *names: str
) -> Iterator[psycopg.Connection[Any]]:
    """An autocommit connection to a database other than ``names``; errors as SourceError."""
    maintenance = next(db for db in (endpoint.dbname, "postgres", "template1") if db not in names)
    conn = _connect(endpoint, maintenance, autocommit=True)
    try:
        with conn:
            yield conn
    except psycopg.Error as exc:
        raise SourceError(f"{action}: {_one_line(exc, endpoint)}") from None


def database_exists(endpoint: PostgresEndpoint, name: str) -> bool:
    """Whether database ``name`` exists on the server."""
    with _admin_conn(endpoint, f"look up database {name}") as conn:
        row = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        return row is not None


def database_is_empty(endpoint: PostgresEndpoint, name: str) -> bool:
    """Whether ``name`` holds no user objects (relations, functions, types, schemas, extensions)."""
    with _connect(endpoint, name) as conn:
        row = conn.execute(_EMPTY_SQL).fetchone()
        assert row is not None
        return int(row[0]) == 0


def create_database(
    endpoint: PostgresEndpoint, name: str, props: DatabaseProps | None = None
) -> None:
    """``CREATE DATABASE name TEMPLATE template0`` with the snapshot's encoding and locale.

    ``props`` None (a snapshot that did not record them): the server's defaults.
    """
    options: list[sql.Composable] = [sql.SQL("TEMPLATE template0")]
    if props is not None:
        options += [
            sql.SQL("ENCODING {}").format(sql.Literal(props.encoding)),
            sql.SQL("LC_COLLATE {}").format(sql.Literal(props.collate)),
            sql.SQL("LC_CTYPE {}").format(sql.Literal(props.ctype)),
        ]
        if props.locale_provider != "libc":
            options.append(sql.SQL("LOCALE_PROVIDER {}").format(sql.SQL(props.locale_provider)))
        if props.icu_locale:
            options.append(sql.SQL("ICU_LOCALE {}").format(sql.Literal(props.icu_locale)))
        options.append(sql.SQL("CONNECTION LIMIT {}").format(sql.Literal(props.connlimit)))
    create = sql.SQL("CREATE DATABASE {} {}").format(
        sql.Identifier(name), sql.SQL(" ").join(options)
    )
    with _admin_conn(endpoint, f"create database {name}", name) as conn:
        conn.execute(create)


_LIST_QUOTED = {
    "local_preload_libraries",
    "search_path",
    "session_preload_libraries",
    "shared_preload_libraries",
    "temp_tablespaces",
    "unix_socket_directories",
}
"""Settings whose value is a list of quoted names: set element by element (as pg_dump does)."""


def _setting_value(name: str, value: str) -> sql.Composable:
    if name.lower() not in _LIST_QUOTED:
        return sql.Literal(value)
    items = [m.group(1).replace('""', '"') if m.group(1) is not None else m.group(2).strip()
             for m in re.finditer(r'\s*(?:"((?:[^"]|"")*)"|([^,]+))\s*(?:,|$)', value)]  # fmt: skip
    return sql.SQL(", ").join(sql.Literal(item) for item in items)


def apply_database_props(endpoint: PostgresEndpoint, name: str, props: DatabaseProps) -> None:
    """Give database ``name`` the snapshot's owner, comment, privileges and settings.

    Run after pg_restore (a setting such as ``default_transaction_read_only`` would stop it).
    A statement the login may not run fails the restore (the copy is dropped).
    """
    db = sql.Identifier(name)
    statements: list[sql.Composed] = []
    if props.owner:
        statements.append(
            sql.SQL("ALTER DATABASE {} OWNER TO {}").format(db, sql.Identifier(props.owner))
        )
    if props.comment is not None:
        statements.append(
            sql.SQL("COMMENT ON DATABASE {} IS {}").format(db, sql.Literal(props.comment))
        )
    if props.acl is not None:
        statements.append(sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(db))
        for grantee, privilege, grantable in props.acl:
            statements.append(
                sql.SQL("GRANT {} ON DATABASE {} TO {}{}").format(
                    sql.SQL(privilege),
                    db,
                    sql.SQL("PUBLIC") if grantee == "PUBLIC" else sql.Identifier(grantee),
                    sql.SQL(" WITH GRANT OPTION" if grantable else ""),
                )
            )
    for role, setting in props.settings:
        key, _, value = setting.partition("=")
        target = (
            sql.SQL("ALTER ROLE {} IN DATABASE {}").format(sql.Identifier(role), db)
            if role
            else sql.SQL("ALTER DATABASE {}").format(db)
        )
        statements.append(
            sql.SQL("{} SET {} TO {}").format(
                target, sql.Identifier(key), _setting_value(key, value)
            )
        )
    with _admin_conn(endpoint, f"set the properties of database {name}", name) as conn:
        for statement in statements:
            conn.execute(statement)


def switch_databases(endpoint: PostgresEndpoint, copy: str, name: str, old: str | None) -> int:
    """Make database ``copy`` the database ``name``, the current one (if ``old``) renamed ``old``.

    New connections to ``name`` are refused and the open ones to both ended; then both renames
    commit in one transaction, so there is never a moment without a database ``name``. Returns
    how many client connections to ``name`` were ended (the restore reports it).
    """
    moving = [name, copy] if old is not None else [copy]
    with _admin_conn(endpoint, f"switch {copy} in as {name}", *moving) as conn:
        allow = sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS {}")
        for db in moving:
            conn.execute(allow.format(sql.Identifier(db), sql.SQL("false")))
        try:
            ended = conn.execute(
                "SELECT datname, backend_type, pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = ANY(%s) AND pid <> pg_backend_pid()",
                (moving,),
            ).fetchall()
            rename = sql.SQL("ALTER DATABASE {} RENAME TO {}")
            with conn.transaction():
                if old is not None:
                    conn.execute(rename.format(sql.Identifier(name), sql.Identifier(old)))
                conn.execute(rename.format(sql.Identifier(copy), sql.Identifier(name)))
        except psycopg.Error:
            for db in moving:
                conn.execute(allow.format(sql.Identifier(db), sql.SQL("true")))
            raise
        for db in [name] if old is None else [name, old]:
            conn.execute(allow.format(sql.Identifier(db), sql.SQL("true")))
    return sum(1 for db, kind, done in ended if db == name and kind == "client backend" and done)


def open_connections(endpoint: PostgresEndpoint, name: str) -> int:
    """Client connections to database ``name`` now, not counting this one (the apps')."""
    with _admin_conn(endpoint, f"count connections to {name}", name) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s "
            "AND backend_type = 'client backend' AND pid <> pg_backend_pid()",
            (name,),
        ).fetchone()
    return int(row[0]) if row else 0


def restore_copies(endpoint: PostgresEndpoint, name: str) -> list[str]:
    """Databases ``<name>_restore_*``: restore copies (a running or an interrupted restore)."""
    with _admin_conn(endpoint, "list databases", name) as conn:
        rows = conn.execute(
            "SELECT datname FROM pg_database WHERE starts_with(datname, %s) ORDER BY 1",
            (f"{name}_restore_",),
        ).fetchall()
    return [str(r[0]) for r in rows]


def checkpoint(endpoint: PostgresEndpoint) -> bool:
    """``CHECKPOINT`` (flush written data to disk); False when the login may not run it."""
    try:
        with _admin_conn(endpoint, "checkpoint") as conn:
            conn.execute("CHECKPOINT")
    except SourceError as exc:
        log.debug("CHECKPOINT not run: %s", exc)
        return False
    return True


def drop_database(endpoint: PostgresEndpoint, name: str) -> None:
    """``DROP DATABASE IF EXISTS name WITH (FORCE)``: other connections are terminated."""
    with _admin_conn(endpoint, f"drop database {name}", name) as conn:
        drop = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
        conn.execute(drop.format(sql.Identifier(name)))


def role_names(endpoint: PostgresEndpoint) -> set[str]:
    """The names of every role on the server."""
    with _admin_conn(endpoint, "list roles") as conn:
        return {row[0] for row in conn.execute("SELECT rolname FROM pg_roles").fetchall()}


def run_sql_file(
    path: Path,
    endpoint: PostgresEndpoint,
    dbname: str,
    *,
    pg_bin_dir: Path | None = None,
    timeout: float,
) -> None:
    """``psql -v ON_ERROR_STOP=1 -f path``: the first failing statement fails the run."""
    argv = [_binary("psql", pg_bin_dir), "-X", "-q", "-v", "ON_ERROR_STOP=1", "--no-password"]
    run_checked(
        [*argv, _dbname_arg(dbname), "-f", str(path)],
        env=_tool_env(endpoint, "drtool-psql"),
        timeout=timeout,
        name="psql",
        secrets=_secrets(endpoint),
    )
