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
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
from support.stacks import make_repository, source_stack

from chat_stack.seed import SeedSizes
from drtool.config import load_config
from drtool.endpoints import PostgresEndpoint, S3Endpoint, StackEndpoints
from drtool.errors import NotFound
from drtool.repository import catalog
from drtool.repository.access import open_repo
from drtool.s3session import s3_client
from drtool.services.capture import build_capturer
from drtool.services.restore import moment
from drtool.wal.index import WalIndex

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
        empty = WalIndex(repo.info.repo_id)

        def plan(at: datetime, limit: float = 3600.0) -> moment.MomentPlan:
            return moment.plan_from(repo, records, empty, at, limit, "given")

        bucket = moment.bucket_store(stack.buckets[0])
        # a moment before the capture's round: the journal covers it, the bucket reaches it;
        # the snapshot's Redis part had not ended then: no RDB to restore
        before = record.time + timedelta(microseconds=1)
        at_before = plan(before)
        assert at_before.store(bucket).effective == before
        assert at_before.store(bucket).skew_s == 0.0
        assert "covers the moment" in at_before.store(bucket).source
        assert at_before.store("redis").effective is None
        assert "no valid snapshot holds a Redis RDB" in at_before.store("redis").error

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


def test_max_skew_defaults_to_the_schedules_redis_interval(tmp_path: Path) -> None:
    limit, why = moment.default_max_skew(Path(__file__).parents[1] / "schedules")
    assert limit == 3600.0 and "redis" in why
    (tmp_path / "s.toml").write_text(
        '[jobs.fast]\nkind = "backup"\ncomponents = ["redis"]\nevery = "15m"\n'
        '[jobs.full]\nkind = "backup"\nat = "03:00"\n'
    )
    assert moment.default_max_skew(tmp_path)[0] == 900.0
    limit, why = moment.default_max_skew(tmp_path / "absent")
    assert limit == moment.FALLBACK_MAX_SKEW_S and "no schedule read" in why
    cfg = load_config(None, {"DRTOOL_RESTORE_MAX_SKEW_S": "120"})
    assert moment.max_skew(cfg) == (120.0, "restore.max_skew_s")
