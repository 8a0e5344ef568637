"""One exception hierarchy; each class carries its exit code.

Only ``drtool.cli`` catches these, prints ``error: <message>`` on one line and exits with
``exit_code``. Messages name the cause and, where one exists, the fix. They never contain a
secret: build them from names, paths and numbers, not from credentials.
"""

from __future__ import annotations


class DrtoolError(Exception):
    """Base of every error drtool reports to a user."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class UsageError(DrtoolError):
    """Bad command-line usage."""

    exit_code = 2


class ConfigError(DrtoolError):
    """Bad or missing configuration: ``field: problem (got value)``."""

    exit_code = 2


class SourceError(DrtoolError):
    """A data source (pg_dump, Redis, MinIO, a local server) failed."""

    exit_code = 3


class StorageError(DrtoolError):
    """The repository storage failed or is unreachable."""

    exit_code = 4


class IntegrityError(DrtoolError):
    """Data failed authentication, a hash, size or signature check."""

    exit_code = 5


class DrillFailed(DrtoolError):
    """A restore drill ran and one of its checks failed."""

    exit_code = 6


class CheckFailed(DrtoolError):
    """``drtool doctor``: at least one check of the deployment failed."""

    exit_code = 7


class NotFound(DrtoolError):
    """A snapshot, object or repository does not exist."""

    exit_code = 10


class Locked(DrtoolError):
    """Another process holds the repository lock."""

    exit_code = 11


class WrongKey(DrtoolError):
    """No identity matches the recipients an object was encrypted to."""

    exit_code = 12


class Interrupted(DrtoolError):
    """The run was interrupted (Ctrl-C, SIGTERM)."""

    exit_code = 130


EXIT_CODES: dict[int, str] = {
    0: "success: committed and verified",
    1: "unexpected internal error (a bug: run with --debug and report it)",
    2: "usage or configuration error",
    3: "a source failed (pg_dump, Redis, MinIO, a local server)",
    4: "storage failed or unreachable",
    5: "integrity check failed (authentication, hash, size, signature)",
    6: "restore drill failed",
    7: "doctor: a check of the deployment failed",
    10: "not found",
    11: "repository locked by another run",
    12: "wrong or missing key",
    130: "interrupted",
}
