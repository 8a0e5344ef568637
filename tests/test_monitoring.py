"""The shipped alert rules (monitoring/drtool-alerts.yml) as users run them.

Real ``drtool schedule run`` processes play the Compose services: ``backup-cron`` (a backup
and a verify job against real servers), a fresh ``drill`` service whose first drill is not due
yet, one whose drill passed and one whose drill failed. Their /metrics are scraped; Debian's
``promtool`` checks the rules and unit-tests them on exactly those series; a real Prometheus
scrapes the four endpoints with the shipped rules and a real Alertmanager delivers to a webhook
in this test. Everything listens on 127.0.0.1; every wait is bounded.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from prometheus_client.parser import text_string_to_metric_families
from support.cli import DRTOOL
from support.stacks import make_repository, source_stack
from test_drill import webhook_receiver

from drtool.endpoints import PostgresEndpoint, S3Endpoint

pytestmark = pytest.mark.slow  # real Prometheus, Alertmanager and four schedulers

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "monitoring" / "drtool-alerts.yml"
WAIT_S = 300.0  # conditions are waited for, never timed; two drills run in parallel
PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")
ALERTMANAGER = shutil.which("prometheus-alertmanager")


def need(binary: str | None, package: str) -> str:
    """The binary's path, or skip (fail in CI) naming the Debian package."""
    if binary is None:
        if os.environ.get("DRTOOL_REQUIRE_SERVERS") == "1":
            pytest.fail(f"{package} not installed (DRTOOL_REQUIRE_SERVERS=1)", pytrace=False)
        pytest.skip(f"{package} not installed (apt-get install {package})")
    return binary


def wait_for(condition: Callable[[], bool], what: str, timeout: float = WAIT_S) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.3)


def free_port() -> int:
    """A loopback port free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(url: str) -> str:
    """GET ``url`` (loopback only) as text."""
    with urllib.request.urlopen(url, timeout=10) as response:
        return str(response.read().decode())


def by_key(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The samples of a /metrics text keyed by name and sorted labels."""
    return {(n, tuple(sorted(labels.items()))): v for n, labels, v in samples(text)}


def samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    """The samples of a /metrics text (without the ``_created`` series of counters)."""
    found = []
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if not s.name.endswith("_created"):
                found.append((s.name, dict(s.labels), float(s.value)))
    return found


@dataclass
class Service:
    """One ``drtool schedule run`` process with its metrics port."""

    name: str
    home: Path
    config: Path
    schedules: Path
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    log: Path = field(default_factory=Path)

    def start(self) -> None:
        """Start the scheduler on a fresh loopback port."""
        self.port = free_port()
        self.log = self.home.parent / f"{self.name}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("DRTOOL_")}
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [DRTOOL, "--config", str(self.config), "--home", str(self.home),
                 "schedule", "run", "--schedule-dir", str(self.schedules),
                 "--metrics-address", "127.0.0.1", "--metrics-port", str(self.port)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log, env=env,
            )  # fmt: skip

    def scrape(self) -> str:
        """Its /metrics text ("" while it does not answer yet)."""
        assert self.proc is not None
        if self.proc.poll() is not None:
            pytest.fail(f"{self.name} exited {self.proc.returncode}: {self.log.read_text()}")
        try:
            return get(f"http://127.0.0.1:{self.port}/metrics")
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM, then wait (bounded) for a clean exit."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@dataclass
class Stack:
    """The four services, their scrapes once each reached its state, and the scrape time."""

    services: dict[str, Service]
    scrapes: dict[str, str]
    scraped_at: float


def write_schedule(directory: Path, jobs: dict[str, dict[str, object]]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "jobs.toml").write_text(tomli_w.dumps({"jobs": jobs}))
    return directory


