"""``drtool schedule``: schedule files, catch-up, the job loop, signals, health and metrics.

The loop runs real jobs (backup, verify, prune) against a real local stack and a ``file://``
repository, with intervals of seconds. A slow backup is made with a ``pg_dump`` wrapper in a
``postgres.bin_dir`` that streams the first bytes of the real dump, then pauses.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import schedule
import tomli_w
from conftest import servers_required

from chat_stack.seed import SeedSizes
from chat_stack.seed import seed as seed_chat_data
from drtool import keys
from drtool.config import Config, load_config
from drtool.errors import ConfigError
from drtool.repository import access
from drtool.repository.locks import read_locks, repository_lock
from drtool.runtime import binaries
from drtool.runtime.local import LocalStack
from drtool.services import repo as repo_svc
from drtool.services import stack as stack_svc
from drtool.services.scheduling import jobs as jobs_svc
from drtool.services.scheduling import scheduler as svc
from drtool.services.scheduling.jobs import JobSpec, JobState
from drtool.services.scheduling.metrics import Metrics, MetricsServer

ROOT = Path(__file__).resolve().parent.parent
DRTOOL = [str(Path(sys.executable).parent / "drtool")]
WAIT_S = 180.0  # generous: conditions are waited for, never timed


def wait_for(condition: Callable[[], bool], what: str, timeout: float = WAIT_S) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.2)


# -- schedule files (no servers) -------------------------------------------------------------


def test_shipped_schedules_load() -> None:
    specs = {s.name: s for s in jobs_svc.load_schedules(ROOT / "schedules")}
    assert list(specs) == ["postgres", "redis", "full", "prune", "verify", "drill"]
    assert specs["postgres"].every_s == 6 * 3600 and specs["postgres"].components == ("postgres",)
    assert specs["redis"].every_s == 3600 and specs["redis"].threshold_s == 2 * 3600
    assert (specs["full"].at, specs["full"].timezone) == ("03:00", "Asia/Seoul")
    assert specs["full"].components == ("postgres", "redis", "minio")
    assert specs["prune"].keep.daily == 7
    assert specs["verify"].kind == "verify" and specs["verify"].snapshot == "unverified"
    assert (specs["drill"].kind, specs["drill"].on, specs["drill"].at) == (
        "drill",
        "sunday",
        "04:00",
    )
    assert specs["drill"].describe() == "sunday 04:00 Asia/Seoul"
    scheduler = schedule.Scheduler()
    for spec in specs.values():
        svc.add_job(scheduler, spec, lambda: None)
    assert len(scheduler.get_jobs()) == 6 and not schedule.get_jobs()  # never the default one


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ('[jobs.a]\nkind = "backup"\nevery = "1h"\nat = "03:00"\n', "exactly one of"),
        ('[jobs.a]\nkind = "backup"\nevery = "soon"\n', "expected a duration"),
        ('[jobs.a]\nkind = "copy"\nevery = "1h"\n', "kind: expected one of"),
        ('[jobs.a]\nkind = "backup"\nevery = "1h"\ncolour = 1\n', "colour: unknown setting"),
        ('[jobs.a]\nkind = "prune"\nevery = "1d"\nkeep = {}\n', "keeps nothing"),
        ('[jobs.a]\nkind = "backup"\nat = "25:00"\n', "expected HH:MM"),
        ('[jobs.a]\nkind = "backup"\nat = "03:00"\ntimezone = "Mars/Base"\n', "unknown time zone"),
    ],
)
def test_bad_schedule_files_are_refused(tmp_path: Path, body: str, problem: str) -> None:
    (tmp_path / "s.toml").write_text(body)
    with pytest.raises(ConfigError, match=problem):
        jobs_svc.load_schedules(tmp_path)


def _registered(spec: JobSpec) -> schedule.Job:
    return svc.add_job(schedule.Scheduler(), spec, lambda: None)


def test_first_run_catches_up_a_missed_slot_only() -> None:
    now = datetime.now(UTC)
    hourly = JobSpec("h", "backup", every_s=3600)
    never = JobState("h")
    assert svc.first_run(hourly, _registered(hourly), never, now) is None
    late = JobState("h", last_success=(now - timedelta(hours=2)).isoformat())
    assert svc.first_run(hourly, _registered(hourly), late, now) is None
    recent = JobState("h", last_success=(now - timedelta(minutes=20)).isoformat())
    first = svc.first_run(hourly, _registered(hourly), recent, now)
    assert first is not None and abs(first - (now + timedelta(minutes=40))) < timedelta(seconds=2)

    daily = JobSpec("d", "backup", at="03:00", timezone="Asia/Seoul")
    job = _registered(daily)
    assert job.next_run is not None
    next_slot = job.next_run.astimezone(UTC)
    before_previous = JobState(
        "d", last_success=(next_slot - timedelta(days=1, minutes=1)).isoformat()
    )
    assert svc.first_run(daily, job, before_previous, now) is None
    after_previous = JobState("d", last_success=(next_slot - timedelta(hours=23)).isoformat())
    assert svc.first_run(daily, job, after_previous, now) == next_slot
    no_catch_up = JobSpec("d", "backup", at="03:00", catch_up=False)
    assert svc.first_run(no_catch_up, _registered(no_catch_up), JobState("d"), now) is not None


# -- a real stack, repository and backup config ----------------------------------------------


@dataclass
class Kit:
    """A running local stack, an initialised file:// repository and configs for it."""

    dir: Path
    stack: LocalStack
    sections: dict[str, object]

    def config_file(self, name: str, *, pg_bin_dir: Path | None = None) -> Path:
        """A backup config (optionally with a slow pg_dump) with its own state dir."""
        doc = json.loads(json.dumps(self.sections))
        doc["backup"] = {"state_dir": str(self.dir / "state" / name)}
        if pg_bin_dir is not None:
            doc["postgres"]["bin_dir"] = str(pg_bin_dir)
        path = self.dir / f"{name}.toml"
        path.write_text(tomli_w.dumps(doc))
        return path

    def config(self, name: str, **kw: Path) -> Config:
        return load_config(self.config_file(name, **kw), {})

    def slow_pg_bin(self, pause_s: int) -> Path:
        """A bin dir whose pg_dump streams 64 KiB of the real dump, pauses, then the rest.

        It touches ``<dir>/streaming`` when the pause starts.
        """
        real = binaries.pg_bin_dir()
        bin_dir = self.dir / f"slow-pg-{pause_s}"
        if bin_dir.exists():
            return bin_dir
        bin_dir.mkdir()
        (bin_dir / "pg_dumpall").symlink_to(real / "pg_dumpall")
        script = bin_dir / "pg_dump"
        script.write_text(
            "#!/bin/bash\n"
            "set -o pipefail\n"
            f'if [ "$1" = "--version" ]; then exec {real}/pg_dump "$@"; fi\n'
            f'{real}/pg_dump "$@" | {{ head -c 65536; touch {bin_dir}/streaming; '
            f"sleep {pause_s}; cat; }}\n"
        )
        script.chmod(0o755)
        return bin_dir


