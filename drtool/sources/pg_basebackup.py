"""A physical base backup: ``pg_basebackup -D - -Ft -X none -c fast`` streamed as one tar.

The base backup is what point-in-time recovery replays WAL on (issue 12 item 2). It carries no
WAL (``-X none``): the WAL comes from ``drtool wal stream``. Its start and stop LSN and timeline
are read from the stream itself as it passes, from the two members pg_basebackup writes into
the tar: ``backup_label`` (first: ``START WAL LOCATION``, ``START TIMELINE``) and
``backup_manifest`` (last: ``WAL-Ranges`` with the end LSN). Nothing is buffered but those two.

Tablespaces are refused before anything starts: with them pg_basebackup writes one tar per
tablespace, which cannot go to one stdout.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg

from drtool.endpoints import PostgresEndpoint
from drtool.errors import SourceError
from drtool.runtime.binaries import pg_client_tool
from drtool.sources.process import child_env, command_stream, scrub

BLOCK = 512
_LABEL_MAX = 64 * 1024
_MANIFEST_TAIL = 256 * 1024
_WATCHED = {"backup_label": _LABEL_MAX, "backup_manifest": _MANIFEST_TAIL}
_MIN_BYTES = 64 * 1024  # an empty cluster's tar is megabytes; less is no base backup


class TarWatcher:
    """Follows ustar member headers in a passing stream and keeps two small members.

    ``backup_label`` is kept whole (it is tiny); of ``backup_manifest`` only the tail, where
    the ``WAL-Ranges`` are. Memory: one block plus those two.
    """

    def __init__(self) -> None:
        self.members: dict[str, bytearray] = {}
        self._buf = bytearray()
        self._remaining = 0  # data bytes (with padding) of the current member still to pass
        self._current: str | None = None
        self._data_left = 0  # unpadded data bytes of the current member
        self.ended = False

    def wrap(self, chunks: Iterable[bytes]) -> Iterator[bytes]:
        """Yield ``chunks`` unchanged while following the tar structure."""
        for chunk in chunks:
            self._feed(chunk)
            yield chunk

    def _feed(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self._remaining:
                take = min(self._remaining, len(view))
                self._keep(view[:take])
                self._remaining -= take
                view = view[take:]
                continue
            need = BLOCK - len(self._buf)
            self._buf += view[:need]
            view = view[need:]
            if len(self._buf) == BLOCK:
                self._header(bytes(self._buf))
                self._buf.clear()

    def _keep(self, data: memoryview) -> None:
        if self._current is None or self._data_left <= 0:
            return
        piece = data[: self._data_left]
        self._data_left -= len(piece)
        kept = self.members[self._current]
        kept += piece
        del kept[: -_WATCHED[self._current]]

    def _header(self, block: bytes) -> None:
        if block == bytes(BLOCK):
            self.ended = True
            self._current = None
            return
        name = block[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
        prefix = block[345:500].split(b"\0", 1)[0].decode("utf-8", "replace")
        if prefix:
            name = f"{prefix}/{name}"
        try:
            size = int(block[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
        except ValueError:
            raise SourceError("pg_basebackup: the stream is not a tar archive") from None
        self._remaining = -(-size // BLOCK) * BLOCK
        self._data_left = size
        self._current = name if name in _WATCHED else None
        if self._current is not None:
            self.members[self._current] = bytearray()


@dataclass(frozen=True)
class BaseBackupInfo:
    """Where the base backup starts and ends in the WAL, and of which cluster."""

    start_lsn: str
    stop_lsn: str
    timeline: int
    start_segment: str
    checkpoint_lsn: str
    system_identifier: str
    server_version: str
    backup_from: str = "primary"  # the label's BACKUP FROM: "standby" when taken on a replica

    def to_dict(self) -> dict[str, Any]:
        """For the manifest's component details."""
        return {
            "start_lsn": self.start_lsn,
            "stop_lsn": self.stop_lsn,
            "timeline": self.timeline,
            "start_segment": self.start_segment,
            "checkpoint_lsn": self.checkpoint_lsn,
            "system_identifier": self.system_identifier,
            "backup_from": self.backup_from,
        }


