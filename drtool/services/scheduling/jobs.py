"""Scheduled jobs: their definitions (``schedules/*.toml``), their persisted state, one run.

A schedule file holds ``[defaults]`` and ``[jobs.NAME]`` tables (the format is documented in
``schedules/default.toml``). A job is one of four kinds:

- ``backup``  — :func:`drtool.services.backup.run_backup` of ``components``;
- ``prune``   — :func:`drtool.services.prune.prune` with the ``keep`` policy;
- ``verify``  — the key-less :func:`drtool.services.repo.verify` of the latest (or every)
  snapshot;
- ``drill``   — ``drtool.services.drill.run_drill`` with the job's ``definition`` file;
- ``copy``    — :func:`drtool.services.copy.run_copy` of the primary into ``repository``
  (a ``[repositories.NAME]`` of the config: the second copy of 3-2-1, ADR 0022).

``repository`` names the repository a prune, verify or drill job works on (default the
primary, ``[repository]``): each repository keeps its own retention and verification.

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
from typing import Any, Literal

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
from drtool.repository.subset import parse_budget
from drtool.services import prune as prune_svc
from drtool.services import repo as repo_svc
from drtool.services.backup import run_backup
from drtool.stores.registry import COMPONENTS, all_components
from drtool.typed_load import build

log = logging.getLogger(__name__)

KINDS = ("backup", "prune", "verify", "drill", "copy")
DAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
DURATION_RE = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$")
AT_RE = re.compile(r"^([01]\d|2[0-3]):[0-5]\d$")
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,40}$")
# errors worth another attempt: a lock held by another run, a storage or source hiccup
RETRYABLE: tuple[type[DrtoolError], ...] = (Locked, StorageError, SourceError)
HEARTBEAT_TIMEOUT_S = 10.0


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
    read_data_subset: str = ""  # verify: then also today's rotating slice (N% or SIZE)
    definition: str = ""  # drill: the drill definition file
    repository: str = ""  # copy: the destination; prune/verify/drill: the one worked on
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


def _timezone(where: str, name: str) -> str:
    """An IANA time zone name pytz knows ('' = local time)."""
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


def _at_least_0(where: str, value: int) -> int:
    """Counts and seconds of a schedule are never negative."""
    if value < 0:
        raise ConfigError(f"{where}: expected a whole number >= 0 (got {value!r})")
    return value


def _time_of_day(where: str, value: str) -> str:
    """``HH:MM``, 24-hour."""
    if not AT_RE.match(value):
        raise ConfigError(f"{where}: expected HH:MM (got {value!r})")
    return value


def _weekday(where: str, value: str) -> str:
    """A weekday name, any case."""
    if value.lower() not in DAYS:
        raise ConfigError(f"{where}: expected a weekday with `at` (got {value!r})")
    return value.lower()


def _components(where: str, value: tuple[str, ...]) -> tuple[str, ...]:
    """Some of the stores (the optional ``postgres-base`` too), at least one."""
    known = all_components()
    unknown = [c for c in value if c not in known]
    if unknown or not value:
        raise ConfigError(f"{where}: expected some of {', '.join(known)} (got {value})")
    return value


def _duration(where: str, value: str) -> str:
    """Refuse a value :func:`parse_duration` cannot read (keeping the text)."""
    parse_duration(where, value)
    return value


def _subset(where: str, value: str) -> str:
    """Refuse a ``read_data_subset`` :func:`parse_budget` cannot read (keeping the text)."""
    if value:
        parse_budget(value, where=where)
    return value


_NONNEG = {"check": _at_least_0}


@dataclass(frozen=True)
class _Defaults:
    """``[defaults]``: what every job of the file inherits unless it sets its own."""

    timezone: str = field(default="", metadata={"check": _timezone})
    jitter_s: int = field(default=0, metadata=_NONNEG)
    retries: int = field(default=2, metadata=_NONNEG)
    retry_backoff_s: int = field(default=60, metadata=_NONNEG)
    catch_up: bool = True


@dataclass(frozen=True)
class _JobTable(_Defaults):
    """``[jobs.NAME]`` as written: every key typed; :func:`_job` derives the :class:`JobSpec`."""

    kind: Literal["backup", "prune", "verify", "drill", "copy"] | None = None
    every: str = field(default="", metadata={"check": _duration})
    at: str = field(default="", metadata={"check": _time_of_day})
    on: str = field(default="", metadata={"check": _weekday})
    max_age: str = field(default="", metadata={"check": _duration})
    enabled: bool = True
    heartbeat_url_file: str = ""
    components: tuple[str, ...] = field(default=COMPONENTS, metadata={"check": _components})
    keep: Policy | None = None
    snapshot: Literal["latest", "all", "unverified"] = "latest"
    read_data_subset: str = field(default="", metadata={"check": _subset})
    definition: str = ""
    repository: str = ""


def _policy(where: str, policy: Policy | None) -> Policy:
    """A prune job's ``keep``: required, and keeping something."""
    if policy is None:
        raise ConfigError(
            f"{where}: required for a prune job, e.g. keep = {{ daily = 7, weekly = 4 }}"
        )
    try:
        policy.check()
    except DrtoolError as exc:
        raise ConfigError(f"{where}: {exc.message}") from None
    return policy