@pytest.fixture(scope="module")
def kit(runtime_root: Path) -> Iterator[Kit]:
    """Mirrors ``drtool demo``: keys, a seeded stack, an initialised repository."""
    base = runtime_root / f"sched-{uuid.uuid4().hex[:8]}"
    base.mkdir()
    with servers_required():
        stack = LocalStack.up(base / "stack", "sched")
    try:
        seed_chat_data(
            stack.endpoints, SeedSizes(users=10, rooms=3, messages=300, attachments=4), 1, False
        )
        (base / "keys").mkdir(mode=0o700)
        recipient = keys.write_identity(base / "keys" / "operator.key", passphrase=None)
        verify_key = keys.write_signing_key(base / "keys" / "signing.key")
        sections: dict[str, object] = {
            **stack_svc.stack_config(stack),
            "repository": {"url": (base / "repository").as_uri()},
            "keys": {
                "recipients": [recipient],
                "signing_key_file": str(base / "keys" / "signing.key"),
                "verify_key": verify_key,
            },
        }
        (base / "repository").mkdir()
        k = Kit(base, stack, sections)
        repo_svc.init_repo(k.config("init"))
        yield k
    finally:
        stack.down()


def write_schedule(directory: Path, jobs: dict[str, dict[str, object]]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "test.toml").write_text(tomli_w.dumps({"jobs": jobs}))
    return directory


