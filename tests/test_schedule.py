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
import time
import tomllib
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import schedule
import tomli_w
from support.cli import DRTOOL, run_drtool, start_drtool
from support.clock import FakeClock
from support.servers import servers_required

from chat_stack.seed import SeedSizes
from chat_stack.seed import seed as seed_chat_data
from drtool.config import Config, load_config
from drtool.errors import ConfigError
from drtool.repository import access
from drtool.repository.locks import read_locks, repository_lock
from drtool.runtime import binaries
from drtool.runtime.local import LocalStack
from drtool.services import repo as repo_svc
from drtool.services import stack as stack_svc
from drtool.services.repo_setup import set_up_repository
from drtool.services.scheduling import jobs as jobs_svc
from drtool.services.scheduling import scheduler as svc
from drtool.services.scheduling.jobs import JobSpec, JobState
from drtool.services.scheduling.metrics import Metrics, MetricsServer

ROOT = Path(__file__).resolve().parent.parent
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
    assert list(specs) == ["postgres", "redis", "full", "base", "prune", "verify", "drill"]
    assert specs["postgres"].every_s == 6 * 3600 and specs["postgres"].components == ("postgres",)
    assert specs["redis"].every_s == 3600 and specs["redis"].threshold_s == 2 * 3600
    assert (specs["full"].at, specs["full"].timezone) == ("03:00", "Asia/Seoul")
    assert specs["full"].components == ("postgres", "redis", "minio")
    assert (specs["base"].at, specs["base"].components) == ("03:30", ("postgres-base",))
    assert specs["prune"].keep.daily == 7
    assert specs["verify"].kind == "verify" and specs["verify"].snapshot == "unverified"
    assert specs["verify"].read_data_subset == "4%"  # issue 18.9: every object within 25 days
    assert (specs["drill"].kind, specs["drill"].on, specs["drill"].at) == (
        "drill",
        "sunday",
        "04:00",
    )
    assert specs["drill"].describe() == "sunday 04:00 Asia/Seoul"
    scheduler = schedule.Scheduler()
    for spec in specs.values():
        svc.add_job(scheduler, spec, lambda: None)
    assert len(scheduler.get_jobs()) == 7 and not schedule.get_jobs()  # never the default one


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ('[jobs.a]\nkind = "backup"\nevery = "1h"\nat = "03:00"\n', "exactly one of"),
        ('[jobs.a]\nkind = "backup"\nevery = "soon"\n', "expected a duration"),
        ('[jobs.a]\nkind = "sync"\nevery = "1h"\n', "kind: expected one of"),
        ('[jobs.a]\nkind = "backup"\nevery = "1h"\ncolour = 1\n', "colour: unknown setting"),
        ('[jobs.a]\nkind = "prune"\nevery = "1d"\nkeep = {}\n', "keeps nothing"),
        ('[jobs.a]\nkind = "backup"\nat = "25:00"\n', "expected HH:MM"),
        ('[jobs.a]\nkind = "verify"\nat = "06:00"\nread_data_subset = "lots"\n', "a share like"),
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
        (base / "repository").mkdir()
        setup = set_up_repository(
            base, {"url": (base / "repository").as_uri()}, stores=stack_svc.stack_config(stack)
        )
        k = Kit(base, stack, setup.backup_doc)
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