def _definition(where: str, path: str) -> str:
    """A drill job's definition file: it must exist and parse now, not at Sunday 04:00."""
    if not path:
        return ""
    try:
        load_definition(Path(path))
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc.message}") from None
    return path


def _job(name: str, table: Any, defaults: Mapping[str, Any], source: str) -> JobSpec | None:
    """The JobSpec of ``[jobs.NAME]`` (None when it is disabled), every value checked."""
    where = f"{source}: jobs.{name}"
    if not NAME_RE.match(name):
        raise ConfigError(f"{where}: a job name is 1-41 lowercase letters, digits, '-' or '_'")
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: expected a [jobs.{name}] table (got {table!r})")
    t = build(_JobTable, {**defaults, **table}, where)
    if not t.enabled:
        return None
    if t.kind is None:
        raise ConfigError(f"{where}.kind: expected one of {', '.join(KINDS)} (got None)")
    if bool(t.every) == bool(t.at):
        raise ConfigError(f"{where}: give exactly one of `every` or `at` (got {sorted(table)})")
    if t.on and not t.at:
        raise ConfigError(f"{where}.on: expected a weekday with `at` (got {t.on!r})")
    if t.kind == "copy" and not t.repository:
        raise ConfigError(
            f"{where}.repository: required for a copy job: the [repositories.NAME] to copy to"
        )
    if t.kind == "backup" and t.repository:
        raise ConfigError(
            f"{where}.repository: a backup writes to the primary [repository] only "
            f"(got {t.repository!r}); copy it with a job of kind copy"
        )
    return JobSpec(
        name=name,
        kind=t.kind,
        every_s=parse_duration(f"{where}.every", t.every) if t.every else 0,
        at=t.at,
        on=t.on,
        timezone=t.timezone,
        jitter_s=t.jitter_s,
        retries=t.retries,
        retry_backoff_s=t.retry_backoff_s,
        max_age_s=parse_duration(f"{where}.max_age", t.max_age) if t.max_age else 0,
        catch_up=t.catch_up,
        heartbeat_url_file=t.heartbeat_url_file,
        components=t.components,
        keep=_policy(f"{where}.keep", t.keep) if t.kind == "prune" else Policy(),
        snapshot=t.snapshot,
        read_data_subset=t.read_data_subset,
        definition=_definition(f"{where}.definition", t.definition) if t.kind == "drill" else "",
        repository=t.repository,
        source=source,
    )


def _read_schedule_file(path: Path) -> dict[str, Any]:
    """One schedule file's tables, its ``[defaults]`` already checked."""
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the schedule: {exc}") from None
    for key in data:
        if key not in ("defaults", "jobs"):
            raise ConfigError(f"{path}: {key}: unknown table (known: defaults, jobs)")
    build(_Defaults, data.get("defaults", {}), f"{path}: defaults")
    return data


def load_schedules(directory: Path) -> list[JobSpec]:
    """Every enabled job of every ``*.toml`` in ``directory``, in file then table order."""
    if not directory.is_dir():
        raise ConfigError(f"schedule-dir: not a directory (got {directory})")
    files = sorted(directory.glob("*.toml"))
    if not files:
        raise ConfigError(f"schedule-dir: no *.toml schedule files (got {directory})")
    jobs: dict[str, JobSpec] = {}
    for path in files:
        data = _read_schedule_file(path)
        defaults = data.get("defaults", {})
        for name, table in data.get("jobs", {}).items():
            if name in jobs:
                raise ConfigError(f"{path}: jobs.{name}: already defined in {jobs[name].source}")
            spec = _job(name, table, defaults, str(path))
            if spec is not None:
                jobs[name] = spec
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
    # when a scheduler first ran with this job: before its first success, the job's deadline
    # (metrics) counts from here, so a job that never succeeds alerts instead of staying silent
    scheduled_since: str | None = None
    # drill jobs: the last verdict and figures, so the metrics survive a restart
    drill_passed: bool | None = None
    drill_rto_s: dict[str, float] = field(default_factory=dict)
    drill_rpo_s: float | None = None

    def success_time(self) -> datetime | None:
        """``last_success`` as an aware datetime."""
        return datetime.fromisoformat(self.last_success) if self.last_success else None