def valid_ids(cfg: Config) -> list[str]:
    return [r.snapshot_id for r in repo_svc.list_records(cfg) if r.valid]


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return str(response.read().decode())


def test_loop_no_overlap_isolates_failures_tags_logs_and_serves_metrics(
    kit: Kit, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = kit.config("loop", pg_bin_dir=kit.slow_pg_bin(pause_s=2))
    specs = jobs_svc.load_schedules(
        write_schedule(
            tmp_path / "schedules",
            {
                # slower than its interval: triggers while it runs must not start it twice
                "pg": {"kind": "backup", "components": ["postgres"], "every": "1s"},
                # always fails (no drill service, or no such definition): isolated, recorded
                "broken": {
                    "kind": "drill",
                    "every": "1s",
                    "definition": str(tmp_path / "missing.toml"),
                    "retries": 0,
                },
                "check": {"kind": "verify", "every": "1s"},
            },
        )
    )
    metrics = Metrics()
    server = MetricsServer(metrics, "127.0.0.1", 0)
    caplog.set_level(logging.INFO)
    try:
        runner = svc.Runner(specs, cfg, home=tmp_path, env={}, metrics=metrics, grace_s=5)
        deadline = time.monotonic() + WAIT_S
        runner.run(until=lambda r: min(r.completed.values()) >= 3 or time.monotonic() > deadline)
        assert min(runner.completed.values()) >= 3, runner.completed
        text = scrape(server.port)
    finally:
        server.close()

    events = [
        (r.job, r.event)  # type: ignore[attr-defined]
        for r in caplog.records
        if getattr(r, "event", None) in ("job_started", "job_finished")
    ]
    for name in ("pg", "broken", "check"):
        mine = [e for _, e in events if _ == name]
        assert mine[::2] == ["job_started"] * len(mine[::2]), f"{name} overlapped: {mine}"
        assert mine[1::2] == ["job_finished"] * len(mine[1::2])
    finished = [
        r
        for r in caplog.records
        if getattr(r, "event", None) == "job_finished" and r.job == "pg"  # type: ignore[attr-defined]
    ]
    assert all(r.exit_code == 0 and r.snapshot for r in finished)  # type: ignore[attr-defined]
    backing_up = [r for r in caplog.records if r.getMessage() == "backing up postgres"]
    assert backing_up and all(getattr(r, "job", None) == "pg" and r.snapshot for r in backing_up)  # type: ignore[attr-defined]

    state_dir = Path(cfg.backup.state_dir)
    pg_state = jobs_svc.read_state(state_dir, "pg")
    assert pg_state.exit_code == 0 and pg_state.snapshot in valid_ids(cfg)
    broken = jobs_svc.read_state(state_dir, "broken")
    assert broken.exit_code not in (None, 0) and broken.last_success is None and broken.message
    assert broken.failures_in_a_row >= 3
    assert jobs_svc.read_state(state_dir, "check").exit_code == 0

    assert re.search(r'drtool_last_success_timestamp_seconds\{job="pg"\} [0-9.e+]+', text)
    assert re.search(r'drtool_job_duration_seconds\{job="check"\} ', text)
    assert re.search(r'drtool_backup_stored_bytes\{component="postgres"\} [1-9]', text)
    assert re.search(r'drtool_backup_plain_bytes\{component="postgres"\} [1-9]', text)
    assert re.search(r'drtool_snapshots\{status="VALID"\} [1-9]', text)
    assert re.search(r'drtool_job_failures_total\{cause="\w+",job="broken"\} [3-9]', text)
    assert "drtool_drill_result 0.0" in text


def test_missed_run_runs_once_at_start(kit: Kit, tmp_path: Path) -> None:
    cfg = kit.config("catchup")
    before = valid_ids(cfg)
    state_dir = Path(cfg.backup.state_dir)
    long_ago = (datetime.now(UTC) - timedelta(days=3)).isoformat()
    just_now = datetime.now(UTC).isoformat()
    jobs_svc.write_state(state_dir, JobState("late", last_success=long_ago, exit_code=0))
    jobs_svc.write_state(state_dir, JobState("fresh", last_success=just_now, exit_code=0))
    specs = jobs_svc.load_schedules(
        write_schedule(
            tmp_path / "schedules",
            {
                "late": {"kind": "backup", "components": ["redis"], "at": "03:00"},
                "fresh": {"kind": "backup", "components": ["redis"], "at": "03:00"},
            },
        )
    )
    runner = svc.Runner(specs, cfg, home=tmp_path, env={})
    deadline = time.monotonic() + WAIT_S
    runner.run(until=lambda r: r.completed["late"] >= 1 or time.monotonic() > deadline)
    assert runner.completed == {"late": 1, "fresh": 0}
    late = jobs_svc.read_state(state_dir, "late")
    assert late.exit_code == 0 and late.last_success != long_ago
    assert jobs_svc.read_state(state_dir, "fresh").last_success == just_now
    assert len(valid_ids(cfg)) == len(before) + 1


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*DRTOOL, *args],
        capture_output=True,
        text=True,
        timeout=WAIT_S,
        env={**os.environ, **(env or {})},
    )


