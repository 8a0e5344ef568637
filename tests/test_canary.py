"""Canaries: written to PostgreSQL, Redis and each bucket, read back, and measured by a drill."""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from support.cli import run_drtool
from support.servers import free_port
from support.stacks import make_repository, source_stack

from drtool.config import load_config
from drtool.drills.definition import DrillDefinition, ReportSettings
from drtool.drills.report import prometheus_textfile
from drtool.endpoints import PostgresEndpoint, RedisEndpoint, S3Endpoint, StackEndpoints
from drtool.s3session import s3_client
from drtool.services.canary import CanaryLoop
from drtool.services.drill import run_drill
from drtool.stores import canary

T0 = datetime(2026, 12, 1, 12, 0, 0, tzinfo=UTC)


@pytest.fixture
def stack(
    pg_database: PostgresEndpoint, redis_db: RedisEndpoint, s3_server: S3Endpoint, s3_bucket: str
) -> StackEndpoints:
    """Empty stores: a fresh database, a flushed Redis, a fresh bucket."""
    return StackEndpoints(pg_database, redis_db, s3_server, (s3_bucket,))


def canary_keys(stack: StackEndpoints) -> list[str]:
    """The canary objects in the stack's bucket."""
    listed = s3_client(stack.minio).list_objects_v2(
        Bucket=stack.buckets[0], Prefix=canary.OBJECT_PREFIX
    )
    return [o["Key"] for o in listed.get("Contents", [])]


def test_canaries_are_written_to_each_store_and_read_back(stack: StackEndpoints) -> None:
    bucket = canary.minio_name(stack.buckets[0])
    assert canary.newest_canaries(stack, stack.buckets) == {
        "postgres": None,
        "redis": None,
        bucket: None,
    }
    first = canary.write_canaries(stack, stack.buckets, now=T0)
    assert first.failed == {} and first.written == ["postgres", "redis", bucket]
    assert canary.newest_canaries(stack, stack.buckets) == {
        "postgres": T0,
        "redis": T0,
        bucket: T0,
    }
    later = T0 + timedelta(hours=2)
    canary.write_canaries(stack, stack.buckets, now=later, keep=timedelta(hours=1))
    assert canary.newest_canaries(stack, stack.buckets) == {
        "postgres": later,
        "redis": later,
        bucket: later,
    }
    # older than `keep`: the first round's object is gone, so the listing stays small
    assert canary_keys(stack) == [canary.OBJECT_PREFIX + later.strftime(canary.TIME_FORMAT)]


def test_no_canary_measures_none_never_zero(stack: StackEndpoints) -> None:
    newest = canary.newest_canaries(stack, stack.buckets)
    assert set(canary.measured_rpo(T0, newest).values()) == {None}
    canary.write_canaries(stack, stack.buckets, now=T0)
    measured = canary.measured_rpo(T0 + timedelta(seconds=90), canary.newest_canaries(stack, ()))
    assert measured == {"postgres": 90.0, "redis": 90.0}
    # written after the moment (clock skew): nothing lost, not a negative loss
    # a canary newer than the moment: past it, never 0 ("nothing lost")
    past = canary.measured_rpo(T0 - timedelta(seconds=5), {"redis": T0})
    assert past == {"redis": -5.0}
    assert canary.past_the_moment(past) == ["redis: its newest canary is 5.0 s past the moment"]


def test_a_store_that_is_down_is_named_and_the_others_are_still_written(
    stack: StackEndpoints,
) -> None:
    dead = replace(stack, redis=replace(stack.redis, port=free_port()))
    result = canary.write_canaries(dead, dead.buckets, now=T0)
    assert set(result.failed) == {"redis"}
    assert "redis" in result.failed["redis"]
    assert canary.newest_canaries(stack, ())["postgres"] == T0


