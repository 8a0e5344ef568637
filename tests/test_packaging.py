"""Packaging: the compose files validate with docker-compose, the Dockerfile and the monitoring
files agree with the code (metric names, commands, secrets).

``docker-compose config`` needs no engine. A missing binary skips those tests unless
``DRTOOL_REQUIRE_DOCKER=1``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from drtool.services.scheduling.metrics import Metrics, WalMetrics

ROOT = Path(__file__).resolve().parent.parent


def compose_config(compose_file: str, env: dict[str, str]) -> str:
    """``docker-compose -f FILE config`` output; skip (or fail) without the binary."""
    binary = shutil.which("docker-compose")
    if binary is None:
        reason = "docker-compose not installed (apt-get install docker-compose)"
        if os.environ.get("DRTOOL_REQUIRE_DOCKER") == "1":
            pytest.fail(f"{reason} (DRTOOL_REQUIRE_DOCKER=1)", pytrace=False)
        pytest.skip(reason)
    done = subprocess.run(
        [binary, "-f", compose_file, "config"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env},
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_backup_compose_file_validates() -> None:
    text = (ROOT / "docker-compose.backup.yml").read_text()
    assert not re.search(r"^(version|name):", text, re.M)  # valid for Compose v1.29 and v2
    out = compose_config("docker-compose.backup.yml", {})
    for service in ("backup:", "backup-cron:", "wal:", "drill:"):
        assert re.search(rf"^  {service}$", out, re.M), service
    assert "external: true" in out and "cotalk-data" in out
    assert "mem_limit: 256m" in out


def _service(out: str, name: str) -> str:
    match = re.search(rf"^  {name}:\n((?:    .*\n|      .*\n)+)", out, re.M)
    assert match, name
    return match.group(1)


def test_only_the_drill_service_holds_the_identity() -> None:
    out = compose_config("docker-compose.backup.yml", {})
    assert "drtool_identity" in _service(out, "drill")
    for name in ("backup", "backup-cron", "wal"):
        block = _service(out, name)
        assert "identity" not in block.lower(), name
        assert "DRTOOL_POSTGRES_PASSWORD_FILE: /run/secrets/postgres_password" in block
        assert "source: drtool_signing_key" in block


def test_the_wal_service_streams_for_good_with_backup_cron_s_secrets_and_volume() -> None:
    out = compose_config("docker-compose.backup.yml", {})
    wal, cron = _service(out, "wal"), _service(out, "backup-cron")
    assert "    - wal\n    - stream\n" in wal  # the long-running mode: no --once/--until-idle
    assert "restart: unless-stopped" in wal
    assert re.search(r"^    mem_limit: \d+m$", wal, re.M) and re.search(r"^    cpus: ", wal, re.M)
    # the same secrets and config as backup-cron, the spool on the same backup volume
    secrets = re.compile(r"^    - source: (\w+)$", re.M)
    assert secrets.findall(wal) == secrets.findall(cron)
    for line in ("/etc/drtool/drtool.toml:ro", "drtool-state:/var/lib/drtool:rw"):
        assert line in wal and line in cron
    assert "DRTOOL_METRICS_PORT: '9467'" in wal and "127.0.0.1:9467:9467/tcp" in wal
    # its alerts watch it; the image's HEALTHCHECK (scheduled jobs) would not
    assert "- NONE" in wal


def test_the_capture_service_runs_for_good_with_backup_cron_s_secrets_and_volume() -> None:
    out = compose_config("docker-compose.backup.yml", {})
    capture, cron = _service(out, "capture"), _service(out, "backup-cron")
    assert "    - capture\n    - run\n" in capture  # the loop, not --once
    assert "restart: unless-stopped" in capture
    assert re.search(r"^    mem_limit: \d+m$", capture, re.M)
    secrets = re.compile(r"^    - source: (\w+)$", re.M)
    assert secrets.findall(capture) == secrets.findall(cron)  # no identity
    for line in ("/etc/drtool/drtool.toml:ro", "drtool-state:/var/lib/drtool:rw"):
        assert line in capture
    assert "- NONE" in capture


def test_chat_stack_compose_file_validates() -> None:
    out = compose_config(
        "chat_stack/docker-compose.yml",
        {"CHAT_REDIS_PASSWORD": "x" * 16, "CHAT_S3_SECRET_KEY": "y" * 16},
    )
    assert "name: cotalk-data" in out
    # PostgreSQL is set up for the wal service and for the snapshot LSN (ADR 0015, 0018)
    pg = _service(out, "postgres")
    for setting in ("wal_level=logical", "max_wal_senders=10", "max_replication_slots=10"):
        assert f"    - {setting}\n" in pg, setting
    assert "    - max_slot_wal_keep_size=4GB\n" in pg  # a dead streamer cannot fill the disk
    assert re.search(r"/chat_stack/postgres-init:/docker-entrypoint-initdb.d:ro$", pg, re.M)
    init = (ROOT / "chat_stack" / "postgres-init" / "10-drtool-replication.sh").read_text()
    assert re.search(r"^echo \"host replication \$\{DRTOOL_REPLICATION_ROLE:-\$POSTGRES_USER\} "
                     r"samenet scram-sha-256\" \\$", init, re.M)  # fmt: skip


def test_dockerfile_shape() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim-bookworm$", text, re.M)
    assert re.search(r"^FROM \$\{PYTHON_IMAGE\}$", text, re.M)
    for package in ("postgresql-client-$PG_MAJOR", "redis-tools", "zstd", "age"):
        assert package in text
    assert re.search(r"^USER drtool$", text, re.M)
    assert 'ENTRYPOINT ["drtool"]' in text
    assert 'CMD ["drtool", "schedule", "health"]' in text
    assert "pip install /src" in text


def test_monitoring_names_only_metrics_drtool_exports() -> None:
    exported = set()
    for registry in (Metrics().registry, WalMetrics().registry):
        for family in registry.collect():
            exported |= {s.name for s in family.samples} | {family.name}
    rules = (ROOT / "monitoring" / "drtool-alerts.yml").read_text()
    dashboard = json.loads((ROOT / "monitoring" / "drtool-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = set(re.findall(r"\bdrtool_[a-z_]+", rules + "\n".join(exprs)))
    assert used and used <= exported | {"drtool_job_failures_total"}, used - exported
    for alert in ("BackupMissing", "BackupFailed", "DrillFailed", "RepositoryUnreachable"):
        assert f"alert: {alert}" in rules
    assert "alert: BackupShrunk" in rules and "max_over_time(drtool_backup_stored_bytes" in rules
    for alert in ("WalLagHigh", "WalSlotLost", "PitrWindowShort", "WalSpoolNearBound"):
        assert f"alert: {alert}" in rules