def drill_job(definition: Path, *, catch_up: bool = True) -> dict[str, object]:
    """The shipped drill job (schedules/drill.toml), with its own definition file."""
    return {
        "kind": "drill",
        "definition": str(definition),
        "on": "sunday",
        "at": "04:00",
        "max_age": "15d",
        "retries": 0,
        "catch_up": catch_up,
    }


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, pg_server: PostgresEndpoint, s3_server: S3Endpoint
) -> Iterator[Stack]:
    """backup-cron, drill-fresh, drill-ok and drill-bad, each in the state the test wants."""
    need(PROMTOOL, "prometheus")
    base = tmp_path_factory.mktemp("monitoring")
    with source_stack(base, pg_server, s3_server) as source:
        repo = make_repository(base / "repo", source)
        repo.backup()
        operator = repo.operator_config(base / "operator.toml")
        services: dict[str, Service] = {}
        homes: list[Path] = []

        def service(name: str, config: Path, jobs: dict[str, dict[str, object]]) -> Service:
            # short and enterable by postgres: the local drill runtime puts sockets there
            home = Path(tempfile.mkdtemp(prefix=f"mon-{name}-"))
            home.chmod(0o711)
            homes.append(home)
            svc = Service(name, home, config, write_schedule(base / name / "schedules", jobs))
            services[name] = svc
            return svc

        def definition(name: str, extra: str = "") -> Path:
            path = base / f"{name}.toml"
            path.write_text(f'name = "weekly"\n{extra}\n[report]\ndir = "{base / name}/reports"\n')
            return path

        service(
            "backup-cron",
            repo.backup_config,
            {
                "full": {"kind": "backup", "every": "1h", "retries": 0},
                "verify": {"kind": "verify", "every": "1d", "retries": 0},
            },
        )
        service("drill-fresh", operator, {"drill": drill_job(definition("fresh"), catch_up=False)})
        service("drill-ok", operator, {"drill": drill_job(definition("ok"))})
        bad = definition("bad", "[thresholds]\nmax_rto_s = 0.001")
        service("drill-bad", operator, {"drill": drill_job(bad)})
        try:
            for svc in services.values():
                svc.start()
            ready = {
                "backup-cron": lambda t: 'job="full"' in t and 'job="verify"' in t
                and "drtool_last_success_timestamp_seconds" in t,
                "drill-fresh": lambda t: "drtool_job_deadline_timestamp_seconds{" in t,
                "drill-ok": lambda t: 'drtool_drill_result{job="drill"} 1.0' in t,
                "drill-bad": lambda t: 'drtool_drill_result{job="drill"} 0.0' in t,
            }  # fmt: skip
            scrapes: dict[str, str] = {}
            for name, svc in services.items():
                wait_for(lambda: ready[name](svc.scrape()), f"{name} to reach its state")  # noqa: B023
            for name, svc in services.items():
                scrapes[name] = svc.scrape()
            yield Stack(services, scrapes, time.time())
        finally:
            for svc in services.values():
                svc.stop()
            for home in homes:
                shutil.rmtree(home, ignore_errors=True)


# -- what each process exports ---------------------------------------------------------------


def test_no_process_exports_a_drill_verdict_it_does_not_have(stack: Stack) -> None:
    """backup-cron never runs a drill and the fresh drill service has not run one yet: neither
    says "the last drill failed"; both say by when their jobs must succeed."""
    for name in ("backup-cron", "drill-fresh"):
        names = {n for n, _, _ in samples(stack.scrapes[name])}
        assert "drtool_drill_result" not in names, name
        assert "drtool_drill_rpo_seconds" not in names, name
    deadlines = {
        (name, labels["job"], labels["kind"])
        for name, text in stack.scrapes.items()
        for n, labels, _ in samples(text)
        if n == "drtool_job_deadline_timestamp_seconds"
    }
    assert deadlines == {
        ("backup-cron", "full", "backup"),
        ("backup-cron", "verify", "verify"),
        ("drill-fresh", "drill", "drill"),
        ("drill-ok", "drill", "drill"),
        ("drill-bad", "drill", "drill"),
    }
    ok = by_key(stack.scrapes["drill-ok"])
    assert ok[("drtool_drill_result", (("job", "drill"),))] == 1.0
    assert ("drtool_drill_rto_seconds", (("component", "postgres"), ("job", "drill"))) in ok


