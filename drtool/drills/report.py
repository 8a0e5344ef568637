"""Drill reports: JSON for machines, Markdown for people, alerts when a drill fails.

The full report (with figures that describe the data: row counts, examples) is kept locally
and stored encrypted in the repository; a small clear summary (pass/fail, snapshot, RTO,
RPO) beside it lets ``drtool drill history`` work without a key.
"""

from __future__ import annotations

import json
import logging
import os
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from drtool.errors import ConfigError
from drtool.stores.checks import CheckResult

if TYPE_CHECKING:
    from drtool.drills.definition import ReportSettings

log = logging.getLogger(__name__)


MAX_ERROR_CHARS = 500


@dataclass
class DrillReport:
    """What one drill did and found."""

    drill_id: str
    definition: str
    runtime: str
    snapshot_id: str
    snapshot_time: str
    started: str
    finished: str = ""
    passed: bool = False
    error: str = ""
    rto_s: dict[str, float] = field(default_factory=dict)
    # the whole restore, wall time: staging, decryption and checks included, and up to the
    # failure when it failed (the components' own times leave those out)
    restore_s: float = 0.0
    rpo_s: float = 0.0
    # per restored store: the snapshot's time minus the newest canary found in it (None:
    # no canary; drtool/stores/canary.py); what each store really lost, not the snapshot age
    measured_rpo_s: dict[str, float | None] = field(default_factory=dict)
    phases_s: dict[str, float] = field(default_factory=dict)
    checks: list[CheckResult] = field(default_factory=list)
    pg_major: int | None = None  # the scratch PostgreSQL's major, checked equal to the snapshot's
    keys_proven: list[str] = field(default_factory=list)  # recipients (public) that decrypted

    def summary(self) -> dict[str, Any]:
        """The key-less summary kept in the clear: no figure that describes the data."""
        return {
            "drill_id": self.drill_id,
            "definition": self.definition,
            "runtime": self.runtime,
            "snapshot_id": self.snapshot_id,
            "started": self.started,
            "finished": self.finished,
            "passed": self.passed,
            "failed_checks": [c.name for c in self.checks if not c.passed],
            # why a drill that failed with an error (no image, a stall, no snapshot) failed:
            # drtool's own one-line message, which names objects and endpoints, never data
            "error": self.error[:MAX_ERROR_CHARS],
            "rto_s": self.rto_s,
            "restore_s": self.restore_s,
            "rpo_s": self.rpo_s,
            "measured_rpo_s": self.measured_rpo_s,
            "keys_proven": self.keys_proven,  # public recipients; doctor's "proven in N days"
        }

    def _measured_lines(self) -> list[str]:
        if not self.measured_rpo_s:
            return []
        parts = [
            f"{name} {'no canary' if value is None else f'{value:.0f} s'}"
            for name, value in self.measured_rpo_s.items()
        ]
        return [f"- measured RPO (each part's end minus its newest canary): {', '.join(parts)}"]

    def to_json(self) -> str:
        """The full report as JSON."""
        return json.dumps(asdict(self), indent=2, default=str, ensure_ascii=False)

    def to_markdown(self) -> str:
        """The full report for people."""
        verdict = "PASSED" if self.passed else "FAILED"
        lines = [
            f"# Restore drill {self.drill_id}: {verdict}",
            "",
            f"- definition: `{self.definition}`, runtime: `{self.runtime}`"
            + (f", PostgreSQL {self.pg_major}" if self.pg_major else ""),
            f"- snapshot: `{self.snapshot_id}` taken {self.snapshot_time}",
            f"- started {self.started}, finished {self.finished}",
            f"- RPO (snapshot age at drill time): {self.rpo_s / 3600:.1f} h",
            *self._measured_lines(),
            f"- RTO (the whole restore): {self.restore_s:.1f} s"
            + (" (" + ", ".join(f"{k} {v:.1f} s" for k, v in self.rto_s.items()) + ")")
            * bool(self.rto_s),
        ]
        if self.error:
            lines += ["", f"**Error:** {self.error}"]
        lines += ["", "| check | result | detail |", "|---|---|---|"]
        for check in self.checks:
            lines.append(
                f"| {check.name} | {'pass' if check.passed else '**FAIL**'} | {check.detail} |"
            )
        failing = [c for c in self.checks if not c.passed and c.examples]
        for check in failing:
            lines += ["", f"## {check.name}", ""] + [f"- {e}" for e in check.examples]
        if self.phases_s:
            lines += ["", "| phase | seconds |", "|---|---|"]
            lines += [f"| {k} | {v:.1f} |" for k, v in self.phases_s.items()]
        return "\n".join(lines) + "\n"


