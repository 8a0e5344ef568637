"""One exception hierarchy; each class carries its exit code and what that code means.

Only ``drtool.cli`` catches these, prints ``error: <message>`` on one line and exits with
``exit_code``. Messages name the cause and, where one exists, the fix. They never contain a
secret: build them from names, paths and numbers, not from credentials.

The classes are the single source of the exit-code table: :data:`EXIT_CODES` (shown by
``drtool --help``) is built from their ``exit_code`` and ``meaning``, and a test holds the
README's table to it. A new code is a new class here and nothing else.
"""

from __future__ import annotations

import signal

SUCCESS = "success: committed and verified"


class DrtoolError(Exception):
    """Base of every error drtool reports to a user."""

    exit_code = 1
    meaning = "unexpected internal error (a bug: run with `--debug` and report it)"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class UsageError(DrtoolError):
    """Bad command-line usage."""

    exit_code = 2
    meaning = "usage or configuration error"


class ConfigError(DrtoolError):
    """Bad or missing configuration: ``field: problem (got value)``."""

    exit_code = 2
    meaning = "usage or configuration error"


class SourceError(DrtoolError):
    """A data source (pg_dump, Redis, MinIO, a local server) failed."""

    exit_code = 3
    meaning = "a source failed (pg_dump, Redis, MinIO, a local server)"


class StorageError(DrtoolError):
    """The repository storage failed or is unreachable."""

    exit_code = 4
    meaning = "storage failed or unreachable"


class IntegrityError(DrtoolError):
    """Data failed authentication, a hash, size or signature check."""

    exit_code = 5
    meaning = "integrity check failed (authentication, hash, size, signature)"


class DrillFailed(DrtoolError):
    """A restore drill ran and one of its checks failed."""

    exit_code = 6
    meaning = "restore drill failed"


class CheckFailed(DrtoolError):
    """``drtool doctor``: at least one check of the deployment failed."""

    exit_code = 7
    meaning = "`drtool doctor`: a check of the deployment failed"


class NotFound(DrtoolError):
    """A snapshot, object or repository does not exist."""

    exit_code = 10
    meaning = "not found"


class Locked(DrtoolError):
    """Another process holds the repository lock."""

    exit_code = 11
    meaning = "repository locked by another run"


class WrongKey(DrtoolError):
    """No identity matches the recipients an object was encrypted to."""

    exit_code = 12
    meaning = "wrong or missing key"


class Interrupted(DrtoolError):
    """The run was interrupted by Ctrl-C (SIGINT): 128 + 2, as a shell reports it."""

    exit_code = 130
    meaning = "interrupted (Ctrl-C, SIGINT)"


class Terminated(Interrupted):
    """The run was stopped by SIGTERM (``docker stop``, systemd): 128 + 15 (ADR 0008).

    A subclass of :class:`Interrupted`: the same cleanup runs and code that catches an
    interruption catches both; only the exit code tells a stop from a Ctrl-C.
    """

    exit_code = 128 + signal.SIGTERM
    meaning = "stopped (SIGTERM: `docker stop`, systemd)"


def interrupted(signum: int | None, message: str) -> Interrupted:
    """The error for a run stopped by signal ``signum`` (None or SIGINT: Ctrl-C)."""
    return Terminated(message) if signum == signal.SIGTERM else Interrupted(message)


def _error_classes() -> list[type[DrtoolError]]:
    """DrtoolError and every subclass, in definition order (depth first)."""
    found: list[type[DrtoolError]] = []
    pending: list[type[DrtoolError]] = [DrtoolError]
    while pending:
        cls = pending.pop(0)
        found.append(cls)
        pending[:0] = cls.__subclasses__()
    return found


def _exit_codes() -> dict[int, str]:
    """The exit-code table, built from the classes (a shared code must share its meaning)."""
    table = {0: SUCCESS}
    for cls in _error_classes():
        if table.setdefault(cls.exit_code, cls.meaning) != cls.meaning:
            raise AssertionError(f"exit code {cls.exit_code}: two meanings ({cls.__name__})")
    return dict(sorted(table.items()))


EXIT_CODES: dict[int, str] = _exit_codes()
"""code -> meaning, for ``drtool --help`` and the README (tests/test_cli.py compares)."""
