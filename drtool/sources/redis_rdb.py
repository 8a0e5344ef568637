"""Fetch a Redis RDB over the network by speaking the replication protocol, and check it.

The backup container does not share Redis's volume, so it asks the server for a full
resynchronisation like a replica would (``REPLCONF capa eof``, ``REPLCONF rdb-only 1``,
``PSYNC ? -1``) and streams the RDB that follows to a file. Both bulk forms are handled: the
disk-based ``$<len>`` and the diskless ``$EOF:<40-byte mark>``; the ``\\n`` keep-alives the
server sends while it prepares the snapshot are skipped.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import socket
import ssl
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from drtool.endpoints import RedisEndpoint
from drtool.errors import SourceError

PIECE = 1 << 20
"""Bytes read from the socket at a time: memory stays bounded whatever the RDB size."""

EOF_MARK_LEN = 40
MAX_LINE = 64 * 1024
RDB_MAGIC = b"REDIS"
REPL_PERMISSIONS = "the backup user needs the +replconf, +psync and +sync permissions"


def _refused(command: str, msg: str) -> str:
    """Why replication was refused, naming the missing ACL rule when the server says NOPERM."""
    if msg.startswith("NOPERM"):
        rule = "+psync (or +sync)" if command in ("PSYNC", "SYNC") else f"+{command.lower()}"
        return (
            f"Redis refused replication ({command}): {msg}; the backup user lacks the ACL "
            f"rule {rule} (ACL SETUSER <user> {rule.split()[0]}); {REPL_PERMISSIONS}"
        )
    return f"Redis refused replication ({command}): {msg}; {REPL_PERMISSIONS}"


_REDIS_VER_AUX = re.compile(rb"\xfa\x09redis-ver([\x00-\x3f])")


@dataclass(frozen=True)
class RdbInfo:
    """What a fetched RDB file is: its size, sha256 and the versions that wrote it."""

    size: int
    sha256: str
    redis_version: str
    rdb_version: int


class ReplicationRefused(SourceError):
    """The server refused the replication commands (an ACL, or a managed service that offers
    no SYNC/PSYNC): the one failure after which a logical dump can still be taken."""


class _Closed(SourceError):
    """The server closed the connection."""


class _Wire:
    """A buffered RESP connection with an overall deadline and an idle timeout."""

    def __init__(self, sock: socket.socket, where: str, timeout: float, idle: float) -> None:
        self._sock = sock
        self._buf = b""
        self.where = where
        self._timeout = timeout
        self._deadline = time.monotonic() + timeout
        self._idle = idle

    def _arm(self) -> None:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise SourceError(
                f"Redis RDB fetch from {self.where} timed out after {self._timeout:g}s"
            )
        self._sock.settimeout(min(left, self._idle))

    def _recv(self) -> bytes:
        """One read: an idle timeout and the overall deadline are both errors that say which."""
        self._arm()
        try:
            data = self._sock.recv(PIECE)
        except TimeoutError:
            self._arm()  # raises when the overall deadline passed
            raise SourceError(
                f"Redis at {self.where} sent nothing for {self._idle:g}s during the RDB fetch"
            ) from None
        except OSError as exc:
            raise self._broken(exc) from None
        if not data:
            raise _Closed(f"Redis at {self.where} closed the connection during the RDB fetch")
        return data

    def _broken(self, exc: OSError) -> SourceError:
        return SourceError(f"connection to Redis at {self.where} failed: {_reason(exc)}")

    def command(self, *args: str) -> None:
        """Send one command as a RESP array of bulk strings."""
        parts = [f"*{len(args)}\r\n".encode()]
        for arg in args:
            raw = arg.encode()
            parts += [f"${len(raw)}\r\n".encode(), raw, b"\r\n"]
        self._arm()
        try:
            self._sock.sendall(b"".join(parts))
        except OSError as exc:
            raise self._broken(exc) from None

    def line(self) -> bytes:
        """The next non-empty reply line without its line ending (skips ``\\n`` keep-alives)."""
        while True:
            end = self._buf.find(b"\n")
            if end < 0:
                if len(self._buf) > MAX_LINE:
                    raise SourceError(f"Redis at {self.where} sent an over-long reply line")
                self._buf += self._recv()
                continue
            line, self._buf = self._buf[:end].rstrip(b"\r"), self._buf[end + 1 :]
            if line:
                return line

    def exactly(self, n: int) -> bytes:
        """Exactly ``n`` bytes (for small bulk replies such as INFO)."""
        while len(self._buf) < n:
            self._buf += self._recv()
        data, self._buf = self._buf[:n], self._buf[n:]
        return data

    def piece(self) -> bytes:
        """Whatever is buffered, or the next read from the socket."""
        data, self._buf = self._buf, b""
        return data or self._recv()

    def close(self) -> None:
        """Close the socket."""
        self._sock.close()

    def unread(self, data: bytes) -> None:
        """Push back bytes read past the end of the payload."""
        self._buf = data + self._buf


def _reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


def _error_text(line: bytes) -> str | None:
    """The server's message when ``line`` is an error reply, else None."""
    return line[1:].decode(errors="replace") if line.startswith(b"-") else None


