"""Drill definitions load typed: an unknown key or a value of the wrong type stops at load.

``cls(**data)`` accepted ``max_rto_s = "15m"`` or ``sample_rooms = "ten"`` and the drill failed
later, after restoring for minutes (or compared a string with a float and crashed). Parsing
needs no server.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from drtool.drills.definition import DrillDefinition, load_definition, parse_definition
from drtool.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        (
            '[thresholds]\nmax_rto_s = "15m"\n',
            "thresholds.max_rto_s: expected a number (got '15m')",
        ),
        (
            "[thresholds]\nmax_rpo_s = true\n",
            "thresholds.max_rpo_s: expected a number (got True)",
        ),
        (
            '[checks]\nsample_rooms = "ten"\n',
            "checks.sample_rooms: expected a whole number (got 'ten')",
        ),
        (
            "[checks]\nsample_rooms = 2.5\n",
            "checks.sample_rooms: expected a whole number (got 2.5)",
        ),
        (
            "[checks]\nrooms = 2\n",
            "checks.rooms: unknown setting (known: sample_rooms)",
        ),
        (
            'components = "redis"\n',
            "components: expected a list of strings (got 'redis')",
        ),
        (
            'components = ["mysql"]\n',
            "components: expected some of postgres, redis, minio (got ['mysql'])",
        ),
        (
            "name = 7\n",
            "name: expected a string (got 7)",
        ),
        (
            'runtime = "k8s"\n',
            "runtime: expected one of local, docker (got 'k8s')",
        ),
        (
            "[docker]\npostgres_memory = 512\n",
            "docker.postgres_memory: expected a string (got 512)",
        ),
        (
            '[docker]\ndata = "ram"\n',
            "docker.data: expected one of disk, tmpfs (got 'ram')",
        ),
        (
            '[report]\nwebhook_format = "teams"\n',
            "report.webhook_format: expected one of slack, alertmanager (got 'teams')",
        ),
        (
            "[report]\ndir = false\n",
            "report.dir: expected a string (got False)",
        ),
        (
            '[reports]\ndir = "x"\n',
            "reports: unknown setting (known: components, docker, identities, name, ",
        ),
        (
            "thresholds = 5\n",
            "thresholds: expected a table (got 5)",
        ),
        (
            'snapshot = "random-within:soon"\n',
            "snapshot: expected latest, an id or random-within:<N>d",
        ),
        (
            'snapshot = "pitr:latest"\n',
            "snapshot: expected pitr:lsn-of-latest or pitr:random-within:<N>d|h",
        ),
        (
            'snapshot = "pitr:at:2026-12-05T10:00:00"\n',
            "snapshot: expected pitr:at:<ISO time with its zone>",
        ),
        (
            "[thresholds]\nmax_skew_s = -1\n",
            "thresholds.max_skew_s: expected a number of 0 or more",
        ),
    ],
)
def test_a_mistyped_definition_fails_at_load_naming_the_field(
    tmp_path: Path, toml: str, message: str
) -> None:
    path = tmp_path / "weekly.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as info:
        load_definition(path)
    assert str(info.value).startswith(f"{path}: {message}")
    assert info.value.exit_code == 2


def test_a_good_definition_gets_its_types() -> None:
    definition = parse_definition(
        'name = "w"\ncomponents = ["redis"]\n[thresholds]\nmax_rto_s = 600\n'
        "[checks]\nsample_rooms = 3\n"
    )
    assert definition.components == ("redis",) and definition.sample_rooms == 3
    assert definition.thresholds.max_rto_s == 600.0 and isinstance(
        definition.thresholds.max_rto_s, float
    )
    assert definition.thresholds.max_rpo_s == DrillDefinition().thresholds.max_rpo_s


def test_the_shipped_definition_loads() -> None:
    definition = load_definition(ROOT / "restore_drills" / "weekly.toml")
    assert definition.name == "weekly" and definition.runtime == "docker"


def test_a_missing_definition_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_definition(tmp_path / "nope.toml")


def test_pitr_choices_load_with_their_window() -> None:
    from drtool.drills.definition import DrillDefinition

    assert DrillDefinition(snapshot="pitr:random-within:2d").window() == timedelta(days=2)
    assert DrillDefinition(snapshot="pitr:lsn-of-latest").window() is None