def test_the_scheduler_loop_writes_every_interval_and_stops(
    stack: StackEndpoints, tmp_path: Path
) -> None:
    repo = make_repository(tmp_path / "repo", stack)
    cfg = load_config(repo.backup_config, {})
    cfg = replace(cfg, canary=replace(cfg.canary, enabled=True, interval_s=0.2))
    loop = CanaryLoop(cfg)
    loop.start()
    try:
        seen: set[datetime] = set()
        deadline = time.monotonic() + 60
        while len(seen) < 3 and time.monotonic() < deadline:
            found = canary.newest_canaries(stack, ())["redis"]
            if found is not None:
                seen.add(found)
            time.sleep(0.05)
        assert len(seen) >= 3, "the loop did not write a canary every interval"
    finally:
        loop.close()
    assert loop.stop.is_set()
    assert loop.last is not None and loop.last.failed == {}


@pytest.fixture
def home() -> Iterator[Path]:
    """A short home the postgres user can enter (the drill's local stack)."""
    directory = Path(tempfile.mkdtemp(prefix="canary-"))
    directory.chmod(0o711)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.slow
def test_a_drill_measures_each_restored_stores_loss_by_its_newest_canary(
    tmp_path: Path, home: Path, pg_server: PostgresEndpoint, s3_server: S3Endpoint
) -> None:
    """The canary written before the backup is found in the restored copy; the one written
    after it is not: the drill reads the restored stores, not production."""
    with source_stack(tmp_path / "src", pg_server, s3_server) as source:
        repo = make_repository(tmp_path / "repo", source)
        wrote = run_drtool("canary", "write", "--json", config=repo.backup_config, home=home)
        assert wrote.returncode == 0, wrote.stderr
        before = datetime.fromisoformat(json.loads(wrote.stdout)["at"])
        repo.backup()
        after = canary.write_canaries(source, source.buckets)  # not in the snapshot
        shown = run_drtool("canary", "show", "--json", config=repo.backup_config, home=home)
        assert shown.returncode == 0, shown.stderr
        assert json.loads(shown.stdout)["postgres"] == after.at.isoformat()

        cfg = load_config(repo.operator_config(tmp_path / "operator.toml"), {})
        spec = DrillDefinition(name="canary", report=ReportSettings(dir=str(tmp_path / "r")))
        report = run_drill(cfg, home=home, spec=spec)
    assert report.passed, report.error or [c for c in report.checks if not c.passed]
    bucket = canary.minio_name(report_bucket(report.measured_rpo_s))
    assert set(report.measured_rpo_s) == {"postgres", "redis", bucket}
    # each store's part ended after the canary written before the backup and before the one
    # written after it: its measured loss is the time from that canary to the part's end
    # (the one after would make it negative: a canary past the copy)
    longest = (after.at - before).total_seconds()
    for value in report.measured_rpo_s.values():
        assert value is not None and 0 < value <= longest, report.measured_rpo_s
    assert "measured RPO" in report.to_markdown()
    metrics = tmp_path / "drill.prom"
    prometheus_textfile(report, metrics)
    assert re.search(
        r'^drtool_drill_measured_rpo_seconds\{definition="canary",store="postgres"\} [0-9.]+$',
        metrics.read_text(),
        re.MULTILINE,
    )


def report_bucket(measured: dict[str, float | None]) -> str:
    """The one bucket named in a report's measured RPO."""
    (name,) = [n for n in measured if n.startswith("minio:")]
    return name.split(":", 1)[1]


def test_canary_write_with_a_store_down_exits_3_naming_it(
    stack: StackEndpoints, tmp_path: Path
) -> None:
    dead = replace(stack, redis=replace(stack.redis, port=free_port()))
    repo = make_repository(tmp_path / "repo", dead)
    result = run_drtool("canary", "write", config=repo.backup_config)
    assert result.returncode == 3
    assert result.stderr.strip().splitlines()[-1] == "error: canary not written to redis"
    assert "Traceback" not in result.stderr


def test_minio_unreachable_fails_only_its_canary(stack: StackEndpoints, tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    repo = make_repository(
        tmp_path / "repo", replace(stack, minio=replace(stack.minio, endpoint_url=dead))
    )
    result = run_drtool("canary", "write", config=repo.backup_config)
    assert result.returncode == 3
    assert result.stderr.strip().splitlines()[-1] == "error: canary not written to minio"
    found = canary.newest_canaries(stack, ())
    assert found["postgres"] is not None and found["redis"] is not None
