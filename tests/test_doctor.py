"""``drtool doctor`` on real servers: each check a row, exit 7 when one fails.

The Object Lock / delete-probe pass case (a write-only credential on an Object Lock bucket)
and the clock-skew failure are in tests/test_storage_faults.py (U6, U7).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis
from support.backup_kit import BackupKit, make_backup_kit
from support.cli import one_error

from drtool import keys
from drtool.endpoints import PostgresEndpoint, RedisEndpoint, S3Endpoint

pytestmark = pytest.mark.slow  # every test seeds a stack and an S3 repository, then runs doctor

NAMES = [
    "no identity on the backup host",
    "postgres reachable",
    "pg_dump version",
    "pg_restore present",
    "redis reachable",
    "minio reachable",
    "repository format",
    "object lock",
    "snapshots locked whole",
    "credential cannot delete",
    "clock skew",
    "scratch free space",
    "key file permissions",
    "every recipient proven",
]


@pytest.fixture
def kit(
    tmp_path: Path,
    pg_database: PostgresEndpoint,
    redis_db: RedisEndpoint,
    s3_server: S3Endpoint,
    s3_bucket: str,
) -> BackupKit:
    return make_backup_kit(tmp_path, pg_database, redis_db, s3_server, s3_bucket)


def _rows(done: object) -> dict[str, dict[str, str]]:
    return {r["name"]: r for r in json.loads(done.stdout)}  # type: ignore[attr-defined]


def test_plain_bucket_and_deleting_credential_fail_the_rest_passes(kit: BackupKit) -> None:
    """The kit's bucket has no Object Lock and its admin credential can delete: two failures."""
    done = kit.drtool("doctor", "--json")
    rows = _rows(done)
    assert list(rows) == NAMES
    failed = {name for name, r in rows.items() if r["status"] == "fail"}
    assert failed == {"object lock", "credential cannot delete"}
    assert rows["object lock"]["detail"].startswith("Object Lock is not enabled on the bucket")
    assert rows["credential cannot delete"]["detail"].startswith(
        "this credential can delete backups"
    )
    assert rows["repository format"]["detail"].endswith("format 1 (supported: 1)")
    assert kit.stored_keys("doctor/") == set()  # the probe was removed again
    message = one_error(done, 7)
    assert message == ("error: doctor: 2 check(s) failed: object lock, credential cannot delete")


def test_identity_wrong_password_and_loose_key_file_are_failures(kit: BackupKit) -> None:
    wrong = kit.tmp / "wrong-redis"
    wrong.write_text("not-the-password")
    signing = Path(kit.sections["keys"]["signing_key_file"])
    signing.chmod(0o644)
    config = kit.write_config("doctor-bad", redis={"password_file": str(wrong)})
    identity = kit.identity_file.read_text()
    done = kit.drtool("doctor", "--json", config=config, env=kit.env(LEAKED=identity))
    rows = _rows(done)
    assert rows["no identity on the backup host"]["status"] == "fail"
    assert "LEAKED" in rows["no identity on the backup host"]["detail"]
    assert rows["redis reachable"]["status"] == "fail"
    assert rows["redis reachable"]["detail"].endswith("authentication failed")
    assert rows["key file permissions"] == {
        "name": "key file permissions",
        "status": "fail",
        "detail": f"{signing} is 644: chmod 600",
    }
    assert rows["postgres reachable"]["status"] == "pass"
    assert keys.contains_identity(identity)
    assert identity.strip() not in done.stdout + done.stderr
    assert done.returncode == 7


def test_table_output_names_each_check(kit: BackupKit) -> None:
    done = kit.drtool("doctor")
    for name in NAMES:
        assert name in done.stdout
    assert "FAIL" in done.stdout and "PASS" in done.stdout
    assert done.returncode == 7


@pytest.mark.parametrize(
    ("rules", "missing"),
    [
        (["+sync", "+psync", "+replconf"], None),
        (["+sync", "+replconf"], None),  # the backup falls back to SYNC
        (["+replconf"], "+psync (or +sync)"),
        (["+sync", "+psync"], "+replconf"),
    ],
)
def test_redis_check_runs_what_the_backup_runs_and_names_a_missing_acl_rule(
    kit: BackupKit, rules: list[str], missing: str | None
) -> None:
    """19.6: the user docs/OPERATIONS.md recommends may not run INFO; doctor used to fail it."""
    redis_ep = kit.endpoints.redis
    user = f"backup-{len(rules)}-{abs(hash(tuple(rules))) % 1000}"
    with redis.Redis(host=redis_ep.host, port=redis_ep.port, password=redis_ep.password) as r:
        r.acl_setuser(user, enabled=True, passwords=["+backup-pw"], commands=rules, reset=True)
    secret = kit.tmp / f"{user}-password"
    secret.write_text("backup-pw")
    secret.chmod(0o600)
    config = kit.write_config(user, redis={"username": user, "password_file": str(secret)})
    row = _rows(kit.drtool("doctor", "--json", config=config))["redis reachable"]
    if missing is None:
        assert row["status"] == "pass", row
        assert row["detail"].endswith("replication (REPLCONF, PSYNC) permitted")
        assert "INFO not permitted" in row["detail"]
    else:
        assert row["status"] == "fail", row
        assert f"lacks the ACL rule {missing}" in row["detail"]