@pytest.mark.slow
def test_loop_no_overlap_isolates_failures_tags_logs_and_serves_metrics(
    kit: Kit, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = kit.config("loop", pg_bin_dir=kit.slow_pg_bin(pause_s=2))
    (tmp_path / "drill.toml").write_text('name = "broken"\n')  # loads; fails: no identity
    specs = jobs_svc.load_schedules(
        write_schedule(
            tmp_path / "schedules",
            {
                # slower than its interval: triggers while it runs must not start it twice
                "pg": {"kind": "backup", "components": ["postgres"], "every": "1s"},
                # always fails (the backup config holds no identity): isolated, recorded
                "broken": {
                    "kind": "drill",
                    "every": "1s",
                    "definition": str(tmp_path / "drill.toml"),
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
    # the failing drill job's verdict carries its name; no other job has one
    assert re.findall(r"^drtool_drill_result\{.*$", text, re.M) == [
        'drtool_drill_result{job="broken"} 0.0'
    ]


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


def test_retries_back_off_exponentially_on_the_runners_clock(
    kit: Kit, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A job that meets a held lock is retried after 60 s, then 120 s; the lock is freed
    during the second wait and the third attempt succeeds. The fake clock makes the three
    minutes of backoff pass at once."""
    cfg = kit.config("retry")
    specs = jobs_svc.load_schedules(
        write_schedule(
            tmp_path / "schedules",
            {
                "redis": {
                    "kind": "backup",
                    "components": ["redis"],
                    "every": "1h",
                    "retries": 3,
                    "retry_backoff_s": 60,
                }
            },
        )
    )
    held = ExitStack()
    held.enter_context(repository_lock(access.storage_for(cfg), "test"))
    clock = FakeClock(on_sleep=lambda now: held.close() if now >= 60 + 120 else None)
    caplog.set_level(logging.INFO)
    try:
        runner = svc.Runner(specs, cfg, home=tmp_path, env={}, clock=clock, sleep=clock.sleep)
        runner.run(until=lambda r: r.completed["redis"] >= 1)
    finally:
        held.close()
    retries = [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()]
    assert retries == [
        "job redis: attempt 1 failed; retrying in 60 s (1 of 3)",
        "job redis: attempt 2 failed; retrying in 120 s (2 of 3)",
    ]
    assert clock.now == 180.0 and runner.completed == {"redis": 1}
    state = jobs_svc.read_state(Path(cfg.backup.state_dir), "redis")
    assert state.exit_code == 0 and state.failures_in_a_row == 0
    assert not read_locks(access.storage_for(cfg))


@pytest.mark.slow
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
    ok = run_drtool(*common, "run", "--schedule-dir", str(schedules), "--once", "redis")
    assert ok.returncode == 0, ok.stderr
    assert jobs_svc.read_state(state_dir, "redis").exit_code == 0

    # the repository is locked by a live holder (this process): prune fails with exit 11
    storage = access.storage_for(load_config(config, {}))
    with repository_lock(storage, "test"):
        failed = run_drtool(*common, "run", "--schedule-dir", str(schedules), "--once", "broken")
    assert failed.returncode == 11, failed.stderr
    assert "error:" in failed.stderr
    assert jobs_svc.read_state(state_dir, "broken").exit_code == 11

    unknown = run_drtool(*common, "run", "--schedule-dir", str(schedules), "--once", "nope")
    assert unknown.returncode == 10 and "not in the schedule" in unknown.stderr

    stale = run_drtool(*common, "health", "--schedule-dir", str(schedules))
    assert stale.returncode == 1
    assert "ok    redis" in stale.stdout and "STALE broken: never succeeded" in stale.stdout
    old = (datetime.now(UTC) - timedelta(days=3)).isoformat()
    jobs_svc.write_state(
        state_dir, JobState("broken", last_success=old, exit_code=11, message="locked")
    )
    stale = run_drtool(*common, "health", "--schedule-dir", str(schedules))
    assert stale.returncode == 1 and "older than 2d" in stale.stdout
    jobs_svc.write_state(state_dir, JobState("broken", last_success=datetime.now(UTC).isoformat()))
    healthy = run_drtool(*common, "health", "--schedule-dir", str(schedules))
    assert healthy.returncode == 0, healthy.stdout
    listed = run_drtool(*common, "list", "--schedule-dir", str(schedules), "--json")
    rows = {r["job"]: r for r in json.loads(listed.stdout)}
    assert rows["redis"]["last_success"] and rows["redis"]["next_run"] != "now (due)"


@pytest.mark.slow
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
    proc = start_drtool(
        *("schedule", "run", "--schedule-dir", str(schedules), "--metrics-port", "0"),
        *("--grace", "2"),
        config=config,
        home=tmp_path,
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
    assert rc == 143, stderr
    lines = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    assert any("aborting job pg" in entry["message"] for entry in lines), stderr
    assert valid_ids(cfg) == before
    assert [
        r.snapshot_id for r in repo_svc.list_records(cfg)
    ] == before  # nothing, not even INVALID
    assert not read_locks(access.storage_for(cfg))
    state = jobs_svc.read_state(Path(cfg.backup.state_dir), "pg")
    assert state.exit_code == 143 and state.last_success is None


def test_after_kill_9_health_is_not_ok_and_the_next_run_sweeps_the_lock(
    kit: Kit, tmp_path: Path
) -> None:
    """19.7: a scheduler killed outright (kill -9, OOM) is not reported as "started recently"."""
    slow = kit.slow_pg_bin(pause_s=600)
    config = kit.config_file("kill9", pg_bin_dir=slow)
    doc = tomllib.loads(config.read_text())
    del doc["postgres"]["bin_dir"]
    normal = tmp_path / "kill9-normal.toml"  # same repository and state dir, the real pg_dump
    normal.write_text(tomli_w.dumps(doc))
    cfg = load_config(normal, {})
    schedules = write_schedule(
        tmp_path / "schedules",
        {"pg": {"kind": "backup", "components": ["postgres"], "every": "1h"}},
    )
    (slow / "streaming").unlink(missing_ok=True)
    common = ["--config", str(config), "--home", str(tmp_path), "schedule"]
    health = [*common, "health", "--schedule-dir", str(schedules)]
    proc = subprocess.Popen(
        [str(DRTOOL), *common, "run", "--schedule-dir", str(schedules), "--metrics-port", "0"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: killed with its pg_dump, as in a container
    )
    try:
        wait_for(lambda: (slow / "streaming").exists(), "the backup to stream pg_dump output")
        running = run_drtool(*health)
        assert running.returncode == 0 and "the scheduler started recently" in running.stdout
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=WAIT_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    dead = run_drtool(*health)
    assert dead.returncode == 1, dead.stdout
    assert "started recently" not in dead.stdout
    assert f"no longer runs (process {proc.pid} is gone)" in dead.stdout
    [left] = read_locks(access.storage_for(cfg))
    assert left.pid == proc.pid  # the killed run could not release its lock

    once = run_drtool(
        "--config",
        str(normal),
        "--home",
        str(tmp_path),
        "schedule",
        "run",
        "--schedule-dir",
        str(schedules),
        "--once",
        "pg",
    )
    assert once.returncode == 0, once.stderr
    assert read_locks(access.storage_for(cfg)) == []  # swept by the next successful run


def test_a_second_sigterm_aborts_at_once_and_says_so(kit: Kit, tmp_path: Path) -> None:
    """The message names the second signal, not a grace period that had not run out."""
    slow = kit.slow_pg_bin(pause_s=600)
    config = kit.config_file("second-sigterm", pg_bin_dir=slow)
    schedules = write_schedule(
        tmp_path / "schedules",
        {"pg": {"kind": "backup", "components": ["postgres"], "every": "1h"}},
    )
    (slow / "streaming").unlink(missing_ok=True)
    log_path = tmp_path / "stderr.log"
    with log_path.open("w") as log_file:
        proc = subprocess.Popen(
            [str(DRTOOL), "--config", str(config), "--home", str(tmp_path), "schedule", "run",
             "--schedule-dir", str(schedules), "--metrics-port", "0", "--grace", "600"],
            stdout=subprocess.DEVNULL, stderr=log_file,
        )  # fmt: skip
        try:
            wait_for(lambda: (slow / "streaming").exists(), "the backup to stream")
            proc.send_signal(signal.SIGTERM)
            wait_for(lambda: "letting job pg finish" in log_path.read_text(), "the first SIGTERM")
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(timeout=WAIT_S)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    stderr = log_path.read_text()
    assert rc == 143, stderr  # SIGTERM (ADR 0008)
    messages = [json.loads(line)["message"] for line in stderr.splitlines() if line.startswith("{")]
    assert "aborting job pg: a second SIGTERM arrived" in messages, stderr
    assert stderr.strip().splitlines()[-1] == (
        "error: schedule: stopped; a job was aborted: a second SIGTERM arrived "
        "(no partial snapshot is listed)"
    )
    assert "grace period" not in stderr.replace("(up to 600 s)", "")


def test_sigterm_while_idle_stops_cleanly(kit: Kit, tmp_path: Path) -> None:
    config = kit.config_file("idle")
    state_dir = kit.dir / "state" / "idle"
    schedules = write_schedule(
        tmp_path / "schedules",
        {"redis": {"kind": "backup", "components": ["redis"], "every": "1h"}},
    )
    proc = start_drtool(
        *("schedule", "run", "--schedule-dir", str(schedules), "--metrics-port", "0"),
        config=config,
        home=tmp_path,
        stdout=subprocess.DEVNULL,
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
        (tmp_path / "drill.toml").write_text('name = "bad"\n')  # loads; fails: no identity
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
                        "definition": str(tmp_path / "drill.toml"),
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
