"""Schedule files and job state at load: every mistake stops ``schedule run`` before it starts.

These need no servers: loading is pure parsing (plus the drill definition files it names).
The job loop itself is tested in test_schedule.py.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from drtool.config import BackupConfig, Config
from drtool.errors import ConfigError
from drtool.services.scheduling import jobs as jobs_svc
from drtool.services.scheduling import scheduler as svc

ROOT = Path(__file__).resolve().parent.parent
DRTOOL = str(Path(sys.executable).parent / "drtool")
JOB = '[jobs.a]\nkind = "backup"\nevery = "1h"\n'


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ('[jobs.a]\nkind = "prune"\nevery = "1d"\n', r"jobs\.a\.keep: required for a prune job"),
        (JOB + 'enabled = "false"\n', r"jobs\.a\.enabled: expected true or false \(got 'false'\)"),
        (JOB + 'retries = "2"\n', r"jobs\.a\.retries: expected a whole number \(got '2'\)"),
        (JOB + "jitter_s = -5\n", r"jobs\.a\.jitter_s: expected a whole number >= 0 \(got -5\)"),
        (JOB + "catch_up = 1\n", r"jobs\.a\.catch_up: expected true or false \(got 1\)"),
        (JOB + 'components = "redis"\n', r"components: expected a list of strings \(got 'redis'\)"),
        (
            JOB + 'snapshot = "newest"\n',
            r"snapshot: expected one of latest, all, unverified \(got 'newest'\)",
        ),
        ('[defaults]\nretries = "x"\n' + JOB, r"defaults\.retries: expected a whole number"),
        ("[defaults]\ncolour = 1\n" + JOB, r"defaults\.colour: unknown setting"),
        ('[jobs.a]\nkind = "prune"\nevery = "1d"\nkeep = { daily = "7" }\n', r"keep\.daily: "),
        ('[jobs.a]\nkind = "prune"\nevery = "1d"\nkeep = { dayly = 7 }\n', r"keep\.dayly: unknown"),
        ('[jobs.a]\nevery = "1d"\n', r"jobs\.a\.kind: expected one of"),
    ],
)
def test_mistyped_or_missing_values_fail_at_load(tmp_path: Path, body: str, problem: str) -> None:
    (tmp_path / "s.toml").write_text(body)
    with pytest.raises(ConfigError, match=problem):
        jobs_svc.load_schedules(tmp_path)


def test_a_disabled_job_is_skipped_only_when_enabled_is_a_real_false(tmp_path: Path) -> None:
    (tmp_path / "s.toml").write_text(JOB + "enabled = false\n" + JOB.replace("jobs.a", "jobs.b"))
    assert [s.name for s in jobs_svc.load_schedules(tmp_path)] == ["b"]


def test_a_drill_job_whose_definition_is_missing_fails_at_load(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "weekly.toml"
    (tmp_path / "s.toml").write_text(
        f'[jobs.drill]\nkind = "drill"\nat = "04:00"\ndefinition = "{missing}"\n'
    )
    with pytest.raises(ConfigError, match=r"jobs\.drill\.definition: .*file not found"):
        jobs_svc.load_schedules(tmp_path)


def test_a_drill_job_whose_definition_is_bad_fails_at_load(tmp_path: Path) -> None:
    definition = tmp_path / "weekly.toml"
    definition.write_text('runtime = "docker"\n[thresholds]\nmax_rto_s = "15m"\n')
    (tmp_path / "s.toml").write_text(
        f'[jobs.drill]\nkind = "drill"\nat = "04:00"\ndefinition = "{definition}"\n'
    )
    with pytest.raises(ConfigError, match=r"thresholds\.max_rto_s: expected a number"):
        jobs_svc.load_schedules(tmp_path)


def test_prune_without_keep_exits_2_with_one_line(tmp_path: Path) -> None:
    """It was ``internal error: KeyError: 'keep'`` with exit 1."""
    schedules = tmp_path / "schedules"
    schedules.mkdir()
    (schedules / "s.toml").write_text('[jobs.prune]\nkind = "prune"\nat = "05:00"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("DRTOOL_")}
    result = subprocess.run(
        [DRTOOL, "--home", str(tmp_path), "schedule", "list", "--schedule-dir", str(schedules)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: ") and "jobs.prune.keep: required for a prune job" in line


@pytest.mark.parametrize(
    "content",
    [
        '{"job": "a", "last_success": "yesterday"}',
        '{"job": "a", "last_attempt": "2026-13-45T99:00:00+00:00"}',
        '{"job": "a", "last_success": "2026-12-01T03:00:00"}',  # no zone: cannot be compared
        '{"job": "a", "failures_in_a_row": "two"}',
        '["not", "an", "object"]',
        "{ half",
    ],
    ids=["word", "impossible-date", "naive", "wrong-type", "array", "broken-json"],
)
def test_a_bad_state_file_is_ignored_and_rewritten_with_a_warning(
    tmp_path: Path, content: str, caplog: pytest.LogCaptureFixture
) -> None:
    """It made ``schedule run`` exit 1 at start: a crash loop in a container."""
    cfg = Config(backup=BackupConfig(state_dir=str(tmp_path / "state")))
    path = jobs_svc.state_path(tmp_path / "state", "a")
    path.parent.mkdir(parents=True)
    path.write_text(content)
    spec = jobs_svc.JobSpec("a", "backup", every_s=3600)
    with caplog.at_level(logging.WARNING):
        [row] = svc.job_rows([spec], cfg, tmp_path)
    assert row.next_run == "now (due)" and row.last_success is None
    assert any(
        "unreadable" in r.getMessage() and "rewriting" in r.getMessage() for r in caplog.records
    )
    assert json.loads(path.read_text())["last_success"] is None
    assert jobs_svc.read_state(tmp_path / "state", "a") == jobs_svc.JobState("a")


def test_shipped_drill_schedule_loads_with_its_definition() -> None:
    specs = jobs_svc.load_schedules(ROOT / "schedules")
    [drill] = [s for s in specs if s.kind == "drill"]
    assert (ROOT / drill.definition).is_file() or Path(drill.definition).is_file()
