"""One moment across PostgreSQL, Redis and the attachment bucket, against real servers.

The plan (services/restore/moment.py): each store's effective moment and skew from the
signed records alone, the ``max_skew`` limit and its default from the schedule. The drill
at a moment (services/drill.py ``_moment``): a PostgreSQL 15 streams its WAL, a base backup
and a Redis + MinIO snapshot are taken, the capture follows the attachment rows while
traffic writes messages with attachments; the whole stack is restored to a moment just
after a message with an attachment, and the restored copy holds that attachment with its
bytes, content type and metadata, and nothing of the message committed after the moment.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import threading
import tomllib
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from support.cli import run_drtool
from support.stacks import make_repository, source_stack, stack_sections
from support.wal_kit import WalKit, make_kit, start_wal_server, stop_streamer, wait_for, write_rows

from chat_stack import redis_layout
from chat_stack.seed import SeedSizes
from chat_stack.traffic import run_traffic
from drtool.capture import capturer as capturer_module
from drtool.capture import chain as capture_chain
from drtool.capture.at import bucket_at, bucket_bases
from drtool.cli.restore import _show_stack_result
from drtool.config import load_config
from drtool.drills.definition import DrillDefinition, ReportSettings, Thresholds
from drtool.drills.report import DrillReport
from drtool.drills.runtime_local import local_scratch
from drtool.endpoints import PostgresEndpoint, RedisEndpoint, S3Endpoint, StackEndpoints
from drtool.errors import ConfigError, NotFound
from drtool.repository import catalog, part_times
from drtool.repository.access import identities_of, open_repo
from drtool.runtime.redisserver import RedisServer
from drtool.s3session import s3_client
from drtool.services.backup import run_backup
from drtool.services.capture import build_capturer
from drtool.services.drill import _measured_rpo_check, run_drill
from drtool.services.restore import moment, stack_at
from drtool.services.restore.pitr import PitrResult
from drtool.services.stack import write_config
from drtool.sources.minio import MinioStore
from drtool.sources.redis_client import connect as connect_redis
from drtool.stores import canary, checks
from drtool.stores.checks import CheckResult
from drtool.wal.index import WalIndex
from drtool.wal.names import parse_lsn, parse_segment

TINY = SeedSizes(users=5, rooms=2, messages=40, attachments=3)


def post_with_attachment(stack: StackEndpoints, tag: str) -> tuple[int, str, bytes]:
    """One message with an attachment, as the app writes it: the object first, then the
    message and its attachment row in one transaction. Returns (message id, key, bytes)."""
    key = f"moment/{tag}-{uuid.uuid4().hex}.png"
    data = hashlib.sha256(tag.encode()).digest() * 200
    s3_client(stack.minio).put_object(
        Bucket=stack.buckets[0],
        Key=key,
        Body=data,
        ContentType="image/png",
        Metadata={"origin": tag},
    )
    with psycopg.connect(**stack.postgres.connect_kwargs()) as conn:
        row = conn.execute(
            "INSERT INTO messages (room_id, sender_id, kind, content, created_at) "
            "SELECT room_id, user_id, 'attachment', %s, clock_timestamp() "
            "FROM chat_room_members ORDER BY room_id, user_id LIMIT 1 RETURNING id, created_at",
            (tag,),
        ).fetchone()
        assert row is not None
        conn.execute(
            "INSERT INTO attachments (room_id, message_id, message_created_at, uploader_id, "
            "object_key, original_filename, size_bytes, sha256, content_type, created_at) "
            "SELECT room_id, id, created_at, sender_id, %s, 'f.png', %s, %s, 'image/png', "
            "created_at FROM messages WHERE id = %s",
            (key, len(data), hashlib.sha256(data).hexdigest(), row[0]),
        )
    return int(row[0]), key, data


# -- the plan, from the signed records only (fast) -------------------------------------------


def test_the_plan_names_each_stores_effective_moment_and_refuses_a_skew_beyond_the_limit(
    tmp_path: Path, pg_server: PostgresEndpoint, s3_server: S3Endpoint
) -> None:
    with source_stack(tmp_path / "src", pg_server, s3_server, TINY) as stack:
        repository = make_repository(tmp_path / "bk", stack)
        snapshot_id = repository.backup(components=("redis", "minio"))
        backup_cfg = load_config(repository.backup_config, {})
        capturer = build_capturer(backup_cfg, repository.directory)
        with psycopg.connect(**stack.postgres.connect_kwargs()) as conn:
            capturer.run_round(conn)  # the first round only sets its position
            post_with_attachment(stack, "a")
            assert capturer.run_round(conn).captured == 1
        cfg = load_config(repository.operator_config(tmp_path / "op" / "drtool.toml"), {})
        repo = open_repo(cfg)
        records = catalog.list_snapshots(repo.storage, repo.verify_keys, repo.info.repo_id)
        (record,) = records
        redis_window = moment.component_window(record, "redis")
        assert redis_window is not None
        # the schedule's default limit gets the Redis part's duration as a margin
        span = (redis_window[1] - redis_window[0]).total_seconds()
        assert moment.redis_margin(records) == round(span, 1)
        empty = WalIndex(repo.info.repo_id)

        def plan(at: datetime, limit: float = 3600.0) -> moment.MomentPlan:
            return moment.plan_from(repo, records, empty, at, limit, "given")

        bucket = canary.minio_name(stack.buckets[0])
        # a moment after the listing, before the capture's round: the journal covers it, the
        # bucket reaches it
        listed = moment.component_window(record, "minio")
        assert listed is not None
        before = listed[1] + timedelta(microseconds=1)
        at_before = plan(before)
        assert at_before.store(bucket).effective == before
        assert at_before.store(bucket).skew_s == 0.0
        assert "covers the moment" in at_before.store(bucket).source
        # while the snapshot ran: its Redis part had not ended
        during = record.time + timedelta(microseconds=1)
        assert plan(during).store("redis").effective is None
        assert "no valid snapshot holds a Redis RDB" in plan(during).store("redis").error

        # after every round: the bucket reaches the last round's start, no further; Redis
        # the snapshot's Redis part
        later = datetime.now(UTC) + timedelta(minutes=5)
        at_later = plan(later)
        captured = at_later.store(bucket)
        assert captured.effective is not None and record.time < captured.effective < later
        assert "ends before the moment" in captured.source
        redis = at_later.store("redis")
        assert (redis.snapshot_id, redis.effective) == (snapshot_id, redis_window[0])
        assert redis.skew_s == round((later - redis_window[0]).total_seconds(), 1)
        # PostgreSQL: the PITR planner's own refusal (no WAL here), first
        postgres = at_later.store("postgres")
        assert postgres.effective is None and "holds no WAL" in postgres.error
        refusal = at_later.refusal(accept_skew=True)
        assert isinstance(refusal, NotFound) and "holds no WAL" in refusal.message

        # a limit below Redis's skew names Redis and the bucket, not the stores within it
        tight = plan(later, limit=1.0)
        tight.pitr_error = None  # the skew rule on its own: as if PostgreSQL were in reach
        tight.stores = [s for s in tight.stores if s.store != "postgres"]
        assert {s.store for s in tight.over_skew()} == {"redis", bucket}
        refusal = tight.refusal(accept_skew=False)
        assert isinstance(refusal, NotFound)
        assert "redis by" in refusal.message and "--accept-skew" in refusal.message
        assert tight.refusal(accept_skew=True) is None


def test_buckets_map_onto_the_target_in_the_configs_order_never_sorted(
    tmp_path: Path, pg_server: PostgresEndpoint, s3_server: S3Endpoint
) -> None:
    """minio.buckets = [src-…, aaa-…] (not sorted) onto a target's [copy-a, copy-b]: each
    bucket goes where the snapshot restore puts it, the attachments' bucket is the one the
    checks read, and the plan table names each bucket's target."""
    with source_stack(tmp_path / "src", pg_server, s3_server, TINY) as source:
        client = s3_client(s3_server)
        other, first, second = (f"{p}-{uuid.uuid4().hex[:8]}" for p in ("aaa", "copy-a", "copy-b"))
        for bucket in (other, first, second):
            client.create_bucket(Bucket=bucket)
        client.put_object(Bucket=other, Key="avatar.png", Body=b"avatar")
        stack = replace(source, buckets=(source.buckets[0], other))
        repository = make_repository(tmp_path / "bk", stack)
        repository.backup(components=("redis", "minio"))
        config = repository.operator_config(
            tmp_path / "op" / "drtool.toml", {"copy": replace(stack, buckets=(first, second))}
        )
        cfg = load_config(config, {})
        repo = open_repo(cfg)
        records = catalog.list_snapshots(repo.storage, repo.verify_keys, repo.info.repo_id)
        at = datetime.now(UTC) + timedelta(minutes=5)
        plan = moment.plan_from(repo, records, WalIndex(repo.info.repo_id), at, 3600.0, "given")
        assert [b.store for b in plan.buckets()] == [
            canary.minio_name(stack.buckets[0]),
            canary.minio_name(other),
        ]
        mapping = stack_at.check_targets(cfg, tmp_path, plan, "copy", force=True)
        assert mapping == {stack.buckets[0]: first, other: second}
        assert stack_at.attachments_first(cfg, mapping) == (first, second)
        shown = run_drtool(
            "restore",
            "--at",
            at.isoformat(),
            "--into",
            str(tmp_path / "d"),
            "--target",
            "copy",
            "--dry-run",
            config=config,
        )
        assert shown.returncode == 10  # no WAL: the plan is shown, then refused
        rows = {line.split()[0]: line for line in shown.stdout.splitlines() if "minio:" in line}
        assert f"copy bucket {first}" in rows[canary.minio_name(stack.buckets[0])]
        assert f"copy bucket {second}" in rows[canary.minio_name(other)]