def _connect(endpoint: RedisEndpoint, timeout: float, idle: float) -> _Wire:
    """A raw socket (TLS when configured) for the replication protocol, with our timeouts."""
    where = f"{endpoint.host}:{endpoint.port}"
    try:
        sock = socket.create_connection((endpoint.host, endpoint.port), timeout=min(timeout, idle))
    except OSError as exc:
        raise SourceError(f"cannot connect to Redis at {where}: {_reason(exc)}") from None
    if endpoint.tls:
        try:
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=endpoint.host)
        except (OSError, ssl.SSLError) as exc:
            sock.close()
            raise SourceError(f"TLS handshake with Redis at {where} failed: {exc}") from None
    return _Wire(sock, where, timeout, idle)


def _handshake(wire: _Wire, endpoint: RedisEndpoint) -> str:
    """Authenticate and announce replica capabilities; return the server's version or ""."""
    if endpoint.password:
        user = [endpoint.username] if endpoint.username else []
        wire.command("AUTH", *user, endpoint.password)
        if (msg := _error_text(wire.line())) is not None:
            raise SourceError(f"Redis authentication at {wire.where} failed: {msg}")
    version = _server_version(wire)
    wire.command("REPLCONF", "capa", "eof", "capa", "psync2")
    if (msg := _error_text(wire.line())) is not None:
        if msg.startswith("NOAUTH"):
            raise SourceError(f"Redis at {wire.where} requires a password: {msg}")
        raise ReplicationRefused(_refused("REPLCONF", msg))
    wire.command("REPLCONF", "rdb-only", "1")
    msg = _error_text(wire.line())
    if msg is not None and not msg.startswith("ERR"):  # Redis < 7 does not know rdb-only
        raise ReplicationRefused(_refused("REPLCONF", msg))
    return version


def _server_version(wire: _Wire) -> str:
    """``redis_version`` from INFO server, or "" when the user may not run INFO."""
    wire.command("INFO", "server")
    head = wire.line()
    if not head.startswith(b"$"):
        return ""
    text = wire.exactly(int(head[1:]) + 2).decode(errors="replace")
    found = re.search(r"^redis_version:(\S+)", text, re.MULTILINE)
    return found.group(1) if found else ""


def _start_transfer(wire: _Wire) -> bytes:
    """Ask for a full resync; return the bulk header line (``$<len>`` or ``$EOF:<mark>``)."""
    wire.command("PSYNC", "?", "-1")
    reply = wire.line()
    if _error_text(reply) is not None:
        wire.command("SYNC")
        reply = wire.line()
    if (msg := _error_text(reply)) is not None:
        raise ReplicationRefused(_refused("SYNC", msg))
    if reply.startswith(b"+"):  # +FULLRESYNC <replid> <offset>
        reply = wire.line()
    if not reply.startswith(b"$"):
        raise SourceError(f"Redis at {wire.where} sent an unexpected reply to PSYNC")
    return reply


def _stream_payload(wire: _Wire, header: bytes, out: _Sink) -> None:
    """Copy the RDB after its header to ``out``, in bounded pieces.

    Redis sends either ``$<length>`` or, for a diskless sync, ``$EOF:<40-byte mark>`` and the mark
    again at the end; the last 39 bytes are held back so a mark split across reads is found.
    """
    if header.startswith(b"$EOF:"):
        mark = header[5:]
        if len(mark) != EOF_MARK_LEN:
            raise SourceError(f"Redis at {wire.where} sent a malformed EOF mark")
        held = b""
        while True:
            try:
                data = held + wire.piece()
            except _Closed as exc:
                raise SourceError(f"{exc} (short read: the EOF mark never came)") from None
            end = data.find(mark)
            if end >= 0:
                out.write(data[:end])
                return
            cut = max(0, len(data) - (EOF_MARK_LEN - 1))
            out.write(data[:cut])
            held = data[cut:]
    try:
        left = int(header[1:])
    except ValueError:
        raise SourceError(f"Redis at {wire.where} sent a malformed bulk length") from None
    while left > 0:
        try:
            data = wire.piece()
        except _Closed as exc:
            raise SourceError(f"{exc} (short read: {left} bytes of the RDB missing)") from None
        if len(data) > left:
            wire.unread(data[left:])
            data = data[:left]
        out.write(data)
        left -= len(data)


