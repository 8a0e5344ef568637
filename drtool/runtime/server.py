"""The common life cycle of a local server: prepare, spawn detached, wait until ready, stop."""

from __future__ import annotations

import signal
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from drtool.errors import SourceError
from drtool.runtime.procs import HOST, Daemon, deferred_interrupts, ensure_ports_free, log_tail


@dataclass(frozen=True)
class Launch:
    """How to run a prepared server."""

    argv: Sequence[str]
    cwd: Path
    env: Mapping[str, str] | None = None
    run_as: str | None = None


class LocalServer(ABC):
    """One server run as a detached process on 127.0.0.1, its files under ``base_dir``."""

    what: ClassVar[str]
    log_name: ClassVar[str]
    graceful_signal: ClassVar[signal.Signals] = signal.SIGTERM

    def __init__(self, base_dir: Path, daemon: Daemon | None) -> None:
        self.base_dir = base_dir
        self.daemon = daemon

    @property
    def log_path(self) -> Path:
        """The server's stdout/stderr log."""
        return self.base_dir / self.log_name

    @property
    @abstractmethod
    def port(self) -> int:
        """The port clients connect to."""

    @property
    def ports(self) -> tuple[int, ...]:
        """Every TCP port the server listens on."""
        return (self.port,)

    @property
    def running(self) -> bool:
        """Whether the server process is alive."""
        return self.daemon is not None and self.daemon.alive()

    def start(self, timeout: float = 30.0) -> None:
        """Start the server and wait until it answers; on any failure stop it again."""
        if self.running:
            return
        ensure_ports_free(self.what, self.ports)
        self.base_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        launch = self._prepare()
        try:
            with deferred_interrupts():  # a Ctrl-C here must not lose the new pid
                self.daemon = Daemon.spawn(
                    launch.argv,
                    log_path=self.log_path,
                    cwd=launch.cwd,
                    env=launch.env,
                    run_as=launch.run_as,
                )
            self._wait_ready(self.daemon, timeout)
            self._after_ready()
        except BaseException:
            self.stop()
            raise

    def stop(self, timeout: float = 15.0) -> None:
        """Stop gracefully, then kill the process group; remove socket files. Idempotent."""
        if self.daemon is not None:
            self.daemon.stop(self.graceful_signal, timeout, self.what)
        for path in self._socket_files():
            path.unlink(missing_ok=True)

    def status(self) -> dict[str, object]:
        """Running?, pid, port and log path."""
        return {
            "running": self.running,
            "pid": self.daemon.pid if self.daemon else None,
            "port": self.port,
            "log": str(self.log_path),
        }

    def _daemon_state(self) -> dict[str, int]:
        return self.daemon.to_state() if self.daemon else {}

    def _wait_ready(self, daemon: Daemon, timeout: float) -> None:
        """Poll until the server answers; fail with its log tail if it exits or times out."""
        deadline = time.monotonic() + timeout
        while not self._probe():
            if not daemon.alive():
                code = daemon.returncode
                status = f" with status {code}" if code is not None else ""
                raise SourceError(
                    f"{self.what} exited{status} during startup; "
                    f"last lines of {self.log_path}: {self._tail()}"
                )
            if time.monotonic() >= deadline:
                raise SourceError(
                    f"{self.what} did not answer on {HOST}:{self.port} within {timeout:g} s; "
                    f"last lines of {self.log_path}: {self._tail()}"
                )
            time.sleep(0.05)

    def _tail(self) -> str:
        return log_tail(self.log_path, self._secrets())

    @abstractmethod
    def _prepare(self) -> Launch:
        """Create directories and config files; say how to run the server."""

    @abstractmethod
    def _probe(self) -> bool:
        """Whether the server answers a real request now."""

    @abstractmethod
    def _secrets(self) -> tuple[str, ...]:
        """Values that must never appear in a message."""

    def _after_ready(self) -> None:  # noqa: B027 - an optional hook, empty by default
        """Set-up that needs the running server (e.g. create a database)."""

    def _socket_files(self) -> list[Path]:
        """Unix socket files the server may leave behind when killed."""
        return []