def state_path(state_dir: Path, job: str) -> Path:
    """The JSON file holding ``job``'s state."""
    return state_dir / "schedule" / f"{job}.json"


def read_state(state_dir: Path, job: str) -> JobState:
    """The persisted state of ``job`` (an empty one if it never ran).

    A state file that is unreadable, of the wrong shape or with a time that does not parse is
    set aside with a warning and rewritten empty: refusing to start would be a crash loop in a
    container, and the worst an empty state does is run a job once more.
    """
    path = state_path(state_dir, job)
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object (got {type(data).__name__})")
        known = {k: v for k, v in data.items() if k in JobState.__dataclass_fields__}
        state = build(JobState, {**known, "job": job}, "state")
        for when in (state.last_attempt, state.last_success):
            if when is not None and datetime.fromisoformat(when).tzinfo is None:
                raise ValueError(f"time without a zone (got {when!r})")
        return state
    except FileNotFoundError:
        return JobState(job)
    except (OSError, ValueError, TypeError, ConfigError) as exc:
        log.warning(
            "job state %s unreadable (%s); treating the job as never run and rewriting it",
            path,
            exc,
            extra={"job": job},
        )
        fresh = JobState(job)
        try:
            write_state(state_dir, fresh)
        except OSError as write_exc:
            log.warning("job state %s: cannot rewrite it (%s)", path, write_exc.strerror)
        return fresh


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
    figures: dict[str, int] = field(default_factory=dict)  # the backup's, for metrics
    copy: CopyFigures | None = None  # a copy job's, for the per-repository metrics


@dataclass(frozen=True)
class CopyFigures:
    """What a copy job did, exported per destination repository."""

    repository: str
    snapshots: int
    objects: int
    bytes: int
    newest: str | None  # the newest snapshot the destination holds


def check_repositories(specs: list[JobSpec], cfg: Config) -> None:
    """Every job's ``repository`` names one of the config: refused at start, not at 04:00."""
    for spec in specs:
        if spec.repository:
            try:
                cfg.repository_config(spec.repository)
            except ConfigError as exc:
                raise ConfigError(f"{spec.source}: jobs.{spec.name}: {exc.message}") from None


def execute(spec: JobSpec, cfg: Config, *, home: Path, env: Mapping[str, str]) -> JobResult:
    """Run ``spec`` once; raise on failure (a DrtoolError carries the exit code)."""
    if spec.kind == "copy":
        return _execute_copy(spec, cfg, home=home)
    cfg = cfg.with_repository(spec.repository or None)
    if spec.kind == "backup":
        backup = run_backup(cfg, home=home, env=env, components=spec.components)
        return JobResult(
            snapshot=backup.snapshot_id,
            message=f"snapshot {backup.snapshot_id} {backup.verified}"
            + "".join(f"; warning: {w}" for w in backup.warnings),
            plain_bytes={c.name: c.plain_bytes for c in backup.components},
            stored_bytes={c.name: c.stored_bytes for c in backup.components},
            figures=dict(backup.figures),
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
        message = f"{len(outcomes)} snapshots verify (stored bytes)"
        if spec.read_data_subset:
            message += "; " + _verify_subset(cfg, spec.read_data_subset)
        return JobResult(snapshot=outcomes[-1].snapshot_id if outcomes else None, message=message)
    return _execute_drill(spec, cfg, home=home)


def _verify_subset(cfg: Config, budget: str) -> str:
    """Today's rotating slice (ADR 0016); damage raises IntegrityError naming the snapshots."""
    out = repo_svc.verify_subset(cfg, parse_budget(budget))
    if out.damaged:
        raise IntegrityError(
            "verify subset: damaged: "
            + "; ".join(f"{k} (snapshots {', '.join(out.referenced_by[k])})" for k in out.damaged)
        )
    return (
        f"subset ({out.mode}) read {out.objects_read} of {out.total_objects} objects, "
        f"every object within {out.period_days} days"
    )


def _execute_copy(spec: JobSpec, cfg: Config, *, home: Path) -> JobResult:
    """Copy every valid snapshot (and the WAL) the destination lacks; a snapshot that could
    not be copied fails the job (IntegrityError) after the others were copied."""
    from drtool.services.copy import run_copy

    result = run_copy(cfg, home=home, destination=spec.repository)
    if result.problems:
        raise IntegrityError(f"copy to {spec.repository}: {'; '.join(result.problems)}")
    return JobResult(
        snapshot=result.newest,
        message=f"copied {len(result.copied)} snapshots to {spec.repository} "
        f"({result.uploaded} objects, {result.uploaded_bytes} bytes uploaded; "
        f"{result.already} already there)",
        copy=CopyFigures(
            spec.repository,
            len(result.copied),
            result.uploaded,
            result.uploaded_bytes,
            result.newest,
        ),
    )


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