class _Sink:
    """Hashes, counts and writes the payload; keeps the first bytes for the header checks."""

    def __init__(self, fh: BinaryIO) -> None:
        self._fh = fh
        self.sha = hashlib.sha256()
        self.size = 0
        self.head = b""

    def write(self, data: bytes) -> None:
        if len(self.head) < 256:
            self.head += data[: 256 - len(self.head)]
        self.sha.update(data)
        self.size += len(data)
        self._fh.write(data)


def probe_replication(endpoint: RedisEndpoint, *, timeout: float = 30.0) -> str:
    """Check that the backup's own commands are permitted, without the transfer; the version.

    What ``fetch_rdb`` sends first: AUTH, INFO server (optional), REPLCONF, then PSYNC (or
    SYNC); the connection is closed as soon as the server answers PSYNC with +FULLRESYNC,
    before any payload (a server whose ``repl-diskless-sync-delay`` is 0 may start, then
    drop, one snapshot fork; so does the SYNC fallback of a user without +psync).
    Raises SourceError naming the ACL rule that is missing. Returns "" when the user may not
    run INFO (the backup does not need it).
    """
    with contextlib.closing(_connect(endpoint, timeout, timeout)) as wire:
        version = _handshake(wire, endpoint)
        wire.command("PSYNC", "?", "-1")
        if (msg := _error_text(wire.line())) is not None:  # +FULLRESYNC: permitted, hang up
            wire.command("SYNC")  # the fallback fetch_rdb takes; its first line is the payload's
            if (sync_msg := _error_text(wire.line())) is not None:
                raise ReplicationRefused(_refused("SYNC", f"{sync_msg} (PSYNC: {msg})"))
    return version


def fetch_rdb(
    endpoint: RedisEndpoint, dest: Path, *, timeout: float, idle_timeout: float = 60.0
) -> RdbInfo:
    """Fetch the server's RDB into ``dest`` (temp file, fsync, rename); never leave a partial file.

    ``timeout`` bounds the whole fetch, ``idle_timeout`` each silence (the server sends a
    keep-alive every second while it prepares the snapshot).
    """
    dest = Path(dest)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    except OSError as exc:
        raise SourceError(f"cannot write the RDB to {dest.parent}: {_reason(exc)}") from None
    tmp = Path(tmp_name)
    try:
        with (
            os.fdopen(fd, "wb") as fh,
            contextlib.closing(_connect(endpoint, timeout, idle_timeout)) as wire,
        ):
            version = _handshake(wire, endpoint)
            sink = _Sink(fh)
            _stream_payload(wire, _start_transfer(wire), sink)
            fh.flush()
            os.fsync(fh.fileno())
        info = _check_header(sink, version, wire.where)
        os.replace(tmp, dest)
        _fsync_dir(dest.parent)
    except OSError as exc:  # socket errors are SourceErrors already: this is the local disk
        tmp.unlink(missing_ok=True)
        raise SourceError(f"cannot write the RDB to {dest.parent}: {_reason(exc)}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return info


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_header(sink: _Sink, version: str, where: str) -> RdbInfo:
    head = sink.head
    if not head.startswith(RDB_MAGIC) or not head[5:9].isdigit():
        raise SourceError(f"Redis at {where} sent data that is not an RDB file (no REDIS magic)")
    if not version and (aux := _REDIS_VER_AUX.search(head)):
        start = aux.end()
        version = head[start : start + aux.group(1)[0]].decode(errors="replace")
    return RdbInfo(sink.size, sink.sha.hexdigest(), version or "unknown", int(head[5:9]))


def validate_rdb(path: Path, *, binary: str = "redis-check-rdb", timeout: float = 3600.0) -> None:
    """Run ``redis-check-rdb`` on ``path``; raise SourceError with its output tail if invalid."""
    try:
        proc = subprocess.run(
            [binary, str(path)],
            capture_output=True,
            timeout=timeout,
            check=False,
            cwd=tempfile.gettempdir(),
        )
    except FileNotFoundError:
        raise SourceError(f"{binary} not found; install redis-tools") from None
    except subprocess.TimeoutExpired:
        raise SourceError(f"{binary} {path} timed out after {timeout:g}s") from None
    output = (proc.stdout + proc.stderr).decode(errors="replace")
    if proc.returncode != 0 or "RDB looks OK" not in output:
        lines = [line.strip() for line in output.strip().splitlines()]
        marker = "--- RDB ERROR DETECTED ---"
        tail = lines[lines.index(marker) + 1 :][:2] if marker in lines else lines[-3:]
        detail = " | ".join(tail)
        raise SourceError(f"RDB check of {path} failed (exit {proc.returncode}): {detail}")