def test_no_part_taken_after_the_moment_is_used_for_it(
    tmp_path: Path, pg_server: PostgresEndpoint, s3_server: S3Endpoint
) -> None:
    """A backup whose parts start long after its ``started`` (the lock, the repository and
    the rollback check come first, none counted in a duration): the manifest records when
    each part ran, so a moment between ``started`` and the Redis part never gets that RDB;
    a manifest without those times is bounded by ``finished`` minus the later parts."""
    with source_stack(tmp_path / "src", pg_server, s3_server, TINY) as stack:
        repository = make_repository(tmp_path / "bk", stack)
        began = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=10)
        repository.backup(now=began, components=("redis", "minio"))
        cfg = load_config(repository.operator_config(tmp_path / "op" / "drtool.toml"), {})
        repo = open_repo(cfg)
        (record,) = catalog.list_snapshots(repo.storage, repo.verify_keys, repo.info.repo_id)
        assert record.manifest is not None
        redis_part = record.manifest.component("redis")
        assert redis_part is not None and redis_part.started and redis_part.ended
        window = moment.component_window(record, "redis")
        assert window is not None and window[0] > began + timedelta(minutes=9)
        empty = WalIndex(repo.info.repo_id)
        between = began + timedelta(minutes=5)  # after `started`, before the RDB was taken
        plan = moment.plan_from(repo, [record], empty, between, 3600.0, "given")
        assert plan.store("redis").effective is None
        # the same manifest as an older drtool wrote it: no part times
        old = replace(
            record.manifest,
            components=tuple(
                replace(c, started=None, ended=None) for c in record.manifest.components
            ),
        )
        assert "started" not in json.dumps(old.to_dict()["components"])
        start, end = part_times.part_window(old, "redis") or (between, between)
        assert start == began and end >= window[1] - timedelta(seconds=1)
        assert end > between
        legacy = replace(record, manifest=old)
        assert (
            moment.plan_from(repo, [legacy], empty, between, 3600.0, "given")
            .store("redis")
            .effective
            is None
        )
        # the bucket: listed after the moment, so not its base either (one rule for the
        # plan and bucket_at), although the snapshot started before it
        unreachable = [s.store for s in plan.stores if s.effective is None]
        assert unreachable == ["postgres", "redis", "minio"]
        assert "listed a bucket before" in plan.store("minio").error
        assert bucket_bases([record], between) == {}
        with pytest.raises(NotFound, match="no valid snapshot listed it"):
            bucket_at(repo, identities_of(cfg), stack.buckets[0], between)
        assert set(bucket_bases([record], datetime.now(UTC))) == {stack.buckets[0]}