def parse_label_and_manifest(label: bytes, manifest_tail: bytes) -> dict[str, Any]:
    """Start/stop LSN, timeline and start segment from the two members; SourceError if absent."""
    text = label.decode("utf-8", "replace")
    start = re.search(r"^START WAL LOCATION: (\S+) \(file ([0-9A-F]{24})\)", text, re.M)
    checkpoint = re.search(r"^CHECKPOINT LOCATION: (\S+)", text, re.M)
    timeline = re.search(r"^START TIMELINE: (\d+)", text, re.M)
    taken_from = re.search(r"^BACKUP FROM: (\w+)", text, re.M)
    ranges = re.search(rb'"WAL-Ranges": (\[.*?\])', manifest_tail, re.S)
    if not (start and checkpoint and timeline):
        raise SourceError("pg_basebackup: backup_label lacks the start location or timeline")
    if ranges is None:
        raise SourceError("pg_basebackup: backup_manifest lacks its WAL-Ranges")
    try:
        last = json.loads(ranges.group(1))[-1]
        stop, stop_timeline = str(last["End-LSN"]), int(last["Timeline"])
    except (ValueError, KeyError, IndexError, TypeError):
        raise SourceError("pg_basebackup: backup_manifest's WAL-Ranges are unreadable") from None
    if stop_timeline != int(timeline.group(1)):
        raise SourceError("pg_basebackup: the timeline changed during the base backup")
    return {
        "start_lsn": start.group(1),
        "start_segment": start.group(2),
        "checkpoint_lsn": checkpoint.group(1),
        "timeline": int(timeline.group(1)),
        "stop_lsn": stop,
        "backup_from": taken_from.group(1) if taken_from else "primary",
    }


@dataclass
class BaseBackup:
    """A running base backup: consume ``stream``, then read ``info()``."""

    stream: Iterator[bytes]
    watcher: TarWatcher
    system_identifier: str
    server_version: str

    def info(self) -> BaseBackupInfo:
        """The LSNs read from the tar (only after ``stream`` was consumed to its end)."""
        if not self.watcher.ended:
            raise SourceError("pg_basebackup: the tar archive has no end (truncated?)")
        found = parse_label_and_manifest(
            bytes(self.watcher.members.get("backup_label", b"")),
            bytes(self.watcher.members.get("backup_manifest", b"")),
        )
        return BaseBackupInfo(
            **found,
            system_identifier=self.system_identifier,
            server_version=self.server_version,
        )


def _preflight(endpoint: PostgresEndpoint) -> tuple[int, str, str]:
    """Major, version and system identifier; refuses tablespaces."""
    secrets = (endpoint.password,) if endpoint.password else ()
    try:
        with psycopg.connect(
            **endpoint.connect_kwargs(), connect_timeout=10, application_name="drtool"
        ) as conn:
            row = conn.execute(
                "SELECT current_setting('server_version_num')::int / 10000, "
                "current_setting('server_version'), "
                "(SELECT system_identifier::text FROM pg_control_system())"
            ).fetchone()
            spaces = conn.execute(
                "SELECT spcname FROM pg_tablespace WHERE spcname NOT IN ('pg_default', 'pg_global')"
            ).fetchall()
    except psycopg.Error as exc:
        where = f"{endpoint.host}:{endpoint.port}"
        message = scrub(" ".join(str(exc).split()), secrets)
        raise SourceError(f"cannot reach PostgreSQL {where}: {message}") from None
    assert row is not None
    if spaces:
        names = ", ".join(str(s[0]) for s in spaces)
        raise SourceError(
            f"postgres-base: the cluster has tablespaces ({names}); a physical base backup to "
            "one stream cannot hold them (move them to pg_default, or back up the logical "
            "dump only)"
        )
    return int(row[0]), str(row[1]), str(row[2])


@contextmanager
def base_backup(
    endpoint: PostgresEndpoint, *, bin_dir: str, timeout: float
) -> Iterator[BaseBackup]:
    """A base backup of the cluster by ``pg_basebackup`` of the server's major.

    The role needs REPLICATION (and a ``replication`` line in pg_hba.conf).
    """
    major, version, system_id = _preflight(endpoint)
    binary = pg_client_tool("pg_basebackup", major, bin_dir)
    argv = [str(binary), "--pgdata=-", "--format=tar", "--wal-method=none"]
    argv += ["--checkpoint=fast", "--no-password", "--label=drtool"]
    extra = endpoint.libpq_env()
    extra["PGAPPNAME"] = "drtool-basebackup"
    stream = command_stream(
        argv,
        env=child_env(extra),
        timeout=timeout,
        name="pg_basebackup",
        min_bytes=_MIN_BYTES,
        secrets=(endpoint.password,) if endpoint.password else (),
    )
    watcher = TarWatcher()
    try:
        yield BaseBackup(watcher.wrap(stream), watcher, system_id, version)
    finally:
        stream.close()  # a consumer that stopped early: the process group is killed
