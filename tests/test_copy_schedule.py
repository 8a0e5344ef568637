"""The ``copy`` job kind: scheduled copies, jobs on the second repository, and the metrics
per repository (absent until a copy happened, ADR 0012)."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.repo_kit import RepoKit
from test_copy import DEST, copy_config, file_dest, three_snapshots

from drtool.config import load_config
from drtool.errors import ConfigError
from drtool.repository.ids import id_time
from drtool.services.scheduling import jobs as jobs_svc
from drtool.services.scheduling.metrics import Metrics
from drtool.services.scheduling.scheduler import Runner

SCHEDULE = f"""
[jobs.offsite]
kind = "copy"
repository = "{DEST}"
every = "1d"

[jobs.verify-offsite]
kind = "verify"
repository = "{DEST}"
snapshot = "all"
every = "1d"
"""


def write(directory: Path, body: str) -> Path:
    directory.mkdir(exist_ok=True)
    (directory / "copy.toml").write_text(body)
    return directory


def sample(metrics: Metrics, name: str) -> float | None:
    return metrics.registry.get_sample_value(name, {"repository": DEST})


def test_a_copy_job_copies_and_exports_metrics_per_repository(
    repo_kit: RepoKit, tmp_path: Path
) -> None:
    ids = three_snapshots(repo_kit)
    cfg = load_config(copy_config(repo_kit, file_dest(repo_kit)), {})
    specs = jobs_svc.load_schedules(write(tmp_path / "schedules", SCHEDULE))
    metrics = Metrics()
    runner = Runner(specs, cfg, home=tmp_path, env={}, metrics=metrics)
    assert sample(metrics, "drtool_copy_last_success_timestamp_seconds") is None
    copied = runner.run_once("offsite")
    assert copied.exit_code == 0, copied.message
    assert copied.snapshot == ids[-1]
    assert sample(metrics, "drtool_copy_last_success_timestamp_seconds") is not None
    assert sample(metrics, "drtool_copy_snapshots_copied") == 3
    assert (sample(metrics, "drtool_copy_uploaded_bytes") or 0) > 0
    newest = sample(metrics, "drtool_copy_newest_snapshot_timestamp_seconds")
    assert newest == id_time(ids[-1]).timestamp()
    verified = runner.run_once("verify-offsite")  # the second repository's own verify
    assert verified.exit_code == 0, verified.message
    again = runner.run_once("offsite")
    assert again.exit_code == 0 and sample(metrics, "drtool_copy_uploaded_objects") == 0
    restarted = Metrics()  # after a restart the time comes back from the job's state
    later = Runner(specs, cfg, home=tmp_path, env={}, metrics=restarted)
    later._metrics_from_state(
        later.specs["offsite"], jobs_svc.read_state(later.state_dir, "offsite")
    )
    assert sample(restarted, "drtool_copy_last_success_timestamp_seconds") is not None
    assert sample(restarted, "drtool_copy_uploaded_bytes") is None  # not persisted: absent


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ('[jobs.c]\nkind = "copy"\nevery = "1d"\n', "required for a copy job"),
        ('[jobs.b]\nkind = "backup"\nrepository = "x"\nevery = "1d"\n', "primary"),
    ],
)
def test_copy_jobs_need_a_destination(tmp_path: Path, body: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        jobs_svc.load_schedules(write(tmp_path / "s", body))


def test_an_unknown_repository_stops_the_scheduler_at_start(
    repo_kit: RepoKit, tmp_path: Path
) -> None:
    specs = jobs_svc.load_schedules(write(tmp_path / "s", SCHEDULE.replace(DEST, "nowhere")))
    with pytest.raises(ConfigError, match="no repository named 'nowhere'"):
        Runner(specs, repo_kit.config(), home=tmp_path, env={})
