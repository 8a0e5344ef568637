"""The long-running loop of ``drtool wal stream``: receive, seal, force segment closes.

Every tick (1 s): restart ``pg_receivewal`` if it ended (after a backoff, logged), seal what
is closed in the spool, pause the receiver while the spool is over its bound (the slot keeps
the WAL on the server meanwhile), and close the current segment with ``pg_switch_wal()`` when
WAL advanced and ``wal.flush_interval`` passed since the last close: a quiet server thus
loses at most about one interval plus one upload (the RPO, ADR 0015).

The repository being unreachable is not fatal: files stay in the spool, the error is logged
once per outage as an alarm, and sealing resumes when it answers. An integrity problem
(a forked WAL history, a broken index) is fatal: exit 5, nothing deleted.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg

from drtool.endpoints import PostgresEndpoint
from drtool.errors import NotFound, SourceError, StorageError
from drtool.runtime.binaries import MissingBinary, pg_client_tool
from drtool.sources.process import scrub
from drtool.wal.names import parse_lsn
from drtool.wal.receiver import Receiver, describe_exit
from drtool.wal.sealer import Sealer, SealReport
from drtool.wal.spool import Spool

log = logging.getLogger(__name__)

TICK = 1.0
STATE_EVERY = 5.0  # seconds between heartbeats written for `drtool wal status`
IDLE_TIMEOUT = 120.0  # --until-idle gives up after this long
APP_PREFIX = "drtool-wal-"


@dataclass(frozen=True)
class ServerFacts:
    """What the streamer needs to know about the server before receiving."""

    major: int
    segment_size: int


def _connect(endpoint: PostgresEndpoint) -> psycopg.Connection[Any]:
    return psycopg.connect(
        **endpoint.connect_kwargs(),
        autocommit=True,
        connect_timeout=10,
        application_name="drtool-wal-switch",
    )


def _one_line(exc: BaseException, endpoint: PostgresEndpoint) -> str:
    secrets = (endpoint.password,) if endpoint.password else ()
    return scrub(" ".join(str(exc).split()), secrets)


def server_facts(endpoint: PostgresEndpoint) -> ServerFacts:
    """The server's major and WAL segment size; SourceError when unreachable."""
    try:
        with _connect(endpoint) as conn:
            row = conn.execute(
                "SELECT current_setting('server_version_num')::int / 10000, "
                "pg_size_bytes(current_setting('wal_segment_size'))"
            ).fetchone()
    except psycopg.Error as exc:
        where = f"{endpoint.host}:{endpoint.port}"
        raise SourceError(f"cannot reach PostgreSQL {where}: {_one_line(exc, endpoint)}") from None
    assert row is not None
    return ServerFacts(int(row[0]), int(row[1]))


def receivewal_binary(bin_dir: str, major: int) -> Path:
    """``pg_receivewal`` of the server's major (``postgres.bin_dir`` when set)."""
    return pg_client_tool("pg_receivewal", major, bin_dir)


