"""Detached server processes, loopback ports and log tails for the local runtime.

A server is started as the leader of a new session, so it outlives the Python process that
started it and so that its whole process group can be found and killed later — also from
another process that knows only its pid (see :class:`Daemon`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from drtool.errors import SourceError

HOST = "127.0.0.1"
MAX_SOCKET_PATH = 107  # sun_path holds 108 bytes including the terminating NUL


@dataclass(frozen=True)
class _ProcInfo:
    state: str
    pgrp: int
    start_ticks: int


def _proc_info(pid: int) -> _ProcInfo | None:
    """State, process group and start time of ``pid`` from ``/proc``, or None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = raw[raw.rindex(")") + 2 :].split()  # the command name may hold spaces
    return _ProcInfo(state=fields[0], pgrp=int(fields[2]), start_ticks=int(fields[19]))


def _group_members(pgid: int) -> list[int]:
    """Pids of the live (non-zombie) processes in process group ``pgid``."""
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            info = _proc_info(int(entry))
            if info is not None and info.pgrp == pgid and info.state != "Z":
                members.append(int(entry))
    return members


@dataclass
class Daemon:
    """A detached server process that leads its own session and process group."""

    pid: int
    start_ticks: int
    popen: subprocess.Popen[bytes] | None = field(default=None, compare=False, repr=False)

    @classmethod
    def spawn(
        cls,
        argv: Sequence[str],
        *,
        log_path: Path,
        cwd: Path,
        env: Mapping[str, str] | None = None,
        run_as: str | None = None,
    ) -> Daemon:
        """Start ``argv`` detached, stdout and stderr appended to ``log_path``."""
        user_kwargs: dict[str, object] = {}
        if run_as is not None:
            user_kwargs = {"user": run_as, "group": run_as, "extra_groups": []}
        with open(log_path, "ab") as log:
            popen = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=dict(env) if env is not None else None,
                start_new_session=True,
                **user_kwargs,  # type: ignore[call-overload]
            )
        info = _proc_info(popen.pid)
        return cls(popen.pid, info.start_ticks if info else 0, popen)

    @classmethod
    def from_state(cls, state: Mapping[str, object]) -> Daemon:
        """Rebuild from :meth:`to_state` output (e.g. in another process)."""
        return cls(int(str(state["pid"])), int(str(state["start_ticks"])))

    def to_state(self) -> dict[str, int]:
        """Pid and start time: enough to find the process again and not mistake a reused pid."""
        return {"pid": self.pid, "start_ticks": self.start_ticks}

    @property
    def returncode(self) -> int | None:
        """The exit status if this process started it and it has exited, else None."""
        return self.popen.poll() if self.popen is not None else None

    def alive(self) -> bool:
        """Whether the leader still runs (a zombie or a reused pid counts as gone)."""
        if self.popen is not None:
            return self.popen.poll() is None
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, os.WNOHANG)  # reap it if it happens to be our child
        info = _proc_info(self.pid)
        return info is not None and info.state != "Z" and info.start_ticks == self.start_ticks

    def stop(self, graceful: signal.Signals, timeout: float, what: str) -> None:
        """Send ``graceful``, wait up to ``timeout`` s, then SIGKILL the whole process group."""
        info = _proc_info(self.pid)
        if info is not None and info.start_ticks != self.start_ticks:
            return  # the pid was reused, so our group is empty (a pgid in use is never reused)
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, graceful)
            _wait_for(lambda: not self.alive(), timeout)
        if _group_members(self.pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)
        if not _wait_for(lambda: not self.alive() and not _group_members(self.pid), 10.0):
            raise SourceError(
                f"{what} (pid {self.pid}) survived SIGKILL; check `ps -g {self.pid}` and kill it"
            )


def _wait_for(condition: Callable[[], bool], timeout: float) -> bool:
    """Poll ``condition`` until it holds (True) or ``timeout`` s have passed (False)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block ends, then deliver them (main thread only).

    Handlers (unlike a blocked signal mask) are reset in an exec'd child, so servers spawned
    inside the block still stop on their signals.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {
        sig: signal.signal(sig, lambda signum, _frame: received.append(signum))
        for sig in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for signum in received[:1]:
            signal.raise_signal(signum)


def port_is_free(port: int) -> bool:
    """Whether a server could listen on ``port`` of 127.0.0.1 now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return False
            raise
    return True


def ensure_ports_free(what: str, ports: Iterable[int]) -> None:
    """Raise a clear SourceError naming the first port in ``ports`` that is taken."""
    for port in ports:
        if not port_is_free(port):
            raise SourceError(
                f"port {port} on {HOST} is in use; stop the process that holds it "
                f"or choose other ports for {what}"
            )


def _ephemeral_low() -> int:
    """The lowest port the kernel hands to outgoing connections (Linux default 32768)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port_block(offsets: Sequence[int], taken: set[int]) -> int:
    """A base port B such that B+o is free for every o in ``offsets``, and none is in ``taken``.

    Candidates are drawn below the kernel's ephemeral range: a port picked from that range
    can be taken by any outgoing connection before the server binds it.
    """
    high = _ephemeral_low() - 1 - max(offsets)
    rng = random.SystemRandom()
    for _ in range(500):
        base = rng.randint(min(10000, high), high)
        ports = [base + o for o in offsets]
        if not taken.intersection(ports) and all(map(port_is_free, ports)):
            return base
    raise SourceError(f"found no free ports on {HOST}; free some ports and retry")


def check_socket_path(path: Path) -> None:
    """Refuse a Unix socket path longer than the kernel accepts."""
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise SourceError(
            f"socket path {path} is longer than {MAX_SOCKET_PATH} bytes; "
            "choose a shorter state directory"
        )


def log_tail(path: Path, secrets: Iterable[str], lines: int = 5) -> str:
    """The last non-empty lines of a log file on one line, with any secret masked."""
    try:
        with open(path, "rb") as log:
            log.seek(max(0, log.seek(0, os.SEEK_END) - 8192))
            text = log.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return "(no log file)"
    kept = [line.strip() for line in text.splitlines() if line.strip()][-lines:]
    tail = " | ".join(kept) or "(log is empty)"
    for secret in secrets:
        if secret:
            tail = tail.replace(secret, "***")
    return tail


def write_secret(path: Path, value: str) -> None:
    """Write ``value`` to a new 0600 file (its directory made 0700)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(value)
