"""``pg_receivewal``, the trusted WAL receiver, run and watched as a child process.

drtool does not speak the replication protocol itself: PostgreSQL's own ``pg_receivewal`` of
the server's major receives the WAL into the spool through a replication slot (so the server
keeps WAL the receiver has not confirmed). It runs with ``--no-loop``: when the server goes
away it exits and the streamer restarts it with a backoff and says so in the log, instead of
retrying silently. The child dies with drtool (``PR_SET_PDEATHSIG``): after a ``kill -9`` of
the streamer no orphan keeps the slot busy or writes into the spool behind the next streamer.
"""

from __future__ import annotations

import ctypes
import logging
import re
import signal
import subprocess
import threading
from pathlib import Path

from drtool.endpoints import PostgresEndpoint
from drtool.errors import ConfigError
from drtool.sources.process import child_env, run_checked, scrub

log = logging.getLogger(__name__)

SLOT_RE = re.compile(r"[a-z0-9_]{1,63}")
_PR_SET_PDEATHSIG = 1
_STOP_TIMEOUT = 15.0


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def check_slot_name(slot: str) -> str:
    """The slot name, or ConfigError: PostgreSQL allows lower-case letters, digits and ``_``."""
    if not SLOT_RE.fullmatch(slot):
        raise ConfigError(
            f"wal.slot: a replication slot name is 1-63 of a-z, 0-9 and _ (got {slot!r})"
        )
    return slot


class Receiver:
    """One ``pg_receivewal`` into ``spool`` through ``slot``."""

    def __init__(
        self, binary: Path, endpoint: PostgresEndpoint, spool: Path, slot: str, app: str
    ) -> None:
        self.binary = binary
        self.endpoint = endpoint
        self.spool = spool
        self.slot = check_slot_name(slot)
        self.app = app
        self.proc: subprocess.Popen[bytes] | None = None
        self.last_error = ""
        self._reader: threading.Thread | None = None

    def _env(self) -> dict[str, str]:
        return child_env({**self.endpoint.libpq_env(), "PGAPPNAME": self.app})

    def _secrets(self) -> tuple[str, ...]:
        return (self.endpoint.password,) if self.endpoint.password else ()

    def create_slot(self) -> None:
        """Create the replication slot unless it exists (``--create-slot --if-not-exists``)."""
        argv = [str(self.binary), "--create-slot", "--if-not-exists", f"--slot={self.slot}"]
        run_checked(
            [*argv, "--no-password"],
            env=self._env(),
            timeout=60,
            name="pg_receivewal --create-slot",
            secrets=self._secrets(),
        )

    def start(self) -> None:
        """Spawn the receiver; its stderr goes to the log line by line."""
        argv = [str(self.binary), f"--directory={self.spool}", f"--slot={self.slot}"]
        argv += ["--no-loop", "--no-password", "--status-interval=1", "--verbose"]
        self.last_error = ""
        self.proc = subprocess.Popen(
            argv,
            env=self._env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,  # a terminal's Ctrl-C reaches drtool, which stops it
            preexec_fn=_die_with_parent,
        )
        self._reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._reader.start()
        log.info("pg_receivewal started (pid %d, slot %s)", self.proc.pid, self.slot)

    def _read_stderr(self) -> None:
        proc = self.proc
        assert proc is not None and proc.stderr is not None
        for raw in proc.stderr:
            line = scrub(raw.decode("utf-8", "replace").rstrip(), self._secrets())
            if "error" in line or "fatal" in line.lower():
                self.last_error = line
                log.warning("%s", line)
            else:
                log.debug("%s", line)

    def alive(self) -> bool:
        """Whether the receiver runs now."""
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        """The exit status once it exited."""
        return None if self.proc is None else self.proc.poll()

    def stop(self) -> None:
        """SIGINT (it closes the ``.partial`` file and exits), then SIGKILL after a grace time."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            log.warning("pg_receivewal did not stop within %.0f s; killed", _STOP_TIMEOUT)
            proc.kill()
            proc.wait()
        if self._reader is not None:
            self._reader.join(5)


def describe_exit(receiver: Receiver) -> str:
    """Why the receiver ended, for the log."""
    code = receiver.returncode
    how = f"exited {code}" if code is not None and code >= 0 else f"was killed ({code})"
    return f"pg_receivewal {how}" + (f": {receiver.last_error}" if receiver.last_error else "")
