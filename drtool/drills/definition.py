"""Drill definitions: TOML files in ``restore_drills/`` naming what a drill restores and proves.

```toml
name = "weekly"
snapshot = "latest"            # an id, "latest", or "random-within:7d"; or PostgreSQL from a
                               # base backup + WAL: "pitr:lsn-of-latest" (must equal the newest
                               # logical snapshot's fingerprints) or "pitr:random-within:7d" /
                               # "pitr:at:2026-12-05T10:00:00Z" (a moment: with components
                               # beyond postgres, the whole stack at that moment, ADR 0027)
runtime = "local"              # "local" (server processes) or "docker"
components = ["postgres", "redis", "minio"]
identities = []                # identity files, one per recipient: each must decrypt a sample

[thresholds]
max_rto_s = 900                # total restore time allowed
max_rpo_s = 93600              # maximum snapshot age (26 h); for a drill of the whole stack
                               # at a moment: each store's canary-measured RPO
max_skew_s = 0                 # a drill at a moment: the largest skew (the moment minus a
                               # store's effective moment); 0 = restore.max_skew_s or the
                               # schedule's Redis interval (ADR 0027)

[checks]
sample_rooms = 10

[docker]                       # only for runtime = "docker"
postgres_image = "postgres:16-alpine"
redis_image = "redis:7-alpine"
minio_image = "minio/minio"
postgres_memory = "512m"       # unset: sized from the snapshot (floor: 512m, 128m, 256m)
data = "disk"                  # or "tmpfs": faster, but the data then counts against the limits

[report]
dir = "restore_drills/reports"
webhook_url_file = ""          # a file holding the URL (it may embed a token)
webhook_format = "slack"       # or "alertmanager"
textfile = ""                  # Prometheus node-exporter textfile path
```
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from drtool.drills.report import check_report_paths
from drtool.errors import ConfigError
from drtool.stores.registry import COMPONENTS
from drtool.typed_load import build, problem

_WINDOW = re.compile(r"^random-within:(\d+)([hd])$")
_MEMORY = re.compile(r"^\d+[bkmg]?$", re.IGNORECASE)


def _components(where: str, value: tuple[str, ...]) -> tuple[str, ...]:
    """Some of the known stores, at least one."""
    if not value or any(c not in COMPONENTS for c in value):
        raise problem(where, f"expected some of {', '.join(COMPONENTS)}", list(value))
    return value


def _snapshot(where: str, value: str) -> str:
    """``latest``, an id, ``random-within:<N>d|h``, ``pitr:lsn-of-latest`` or
    ``pitr:random-within:<N>d|h`` (PostgreSQL from a base backup and the WAL)."""
    if value.startswith("random") and not _WINDOW.match(value):
        raise problem(where, "expected latest, an id or random-within:<N>d", value)
    if value.startswith("pitr:at:"):
        if moment_of(value) is None:
            raise problem(where, "expected pitr:at:<ISO time with its zone>", value)
        return value
    if value.startswith("pitr:") and not (
        value == "pitr:lsn-of-latest" or _WINDOW.match(value.removeprefix("pitr:"))
    ):
        raise problem(
            where,
            "expected pitr:lsn-of-latest or pitr:random-within:<N>d|h (or pitr:at:<time>)",
            value,
        )
    return value


def moment_of(value: str) -> datetime | None:
    """The moment of ``pitr:at:<ISO>`` (with its zone), None when it is not one."""
    try:
        at = datetime.fromisoformat(value.removeprefix("pitr:at:"))
    except ValueError:
        return None
    return at if value.startswith("pitr:at:") and at.tzinfo is not None else None


def _not_negative(where: str, value: float) -> float:
    """A limit of zero or more (0: the default chosen elsewhere)."""
    if value < 0:
        raise problem(where, "expected a number of 0 or more", value)
    return value


def _positive(where: str, value: float) -> float:
    """A limit above zero (0 would fail every drill)."""
    if value <= 0:
        raise problem(where, "expected a number above 0", value)
    return value


def _memory(where: str, value: str) -> str:
    """A Docker memory limit (``256m``, ``2g``), or ``""``: sized from the snapshot."""
    if value and not _MEMORY.match(value):
        raise problem(where, 'expected a memory limit such as "256m" or "2g", or ""', value)
    return value


@dataclass(frozen=True)
class Thresholds:
    """Limits a drill must meet."""

    max_rto_s: float = field(default=900.0, metadata={"check": _positive})
    max_rpo_s: float = field(default=26 * 3600.0, metadata={"check": _positive})
    # 0: restore.max_skew_s, else the schedule's Redis interval (services/restore/moment.py)
    max_skew_s: float = field(default=0.0, metadata={"check": _not_negative})


@dataclass(frozen=True)
class DockerImages:
    """Images of the docker runtime (production defaults: the official images)."""

    postgres_image: str = "postgres:16-alpine"
    redis_image: str = "redis:7-alpine"
    minio_image: str = "minio/minio"
    # "": sized from the snapshot's manifest at drill time (drills/sizing.py), never below the
    # production defaults 512m / 128m / 256m; a value set here always wins
    postgres_memory: str = field(default="", metadata={"check": _memory})
    redis_memory: str = field(default="", metadata={"check": _memory})
    minio_memory: str = field(default="", metadata={"check": _memory})
    data: Literal["disk", "tmpfs"] = (
        "disk"  # "disk": the container's own layer, removed with it; "tmpfs": in memory
    )


@dataclass(frozen=True)
class ReportSettings:
    """Where a drill's report goes."""

    dir: str = "restore_drills/reports"
    webhook_url_file: str = ""
    webhook_format: Literal["slack", "alertmanager"] = "slack"
    textfile: str = ""


