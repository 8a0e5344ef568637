"""Scheduled jobs: their definitions (``schedules/*.toml``), their persisted state, one run.

A schedule file holds ``[defaults]`` and ``[jobs.NAME]`` tables (the format is documented in
``schedules/default.toml``). A job is one of four kinds:

- ``backup``  — :func:`drtool.services.backup.run_backup` of ``components``;
- ``prune``   — :func:`drtool.services.prune.prune` with the ``keep`` policy;
- ``verify``  — the key-less :func:`drtool.services.repo.verify` of the latest (or every)
  snapshot;
- ``drill``   — ``drtool.services.drill.run_drill`` with the job's ``definition`` file.

Each job's state is one JSON file ``<state_dir>/schedule/<job>.json`` (last attempt, last
success, exit code, message, duration, snapshot), written atomically after every attempt.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tomllib
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from drtool.config import Config
from drtool.drills.definition import load_definition
from drtool.errors import (
    ConfigError,
    DrillFailed,
    DrtoolError,
    IntegrityError,
    Locked,
    SourceError,
    StorageError,
)
from drtool.repository.retention import Policy
from drtool.services import prune as prune_svc
from drtool.services import repo as repo_svc
from drtool.services.backup import COMPONENTS, run_backup

log = logging.getLogger(__name__)

KINDS = ("backup", "prune", "verify", "drill")
DAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
DURATION_RE = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$")
AT_RE = re.compile(r"^([01]\d|2[0-3]):[0-5]\d$")
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,40}$")
# errors worth another attempt: a lock held by another run, a storage or source hiccup
RETRYABLE: tuple[type[DrtoolError], ...] = (Locked, StorageError, SourceError)
HEARTBEAT_TIMEOUT_S = 10.0

_JOB_KEYS = {
    "kind",
    "every",
    "at",
    "on",
    "timezone",
    "jitter_s",
    "retries",
    "retry_backoff_s",
    "max_age",
    "catch_up",
    "enabled",
    "heartbeat_url_file",
    "components",
    "keep",
    "snapshot",
    "definition",
}
_DEFAULT_KEYS = {"timezone", "jitter_s", "retries", "retry_backoff_s", "catch_up"}


def parse_duration(where: str, text: object) -> int:
    """``"90s"``, ``"15m"``, ``"6h"``, ``"1d"``, ``"2w"`` -> seconds."""
    match = DURATION_RE.match(text) if isinstance(text, str) else None
    if match is None or int(match.group(1)) == 0:
        raise ConfigError(
            f"{where}: expected a duration like 90s, 15m, 6h, 1d or 1w (got {text!r})"
        )
    return int(match.group(1)) * UNITS[match.group(2)]


@dataclass(frozen=True)
class JobSpec:
    """One scheduled job, as read from a schedule file."""

    name: str
    kind: str
    every_s: int = 0  # an interval; or `at` (daily) / `on` + `at` (weekly)
    at: str = ""
    on: str = ""
    timezone: str = ""
    jitter_s: int = 0
    retries: int = 2
    retry_backoff_s: int = 60
    max_age_s: int = 0  # 0: twice the period
    catch_up: bool = True
    heartbeat_url_file: str = ""
    components: tuple[str, ...] = COMPONENTS
    keep: Policy = field(default_factory=Policy)
    snapshot: str = "latest"  # verify: "latest", "all" or "unverified"
    definition: str = ""  # drill: the drill definition file
    source: str = ""  # the schedule file it came from

    @property
    def period_s(self) -> int:
        """The nominal time between two runs."""
        if self.every_s:
            return self.every_s
        return UNITS["w"] if self.on else UNITS["d"]

    @property
    def threshold_s(self) -> int:
        """How old the last success may be before ``schedule health`` fails."""
        return self.max_age_s or 2 * self.period_s

    def describe(self) -> str:
        """``every 6h`` / ``daily 03:00 Asia/Seoul`` / ``sunday 04:00 Asia/Seoul``."""
        if self.every_s:
            return f"every {human_seconds(self.every_s)}"
        when = f"{self.on} {self.at}" if self.on else f"daily {self.at}"
        return f"{when} {self.timezone or 'local time'}".strip()


def human_seconds(seconds: int) -> str:
    """21600 -> '6h'."""
    for unit in ("w", "d", "h", "m"):
        if seconds % UNITS[unit] == 0:
            return f"{seconds // UNITS[unit]}{unit}"
    return f"{seconds}s"


def _expect(where: str, value: Any, kind: type) -> Any:
    if kind is int and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ConfigError(f"{where}: expected a whole number >= 0 (got {value!r})")
    if not isinstance(value, kind):
        raise ConfigError(f"{where}: expected {kind.__name__} (got {value!r})")
    return value


def _timezone(where: str, name: str) -> str:
    if not name:
        return ""
    try:
        import pytz
    except ImportError:
        raise ConfigError(f"{where}: time zones need the pytz package (got {name!r})") from None
    try:
        pytz.timezone(name)
    except pytz.UnknownTimeZoneError:
        raise ConfigError(f"{where}: unknown time zone (got {name!r})") from None
    return name


def _policy(where: str, table: Any) -> Policy:
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: expected a table like {{ daily = 7 }} (got {table!r})")
    known = ("last", "hourly", "daily", "weekly", "monthly")
    for key in table:
        if key not in known:
            raise ConfigError(f"{where}.{key}: unknown rule (known: {', '.join(known)})")
    policy = Policy(**{k: _expect(f"{where}.{k}", v, int) for k, v in table.items()})
    try:
        policy.check()
    except DrtoolError as exc:
        raise ConfigError(f"{where}: {exc.message}") from None
    return policy


def _job(name: str, table: Any, defaults: Mapping[str, Any], source: str) -> JobSpec:
    where = f"{source}: jobs.{name}"
    if not NAME_RE.match(name):
        raise ConfigError(f"{where}: a job name is 1-41 lowercase letters, digits, '-' or '_'")
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: expected a [jobs.{name}] table (got {table!r})")
    for key in table:
        if key not in _JOB_KEYS:
            raise ConfigError(
                f"{where}.{key}: unknown setting (known: {', '.join(sorted(_JOB_KEYS))})"
            )
    t = {**defaults, **table}
    kind = t.get("kind")
    if kind not in KINDS:
        raise ConfigError(f"{where}.kind: expected one of {', '.join(KINDS)} (got {kind!r})")
    has_every, has_at = "every" in t, "at" in t
    if has_every == has_at:
        raise ConfigError(f"{where}: give exactly one of `every` or `at` (got {sorted(t)})")
    every = parse_duration(f"{where}.every", t["every"]) if has_every else 0
    at = str(_expect(f"{where}.at", t["at"], str)) if has_at else ""
    if at and not AT_RE.match(at):
        raise ConfigError(f"{where}.at: expected HH:MM (got {at!r})")
    on = str(_expect(f"{where}.on", t.get("on", ""), str)).lower()
    if on and (on not in DAYS or not at):
        raise ConfigError(f"{where}.on: expected a weekday with `at` (got {on!r})")
    components = tuple(_expect(f"{where}.components", t.get("components", list(COMPONENTS)), list))
    unknown = [c for c in components if c not in COMPONENTS]
    if unknown or not components:
        raise ConfigError(
            f"{where}.components: expected some of {', '.join(COMPONENTS)} (got {components})"
        )
    snapshot = _expect(f"{where}.snapshot", t.get("snapshot", "latest"), str)
    if snapshot not in ("latest", "all", "unverified"):
        raise ConfigError(
            f"{where}.snapshot: expected latest, all or unverified (got {snapshot!r})"
        )
    return JobSpec(
        name=name,
        kind=kind,
        every_s=every,
        at=at,
        on=on,
        timezone=_timezone(
            f"{where}.timezone", _expect(f"{where}.timezone", t.get("timezone", ""), str)
        ),
        jitter_s=_expect(f"{where}.jitter_s", t.get("jitter_s", 0), int),
        retries=_expect(f"{where}.retries", t.get("retries", 2), int),
        retry_backoff_s=_expect(f"{where}.retry_backoff_s", t.get("retry_backoff_s", 60), int),
        max_age_s=parse_duration(f"{where}.max_age", t["max_age"]) if "max_age" in t else 0,
        catch_up=_expect(f"{where}.catch_up", t.get("catch_up", True), bool),
        heartbeat_url_file=_expect(
            f"{where}.heartbeat_url_file", t.get("heartbeat_url_file", ""), str
        ),
        components=components,
        keep=_policy(f"{where}.keep", t["keep"]) if kind == "prune" else Policy(),
        snapshot=snapshot,
        definition=_expect(f"{where}.definition", t.get("definition", ""), str),
        source=source,
    )


def load_schedules(directory: Path) -> list[JobSpec]:
    """Every enabled job of every ``*.toml`` in ``directory``, in file then table order."""
    if not directory.is_dir():
        raise ConfigError(f"schedule-dir: not a directory (got {directory})")
    files = sorted(directory.glob("*.toml"))
    if not files:
        raise ConfigError(f"schedule-dir: no *.toml schedule files (got {directory})")
    jobs: dict[str, JobSpec] = {}
    for path in files:
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read the schedule: {exc}") from None
        for key in data:
            if key not in ("defaults", "jobs"):
                raise ConfigError(f"{path}: {key}: unknown table (known: defaults, jobs)")
        defaults = data.get("defaults", {})
        for key in defaults:
            if key not in _DEFAULT_KEYS:
                raise ConfigError(
                    f"{path}: defaults.{key}: unknown setting "
                    f"(known: {', '.join(sorted(_DEFAULT_KEYS))})"
                )
        for name, table in data.get("jobs", {}).items():
            if isinstance(table, dict) and table.get("enabled", True) is False:
                continue
            if name in jobs:
                raise ConfigError(f"{path}: jobs.{name}: already defined in {jobs[name].source}")
            jobs[name] = _job(name, table, defaults, str(path))
    if not jobs:
        raise ConfigError(f"schedule-dir: no enabled jobs in {directory}")
    return list(jobs.values())


# -- state -----------------------------------------------------------------------------------


@dataclass
class JobState:
    """What the last attempts of one job did (persisted as JSON)."""

    job: str
    last_attempt: str | None = None
    last_success: str | None = None
    exit_code: int | None = None
    message: str = ""
    duration_s: float = 0.0
    snapshot: str | None = None
    failures_in_a_row: int = 0

    def success_time(self) -> datetime | None:
        """``last_success`` as an aware datetime."""
        return datetime.fromisoformat(self.last_success) if self.last_success else None


def state_path(state_dir: Path, job: str) -> Path:
    """The JSON file holding ``job``'s state."""
    return state_dir / "schedule" / f"{job}.json"