def test_only_caught_up_rounds_prove_a_bucket_reaches_the_moment(
    tmp_path: Path,
    pg_server: PostgresEndpoint,
    s3_server: S3Endpoint,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A quiet capture still proves coverage (a signed heartbeat record); a round that left
    an object owed does not, although it captured another object after the moment."""
    monkeypatch.setattr(capturer_module, "HEARTBEAT", timedelta(0))  # every idle round
    with source_stack(tmp_path / "src", pg_server, s3_server, TINY) as stack:
        repository = make_repository(tmp_path / "bk", stack)
        repository.backup(components=("redis", "minio"))
        capturer = build_capturer(load_config(repository.backup_config, {}), repository.directory)
        cfg = load_config(repository.operator_config(tmp_path / "op" / "drtool.toml"), {})
        repo = open_repo(cfg)
        records = catalog.list_snapshots(repo.storage, repo.verify_keys, repo.info.repo_id)
        bucket = canary.minio_name(stack.buckets[0])

        def plan(at: datetime) -> moment.StoreMoment:
            empty = WalIndex(repo.info.repo_id)
            return moment.plan_from(repo, records, empty, at, 3600.0, "given").store(bucket)

        with psycopg.connect(**stack.postgres.connect_kwargs()) as conn:
            assert capturer.run_round(conn).caught_up  # the position; a heartbeat
            quiet = datetime.now(UTC)
            heartbeat = capturer.run_round(conn)  # nothing new: a heartbeat after the moment
            assert heartbeat.captured == 0 and heartbeat.seq is not None
            assert (plan(quiet).effective, plan(quiet).skew_s) == (quiet, 0.0)

            post_with_attachment(stack, "present")
            _, owed_key, _ = post_with_attachment(stack, "owed")
            MinioStore(stack.minio).delete(stack.buckets[0], owed_key)  # its object: not yet
            owed_at = datetime.now(UTC)
            owed = capturer.run_round(conn)
            assert owed.captured == 1 and owed.absent == 1 and not owed.caught_up
        chain = capture_chain.load_chain(repo.storage, repo.verify_keys, repo.info.repo_id)
        assert [r.caught_up for _, r in chain.records] == [True, True, False]
        assert datetime.fromisoformat(chain.records[-1][1].last_captured) > owed_at
        reached = plan(owed_at)
        assert "ends before the moment" in reached.source
        assert reached.effective == datetime.fromisoformat(chain.records[1][1].created)
        assert reached.skew_s is not None and reached.skew_s > 0
        # another process (`capture run --once` from cron) within 5 minutes: no heartbeat,
        # the state remembers the last commit
        monkeypatch.setattr(capturer_module, "HEARTBEAT", timedelta(minutes=5))
        s3_client(stack.minio).put_object(Bucket=stack.buckets[0], Key=owed_key, Body=b"late")
        again = build_capturer(load_config(repository.backup_config, {}), repository.directory)
        with psycopg.connect(**stack.postgres.connect_kwargs()) as conn:
            assert again.run_round(conn).caught_up  # the owed object arrived: captured
            assert again.run_round(conn).seq is None  # idle, a commit just now: no heartbeat


@pytest.mark.slow  # six CLI runs and a backup: about 20 s
def test_restore_at_refuses_in_one_line_before_touching_anything(
    tmp_path: Path, pg_server: PostgresEndpoint, s3_server: S3Endpoint
) -> None:
    """No WAL for PostgreSQL, a time without its zone, --accept-skew elsewhere, no --target,
    a per-store option: one line, non-zero, no data directory, Redis and the bucket
    untouched."""
    with source_stack(tmp_path / "src", pg_server, s3_server, TINY) as stack:
        repository = make_repository(tmp_path / "bk", stack)
        repository.backup(components=("redis", "minio"))
        config = repository.operator_config(tmp_path / "op" / "drtool.toml", {"copy": stack})
        into = tmp_path / "data"
        keys = redis_keys(stack.redis)
        objects = len(list(MinioStore(stack.minio).list_objects(stack.buckets[0])))
        at = datetime.now(UTC).isoformat()
        whole = ("--at", at, "--into", str(into), "--yes")
        cases = [
            ((*whole, "--target", "copy"), 10, "holds no WAL"),
            (("--at", at[:19], "--into", str(into), "--target", "copy"), 2, "with its zone"),
            (("--at", at, "--accept-skew"), 2, "only for the whole stack"),
            # production's Redis and buckets rolled back, its PostgreSQL left at now: never
            (whole, 2, "name --target"),
            # a per-store option the moment restore would not honour: refused, not ignored
            ((*whole, "--target", "copy", "--minio-mode", "mirror"), 2, "--minio-mode"),
            ((*whole, "--target", "copy", "--redis-mode", "offline", "--jobs", "4"), 2, "--jobs"),
        ]
        for args, code, why in cases:
            result = run_drtool("restore", *args, config=config)
            assert result.returncode == code, result.stderr
            (line,) = result.stderr.strip().splitlines()
            assert why in line
            assert not into.exists()
        assert redis_keys(stack.redis) == keys
        assert len(list(MinioStore(stack.minio).list_objects(stack.buckets[0]))) == objects


def test_max_skew_defaults_to_the_schedules_redis_interval(tmp_path: Path) -> None:
    # the included schedule: jobs.redis every 1h, jitter_s = 120 (a run may start that late)
    limit, why = moment.default_max_skew(Path(__file__).parents[1] / "schedules")
    assert limit == 3600.0 + 120 and "redis" in why
    (tmp_path / "s.toml").write_text(
        '[jobs.fast]\nkind = "backup"\ncomponents = ["redis"]\nevery = "15m"\n'
        '[jobs.full]\nkind = "backup"\nat = "03:00"\n'
    )
    assert moment.default_max_skew(tmp_path)[0] == 900.0
    limit, why = moment.default_max_skew(tmp_path / "absent")
    assert limit == moment.FALLBACK_MAX_SKEW_S and "no schedule read" in why
    cfg = load_config(None, {"DRTOOL_RESTORE_MAX_SKEW_S": "120"})
    assert moment.max_skew(cfg) == (120.0, "restore.max_skew_s")
    with pytest.raises(ConfigError, match=r"restore.max_skew_s: must be 0 .* \(got -5\)"):
        load_config(None, {"DRTOOL_RESTORE_MAX_SKEW_S": "-5"})


# -- the drill at a moment, with traffic (slow: streaming, base backup, physical restore) --


@pytest.fixture
def home(runtime_root: Path) -> Iterator[Path]:
    """A work directory the postgres user can enter (the restored copy runs as it)."""
    directory = runtime_root / f"moment-{uuid.uuid4().hex[:6]}"
    directory.mkdir(mode=0o711)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def _with_stack(path: Path, stack: StackEndpoints, extra: dict[str, Any]) -> None:
    """Add the stack's Redis and MinIO (and ``extra``) to a config written by make_kit."""
    doc = tomllib.loads(path.read_text())
    sections = stack_sections(stack, path.parent / "secrets")
    doc.update({k: v for k, v in sections.items() if k != "postgres"}, **extra)
    write_config(path, doc, "a test of one moment")


def _traffic(stack: StackEndpoints, stop: threading.Event) -> threading.Thread:
    thread = threading.Thread(target=run_traffic, args=(stack, 20.0, 3600.0, 11, stop))
    thread.start()
    return thread


@dataclass
class Scene:
    """A PostgreSQL 15 streaming into a repository, its seeded stack, and the history."""

    kit: WalKit
    stack: StackEndpoints
    history: History
    root: Path


@pytest.fixture(scope="module")
def scene(
    runtime_root: Path, tmp_path_factory: pytest.TempPathFactory, s3_server: S3Endpoint
) -> Iterator[Scene]:
    """Built once for the module's slow tests: streaming, backups, capture, traffic."""
    root = tmp_path_factory.mktemp("moment")
    server = start_wal_server(runtime_root, 15)
    try:
        with source_stack(root / "src", server.endpoint, s3_server, TINY) as stack:
            (root / "kit").mkdir()
            kit = next(make_kit(root / "kit", server))
            _with_stack(kit.config, stack, {})
            _with_stack(kit.operator, stack, {"restore": {"max_skew_s": 3600}})
            for path in (kit.config, kit.operator):  # the source's own database
                doc = tomllib.loads(path.read_text())
                doc["postgres"]["dbname"] = stack.postgres.dbname
                write_config(path, doc, "a test of one moment")
            yield Scene(kit, stack, _history(kit, stack), root)
    finally:
        server.stop()


@pytest.mark.slow
def test_a_drill_at_a_moment_restores_the_three_stores_to_it_and_fails_on_skew(
    tmp_path: Path, home: Path, scene: Scene
) -> None:
    kit, stack, h = scene.kit, scene.stack, scene.history
    before_id, before_key, before_data = h.before
    after_id, after_key, _ = h.after
    at = h.at

    inspected: dict[str, Any] = {}

    @contextmanager
    def inspecting(
        home: Path, drill_id: str, spec: DrillDefinition, major: int | None
    ) -> Iterator[StackEndpoints]:
        """The local scratch stack, read before it is torn down."""
        with local_scratch(home, drill_id, major) as scratch:
            yield scratch
            inspected.update(_inspect(home, scratch, stack, (before_id, after_id)))
            store = MinioStore(scratch.minio)
            meta, body = store.read(scratch.buckets[0], before_key)
            inspected["before_object"] = (b"".join(body), meta.content_type, meta.metadata)
            inspected["after_object"] = store.digest(scratch.buckets[0], after_key)

    operator = load_config(kit.operator, {})
    spec = DrillDefinition(
        name="moment",
        snapshot=f"pitr:at:{at.isoformat()}",
        report=ReportSettings(dir=str(tmp_path / "reports")),
    )
    report = run_drill(operator, home=home, spec=spec, scratch=inspecting)
    assert report.error == "" and report.passed, [c for c in report.checks if not c.passed]
    # the message just before the moment is there with its file; the one after is not
    assert inspected["messages"] == {before_id}
    assert inspected["before_object"] == (before_data, "image/png", {"origin": "before"})
    assert inspected["after_object"] is None
    # the RTO is the restore's own time: the data checks after it are their own phase
    assert report.phases_s["restore"] == report.restore_s and "checks" in report.phases_s
    checks = {c.name: c for c in report.checks}
    files = checks["attachments have their objects"].figures
    assert files["missing"] == 0 and files["different"] == 0
    assert files["present"] == files["rows"] == inspected["attachment_rows"]
    assert files["rows"] > TINY.attachments + 1
    references = checks["redis points to existing rows"].figures
    assert references["dangling"] == 0 and references["existing"] > 0
    skew = checks["skew within threshold"].figures
    bucket = canary.minio_name(stack.buckets[0])
    assert skew["postgres"]["skew_s"] == 0.0 and skew[bucket]["skew_s"] == 0.0
    assert skew["redis"]["skew_s"] > 0
    measured = report.measured_rpo_s
    assert set(measured) == {"postgres", "redis", f"minio:{stack.buckets[0]}"}
    # the PostgreSQL canary was written after the snapshot's: it bounds PostgreSQL closer
    assert measured["postgres"] is not None and measured["redis"] is not None
    assert measured["postgres"] < measured["redis"]
    assert "measured RPO within threshold" in checks
    assert not list(home.glob("pitr-*"))  # the copy was stopped and removed

    # the same moment with a skew limit below Redis's: the drill fails naming Redis
    limit = skew["redis"]["skew_s"] / 2
    tight = replace(spec, thresholds=Thresholds(max_skew_s=limit))
    failed = run_drill(operator, home=home, spec=tight)
    assert not failed.passed
    assert [c.name for c in failed.checks if not c.passed] == ["skew within threshold"]
    (over,) = [c for c in failed.checks if not c.passed]
    assert over.detail.startswith("redis beyond the limit")


@pytest.mark.slow
def test_a_drill_of_a_random_moment_restores_the_whole_stack_where_every_store_has_a_copy(
    tmp_path: Path, home: Path, scene: Scene
) -> None:
    """``pitr:random-within`` with the default components: a moment after the first Redis
    and bucket copies (the base backup is older than them here), the whole stack drilled."""
    operator = load_config(scene.kit.operator, {})
    spec = DrillDefinition(
        name="moment-random",
        snapshot="pitr:random-within:1d",
        report=ReportSettings(dir=str(tmp_path / "reports")),
    )
    report = run_drill(operator, home=home, spec=spec)
    assert report.error == "" and report.passed, [c for c in report.checks if not c.passed]
    names = [c.name for c in report.checks]
    assert names[:2] == ["skew within threshold", "restored to the moment"]
    assert {"attachments have their objects", "redis points to existing rows"} <= set(names)
    assert set(report.measured_rpo_s) == {
        "postgres",
        "redis",
        canary.minio_name(scene.stack.buckets[0]),
    }


@pytest.mark.slow
def test_a_drill_at_the_windows_end_restores_every_row_committed_before_it(
    tmp_path: Path, home: Path, scene: Scene
) -> None:
    """The newest moment the WAL reaches (the last sealed segment): the message after the
    history's moment is there too, with its object (journaled by the last round)."""
    end = max(datetime.fromisoformat(e.sealed) for e in scene.kit.index().segments())
    after_id, after_key, _ = scene.history.after
    seen: dict[str, Any] = {}

    @contextmanager
    def inspecting(
        home: Path, drill_id: str, spec: DrillDefinition, major: int | None
    ) -> Iterator[StackEndpoints]:
        with local_scratch(home, drill_id, major) as scratch:
            yield scratch
            seen.update(_inspect(home, scratch, scene.stack, (after_id,)))
            seen["after_object"] = MinioStore(scratch.minio).digest(scratch.buckets[0], after_key)

    operator = load_config(scene.kit.operator, {})
    spec = DrillDefinition(
        name="moment-end",
        snapshot=f"pitr:at:{end.isoformat()}",
        report=ReportSettings(dir=str(tmp_path / "reports")),
    )
    report = run_drill(operator, home=home, spec=spec, scratch=inspecting)
    assert report.error == "" and report.passed, [c for c in report.checks if not c.passed]
    assert seen["messages"] == {after_id} and seen["after_object"] is not None
    checks = {c.name: c for c in report.checks}
    assert checks["attachments have their objects"].figures["missing"] == 0
    # a sealed time is after the WAL it holds ends: recovery stops at the end of the WAL
    # held, and PostgreSQL's skew is counted from its last replayed transaction, never 0
    postgres = checks["skew within threshold"].figures["postgres"]
    assert "end of the WAL held" in postgres["source"], postgres
    assert postgres["skew_s"] is not None and postgres["skew_s"] > 0
    assert postgres["effective"] < end.isoformat()


@dataclass
class History:
    """The moment, the message with an attachment just before it and the one just after."""

    at: datetime
    before: tuple[int, str, bytes]
    after: tuple[int, str, bytes]


def _history(kit: WalKit, stack: StackEndpoints) -> History:
    """Stream; a base backup; a canary; a Redis + MinIO snapshot; traffic while the capture
    follows; a message with an attachment, a canary, the moment, another message; the WAL
    sealed past that message's commit."""
    cfg = load_config(kit.config, {})
    proc = kit.start()
    stop = threading.Event()
    traffic: threading.Thread | None = None
    try:
        wait_for("the streamer to seal", lambda: len(kit.segments()) >= 1)
        run_backup(cfg, home=kit.root, env={}, components=("postgres-base",))
        assert canary.write_canaries(stack, stack.buckets).failed == {}
        run_backup(cfg, home=kit.root, env={}, components=("redis", "minio"))
        capturer = build_capturer(cfg, kit.root)
        with psycopg.connect(**stack.postgres.connect_kwargs()) as conn:
            capturer.run_round(conn)
            traffic = _traffic(stack, stop)  # messages, some with attachments
            wait_for("traffic", lambda: _attachments(stack) > TINY.attachments)
            capturer.run_round(conn)
            assert canary.write_canaries(stack, stack.buckets).failed == {}
            before = post_with_attachment(stack, "before")
            at = datetime.now(UTC)
            after = post_with_attachment(stack, "after")
            after_lsn = _wal_inserted(stack)  # past the commit of the message after the moment
            seen = _attachments(stack)
            wait_for("more traffic", lambda: _attachments(stack) > seen)
            stop.set()
            traffic.join()
            # the object of the message just before the moment is read only now, after it
            assert capturer.run_round(conn).captured >= 2
        write_rows(stack.postgres)
        # a segment *sealed* after the moment may have been closed before it (the sealer runs
        # behind the switches on a loaded machine): only the segment holding the commit after
        # the moment proves the WAL reaches it, and lets recovery stop at the moment
        wait_for("WAL sealed past the moment", lambda: _wal_reaches(kit, after_lsn))
        assert stop_streamer(proc) == 0
    finally:
        stop.set()
        if traffic is not None:
            traffic.join()
        if proc.poll() is None:
            proc.kill()

    return History(at, before, after)


def _wal_inserted(stack: StackEndpoints) -> int:
    """The source's WAL insert position: past every commit made so far (the write position
    may lag behind it, synchronous_commit is off)."""
    with psycopg.connect(**stack.postgres.connect_kwargs()) as conn:
        row = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
    assert row is not None
    return parse_lsn(str(row[0]))


def _wal_reaches(kit: WalKit, lsn: int) -> bool:
    """Whether the repository holds the segment with WAL position ``lsn`` (sealed past it)."""
    index = kit.index()
    size = index.segment_size
    return size is not None and any(
        (parse_segment(e.name, size).segno + 1) * size > lsn for e in index.segments()
    )


def _attachments(stack: StackEndpoints) -> int:
    with psycopg.connect(**stack.postgres.connect_kwargs()) as conn:
        row = conn.execute("SELECT count(*) FROM attachments").fetchone()
    return int(row[0]) if row else 0


def _inspect(
    home: Path, scratch: StackEndpoints, source: StackEndpoints, ids: tuple[int, ...]
) -> dict[str, Any]:
    """The restored copy's rows: which of ``ids`` exist, and how many attachment rows."""
    (pid,) = home.glob("pitr-*/data/postmaster.pid")
    port = int(pid.read_text().splitlines()[3])
    ep = replace(source.postgres, host="127.0.0.1", port=port)
    with psycopg.connect(**ep.connect_kwargs()) as conn:
        found = {
            r[0] for r in conn.execute("SELECT id FROM messages WHERE id = ANY(%s)", (list(ids),))
        }
        rows = conn.execute("SELECT count(*) FROM attachments").fetchone()
    assert rows is not None
    return {"messages": found, "attachment_rows": int(rows[0])}


@pytest.mark.slow
def test_restore_at_a_moment_puts_the_whole_stack_into_a_second_stack_with_counts(
    home: Path, scene: Scene, second: tuple[RedisServer, str, Path], s3_server: S3Endpoint
) -> None:
    stack, h = scene.stack, scene.history
    before_id, before_key, before_data = h.before
    after_id, after_key, _ = h.after
    at = h.at.isoformat()
    redis_server, bucket, config = second
    into = home / "data"
    store = MinioStore(s3_server)
    # deleted from the source after its capture: the moment before the deletion still has it
    store.delete(stack.buckets[0], before_key)

    def restore(*args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        return run_drtool(
            "restore", "--at", at, "--target", "second", "--yes", *args, config=config, **kw
        )

    copy: dict[str, Any] = {}
    try:
        # a skew beyond the limit: one line naming Redis, exit 10, nothing created
        refused = restore("--into", str(into), extra_env={"DRTOOL_RESTORE_MAX_SKEW_S": "0.5"})
        assert refused.returncode == 10, refused.stderr
        (line,) = refused.stderr.strip().splitlines()
        assert "redis by" in line and "--accept-skew" in line
        assert not into.exists() and redis_keys(redis_server.endpoint) == 0
        assert list(store.list_objects(bucket)) == []
        # the plan alone
        dry = restore("--into", str(into), "--dry-run")
        assert dry.returncode == 0, dry.stderr
        assert "effective moment" in dry.stdout and "redis" in dry.stdout
        assert not into.exists()

        done = restore("--into", str(into), "--json")
        assert done.returncode == 0, done.stderr
        out = json.loads(done.stdout)
        copy = out["pitr"]
        assert out["ok"] and out["buckets"] == {stack.buckets[0]: bucket}
        assert {p["store"] for p in out["plan"]} == {
            "postgres",
            "redis",
            canary.minio_name(stack.buckets[0]),
        }
        checks = {c["name"]: c["figures"] for c in out["checks"]}
        files = checks["attachments have their objects"]
        assert files["rows"] == files["present"] > TINY.attachments + 1
        assert files["missing"] == 0
        references = checks["redis points to existing rows"]
        assert references["dangling"] == 0 and references["existing"] > 0
        assert out["measured_rpo_s"]["postgres"] is not None
        ep = replace(stack.postgres, host="127.0.0.1", port=copy["port"])
        with psycopg.connect(**ep.connect_kwargs()) as conn:
            rows = conn.execute(
                "SELECT id FROM messages WHERE id = ANY(%s)", ([before_id, after_id],)
            ).fetchall()
        assert {r[0] for r in rows} == {before_id}
        meta, body = store.read(bucket, before_key)
        assert (b"".join(body), meta.content_type, meta.metadata) == (
            before_data,
            "image/png",
            {"origin": "before"},
        )
        assert store.digest(bucket, after_key) is None
        assert redis_keys(redis_server.endpoint) > 0

        # the second stack now holds data: without --force nothing is touched
        again = home / "again"
        busy = restore("--into", str(again))
        assert busy.returncode == 2 and "not empty" in busy.stderr
        assert not again.exists()
    finally:
        if copy:
            subprocess.run(
                [copy["pg_ctl"], "-D", copy["data_dir"], "-m", "fast", "-w", "stop"],
                check=False,
                capture_output=True,
            )


@pytest.mark.slow
def test_a_whole_stack_restore_failing_after_postgresql_stops_the_copy_and_says_so(
    home: Path, scene: Scene, second: tuple[RedisServer, str, Path]
) -> None:
    """The second stack's Redis refuses every write (maxmemory reached): the restore fails
    after the PostgreSQL copy runs; the copy is stopped, DIR removed, one line names what
    was already restored (nothing outside DIR here: Redis was the next store)."""
    redis_server, _, config = second
    client = connect_redis(redis_server.endpoint)
    try:
        client.config_set("maxmemory-policy", "noeviction")
        client.config_set("maxmemory", "1")
    finally:
        client.close()
    into = home / "data"
    failed = run_drtool(
        "restore",
        "--at",
        scene.history.at.isoformat(),
        "--target",
        "second",
        "--yes",
        "--into",
        str(into),
        config=config,
    )
    assert failed.returncode != 0
    (line,) = failed.stderr.strip().splitlines()
    assert "already restored before the failure: nothing outside the data directory" in line
    assert f"copy was stopped and {into} removed" in line
    assert not into.exists()
    assert not [p for p in Path("/proc").glob("[0-9]*/cmdline") if _names(p, str(into))]


def _names(cmdline: Path, text: str) -> bool:
    """Whether a process's command line names ``text`` (it may exit while being read)."""
    try:
        return text.encode() in cmdline.read_bytes()
    except OSError:
        return False


@pytest.fixture
def second(
    tmp_path: Path, scene: Scene, s3_server: S3Endpoint
) -> Iterator[tuple[RedisServer, str, Path]]:
    """A second stack: its own redis-server and bucket (PostgreSQL goes to a new data
    directory), as ``[targets.second]`` of an operator config."""
    server = RedisServer(tmp_path / "redis-second")
    server.start()
    bucket = f"second-{uuid.uuid4().hex[:10]}"
    s3_client(s3_server).create_bucket(Bucket=bucket)
    stack = StackEndpoints(scene.stack.postgres, server.endpoint, s3_server, (bucket,))
    config = tmp_path / "operator.toml"
    doc = tomllib.loads(scene.kit.operator.read_text())
    doc["targets"] = {"second": stack_sections(stack, tmp_path / "secrets")}
    write_config(config, doc, "an operator with a second stack")
    yield server, bucket, config
    server.stop()


def redis_keys(endpoint: RedisEndpoint) -> int:
    client = connect_redis(endpoint)
    try:
        return int(client.dbsize())
    finally:
        client.close()


def test_the_whole_stack_result_is_printed_with_each_stores_figures(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The human result of `restore --at` (the slow test reads the JSON one)."""
    at = datetime(2026, 12, 5, 10, 0, tzinfo=UTC)
    plan = moment.MomentPlan(at, 3600.0, "given")
    plan.stores = [
        moment.StoreMoment("postgres", at, "base X + WAL", 0.0),
        moment.StoreMoment("redis", at - timedelta(minutes=20), "snapshot Y", 1200.0),
        moment.StoreMoment("minio:attachments", at, "snapshot Y + capture journal", 0.0),
    ]
    result = stack_at.StackAtResult(at.isoformat())
    result.pitr = PitrResult(at.isoformat(), "X", "", "", "/data", False, 1, port=5999)
    result.pitr.reached_time = (at - timedelta(seconds=1)).isoformat()
    result.measured_rpo_s = {"postgres": 30.0, "redis": None}
    result.seconds = {"postgres": 3.0, "redis": 1.0, "minio:attachments": 2.0}
    result.checks = [
        CheckResult("attachments have their objects", True, "9 attachment rows; 9 present")
    ]
    _show_stack_result(plan, result)
    out = capsys.readouterr().out
    assert "1200.0" in out and "no canary" in out and "9 present" in out
    assert "127.0.0.1:5999" in out and result.pitr.reached_time in out


def test_the_measured_rpo_check_fails_unproven_and_past_the_moment() -> None:
    """Canaries off: "not proven", never a pass with nothing measured; a canary newer than
    the moment: "past the moment", never an RPO of 0."""
    report = DrillReport("d", "moment", "local", "", "", "")
    report.measured_rpo_s = {"postgres": None, "redis": None}
    off = _measured_rpo_check(report, 3600.0)
    assert not off.passed and off.detail.startswith("not proven")
    report.measured_rpo_s = {"postgres": 3.0, "redis": -12.0}
    past = _measured_rpo_check(report, 3600.0)
    assert not past.passed and "past the moment: redis" in past.detail
    report.measured_rpo_s = {"postgres": 3.0, "redis": 40.0, "minio:b": None}
    ok = _measured_rpo_check(report, 3600.0)
    assert ok.passed and "no canary in minio:b" in ok.detail


def test_redis_references_add_up_and_redis_older_than_postgresql_is_skew_at_a_moment(
    tmp_path: Path, pg_server: PostgresEndpoint, s3_server: S3Endpoint
) -> None:
    """A counter and a recent-list id naming rows below PostgreSQL's largest that do not
    exist (deleted after the RDB, in a restore to a moment) and one above it (newer): every
    reference counted once; dangling after a snapshot restore, older skew at a moment."""
    with source_stack(tmp_path / "src", pg_server, s3_server, TINY) as stack:
        with psycopg.connect(**stack.postgres.connect_kwargs()) as conn:
            row = conn.execute("SELECT min(id), max(id) FROM chat_rooms").fetchone()
            user = conn.execute("SELECT min(id) FROM users").fetchone()
        assert row is not None and user is not None
        room, top = row
        client = connect_redis(stack.redis)
        try:
            client.hset(redis_layout.unread_key(user[0]), mapping={"0": 1, str(top + 100): 1})
            client.lpush(redis_layout.recent_key(room), "0")
        finally:
            client.close()
        for older in (False, True):
            found = checks.redis_points_to_existing_rows(stack, redis_older=older)
            f = found.figures
            assert f["existing"] + f["dangling"] + f["newer"] + f["older"] == f["references"]
            assert f["references"] == f["counters"] + f["recent_ids"]
            assert f["newer"] >= 1
            if older:
                assert found.passed and (f["older"], f["dangling"]) == (2, 0), found.detail
            else:
                assert not found.passed and (f["older"], f["dangling"]) == (0, 2), found.detail