def write_local(report: DrillReport, directory: Path) -> tuple[Path, Path]:
    """Write ``<id>.json`` and ``<id>.md`` into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    json_path = directory / f"{report.drill_id}.json"
    md_path = directory / f"{report.drill_id}.md"
    json_path.write_text(report.to_json())
    md_path.write_text(report.to_markdown())
    return json_path, md_path


def alert_payload(report: DrillReport, fmt: str) -> Any:
    """A Slack incoming-webhook message or an Alertmanager v2 alert list."""
    failed = [c.name for c in report.checks if not c.passed]
    text = f"drtool restore drill {report.drill_id} FAILED on snapshot {report.snapshot_id}: " + (
        report.error or ", ".join(failed) or "thresholds exceeded"
    )
    if fmt == "alertmanager":
        return [
            {
                "labels": {"alertname": "DrillFailed", "severity": "critical", "service": "drtool"},
                "annotations": {"summary": text, "drill_id": report.drill_id},
                "startsAt": report.finished or report.started,
            }
        ]
    return {"text": text}


def send_webhook(url: str, payload: Any, *, timeout: float = 10.0) -> None:
    """POST ``payload`` as JSON; raises OSError (HTTPError included) when it is not accepted.

    The URL is a secret (it may embed a token): it is never part of a message.
    """
    request = urllib.request.Request(
        url,
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read()
    except urllib.error.HTTPError as exc:
        raise OSError(f"the webhook answered HTTP {exc.code}") from None
    except OSError as exc:
        reason = getattr(exc, "reason", None) or exc.strerror or type(exc).__name__
        raise OSError(f"the webhook cannot be reached ({reason})") from None


def prometheus_textfile(report: DrillReport, path: Path) -> None:
    """Write the drill's metrics for node-exporter's textfile collector (atomically)."""
    lines = [
        "# HELP drtool_drill_result 1 when the last drill passed, 0 when it failed.",
        "# TYPE drtool_drill_result gauge",
        f'drtool_drill_result{{definition="{report.definition}"}} {int(report.passed)}',
        "# HELP drtool_drill_rpo_seconds Age of the drilled snapshot at drill time.",
        "# TYPE drtool_drill_rpo_seconds gauge",
        f'drtool_drill_rpo_seconds{{definition="{report.definition}"}} {report.rpo_s:.0f}',
        "# HELP drtool_drill_rto_seconds Restore time per component in the last drill.",
        "# TYPE drtool_drill_rto_seconds gauge",
    ]
    lines += [
        f'drtool_drill_rto_seconds{{definition="{report.definition}",component="{k}"}} {v:.3f}'
        for k, v in report.rto_s.items()
    ]
    measured = {k: v for k, v in report.measured_rpo_s.items() if v is not None}
    if measured:  # absent when no store held a canary (ADR 0012), never an invented 0
        lines += [
            "# HELP drtool_drill_measured_rpo_seconds Snapshot time minus the newest canary "
            "found in the restored store.",
            "# TYPE drtool_drill_measured_rpo_seconds gauge",
        ]
        lines += [
            f'drtool_drill_measured_rpo_seconds{{definition="{report.definition}",store="{k}"}}'
            f" {v:.0f}"
            for k, v in measured.items()
        ]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)


# -- report paths, checked when a definition is loaded ----------------------------------------


def check_report_paths(settings: ReportSettings, source: str) -> None:
    """Refuse report paths a drill could not use, before any drill runs.

    A passing drill never reads the webhook file and a broken path showed only when a drill
    failed, i.e. exactly when the alert mattered. Checked without side effects: the report
    directory need not exist yet, but the nearest existing directory above it must be
    writable by this process (the Compose drill service runs as uid 10001).
    """
    if settings.dir:
        _writable_dir(Path(settings.dir), f"{source}: report.dir")
    if settings.textfile:
        path = Path(settings.textfile)
        where = f"{source}: report.textfile {path}"
        if not path.parent.is_dir():
            raise ConfigError(f"{where}: the directory {path.parent} does not exist")
        if not os.access(path.parent, os.W_OK | os.X_OK):
            raise ConfigError(f"{where}: the directory {path.parent} is not writable{_uid()}")
    if settings.webhook_url_file:
        read_webhook_url(Path(settings.webhook_url_file), f"{source}: report.webhook_url_file")


def read_webhook_url(path: Path, where: str = "report.webhook_url_file") -> str:
    """The URL in the webhook file (a secret: never logged, never quoted in an error)."""
    try:
        url = path.read_text().strip()
    except FileNotFoundError:
        raise ConfigError(f"{where} {path}: file not found") from None
    except OSError as exc:
        raise ConfigError(f"{where} {path}: cannot read ({exc.strerror or exc})") from None
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"{where} {path}: does not hold an http(s) URL")
    return url


def _writable_dir(path: Path, where: str) -> None:
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{where} {path}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = (
            "is not writable"
            if existing == path
            else f"cannot be created: {existing} is not writable"
        )
        raise ConfigError(f"{where} {path}: {what}{_uid()}")


def _uid() -> str:
    return f" by uid {os.getuid()}"