def read_state(state_dir: Path, job: str) -> JobState:
    """The persisted state of ``job`` (an empty one if it never ran or the file is unreadable)."""
    path = state_path(state_dir, job)
    try:
        data = json.loads(path.read_text())
        return JobState(**{k: v for k, v in data.items() if k in JobState.__dataclass_fields__})
    except FileNotFoundError:
        return JobState(job)
    except (OSError, ValueError, TypeError) as exc:
        log.warning("job state %s unreadable (%s); treating the job as never run", path, exc)
        return JobState(job)


def write_state(state_dir: Path, state: JobState) -> None:
    """Persist ``state`` atomically (temp file, fsync, rename)."""
    path = state_path(state_dir, state.job)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w") as fh:
        json.dump(asdict(state), fh, indent=2)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


# -- one run ---------------------------------------------------------------------------------


@dataclass
class JobResult:
    """What a successful run produced (for state, logs and metrics)."""

    snapshot: str | None = None
    message: str = "ok"
    plain_bytes: dict[str, int] = field(default_factory=dict)
    stored_bytes: dict[str, int] = field(default_factory=dict)
    drill_passed: bool | None = None
    drill_rto_s: dict[str, float] = field(default_factory=dict)
    drill_rpo_s: float | None = None


def execute(spec: JobSpec, cfg: Config, *, home: Path, env: Mapping[str, str]) -> JobResult:
    """Run ``spec`` once; raise on failure (a DrtoolError carries the exit code)."""
    if spec.kind == "backup":
        backup = run_backup(cfg, home=home, env=env, components=spec.components)
        return JobResult(
            snapshot=backup.snapshot_id,
            message=f"snapshot {backup.snapshot_id} committed and verified",
            plain_bytes={c.name: c.plain_bytes for c in backup.components},
            stored_bytes={c.name: c.stored_bytes for c in backup.components},
        )
    if spec.kind == "prune":
        plan = prune_svc.prune(cfg, spec.keep, dry_run=False)
        return JobResult(
            message=f"kept {len(plan.keep)}, forgot {len(plan.forget)} snapshots, "
            f"deleted {len(plan.garbage)} objects"
        )
    if spec.kind == "verify":
        ref = {"all": None, "unverified": repo_svc.UNVERIFIED}.get(spec.snapshot, "latest")
        outcomes = repo_svc.verify(cfg, ref, read_data=False)
        bad = [o for o in outcomes if o.problems]
        if bad:
            raise IntegrityError(
                f"verify: {len(bad)} of {len(outcomes)} snapshots failed: {bad[0].problems[0]}"
            )
        return JobResult(
            snapshot=outcomes[-1].snapshot_id if outcomes else None,
            message=f"{len(outcomes)} snapshots verify (stored bytes)",
        )
    return _execute_drill(spec, cfg, home=home)