def test_once_exits_with_the_jobs_code_and_health_flags_stale_jobs(
    kit: Kit, tmp_path: Path
) -> None:
    config = kit.config_file("once")
    state_dir = kit.dir / "state" / "once"
    schedules = write_schedule(
        tmp_path / "schedules",
        {
            "redis": {"kind": "backup", "components": ["redis"], "every": "1h"},
            "broken": {"kind": "prune", "every": "1d", "keep": {"daily": 7}},
        },
    )
    common = ["--config", str(config), "--home", str(tmp_path), "schedule"]
    ok = run_cli(*common, "run", "--schedule-dir", str(schedules), "--once", "redis")
    assert ok.returncode == 0, ok.stderr
    assert jobs_svc.read_state(state_dir, "redis").exit_code == 0

    # the repository is locked by a live holder (this process): prune fails with exit 11
    storage = access.storage_for(load_config(config, {}))
    with repository_lock(storage, "test"):
        failed = run_cli(*common, "run", "--schedule-dir", str(schedules), "--once", "broken")
    assert failed.returncode == 11, failed.stderr
    assert "error:" in failed.stderr
    assert jobs_svc.read_state(state_dir, "broken").exit_code == 11

    unknown = run_cli(*common, "run", "--schedule-dir", str(schedules), "--once", "nope")
    assert unknown.returncode == 10 and "not in the schedule" in unknown.stderr

    stale = run_cli(*common, "health", "--schedule-dir", str(schedules))
    assert stale.returncode == 1
    assert "ok    redis" in stale.stdout and "STALE broken: never succeeded" in stale.stdout
    old = (datetime.now(UTC) - timedelta(days=3)).isoformat()
    jobs_svc.write_state(
        state_dir, JobState("broken", last_success=old, exit_code=11, message="locked")
    )
    stale = run_cli(*common, "health", "--schedule-dir", str(schedules))
    assert stale.returncode == 1 and "older than 2d" in stale.stdout
    jobs_svc.write_state(state_dir, JobState("broken", last_success=datetime.now(UTC).isoformat()))
    healthy = run_cli(*common, "health", "--schedule-dir", str(schedules))
    assert healthy.returncode == 0, healthy.stdout
    listed = run_cli(*common, "list", "--schedule-dir", str(schedules), "--json")
    rows = {r["job"]: r for r in json.loads(listed.stdout)}
    assert rows["redis"]["last_success"] and rows["redis"]["next_run"] != "now (due)"