@dataclass
class Switcher:
    """Closes the current segment when WAL advanced and the flush interval passed.

    ``pg_switch_wal()`` runs on the server that inserts the WAL: the source itself while it is
    a primary; while it is a streaming standby (where the function cannot run) its primary,
    when ``wal.primary_host`` names it (ADR 0030), through a plain session used for nothing
    else. The source's role is read at every check, so after a promotion the switch moves to
    the promoted source by itself. A primary of another cluster (system identifiers differ)
    is never switched. Without a primary, a standby's segments close when its primary
    switches on its own (``archive_timeout``, or full segments).
    """

    endpoint: PostgresEndpoint
    interval: float
    primary: PostgresEndpoint | None = None
    last_switch: float = field(default_factory=time.monotonic)
    last_lsn: str | None = None
    denied: bool = False
    role: str | None = None  # the source's role when last read: "primary" or "standby"
    _conn: psycopg.Connection[Any] | None = None
    _primary_conn: psycopg.Connection[Any] | None = None
    _primary_problem: str | None = None  # why the primary is not used now (logged once)
    _warned_alone: bool = False

    def _conn_or_new(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = _connect(self.endpoint)
        return self._conn

    def _primary_problem_once(self, problem: str | None) -> None:
        if problem is not None and problem != self._primary_problem:
            log.error("%s", problem)
        elif problem is None and self._primary_problem is not None:
            log.warning("the primary answers again: segments close on time again")
        self._primary_problem = problem

    def _primary_or_none(self, system_id: str) -> psycopg.Connection[Any] | None:
        """The session on the configured primary, checked to be the source's cluster."""
        assert self.primary is not None
        where = f"{self.primary.host}:{self.primary.port}"
        if self._primary_conn is None or self._primary_conn.closed:
            try:
                conn = _connect(self.primary)
                row = conn.execute(
                    "SELECT pg_is_in_recovery(), "
                    "(SELECT system_identifier::text FROM pg_control_system())"
                ).fetchone()
            except psycopg.Error as exc:
                self._primary_problem_once(
                    f"cannot reach the primary {where} (wal.primary_host) to close segments: "
                    f"{_one_line(exc, self.primary)}; segments close only when full meanwhile"
                )
                return None
            assert row is not None
            if row[0] or str(row[1]) != system_id:
                conn.close()
                what = "is itself in recovery" if row[0] else "is another cluster"
                self._primary_problem_once(
                    f"wal.primary_host {where} {what} (system identifier {row[1]}, the "
                    f"source's {system_id}): it is not switched; segments close only when full"
                )
                return None
            self._primary_conn = conn
        self._primary_problem_once(None)
        return self._primary_conn

    def _writer(self) -> psycopg.Connection[Any] | None:
        """The session on the server whose WAL is streamed and that inserts it, or None."""
        row = (
            self._conn_or_new()
            .execute(
                "SELECT pg_is_in_recovery(), "
                "(SELECT system_identifier::text FROM pg_control_system())"
            )
            .fetchone()
        )
        assert row is not None
        if not row[0]:
            self.role = "primary"
            self._close_primary()
            return self._conn
        self.role = "standby"
        if self.primary is None:
            if not self._warned_alone:
                log.warning(
                    "the source %s:%s is a standby, where pg_switch_wal() cannot run, and "
                    "wal.primary_host is not set: segments close only when its primary "
                    "switches (set archive_timeout there, or wal.primary_host; ADR 0030)",
                    self.endpoint.host,
                    self.endpoint.port,
                )
                self._warned_alone = True
            return None
        return self._primary_or_none(str(row[1]))

    def closed_by(self) -> str:
        """How segments close now, for ``wal status``."""
        if self.role == "primary":
            return "pg_switch_wal() on the source"
        if self.role is None:
            return "unknown yet"
        if self.primary is None:
            return "the primary's own switches only (wal.primary_host unset)"
        where = f"{self.primary.host}:{self.primary.port}"
        if self._primary_problem is not None:
            return f"nothing now: the primary {where} is not usable ({self._primary_problem})"
        return f"pg_switch_wal() on the primary {where}"

    def insert_lsn(self) -> str:
        """The WAL insert position of the server that inserts the source's WAL ("" when
        no such server is reachable: a standby without a usable ``wal.primary_host``)."""
        writer = self._writer()
        if writer is None:
            return ""
        row = writer.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
        assert row is not None
        return str(row[0])

    def switch(self) -> str | None:
        """``pg_switch_wal()``: the end of the closed segment, None when refused or unreachable."""
        where = self.endpoint
        try:
            writer = self._writer()
            if writer is None:
                return None
            if writer is self._primary_conn and self.primary is not None:
                where = self.primary
            row = writer.execute("SELECT pg_switch_wal()::text").fetchone()
            assert row is not None
            self.last_lsn = self.insert_lsn()
        except psycopg.errors.InsufficientPrivilege:
            if not self.denied:
                log.error(
                    "pg_switch_wal() is not permitted for %s on %s:%s: segments close only "
                    "when full (RPO unbounded on a quiet server); GRANT EXECUTE ON FUNCTION "
                    "pg_switch_wal() TO %s",
                    where.user,
                    where.host,
                    where.port,
                    where.user,
                )
            self.denied = True
            return None
        except psycopg.Error as exc:
            log.warning("pg_switch_wal() failed: %s", _one_line(exc, where))
            self.close()
            return None
        finally:
            self.last_switch = time.monotonic()
        return str(row[0])

    def maybe_switch(self) -> None:
        """Switch when due and WAL advanced since the last switch."""
        if self.denied or time.monotonic() - self.last_switch < self.interval:
            return
        try:
            current = self.insert_lsn()
        except psycopg.Error as exc:
            log.warning("cannot read the WAL position: %s", _one_line(exc, self.endpoint))
            self.close()
            self.last_switch = time.monotonic()
            return
        if current == "":  # a standby without a usable primary: it switches on its own
            self.last_switch = time.monotonic()
            return
        if current != self.last_lsn:
            self.switch()
        else:
            self.last_switch = time.monotonic()

    def _close_primary(self) -> None:
        if self._primary_conn is not None:
            self._primary_conn.close()
            self._primary_conn = None

    def close(self) -> None:
        """Drop the connections (new ones are made on the next use)."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        self._close_primary()


@dataclass
class StreamStats:
    """What a run did, for the final log line and the tests."""

    sealed: int = 0
    already_stored: int = 0
    stored_bytes: int = 0
    receiver_starts: int = 0
    outages: int = 0

    def add(self, report: SealReport) -> None:
        """Count one sealing pass."""
        self.sealed += len(report.sealed)
        self.already_stored += len(report.already_stored)
        self.stored_bytes += report.stored_bytes


@dataclass
class Streamer:
    """One streamer: a receiver into ``spool``, a sealer into the repository."""

    sealer: Sealer
    spool: Spool
    endpoint: PostgresEndpoint
    bin_dir: str
    slot: str
    flush_interval: float
    spool_max_bytes: int
    restart_max_s: float
    primary: PostgresEndpoint | None = None  # wal.primary_host: closes a standby's segments
    stop: threading.Event = field(default_factory=threading.Event)
    stats: StreamStats = field(default_factory=StreamStats)
    observer: Callable[[Streamer], None] | None = None  # called every tick (the metrics)
    slot_lost_at: float | None = None  # Unix time the slot was last found missing
    receiver: Receiver | None = None
    switcher: Switcher | None = None
    _failures: int = 0
    _next_start: float = 0.0
    _started_at: float = 0.0
    _storage_down: str | None = None
    _paused: bool = False
    _slot_seen: bool = False
    _last_state: float = 0.0

    # --- sealing ------------------------------------------------------------------------

    def seal(self) -> None:
        """One sealing pass; an unreachable repository is logged once, not fatal."""
        try:
            report = self.sealer.seal_pending()
        except (StorageError, NotFound) as exc:
            if self._storage_down is None:
                self.stats.outages += 1
                log.error(
                    "ALARM: the repository is unreachable; WAL stays in the spool %s (%s)",
                    self.spool.dir,
                    exc,
                )
            self._storage_down = str(exc)
            return
        if self._storage_down is not None:
            log.warning("the repository answers again; sealing resumed")
            self._storage_down = None
        self.stats.add(report)

    # --- the receiver -------------------------------------------------------------------

    def _start_receiver(self) -> None:
        facts = server_facts(self.endpoint)
        if facts.segment_size != self.sealer.segment_size:
            if self.sealer.index.segment_size not in (None, facts.segment_size):
                raise SourceError(
                    f"the server's WAL segment size ({facts.segment_size}) differs from the "
                    f"WAL index's ({self.sealer.index.segment_size}): another cluster?"
                )
            self.sealer.segment_size = facts.segment_size
        binary = receivewal_binary(self.bin_dir, facts.major)
        if self.receiver is None:
            self.receiver = Receiver(
                binary, self.endpoint, self.spool.dir, self.slot, f"{APP_PREFIX}{self.slot}"
            )
        self._check_slot()
        self.receiver.create_slot()
        self.receiver.start()
        self.stats.receiver_starts += 1
        self._started_at = time.monotonic()
        if self.switcher is None:
            self.switcher = Switcher(self.endpoint, self.flush_interval, self.primary)
        try:
            self.switcher.insert_lsn()  # reads the source's role now (status, the warning)
        except psycopg.Error as exc:
            log.warning("cannot read the WAL position: %s", _one_line(exc, self.endpoint))
            self.switcher.close()

    def _check_slot(self) -> None:
        """Alarm when the slot this streamer used vanished: WAL between may be lost."""
        with _connect(self.endpoint) as conn:
            exists = conn.execute(
                "SELECT 1 FROM pg_replication_slots WHERE slot_name = %s", (self.slot,)
            ).fetchone()
        stored = self.sealer.index.segments()
        if exists is None and (self._slot_seen or stored):
            newest = max((e.name[8:] + e.name[:8], e.name) for e in stored)[1] if stored else "?"
            log.error(
                "ALARM: replication slot %s is missing (dropped?) although WAL up to %s was "
                "streamed through it; it is re-created, WAL written meanwhile may be missing "
                "(`drtool wal status` shows the gap; take a base backup)",
                self.slot,
                newest,
            )
            self.slot_lost_at = time.time()
            self.write_state(force=True)  # kept across a restart (the alert needs it)
        self._slot_seen = True

    def tend_receiver(self) -> None:
        """(Re)start the receiver when it is down and its backoff passed; pause it when full."""
        spool_bytes = self.spool.size()
        over = spool_bytes > self.spool_max_bytes
        running = self.receiver is not None and self.receiver.alive()
        if over:
            if not self._paused:
                log.error(
                    "ALARM: the spool holds %d bytes, over wal.spool_max_bytes (%d); "
                    "receiving paused (the slot keeps the WAL on the server meanwhile)",
                    spool_bytes,
                    self.spool_max_bytes,
                )
                self._paused = True
            if running and self.receiver is not None:
                self.receiver.stop()
                self.receiver.proc = None  # stopped on purpose: no exit to report
            return
        if self._paused:
            log.warning("the spool is below its bound again; receiving resumes")
            self._paused = False
        if running:
            return
        now = time.monotonic()
        if self.receiver is not None and self.receiver.proc is not None and now >= self._next_start:
            if now - self._started_at > 60:
                self._failures = 0
            self._failures += 1
            delay = min(self.restart_max_s, 2.0 ** (self._failures - 1))
            log.warning("%s; restarting in %.0f s", describe_exit(self.receiver), delay)
            self.receiver.proc = None
            self._next_start = now + delay
            return
        if now < self._next_start:
            return
        try:
            self._start_receiver()
        except MissingBinary:
            raise
        except (SourceError, psycopg.Error) as exc:
            self._failures += 1
            delay = min(self.restart_max_s, 2.0 ** (self._failures - 1))
            message = exc.message if isinstance(exc, SourceError) else str(exc)
            log.warning("cannot start pg_receivewal: %s; retrying in %.0f s", message, delay)
            self._next_start = time.monotonic() + delay

    # --- the loop -----------------------------------------------------------------------

    def write_state(self, force: bool = False) -> None:
        """A heartbeat for `drtool wal status` every few seconds."""
        now = time.monotonic()
        if not force and now - self._last_state < STATE_EVERY:
            return
        self._last_state = now
        self.spool.write_state(
            {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "updated": datetime.now(UTC).isoformat(timespec="seconds"),
                "receiving": self.receiver is not None and self.receiver.alive(),
                "paused_spool_full": self._paused,
                "repository_unreachable": self._storage_down,
                "slot": self.slot,
                "slot_lost_at": self.slot_lost_at,
                "source": f"{self.endpoint.host}:{self.endpoint.port}",
                "source_role": self.switcher.role if self.switcher else None,
                "segments_closed_by": self.switcher.closed_by() if self.switcher else None,
            }
        )

    def run(self, *, until_idle: bool = False) -> StreamStats:
        """Stream until ``stop`` is set (SIGTERM) or, with ``until_idle``, caught up."""
        idle_target: int | None = None
        deadline = time.monotonic() + IDLE_TIMEOUT
        if self.slot_lost_at is None:  # a loss found by an earlier run is still a loss
            lost = (self.spool.read_state() or {}).get("slot_lost_at")
            self.slot_lost_at = float(lost) if isinstance(lost, int | float) else None
        try:
            while not self.stop.is_set():
                self.tend_receiver()
                self.seal()
                if self.switcher is not None and self.receiver is not None:
                    if until_idle:
                        idle_target = self._idle_step(idle_target)
                        if idle_target == -1:
                            break
                        if time.monotonic() > deadline:
                            raise SourceError(
                                "wal stream --until-idle: not caught up within "
                                f"{IDLE_TIMEOUT:.0f} s"
                            )
                    else:
                        self.switcher.maybe_switch()
                self.write_state()
                if self.observer is not None:
                    self.observer(self)
                self.stop.wait(TICK)
        finally:
            if self.receiver is not None:
                self.receiver.stop()
            if self.switcher is not None:
                self.switcher.close()
        self.seal()  # what closed meanwhile (a stopped receiver leaves only its .partial)
        self.write_state(force=True)
        return self.stats

    def _idle_step(self, target: int | None) -> int | None:
        """--until-idle: once the receiver is connected, switch once; then wait until it has
        written to the end of the closed segment and every closed file is sealed. -1: done.

        Not before it is connected: a new slot reserves no WAL, so a receiver connecting after
        the switch would start at the next segment and the closed one would never arrive.
        """
        assert self.switcher is not None and self.receiver is not None
        written = self._written() if self.receiver.alive() else None
        if written is None:
            return target
        if target is None:
            end = self.switcher.switch()
            if end is None and self.switcher.role == "standby" and self.switcher.primary is None:
                raise SourceError(
                    "wal stream --until-idle: the source is a standby and wal.primary_host is "
                    "not set: nothing can close its current segment (ADR 0030)"
                )
            if end is None:
                return None
            size = self.sealer.segment_size  # wait for the whole closed segment, to its end
            return ((parse_lsn(end) - 1) // size + 1) * size
        if written >= target and not self.spool.closed() and self._storage_down is None:
            self.seal()
            return -1 if not self.spool.closed() else target
        return target

    def _written(self) -> int | None:
        """How far the receiver has written, None while it is not connected."""
        assert self.receiver is not None
        with _connect(self.endpoint) as conn:
            row = conn.execute(
                "SELECT write_lsn::text FROM pg_stat_replication WHERE application_name = %s",
                (self.receiver.app,),
            ).fetchone()
        if row is None:
            return None
        return parse_lsn(str(row[0])) if row[0] is not None else -1
