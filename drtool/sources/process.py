"""External commands as byte streams that fail closed (like restic's fs_reader_command.go).

A producer's stream is not finished until the process exited 0: at EOF the exit status is
checked and a failure raises with the tail of its stderr. The child runs in its own process
group, which is killed as a whole on timeout and whenever the consumer stops early.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Collection, Generator, Mapping, Sequence
from typing import IO

from drtool.errors import SourceError

log = logging.getLogger(__name__)

_STDERR_KEEP = 64 * 1024
_TAIL_LINES = 5
_TAIL_CHARS = 500
_INHERITED_ENV = ("PATH", "HOME", "TMPDIR", "TZ")
_REAP_GRACE = 5.0


class CommandFailed(SourceError):
    """A command exited non-zero; ``returncode`` and ``stderr_tail`` say how."""

    def __init__(self, name: str, returncode: int, stderr_tail: str) -> None:
        if returncode < 0:
            how = f"was killed by signal {signal.Signals(-returncode).name}"
        else:
            how = f"exited {returncode}"
        super().__init__(f"{name} {how}: {stderr_tail or 'no stderr output'}")
        self.returncode = returncode
        self.stderr_tail = stderr_tail


def child_env(extra: Mapping[str, str]) -> dict[str, str]:
    """A minimal child environment: PATH, HOME, TMPDIR, TZ from ours, C locale, plus ``extra``.

    Nothing else is inherited, so other secrets in our environment (and stray ``PG*``
    variables) never reach the child; the C locale keeps its messages in English.
    """
    env = {key: os.environ[key] for key in _INHERITED_ENV if key in os.environ}
    env["LC_ALL"] = "C"
    env.update(extra)
    return env


def scrub(text: str, secrets: Collection[str]) -> str:
    """``text`` with every non-empty secret replaced by ``***``."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


class _StderrTail:
    """Drains a pipe in a thread, keeping only its last bytes, so the child never blocks."""

    def __init__(self, pipe: IO[bytes]) -> None:
        self._pipe = pipe
        self._buf = bytearray()
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        while chunk := os.read(self._pipe.fileno(), _STDERR_KEEP):
            self._buf += chunk
            del self._buf[:-_STDERR_KEEP]

    def close(self) -> None:
        """Wait (briefly) for the drain to reach EOF, then close the pipe."""
        self._thread.join(_REAP_GRACE)
        if not self._thread.is_alive():
            self._pipe.close()

    def tail(self, secrets: Collection[str]) -> str:
        """The last few non-empty lines, joined on one line, scrubbed of ``secrets``."""
        lines = [ln.strip() for ln in self._buf.decode("utf-8", "replace").splitlines()]
        text = " | ".join([ln for ln in lines if ln][-_TAIL_LINES:])
        return scrub(text, secrets)[-_TAIL_CHARS:]


class _Watchdog:
    """Kills a process group once ``timeout`` seconds have passed, unless stopped first."""

    def __init__(self, proc: subprocess.Popen[bytes], timeout: float) -> None:
        self.fired = threading.Event()
        self._proc = proc
        self._timer = threading.Timer(timeout, self._fire)
        self._timer.daemon = True
        self._timer.start()

    def _fire(self) -> None:
        self.fired.set()
        _kill_group(self._proc)

    def stop(self) -> None:
        """Cancel the timer and wait for a running kill to finish."""
        self._timer.cancel()
        if self._timer.is_alive():
            self._timer.join()


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    # Only called while the child is unreaped, so its pid (= pgid) cannot have been reused.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def command_stream(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    timeout: float,
    name: str,
    min_bytes: int = 0,
    read_size: int = 1 << 20,
    secrets: Collection[str] = (),
) -> Generator[bytes, None, None]:
    """Run ``argv`` with exactly ``env`` and yield its stdout in chunks of up to ``read_size``.

    The process starts on the first ``next()``. After the last chunk the generator raises
    ``CommandFailed`` if the command exited non-zero, ``SourceError`` if it produced fewer
    than ``min_bytes`` bytes or ran past ``timeout`` seconds (a wall-clock limit on the whole
    stream, the consumer's time included; the process group is killed then). Closing the
    generator early, or an exception in the consumer, kills the process group. ``secrets``
    are scrubbed from every message. A successful command's stderr is logged, never dropped.
    """
    deadline = time.monotonic() + timeout
    try:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=dict(env),
            start_new_session=True,
        )
    except OSError as exc:
        raise SourceError(f"{name}: cannot run {argv[0]}: {exc.strerror}") from None
    assert proc.stdout is not None and proc.stderr is not None
    stderr = _StderrTail(proc.stderr)
    watchdog = _Watchdog(proc, timeout)
    total = 0
    try:
        while chunk := proc.stdout.read(read_size):
            total += len(chunk)
            yield chunk
        watchdog.stop()
        try:
            proc.wait(timeout=max(deadline - time.monotonic(), 0.0))
        except subprocess.TimeoutExpired:
            watchdog.fired.set()
    finally:
        watchdog.stop()
        if proc.returncode is None:
            _kill_group(proc)
            proc.wait()
        proc.stdout.close()
        stderr.close()
    tail = stderr.tail(secrets)
    if watchdog.fired.is_set():
        raise SourceError(f"{name} timed out after {timeout:g} s" + (f": {tail}" if tail else ""))
    if proc.returncode != 0:
        raise CommandFailed(name, proc.returncode, tail)
    if total < min_bytes:
        raise SourceError(
            f"{name} produced {total} bytes: implausibly small output "
            f"(expected at least {min_bytes})"
        )
    if tail:
        log.warning("%s stderr: %s", name, tail)


def run_checked(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    timeout: float,
    name: str,
    secrets: Collection[str] = (),
) -> str:
    """Run a short command to completion and return its stdout (same failure rules)."""
    out = b"".join(command_stream(argv, env=env, timeout=timeout, name=name, secrets=secrets))
    return out.decode("utf-8", "replace")