# -- promtool ----------------------------------------------------------------------------------


def test_promtool_checks_the_shipped_rules() -> None:
    promtool = need(PROMTOOL, "prometheus")
    done = subprocess.run(
        [promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_promtool_checks_the_scraped_metrics(stack: Stack) -> None:
    """Every service's exposition passes promtool's metric lint."""
    promtool = need(PROMTOOL, "prometheus")
    for name, text in stack.scrapes.items():
        done = subprocess.run(
            [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, f"{name}: {done.stdout}{done.stderr}"


def rule_annotations() -> dict[str, dict[str, str]]:
    """Each alert's annotation templates, read from the rules file (no YAML library here:
    every annotation is a one-line double-quoted string)."""
    found: dict[str, dict[str, str]] = {}
    current = ""
    for line in RULES.read_text().splitlines():
        match = re.match(r"\s*- alert: (\w+)$", line)
        if match:
            current = match.group(1)
            found[current] = {}
        match = re.match(r'\s+(summary|description): "(.*)"$', line)
        if match and current:
            found[current][match.group(1)] = match.group(2)
    assert all(len(a) == 2 for a in found.values()), found
    return found


def expected_alert(name: str, labels: dict[str, str]) -> dict[str, Any]:
    """One promtool ``exp_alerts`` entry: the series' labels, the rule's, the rendered text."""
    rendered = {
        key: re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels.get(m.group(1), ""), text)
        for key, text in rule_annotations()[name].items()
    }
    severity = {
        name: "warning"
        for name in ("BackupFailed", "JobOverdue", "BackupShrunk", *WARNING_WAL_ALERTS)
    }
    return {
        "exp_labels": {**labels, "severity": severity.get(name, "critical")},
        "exp_annotations": rendered,
    }


def input_series(stack: Stack, hours: int) -> list[dict[str, str]]:
    """Every scraped sample as a promtool series held constant for ``hours`` hours.

    Labels are what Prometheus stores with ``honor_labels: true``: drtool's own (``job`` is
    the scheduled job) plus ``instance``; series without a ``job`` get the scrape job's name.
    Timestamps are shifted so that the scrape is promtool's time 0 (its clock starts at the
    epoch): ``time() > deadline`` then means "this long after the scrape".
    """
    series = []
    for instance, text in stack.scrapes.items():
        for name, labels, value in samples(text):
            if name.endswith("_timestamp_seconds"):
                value -= stack.scraped_at
            full = {"job": "drtool", **labels, "instance": instance}
            selector = ",".join(f'{k}="{v}"' for k, v in sorted(full.items()))
            series.append({"series": f"{name}{{{selector}}}", "values": f"{value!r}+0x{hours}"})
    return series


def test_the_shipped_rules_on_scraped_series_with_promtool(stack: Stack, tmp_path: Path) -> None:
    """Healthy services and a fresh drill service raise nothing; the failed drill raises
    DrillFailed at once; a backup that stops succeeding, and drills that do not pass within
    15 days (including one that never ran), raise theirs only when due."""
    promtool = need(PROMTOOL, "prometheus")
    drills = ("drill-fresh", "drill-ok", "drill-bad")
    drill_failed = [expected_alert("DrillFailed", {"job": "drill", "instance": "drill-bad"})]

    def overdue(*instances: str) -> list[dict[str, Any]]:
        return [
            expected_alert("DrillOverdue", {"job": "drill", "kind": "drill", "instance": i})
            for i in instances
        ]

    quiet = ["BackupMissing", "BackupFailed", "DrillOverdue", "JobOverdue",
             "RepositoryUnreachable", "BackupShrunk"]  # fmt: skip
    tests: list[dict[str, Any]] = [
        {"eval_time": "1h", "alertname": "DrillFailed", "exp_alerts": drill_failed},
        *({"eval_time": "1h", "alertname": a, "exp_alerts": []} for a in quiet),
        # the hourly backup's max_age is 2 h; verify's is 2 d
        {"eval_time": "3h", "alertname": "BackupMissing", "exp_alerts": [
            expected_alert("BackupMissing",
                           {"job": "full", "kind": "backup", "instance": "backup-cron"})]},
        {"eval_time": "3h", "alertname": "JobOverdue", "exp_alerts": []},
        {"eval_time": "49h", "alertname": "JobOverdue", "exp_alerts": [
            expected_alert("JobOverdue",
                           {"job": "verify", "kind": "verify", "instance": "backup-cron"})]},
        {"eval_time": "14d", "alertname": "DrillOverdue", "exp_alerts": []},
        {"eval_time": "16d", "alertname": "DrillOverdue", "exp_alerts": overdue(*drills)},
        {"eval_time": "16d", "alertname": "DrillFailed", "exp_alerts": drill_failed},
    ]  # fmt: skip
    rules = tmp_path / "drtool-alerts.yml"
    shutil.copy(RULES, rules)
    doc = {
        "rule_files": [rules.name],
        "evaluation_interval": "1h",
        "tests": [
            {
                "interval": "1h",
                "input_series": input_series(stack, hours=17 * 24),
                "alert_rule_test": tests,
            }
        ],
    }
    test_file = tmp_path / "tests.yml"  # JSON is YAML
    test_file.write_text(json.dumps(doc, indent=1))
    done = subprocess.run(
        [promtool, "test", "rules", test_file.name],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def run_promtool_tests(tmp_path: Path, groups: list[dict[str, Any]], interval: str) -> None:
    """``promtool test rules`` of the shipped rules on ``groups`` (input series + cases)."""
    promtool = need(PROMTOOL, "prometheus")
    rules = tmp_path / "drtool-alerts.yml"
    shutil.copy(RULES, rules)
    doc = {"rule_files": [rules.name], "evaluation_interval": interval, "tests": groups}
    test_file = tmp_path / "tests.yml"  # JSON is YAML
    test_file.write_text(json.dumps(doc, indent=1))
    done = subprocess.run(
        [promtool, "test", "rules", test_file.name],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr


WAL_LABELS = {"job": "drtool", "instance": "wal", "slot": "drtool_wal"}
WARNING_WAL_ALERTS = ("PitrWindowShort", "WalSpoolNearBound")
WAL_ALERTS = ("WalLagHigh", "WalSlotLost", *WARNING_WAL_ALERTS)
DAY = 86400


def wal_series(**values: str) -> list[dict[str, str]]:
    """The streamer's series (``name=values`` in promtool notation, one sample a minute);
    timestamps are promtool's clock (0 at the start). Defaults: a healthy streamer with an
    8-day window, 10 s lag, a nearly empty spool."""
    defaults = {
        "drtool_wal_lag_seconds": "10+0x240",
        "drtool_wal_spool_bytes": "1e6+0x240",
        "drtool_wal_spool_max_bytes": "4e9+0x240",
        "drtool_pitr_window_policy_seconds": f"{7 * DAY}+0x240",
        "drtool_pitr_window_start_timestamp_seconds": f"{-8 * DAY}+60x240",
        "drtool_pitr_window_end_timestamp_seconds": "0+60x240",
        "drtool_wal_last_segment_timestamp_seconds": "0+60x240",
    }
    selector = ",".join(f'{k}="{v}"' for k, v in sorted(WAL_LABELS.items()))
    return [
        {"series": f"{name}{{{selector}}}", "values": v}
        for name, v in {**defaults, **values}.items()
        if v
    ]


def wal_case(at: str, *firing: str) -> list[dict[str, Any]]:
    """Every WAL alert at ``at``: the ``firing`` ones fire for the streamer, the rest do not."""
    return [
        {
            "eval_time": at,
            "alertname": name,
            "exp_alerts": [expected_alert(name, WAL_LABELS)] if name in firing else [],
        }
        for name in WAL_ALERTS
    ]


def test_the_wal_rules_with_promtool(tmp_path: Path) -> None:
    """A healthy streamer raises nothing; lag over 5 min, a lost slot (until a later base
    opens a new window), a window shorter than the policy or none at all, and a spool near
    its bound each raise theirs, only when due."""
    groups = [
        {"input_series": wal_series(), "alert_rule_test": wal_case("3h")},
        {  # lag 10 s, then 400 s from minute 10: pending for 2 min, then firing
            "input_series": wal_series(drtool_wal_lag_seconds="10+0x9 400+0x200"),
            "alert_rule_test": wal_case("11m") + wal_case("13m", "WalLagHigh"),
        },
        {  # lost at minute 5 inside an 8-day window; a base at minute 30 starts a new one
            "input_series": wal_series(
                drtool_wal_slot_lost_timestamp_seconds="_x4 300+0x200",
                drtool_pitr_window_start_timestamp_seconds=f"{-8 * DAY}+0x29 1800+0x200",
            ),
            "alert_rule_test": wal_case("3m")
            + wal_case("10m", "WalSlotLost")
            + [{"eval_time": "35m", "alertname": "WalSlotLost", "exp_alerts": []}],
        },
        {  # a 1-day window against the 7-day policy: after the rule's hour
            "input_series": wal_series(drtool_pitr_window_start_timestamp_seconds=f"{-DAY}+60x240"),
            "alert_rule_test": wal_case("30m") + wal_case("2h", "PitrWindowShort"),
        },
        {  # WAL streams but no base backup is covered: no window at all
            "input_series": wal_series(
                drtool_pitr_window_start_timestamp_seconds="",
                drtool_pitr_window_end_timestamp_seconds="",
            ),
            "alert_rule_test": wal_case("30m") + wal_case("2h", "PitrWindowShort"),
        },
        {  # the repository away: the spool fills to 3.5 of its 4 GB
            "input_series": wal_series(drtool_wal_spool_bytes="1e6+0x19 3.5e9+0x200"),
            "alert_rule_test": wal_case("25m") + wal_case("35m", "WalSpoolNearBound"),
        },
    ]
    run_promtool_tests(tmp_path, [{"interval": "1m", **g} for g in groups], "1m")


# -- Prometheus and Alertmanager, end to end ---------------------------------------------------


@dataclass
class Daemon:
    """A Prometheus or Alertmanager process on a loopback port."""

    argv: list[str]
    port: int
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Daemon:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        wait_for(self.ready, f"{self.argv[0]} to answer", timeout=60)
        return self

    def ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            pytest.fail(f"{self.argv[0]} exited: {self.log.read_text()[-2000:]}")
        try:
            get(f"http://127.0.0.1:{self.port}/-/ready")
            return True
        except OSError:
            return False

    def api(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        return json.loads(get(f"http://127.0.0.1:{self.port}{path}{query}"))["data"]

    def __exit__(self, *exc: object) -> None:
        assert self.proc is not None
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def alertmanager(directory: Path, hook: str) -> Daemon:
    binary = need(ALERTMANAGER, "prometheus-alertmanager")
    directory.mkdir()
    port = free_port()
    config = directory / "alertmanager.yml"
    config.write_text(
        json.dumps(
            {
                "route": {
                    "receiver": "hook",
                    "group_by": ["alertname", "instance", "job"],
                    "group_wait": "1s",
                    "group_interval": "1s",
                    "repeat_interval": "1h",
                },
                "receivers": [
                    {"name": "hook", "webhook_configs": [{"url": hook, "send_resolved": False}]}
                ],
            }
        )
    )
    argv = [binary, f"--config.file={config}", f"--storage.path={directory / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address="]  # fmt: skip
    return Daemon(argv, port, directory / "log")


def prometheus(directory: Path, stack: Stack, alertmanager_port: int) -> Daemon:
    binary = need(PROMETHEUS, "prometheus")
    directory.mkdir()
    port = free_port()
    config = directory / "prometheus.yml"
    targets = [
        {"targets": [f"127.0.0.1:{svc.port}"], "labels": {"instance": name}}
        for name, svc in stack.services.items()
    ]
    config.write_text(
        json.dumps(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(RULES)],
                "alerting": {
                    "alertmanagers": [
                        {"static_configs": [{"targets": [f"127.0.0.1:{alertmanager_port}"]}]}
                    ]
                },
                # as monitoring/README.md says: drtool's `job` label is kept
                "scrape_configs": [
                    {"job_name": "drtool", "honor_labels": True, "static_configs": targets}
                ],
            }
        )
    )
    argv = [binary, f"--config.file={config}", f"--storage.tsdb.path={directory / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}"]  # fmt: skip
    return Daemon(argv, port, directory / "log")


def test_prometheus_and_alertmanager_page_for_the_failed_drill_only(
    stack: Stack, tmp_path: Path
) -> None:
    with (
        webhook_receiver() as (hook, received),
        alertmanager(tmp_path / "alertmanager", hook) as am,
        prometheus(tmp_path / "prometheus", stack, am.port) as prom,
    ):

        def all_scraped() -> bool:
            up = prom.api("/api/v1/query", query="up == 1")["result"]
            deadlines = prom.api(
                "/api/v1/query", query="count(drtool_job_deadline_timestamp_seconds)"
            )["result"]
            return len(up) == 4 and bool(deadlines) and deadlines[0]["value"][1] == "5"

        wait_for(all_scraped, "Prometheus to scrape all four services", timeout=120)
        seen_all = time.time()

        def evaluated_since_all_scraped() -> bool:
            groups = prom.api("/api/v1/rules")["groups"]
            last = groups[0]["lastEvaluation"] if groups else "0001-01-01T00:00:00Z"
            stamp = re.sub(r"\.\d+", "", last).replace("Z", "+00:00")
            return datetime.fromisoformat(stamp).timestamp() > seen_all + 1

        wait_for(evaluated_since_all_scraped, "a rule evaluation of the full data", timeout=60)

        def delivered() -> list[dict[str, Any]]:
            return [alert for body in list(received) for alert in body["alerts"]]

        wait_for(lambda: bool(delivered()), "Alertmanager to deliver an alert", timeout=120)
        # nothing pending or firing but the failed drill, after evaluations of the full data
        active = prom.api("/api/v1/query", query="ALERTS")["result"]
        assert {
            (a["metric"]["alertname"], a["metric"]["instance"], a["metric"]["alertstate"])
            for a in active
        } == {("DrillFailed", "drill-bad", "firing")}, active
    alerts = delivered()
    assert {(a["labels"]["alertname"], a["labels"]["instance"]) for a in alerts} == {
        ("DrillFailed", "drill-bad")
    }
    assert alerts[0]["labels"]["job"] == "drill" and alerts[0]["status"] == "firing"
    assert alerts[0]["labels"]["severity"] == "critical"
    assert alerts[0]["annotations"]["summary"] == "drtool: the restore drill drill failed"


# -- after a restart ---------------------------------------------------------------------------


def test_the_drill_verdict_survives_a_restart(stack: Stack) -> None:
    """The drill service restarts between drills: its last verdict (and RTO/RPO) come back
    from the persisted job state instead of vanishing or turning into a failure."""
    svc = stack.services["drill-ok"]
    before = by_key(stack.scrapes["drill-ok"])
    svc.stop()
    svc.start()
    wait_for(lambda: "drtool_job_deadline_timestamp_seconds{" in svc.scrape(), "the restart")
    after = by_key(svc.scrape())
    for key in [k for k in before if k[0].startswith("drtool_drill_")]:
        assert after.get(key) == before[key], key
    assert after[("drtool_drill_result", (("job", "drill"),))] == 1.0
    # the drill was not run again: the weekly slot is not due
    last_success = ("drtool_last_success_timestamp_seconds", (("job", "drill"),))
    assert int(after[last_success]) == int(before[last_success])  # the state keeps seconds
