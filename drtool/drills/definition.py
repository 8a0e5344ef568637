"""Drill definitions: TOML files in ``restore_drills/`` naming what a drill restores and proves.

```toml
name = "weekly"
snapshot = "latest"            # an id, "latest", or "random-within:7d"
runtime = "local"              # "local" (server processes) or "docker"
components = ["postgres", "redis", "minio"]

[thresholds]
max_rto_s = 900                # total restore time allowed
max_rpo_s = 93600              # maximum snapshot age (26 h)

[checks]
sample_rooms = 10

[docker]                       # only for runtime = "docker"
postgres_image = "postgres:16-alpine"
redis_image = "redis:7-alpine"
minio_image = "minio/minio"
postgres_memory = "512m"       # the production limits by default
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
from dataclasses import dataclass, field, fields
from datetime import timedelta
from pathlib import Path
from typing import Any

from drtool.errors import ConfigError
from drtool.stores.registry import COMPONENTS

_WINDOW = re.compile(r"^random-within:(\d+)([hd])$")


@dataclass(frozen=True)
class Thresholds:
    """Limits a drill must meet."""

    max_rto_s: float = 900.0
    max_rpo_s: float = 26 * 3600.0


@dataclass(frozen=True)
class DockerImages:
    """Images of the docker runtime (production defaults: the official images)."""

    postgres_image: str = "postgres:16-alpine"
    redis_image: str = "redis:7-alpine"
    minio_image: str = "minio/minio"
    postgres_memory: str = "512m"
    redis_memory: str = "128m"
    minio_memory: str = "256m"
    data: str = "disk"  # "disk": the container's own layer, removed with it; "tmpfs": in memory


@dataclass(frozen=True)
class ReportSettings:
    """Where a drill's report goes."""

    dir: str = "restore_drills/reports"
    webhook_url_file: str = ""
    webhook_format: str = "slack"
    textfile: str = ""


@dataclass(frozen=True)
class DrillDefinition:
    """One drill: which snapshot, where to restore it, what to check, what is acceptable."""

    name: str = "adhoc"
    snapshot: str = "latest"
    runtime: str = "local"
    components: tuple[str, ...] = COMPONENTS
    sample_rooms: int = 10
    thresholds: Thresholds = field(default_factory=Thresholds)
    docker: DockerImages = field(default_factory=DockerImages)
    report: ReportSettings = field(default_factory=ReportSettings)

    def window(self) -> timedelta | None:
        """For ``random-within:Nd`` the window to pick from, else None."""
        match = _WINDOW.match(self.snapshot)
        if not match:
            return None
        amount = int(match.group(1))
        return timedelta(hours=amount) if match.group(2) == "h" else timedelta(days=amount)


def _table(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a table (got {data!r})")
    known = {f.name for f in fields(cls)}
    for key in data:
        if key not in known:
            raise ConfigError(f"{where}.{key}: unknown setting (known: {', '.join(sorted(known))})")
    try:
        return cls(**data)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def parse_definition(text: str, *, source: str = "definition") -> DrillDefinition:
    """Parse and check a drill definition."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    tables = {"thresholds": Thresholds, "docker": DockerImages, "report": ReportSettings}
    nested = {k: _table(cls, data.pop(k, {}), k) for k, cls in tables.items()}
    checks = data.pop("checks", {})
    if not isinstance(checks, dict) or set(checks) - {"sample_rooms"}:
        raise ConfigError(f"checks: unknown setting (known: sample_rooms) (got {checks!r})")
    if "sample_rooms" in checks:
        data["sample_rooms"] = checks["sample_rooms"]
    if "components" in data:
        data["components"] = tuple(data["components"])
    definition: DrillDefinition = _table(DrillDefinition, {**data, **nested}, source)
    if definition.runtime not in ("local", "docker"):
        raise ConfigError(f"runtime: expected local or docker (got {definition.runtime!r})")
    unknown = [c for c in definition.components if c not in COMPONENTS]
    if unknown or not definition.components:
        raise ConfigError(f"components: expected some of {', '.join(COMPONENTS)} (got {unknown})")
    if definition.snapshot.startswith("random") and definition.window() is None:
        raise ConfigError(
            f"snapshot: expected latest, an id or random-within:<N>d (got {definition.snapshot!r})"
        )
    if definition.docker.data not in ("disk", "tmpfs"):
        raise ConfigError(f"docker.data: expected disk or tmpfs (got {definition.docker.data!r})")
    if definition.report.webhook_format not in ("slack", "alertmanager"):
        raise ConfigError(
            f"report.webhook_format: expected slack or alertmanager "
            f"(got {definition.report.webhook_format!r})"
        )
    return definition


def load_definition(path: Path | None) -> DrillDefinition:
    """Read a definition file; None gives the defaults."""
    if path is None:
        return DrillDefinition()
    try:
        return parse_definition(path.read_text(), source=str(path))
    except FileNotFoundError:
        raise ConfigError(f"drill definition: file not found (got {path})") from None
