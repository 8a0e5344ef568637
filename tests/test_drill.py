"""Restore drills on the ``local`` runtime against real servers: a passing drill, damaged and
inconsistent snapshots, thresholds, alerts, the production guard, and drills that are killed.
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psycopg
import pytest
from support.cli import run_drtool, start_drtool
from support.compare import execute
from support.processes import processes_in
from support.stacks import Repository, make_repository, source_stack

from drtool.config import load_config
from drtool.drills import watchdog as watchdog_module
from drtool.drills.definition import DrillDefinition, ReportSettings, Thresholds
from drtool.drills.report import DrillReport
from drtool.endpoints import PostgresEndpoint, S3Endpoint
from drtool.errors import UsageError
from drtool.repository.catalog import SnapshotRecord
from drtool.repository.ids import new_id
from drtool.repository.manifest import ComponentEntry, Manifest
from drtool.runtime import binaries
from drtool.runtime.local import LocalStack
from drtool.s3session import s3_client
from drtool.services.drill import choose_snapshot, guard_production, run_drill

pytestmark = pytest.mark.slow  # every test runs a restore drill into scratch stacks

CHECKS = [
    "postgres fingerprints equal the snapshot's",
    "redis fingerprints equal the snapshot's",
    "minio fingerprints equal the snapshot's",
    "attachments have their objects",
    "latest messages readable",
    "redis points to existing rows",
    "RTO within threshold",
    "RPO within threshold",
]
# Long enough for any drill of the small snapshot here; a drill that hangs fails the test.
PATIENCE = 300.0


@dataclass(frozen=True)
class World:
    """A seeded source stack and a repository holding one snapshot of it."""

    repo: Repository
    snapshot_id: str
    config: Path


@pytest.fixture(scope="module")
def world(
    tmp_path_factory: pytest.TempPathFactory, pg_server: PostgresEndpoint, s3_server: S3Endpoint
) -> Iterator[World]:
    """2,000 messages and 20 attachments, one snapshot, and an operator config."""
    directory = tmp_path_factory.mktemp("drill")
    with source_stack(directory, pg_server, s3_server) as source:
        repo = make_repository(directory / "repo", source)
        snapshot_id = repo.backup()
        yield World(repo, snapshot_id, repo.operator_config(directory / "operator.toml"))


@pytest.fixture
def home() -> Iterator[Path]:
    """A short drtool home (PostgreSQL's socket path has a 107-byte limit) that the postgres
    user can enter (the local stack drops to it when we are root)."""
    directory = Path(tempfile.mkdtemp(prefix="drill-"))
    directory.chmod(0o711)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def definition_file(path: Path, reports: Path, extra: str = "") -> Path:
    """A drill definition TOML with its reports under ``reports``."""
    path.write_text(f'name = "test"\n{extra}\n[report]\ndir = "{reports}"\n')
    return path


def check(report: dict[str, Any] | DrillReport, name: str) -> dict[str, Any]:
    """The named check of a report (JSON document or object)."""
    doc = json.loads(report.to_json()) if isinstance(report, DrillReport) else report
    matches = [c for c in doc["checks"] if c["name"] == name]
    assert matches, f"no check {name!r} in {[c['name'] for c in doc['checks']]}"
    return matches[0]


def test_a_passing_drill_is_reported_stored_and_listed(
    world: World, tmp_path: Path, home: Path
) -> None:
    reports = tmp_path / "reports"
    definition = definition_file(tmp_path / "drill.toml", reports)
    run = run_drtool("drill", "run", "--definition", str(definition), "--json",
                     config=world.config, home=home)  # fmt: skip
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["passed"] is True and report["error"] == ""
    assert report["snapshot_id"] == world.snapshot_id
    assert [c["name"] for c in report["checks"]] == CHECKS
    assert all(c["passed"] for c in report["checks"]), report["checks"]
    assert set(report["rto_s"]) == {"postgres", "redis", "minio"}
    assert set(report["phases_s"]) == {"up", "restore", "checks", "down"}
    drill_id = report["drill_id"]
    assert json.loads((reports / f"{drill_id}.json").read_text())["passed"] is True
    assert "PASSED" in (reports / f"{drill_id}.md").read_text()
    stored = world.repo.directory / "repository" / "drills" / drill_id
    assert json.loads((stored / "summary.json").read_text())["passed"] is True
    assert (stored / "report.json.zst.age").stat().st_size > 0
    history = run_drtool("drill", "history", "--json", config=world.config, home=home)
    assert history.returncode == 0, history.stderr
    listed = {d["drill_id"]: d for d in json.loads(history.stdout)}
    assert listed[drill_id]["passed"] is True
    assert listed[drill_id]["failed_checks"] == []
    assert not (home / "drills" / drill_id).exists()
    assert processes_in(home) == []


def test_a_corrupted_blob_fails_the_drill_naming_the_object(
    world: World, tmp_path: Path, home: Path
) -> None:
    copy = tmp_path / "repository"
    shutil.copytree(world.repo.directory / "repository", copy)
    blob = sorted((copy / "blobs").rglob("*.zst.age"))[0]
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x01
    blob.write_bytes(bytes(data))
    config = world.repo.operator_config(tmp_path / "op.toml", url=copy.as_uri())
    reports = tmp_path / "reports"
    definition = definition_file(tmp_path / "drill.toml", reports)
    run = run_drtool("drill", "run", "--definition", str(definition), config=config, home=home)
    assert run.returncode == 6, run.stderr
    name = f"blobs/{blob.parent.name}/{blob.name}"
    assert name in run.stderr.strip().splitlines()[-1]
    (json_report,) = reports.glob("*.json")
    report = json.loads(json_report.read_text())
    assert report["passed"] is False
    failed = check(report, "snapshot restores")
    assert failed["passed"] is False
    assert name in failed["detail"] and name in failed["examples"][0]
    markdown = json_report.with_suffix(".md").read_text()
    assert "| snapshot restores | **FAIL** |" in markdown and name in markdown
    assert processes_in(home) == []


def test_a_missing_attachment_object_is_caught(
    tmp_path: Path, home: Path, pg_server: PostgresEndpoint, s3_server: S3Endpoint
) -> None:
    """The object went missing before the backup: the snapshot agrees with itself, the
    attachment row does not."""
    with source_stack(tmp_path / "source", pg_server, s3_server) as source:
        row = execute(source.postgres, "SELECT object_key FROM attachments ORDER BY id LIMIT 1")
        key = row[0]
        s3_client(source.minio).delete_object(Bucket=source.buckets[0], Key=key)
        repo = make_repository(tmp_path / "repo", source)
        repo.backup()
        cfg = load_config(repo.operator_config(tmp_path / "operator.toml"), {})
        spec = DrillDefinition(report=ReportSettings(dir=str(tmp_path / "reports")))
        report = run_drill(cfg, home=home, spec=spec)
    assert report.passed is False
    failed = check(report, "attachments have their objects")
    assert failed["passed"] is False
    assert failed["figures"]["missing"] == 1
    assert failed["figures"]["present"] == failed["figures"]["rows"] - 1  # counts, not a flag
    assert failed["examples"] == [f"missing object {key}"]
    for name in CHECKS[:3]:
        assert check(report, name)["passed"] is True, name


@contextmanager
def webhook_receiver() -> Iterator[tuple[str, list[Any]]]:
    """An HTTP server on 127.0.0.1 collecting the JSON bodies POSTed to it."""
    received: list[Any] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append(json.loads(body))
            self.send_response(200)
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook", received
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_exceeded_rto_fails_alerts_and_writes_metrics(
    world: World, tmp_path: Path, home: Path
) -> None:
    textfile = tmp_path / "drtool.prom"
    with webhook_receiver() as (url, received):
        (tmp_path / "hook").write_text(url + "\n")
        spec = DrillDefinition(
            name="weekly",
            thresholds=Thresholds(max_rto_s=0.001),
            report=ReportSettings(
                dir=str(tmp_path / "reports"),
                webhook_url_file=str(tmp_path / "hook"),
                textfile=str(textfile),
            ),
        )
        report = run_drill(load_config(world.config, {}), home=home, spec=spec)
    assert report.passed is False
    assert [c.name for c in report.checks if not c.passed] == ["RTO within threshold"]
    assert check(report, "RTO within threshold")["figures"]["max_rto_s"] == 0.001
    assert len(received) == 1
    text = received[0]["text"]
    assert text.startswith(f"drtool restore drill {report.drill_id} FAILED on snapshot ")
    assert "RTO within threshold" in text
    metrics = textfile.read_text()
    assert 'drtool_drill_result{definition="weekly"} 0\n' in metrics
    assert 'drtool_drill_rto_seconds{definition="weekly",component="postgres"}' in metrics


def test_exceeded_rpo_fails_with_an_alertmanager_alert(
    world: World, tmp_path: Path, home: Path
) -> None:
    with webhook_receiver() as (url, received):
        (tmp_path / "hook").write_text(url)
        spec = DrillDefinition(
            thresholds=Thresholds(max_rpo_s=3600),
            report=ReportSettings(
                dir=str(tmp_path / "reports"),
                webhook_url_file=str(tmp_path / "hook"),
                webhook_format="alertmanager",
            ),
        )
        cfg = load_config(world.config, {})
        later = datetime.now(UTC) + timedelta(hours=2)  # the snapshot is minutes old
        report = run_drill(cfg, home=home, spec=spec, now=later)
    assert [c.name for c in report.checks if not c.passed] == ["RPO within threshold"]
    assert report.rpo_s >= 7200
    (alerts,) = received
    assert alerts[0]["labels"] == {
        "alertname": "DrillFailed",
        "severity": "critical",
        "service": "drtool",
    }
    assert alerts[0]["annotations"]["drill_id"] == report.drill_id
    assert "RPO within threshold" in alerts[0]["annotations"]["summary"]


def test_guard_refuses_the_production_endpoints(world: World, tmp_path: Path, home: Path) -> None:
    cfg = load_config(world.config, {})
    production = cfg.stack()
    with pytest.raises(UsageError, match=r"scratch postgres endpoint .* is the production one"):
        guard_production(production, production)
    before = execute(world.repo.source.postgres, "SELECT count(*) FROM messages")
    # a runtime that hands back the production stack: the drill refuses before restoring
    report = run_drill(
        cfg,
        home=home,
        spec=DrillDefinition(report=ReportSettings(dir=str(tmp_path / "reports"))),
        scratch=lambda home, drill_id, spec, pg_major: nullcontext(production),
    )
    assert report.passed is False
    assert "is the production one; refusing" in report.error
    assert report.checks == []
    assert execute(world.repo.source.postgres, "SELECT count(*) FROM messages") == before


def start_drill(world: World, tmp_path: Path, home: Path) -> subprocess.Popen[str]:
    """``drtool drill run`` in the background."""
    definition = definition_file(tmp_path / "drill.toml", tmp_path / "reports")
    return start_drtool(
        "drill", "run", "--definition", str(definition), config=world.config, home=home
    )


def restoring(home: Path) -> bool:
    """Whether a drill under ``home`` is restoring: its PostgreSQL holds a staging database."""
    for state in (home / "drills").glob("*/stack.json"):
        try:
            endpoint = LocalStack.load(state.parent).endpoints.postgres
            with psycopg.connect(**endpoint.connect_kwargs("postgres"), connect_timeout=1) as conn:
                names = [r[0] for r in conn.execute("SELECT datname FROM pg_database")]
        except Exception:  # not up yet, or already gone
            continue
        known = {"postgres", "cotalk", "template0", "template1"}
        if any(name not in known for name in names):
            return True
    return False


def wait_until_restoring(proc: subprocess.Popen[str], home: Path) -> None:
    deadline = time.monotonic() + PATIENCE
    while not restoring(home):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            _, err = proc.communicate()
            pytest.fail(f"the drill never was seen restoring (exit {proc.returncode}):\n{err}")
        time.sleep(0.05)


def test_sigterm_mid_restore_tears_the_stack_down(world: World, tmp_path: Path, home: Path) -> None:
    proc = start_drill(world, tmp_path, home)
    wait_until_restoring(proc, home)
    stacks = list((home / "drills").iterdir())
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=PATIENCE)
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1] == "error: interrupted"
    assert stacks and not any(s.exists() for s in stacks)
    assert processes_in(home) == []


def test_sigkill_leaves_a_stack_that_cleanup_stops(
    world: World, tmp_path: Path, home: Path
) -> None:
    proc = start_drill(world, tmp_path, home)
    wait_until_restoring(proc, home)
    # 19.13: while the drill runs, cleanup leaves its stack alone
    running = run_drtool("drill", "cleanup", config=world.config, home=home)
    assert running.returncode == 0, running.stderr
    assert "removed" not in running.stdout
    assert f"its drill runs ({socket.gethostname()}/{proc.pid}" in running.stdout
    proc.kill()
    proc.communicate(timeout=PATIENCE)
    (stack,) = (p for p in (home / "drills").iterdir() if p.is_dir())
    assert processes_in(stack) != []
    run = run_drtool("drill", "cleanup", config=world.config, home=home)
    assert run.returncode == 0, run.stderr
    assert f"removed local stack {stack.name}" in run.stdout.splitlines()
    assert not stack.exists()
    assert processes_in(stack) == []
    again = run_drtool("drill", "cleanup", config=world.config, home=home)
    assert again.returncode == 0 and "local stack" not in again.stdout


def _record(snapshot_id: str, *stores: str) -> SnapshotRecord:
    entries = tuple(ComponentEntry(store, (), 0, 0.0) for store in stores)
    manifest = Manifest("repo", snapshot_id, "s", "f", "nas", "co-talk", "0.1.0", entries)
    return SnapshotRecord(snapshot_id, manifest, "0" * 64, None)


def test_drill_picks_a_snapshot_holding_every_store_it_drills() -> None:
    """With the shipped schedule the newest snapshots hold Redis only; the drill skips them."""
    now = datetime(2026, 11, 22, 4, 0, tzinfo=UTC)
    full = _record("20261122T030000Z-0001", "postgres", "redis", "minio")
    records = [
        _record("20261121T210000Z-0001", "postgres"),
        full,
        _record("20261122T033000Z-0001", "redis"),
    ]
    assert choose_snapshot(records, DrillDefinition(), None, now).record is full
    for _ in range(20):
        assert (
            choose_snapshot(records, DrillDefinition(snapshot="random-within:7d"), None, now).record
            is full
        )
    pg = DrillDefinition(components=("postgres",))
    assert choose_snapshot(records, pg, None, now).record is full
    none = choose_snapshot(records[2:], replace(pg, snapshot="random-within:1d"), None, now)
    assert none.record is None
    assert none.skipped[0].startswith("no valid snapshot holding postgres within the last")


# -- report paths (issue 19.11) -----------------------------------------------------------------


HOOK = "report.webhook_url_file {d}/"
BROKEN_REPORT_PATHS = [
    ('webhook_url_file = "{d}/no-such-hook"', HOOK + "no-such-hook: file not found"),
    ('webhook_url_file = "{d}/not-a-url"', HOOK + "not-a-url: does not hold an http(s) URL"),
    (
        'textfile = "{d}/no-such-dir/drtool.prom"',
        "report.textfile {d}/no-such-dir/drtool.prom: the directory {d}/no-such-dir does not exist",
    ),
    ('dir = "{d}/a-file/reports"', "report.dir {d}/a-file/reports: {d}/a-file is not a directory"),
]


@pytest.mark.parametrize(("report", "problem"), BROKEN_REPORT_PATHS)
def test_broken_report_paths_are_refused_when_the_definition_loads(
    world: World, tmp_path: Path, home: Path, report: str, problem: str
) -> None:
    """A passing drill never reads them: checked at load, the mistake shows before it matters."""
    (tmp_path / "not-a-url").write_text("hooks.example/T0/secret-token\n")
    (tmp_path / "a-file").write_text("")
    definition = tmp_path / "drill.toml"
    definition.write_text(f'name = "test"\n[report]\n{report.format(d=tmp_path)}\n')
    run = run_drtool(
        "drill", "run", "--definition", str(definition), config=world.config, home=home
    )
    assert run.returncode == 2, run.stderr
    assert (
        run.stderr.strip().splitlines()[-1] == f"error: {definition}: {problem.format(d=tmp_path)}"
    )
    assert "Traceback" not in run.stderr and "secret-token" not in run.stderr
    assert not (home / "drills").exists() or not any((home / "drills").iterdir())


def test_a_broken_channel_never_stops_the_alert(
    world: World, tmp_path: Path, home: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The local report directory and the textfile's directory break after the definition
    loaded (a full or unmounted disk): the failed drill still alerts and is stored."""
    (tmp_path / "a-file").write_text("")
    with webhook_receiver() as (url, received):
        (tmp_path / "hook").write_text(url)
        spec = DrillDefinition(
            thresholds=Thresholds(max_rto_s=0.001),
            report=ReportSettings(
                dir=str(tmp_path / "a-file" / "reports"),
                webhook_url_file=str(tmp_path / "hook"),
                textfile=str(tmp_path / "gone" / "drtool.prom"),
            ),
        )
        report = run_drill(load_config(world.config, {}), home=home, spec=spec)
    assert report.passed is False
    (alert,) = received
    assert alert["text"].startswith(f"drtool restore drill {report.drill_id} FAILED")
    stored = world.repo.directory / "repository" / "drills" / report.drill_id
    assert json.loads((stored / "summary.json").read_text())["passed"] is False
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any(f"drill {report.drill_id}: local report not delivered" in e for e in errors), errors
    assert any(f"drill {report.drill_id}: textfile not delivered" in e for e in errors), errors


def test_an_unreachable_webhook_is_an_error_in_the_log_and_the_rest_is_delivered(
    world: World, tmp_path: Path, home: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with webhook_receiver() as (url, _):
        pass  # the port is closed again: nothing listens there
    (tmp_path / "hook").write_text(url)
    textfile = tmp_path / "drtool.prom"
    spec = DrillDefinition(
        thresholds=Thresholds(max_rto_s=0.001),
        report=ReportSettings(
            dir=str(tmp_path / "reports"),
            webhook_url_file=str(tmp_path / "hook"),
            textfile=str(textfile),
        ),
    )
    report = run_drill(load_config(world.config, {}), home=home, spec=spec)
    assert report.passed is False
    assert "drtool_drill_result" in textfile.read_text()
    assert (tmp_path / "reports" / f"{report.drill_id}.json").exists()
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    (error,) = [e for e in errors if "webhook not delivered" in e]
    assert "cannot be reached" in error and url not in error


# -- a drill that stalls (issue 19.12, part) ----------------------------------------------------


def stalling_pg_bin(directory: Path) -> Path:
    """PostgreSQL client tools whose pg_restore never finishes (answers --version)."""
    real = binaries.pg_bin_dir()
    directory.mkdir()
    for tool in real.iterdir():
        if tool.name != "pg_restore":
            (directory / tool.name).symlink_to(tool)
    script = directory / "pg_restore"
    script.write_text(
        "#!/bin/bash\n"
        f'if [ "$1" = "--version" ]; then exec {real}/pg_restore "$@"; fi\n'
        "while :; do sleep 0.2; done\n"
    )
    script.chmod(0o755)
    return directory


def test_a_stalled_drill_is_stopped_at_its_deadline_naming_the_phase(
    world: World,
    tmp_path: Path,
    home: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The restore hangs: progress is logged, the deadline stops the drill, the stack goes,
    and the report (locally and in history) says where it was stuck; the RTO counts the
    whole restore up to then."""
    monkeypatch.setattr(watchdog_module, "PROGRESS_S", 2.0)
    caplog.set_level(logging.INFO)
    slow = stalling_pg_bin(tmp_path / "slow-pg")
    cfg = load_config(world.config, {})
    cfg = replace(cfg, postgres=replace(cfg.postgres, bin_dir=str(slow)))
    spec = DrillDefinition(report=ReportSettings(dir=str(tmp_path / "reports")))
    # long enough for the scratch stack to come up: the restore, which never ends, is hit
    report = run_drill(cfg, home=home, spec=spec, deadline_s=30)
    assert report.passed is False
    assert report.error == (
        f"the drill's deadline of 30 s passed while restoring snapshot {report.snapshot_id}"
    )
    assert report.restore_s > 0 and report.phases_s["restore"] == report.restore_s
    progress = [r.getMessage() for r in caplog.records if "restoring snapshot" in r.getMessage()]
    assert any(" for " in m and "deadline in" in m for m in progress), progress
    saved = json.loads((tmp_path / "reports" / f"{report.drill_id}.json").read_text())
    assert saved["error"] == report.error
    history = run_drtool("drill", "history", "--json", config=world.config)
    (entry,) = [d for d in json.loads(history.stdout) if d["drill_id"] == report.drill_id]
    assert entry["error"] == report.error and entry["passed"] is False
    assert processes_in(home) == [] and processes_in(slow) == []


def test_a_drill_that_skips_what_it_should_prove_fails_with_a_report(
    world: World, tmp_path: Path, home: Path
) -> None:
    """Issue 18.11: a newer INVALID snapshot passed over, an invalid snapshot named, no valid
    snapshot at all: each is a failed drill (exit 6) with a report, a history entry, the
    webhook and the metric, naming what was skipped and why."""
    copy = tmp_path / "repository"
    shutil.copytree(world.repo.directory / "repository", copy)
    # a newer snapshot whose manifest is another snapshot's: INVALID
    newer = new_id(datetime.now(UTC) + timedelta(minutes=1))
    shutil.copytree(copy / "snapshots" / world.snapshot_id, copy / "snapshots" / newer)
    config = world.repo.operator_config(tmp_path / "op.toml", url=copy.as_uri())
    reports, textfile = tmp_path / "reports", tmp_path / "drtool.prom"
    with webhook_receiver() as (url, received):
        (tmp_path / "hook").write_text(url + "\n")
        definition = tmp_path / "drill.toml"
        definition.write_text(
            'name = "weekly"\n[report]\n'
            f'dir = "{reports}"\nwebhook_url_file = "{tmp_path / "hook"}"\n'
            f'textfile = "{textfile}"\n'
        )

        def drill(*args: str) -> dict[str, Any]:
            run = run_drtool("drill", "run", "--definition", str(definition), "--json", *args,
                             config=config, home=home)  # fmt: skip
            assert run.returncode == 6, (run.returncode, run.stderr)
            assert "Traceback" not in run.stderr
            report: dict[str, Any] = json.loads(run.stdout)
            assert report["passed"] is False
            assert (reports / f"{report['drill_id']}.json").exists()
            assert 'drtool_drill_result{definition="weekly"} 0' in textfile.read_text()
            textfile.unlink()
            return report

        # 1. latest: the newer INVALID one is passed over; the older one is drilled (and
        #    restores), but the drill fails naming what it skipped and why
        report = drill()
        assert report["snapshot_id"] == world.snapshot_id
        skipped = check(report, "newest snapshot drilled")
        assert skipped["passed"] is False
        assert skipped["detail"].startswith(f"passed over {newer}: INVALID: ")
        assert "belongs to another snapshot" in skipped["detail"]
        assert all(check(report, name)["passed"] for name in CHECKS[:3])
        # 2. the invalid snapshot named explicitly (used to exit 5 without a report)
        report = drill("--snapshot", newer)
        assert report["snapshot_id"] == newer
        assert report["error"].startswith(f"snapshot {newer} is INVALID: ")
        # 3. no valid snapshot at all (used to exit 10 without a report)
        (copy / "snapshots" / world.snapshot_id / "postgres" / "dump.pgdump.zst.age").unlink()
        report = drill()
        assert report["snapshot_id"] == ""
        assert f"passed over {world.snapshot_id}: INVALID: missing object" in report["error"]
        assert "no valid snapshot holding postgres, redis, minio" in report["error"]
        assert len(received) == 3  # the webhook of each failed drill
    history = run_drtool("drill", "history", "--json", config=config, home=home)
    assert [d["passed"] for d in json.loads(history.stdout)][-3:] == [False, False, False]
    assert processes_in(home) == []