def test_sigterm_mid_backup_aborts_after_grace_and_lists_nothing_new(
    kit: Kit, tmp_path: Path
) -> None:
    slow = kit.slow_pg_bin(pause_s=600)
    config = kit.config_file("sigterm", pg_bin_dir=slow)
    cfg = load_config(config, {})
    before = valid_ids(cfg)
    schedules = write_schedule(
        tmp_path / "schedules",
        {"pg": {"kind": "backup", "components": ["postgres"], "every": "1h"}},
    )
    (slow / "streaming").unlink(missing_ok=True)
    log_file = (tmp_path / "stderr.log").open("w")
    proc = subprocess.Popen(
        [
            *DRTOOL,
            "--config",
            str(config),
            "--home",
            str(tmp_path),
            "schedule",
            "run",
            "--schedule-dir",
            str(schedules),
            "--metrics-port",
            "0",
            "--grace",
            "2",
        ],
        stdout=subprocess.DEVNULL,
        stderr=log_file,
    )
    try:
        wait_for(lambda: (slow / "streaming").exists(), "the backup to stream pg_dump output")
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=WAIT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log_file.close()
    stderr = (tmp_path / "stderr.log").read_text()
    assert rc == 130, stderr
    lines = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    assert any("aborting job pg" in entry["message"] for entry in lines), stderr
    assert valid_ids(cfg) == before
    assert [
        r.snapshot_id for r in repo_svc.list_records(cfg)
    ] == before  # nothing, not even INVALID
    assert not read_locks(access.storage_for(cfg))
    state = jobs_svc.read_state(Path(cfg.backup.state_dir), "pg")
    assert state.exit_code == 130 and state.last_success is None


def test_sigterm_while_idle_stops_cleanly(kit: Kit, tmp_path: Path) -> None:
    config = kit.config_file("idle")
    state_dir = kit.dir / "state" / "idle"
    schedules = write_schedule(
        tmp_path / "schedules",
        {"redis": {"kind": "backup", "components": ["redis"], "every": "1h"}},
    )
    proc = subprocess.Popen(
        [
            *DRTOOL,
            "--config",
            str(config),
            "--home",
            str(tmp_path),
            "schedule",
            "run",
            "--schedule-dir",
            str(schedules),
            "--metrics-port",
            "0",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(
            lambda: jobs_svc.read_state(state_dir, "redis").exit_code == 0, "the first redis backup"
        )
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=WAIT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stderr


def test_heartbeat_only_after_success(kit: Kit, tmp_path: Path) -> None:
    import http.server
    import threading

    hits: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hits.append(self.path)
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            return

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url_file = tmp_path / "hc_url"
        url_file.write_text(f"http://127.0.0.1:{server.server_address[1]}/ping/secret-token\n")
        specs = jobs_svc.load_schedules(
            write_schedule(
                tmp_path / "schedules",
                {
                    "good": {
                        "kind": "backup",
                        "components": ["redis"],
                        "every": "1h",
                        "heartbeat_url_file": str(url_file),
                    },
                    "bad": {
                        "kind": "drill",
                        "every": "1h",
                        "definition": str(tmp_path / "missing.toml"),
                        "heartbeat_url_file": str(url_file),
                    },
                },
            )
        )
        runner = svc.Runner(specs, kit.config("heartbeat"), home=tmp_path, env={})
        assert runner.run_once("bad").exit_code != 0
        assert hits == []
        assert runner.run_once("good").exit_code == 0
        assert hits == ["/ping/secret-token"]
    finally:
        server.shutdown()
        server.server_close()
