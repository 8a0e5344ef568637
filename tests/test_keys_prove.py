"""Every key proven (issue 15.3, ADR 0023): a drill decrypts a sample object with each
identity given and reports the recipients nobody proved; `drtool doctor` warns about a
recipient not proven within keys.prove_within_days.

The drills here stop at the scratch stack (a stand-in that refuses): the key proof runs
before it, on the real repository and the real identity files, and is what is checked.
"""

from __future__ import annotations

import json
import tempfile
from contextlib import AbstractContextManager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from support.cli import run_drtool
from support.repo_kit import RepoKit

from drtool import keys
from drtool.drills.definition import DrillDefinition, ReportSettings
from drtool.drills.report import DrillReport
from drtool.endpoints import StackEndpoints
from drtool.errors import UsageError
from drtool.repository import drill_log, layout
from drtool.services import doctor
from drtool.services.drill import run_drill
from drtool.services.key_proof import CHECK_NAME


def _no_scratch(
    home: Path, drill_id: str, spec: DrillDefinition, pg_major: int | None
) -> AbstractContextManager[StackEndpoints]:
    raise UsageError("test: no scratch stack; only the key proof runs")


def _with_escrow(kit: RepoKit) -> Path:
    """A repository encrypted to the operator and an escrow key (added by a rotation)."""
    kit.snapshot(datetime.now(UTC) - timedelta(hours=1))
    escrow = kit.tmp / "keys" / "escrow.key"
    recipient = keys.write_identity(escrow, passphrase=None)
    done = run_drtool("keys", "rotate", "--add-recipient", recipient, config=kit.config_file)
    assert done.returncode == 0, done.stderr
    return escrow


def _drill(kit: RepoKit, *identities: Path) -> DrillReport:
    spec = DrillDefinition(
        components=("postgres",),
        identities=tuple(map(str, identities)),
        report=ReportSettings(dir=str(kit.tmp / "reports")),
    )
    return run_drill(kit.config(), home=kit.tmp / "home", spec=spec, scratch=_no_scratch)


def _proof(report: DrillReport) -> tuple[bool, str]:
    check = next(c for c in report.checks if c.name == CHECK_NAME)
    return check.passed, check.detail


def test_a_drill_proves_both_identities_and_records_it(repo_kit: RepoKit) -> None:
    kit = repo_kit
    escrow = _with_escrow(kit)
    report = _drill(kit, kit.identity_file, escrow)
    passed, detail = _proof(report)
    assert passed, detail
    header = layout.read_repo_info(kit.storage).recipients
    assert len(header) == 2 and sorted(report.keys_proven) == sorted(header)
    stored = drill_log.read_summaries(kit.storage)[-1]
    assert len(stored["keys_proven"]) == 2  # in the repository's clear summary, for doctor


def test_a_drill_fails_when_an_identity_cannot_decrypt_or_a_recipient_is_not_proven(
    repo_kit: RepoKit,
) -> None:
    kit = repo_kit
    escrow = _with_escrow(kit)
    stranger = kit.tmp / "keys" / "stranger.key"
    keys.write_identity(stranger, passphrase=None)

    report = _drill(kit, escrow, stranger)
    passed, detail = _proof(report)
    assert not passed and str(stranger) in detail and "cannot decrypt" in detail
    assert CHECK_NAME in report.summary()["failed_checks"]

    only_operator = _drill(kit, kit.identity_file)  # the escrow key was never tried
    passed, detail = _proof(only_operator)
    assert not passed and "not proven" in detail
    assert only_operator.keys_proven == [kit.recipient]


def test_doctor_warns_about_a_recipient_not_proven_recently(repo_kit: RepoKit) -> None:
    kit = repo_kit
    escrow = _with_escrow(kit)
    cfg = kit.config(recipients=list(layout.read_repo_info(kit.storage).recipients))
    status, detail = doctor._recipients_proven(cfg, datetime.now(UTC))
    assert status == "warn" and "never" in detail

    _drill(kit, kit.identity_file, escrow)
    status, detail = doctor._recipients_proven(cfg, datetime.now(UTC))
    assert status == "pass", detail
    later = datetime.now(UTC) + timedelta(days=cfg.keys.prove_within_days + 1)
    status, detail = doctor._recipients_proven(cfg, later)
    assert status == "warn" and "last " in detail
    summaries = json.dumps(drill_log.read_summaries(kit.storage))
    assert "AGE-SECRET-KEY" not in summaries


def test_doctor_warns_when_the_backup_hosts_recipients_are_not_the_headers(
    repo_kit: RepoKit,
) -> None:
    kit = repo_kit
    _with_escrow(kit)  # the header now lists two recipients, the config still one
    status, detail = doctor._recipients_proven(kit.config(), datetime.now(UTC))
    assert status == "warn" and "keys.recipients differ from the repository header" in detail


def test_a_drill_without_identities_records_the_configured_one_and_adds_no_check(
    repo_kit: RepoKit,
) -> None:
    kit = repo_kit
    _with_escrow(kit)
    report = _drill(kit)
    assert CHECK_NAME not in [c.name for c in report.checks]
    assert report.keys_proven == [kit.recipient]


@pytest.mark.slow
def test_drill_run_takes_identities_on_the_command_line(repo_kit: RepoKit) -> None:
    """`drtool drill run --identity A --identity B`: the flags reach the key proof (the
    synthetic snapshot's dump then fails to restore into the scratch stack: exit 6)."""
    kit = repo_kit
    escrow = _with_escrow(kit)
    stranger = kit.tmp / "keys" / "stranger.key"
    keys.write_identity(stranger, passphrase=None)
    definition = kit.tmp / "drill.toml"
    definition.write_text(f'components = ["postgres"]\n[report]\ndir = "{kit.tmp / "reports"}"\n')
    # short (socket paths) and enterable by the postgres user, as tests/test_drill.py's home
    with tempfile.TemporaryDirectory(prefix="drill-") as home:
        Path(home).chmod(0o711)
        done = run_drtool(
            "drill", "run", "--definition", str(definition),
            "--identity", str(escrow), "--identity", str(stranger), "--json",
            config=kit.config_file, home=Path(home),
        )  # fmt: skip
    assert done.returncode == 6, done.stderr
    report = json.loads(done.stdout)
    assert "fingerprints" in report["error"] or "restore" in report["error"], report["error"]
    proof = next(c for c in report["checks"] if c["name"] == CHECK_NAME)
    assert not proof["passed"] and str(stranger) in proof["detail"]
    assert sorted(report["keys_proven"]) == sorted(layout.read_repo_info(kit.storage).recipients)