@dataclass(frozen=True)
class DrillDefinition:
    """One drill: which snapshot, where to restore it, what to check, what is acceptable."""

    name: str = "adhoc"
    snapshot: str = field(default="latest", metadata={"check": _snapshot})
    runtime: Literal["local", "docker"] = "local"
    components: tuple[str, ...] = field(default=COMPONENTS, metadata={"check": _components})
    sample_rooms: int = 10
    # identity files to prove (one per recipient: operators', escrow); issue 15.3, ADR 0023
    identities: tuple[str, ...] = ()
    thresholds: Thresholds = field(default_factory=Thresholds)
    docker: DockerImages = field(default_factory=DockerImages)
    report: ReportSettings = field(default_factory=ReportSettings)

    def window(self) -> timedelta | None:
        """For ``random-within:Nd`` the window to pick from, else None."""
        match = _WINDOW.match(self.snapshot.removeprefix("pitr:"))
        if not match:
            return None
        amount = int(match.group(1))
        return timedelta(hours=amount) if match.group(2) == "h" else timedelta(days=amount)


@dataclass(frozen=True)
class _Checks:
    """The ``[checks]`` table (its values live on :class:`DrillDefinition`)."""

    sample_rooms: int = 10


def parse_definition(text: str, *, source: str = "definition") -> DrillDefinition:
    """Parse and check a drill definition: every key known, every value of its type."""
    try:
        data: dict[str, Any] = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    try:
        checks = build(_Checks, data.pop("checks", {}), "checks")
        return build(DrillDefinition, data, "", sample_rooms=checks.sample_rooms)
    except ConfigError as exc:  # name the file: a schedule may load several definitions
        raise ConfigError(f"{source}: {exc.message}") from None


def load_definition(path: Path | None) -> DrillDefinition:
    """Read a definition file; None gives the defaults."""
    if path is None:
        return DrillDefinition()
    try:
        definition = parse_definition(path.read_text(), source=str(path))
    except FileNotFoundError:
        raise ConfigError(f"drill definition: file not found (got {path})") from None
    check_report_paths(definition.report, str(path))
    return definition