def _execute_drill(spec: JobSpec, cfg: Config, *, home: Path) -> JobResult:
    """Run the restore drill of ``spec.definition``; a drill that failed raises DrillFailed."""
    from drtool.services.drill import run_drill  # the drill stack is only loaded by drill jobs

    definition = load_definition(Path(spec.definition) if spec.definition else None)
    report = run_drill(cfg, home=home, spec=definition)
    if not report.passed:
        raise DrillFailed(f"job {spec.name}: the drill failed (see its report {report.drill_id})")
    return JobResult(
        snapshot=report.snapshot_id,
        message="drill passed",
        drill_passed=True,
        drill_rto_s=dict(report.rto_s),
        drill_rpo_s=report.rpo_s,
    )


def send_heartbeat(spec: JobSpec) -> None:
    """GET the job's heartbeat URL (M1: called only after a verified success).

    The URL is a secret (it authenticates the ping): it is read from a file and never logged.
    A failure is logged and otherwise ignored.
    """
    if not spec.heartbeat_url_file:
        return
    try:
        url = Path(spec.heartbeat_url_file).read_text().strip()
        if not url.startswith(("http://", "https://")):
            raise ValueError("the file does not hold an http(s) URL")
        with urllib.request.urlopen(url, timeout=HEARTBEAT_TIMEOUT_S) as response:
            response.read(1024)
        log.info("heartbeat sent for job %s", spec.name, extra={"job": spec.name})
    except (OSError, ValueError, urllib.error.URLError) as exc:
        reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or exc
        if isinstance(exc, urllib.error.HTTPError):
            reason = f"HTTP {exc.code}"
        log.warning(
            "heartbeat for job %s failed (%s: %s); the job itself succeeded",
            spec.name,
            type(exc).__name__,
            reason,
            extra={"job": spec.name},
        )
