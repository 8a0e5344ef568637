"""``drtool restore`` against real servers: round trips, refusals, the swap, damaged objects."""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import threading
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
from support.cli import run_drtool
from support.compare import assert_same_redis, bucket_objects, databases, execute, table_rows
from support.servers import skip_or_fail
from support.stacks import Repository, make_repository, source_stack

from drtool import keys
from drtool.config import load_config
from drtool.endpoints import PostgresEndpoint, RedisEndpoint, S3Endpoint, StackEndpoints
from drtool.errors import IntegrityError
from drtool.repository.manifest import canonical
from drtool.s3session import s3_client
from drtool.services.restore.run import RestoreOptions, RestoreResult, run_restore

OLD = datetime(2025, 6, 1, 2, 0, tzinfo=UTC)
NEW = datetime(2025, 6, 2, 2, 0, tzinfo=UTC)


@dataclass(frozen=True)
class World:
    """A seeded source stack and a repository with two snapshots of it and a Redis-only one."""

    repo: Repository
    old_id: str
    new_id: str
    redis_id: str


@pytest.fixture(scope="module")
def world(
    tmp_path_factory: pytest.TempPathFactory, pg_server: PostgresEndpoint, s3_server: S3Endpoint
) -> Iterator[World]:
    """Seed, snapshot (OLD), add a marker user, snapshot again (NEW), then Redis alone."""
    directory = tmp_path_factory.mktemp("restore")
    with source_stack(directory, pg_server, s3_server) as source:
        repo = make_repository(directory / "repo", source)
        old_id = repo.backup(now=OLD)
        execute(
            source.postgres,
            "INSERT INTO users (username, display_name, email, created_at) "
            "VALUES ('marker', 'Marker', 'marker@example.com', now())",
        )
        new_id = repo.backup(now=NEW)
        redis_id = repo.backup(now=NEW + timedelta(hours=1), components=("redis",))
        yield World(repo, old_id, new_id, redis_id)


@pytest.fixture
def target(
    pg_database: PostgresEndpoint, redis_db: RedisEndpoint, s3_server: S3Endpoint, s3_bucket: str
) -> StackEndpoints:
    """An empty target stack: a fresh database, the flushed session Redis, a new bucket."""
    return StackEndpoints(pg_database, redis_db, s3_server, (s3_bucket,))


def restore(world: World, config: Path, **options: object) -> RestoreResult:
    """Run the restore service into target ``t`` with ``--yes``."""
    opts = RestoreOptions(target="t", yes=True, **options)  # type: ignore[arg-type]
    return run_restore(
        load_config(config, {}), home=config.parent, options=opts, confirm=lambda r: False
    )


@pytest.mark.slow
def test_round_trip_equals_the_source(world: World, target: StackEndpoints, tmp_path: Path) -> None:
    config = world.repo.operator_config(tmp_path / "op.toml", {"t": target})
    run = run_drtool(
        "--debug", "restore", "latest", "--target", "t", "--yes", "--json", config=config
    )
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["snapshot_id"] == world.new_id and result["ok"]
    assert [c["name"] for c in result["components"]] == ["postgres", "redis", "minio"]
    # the piped dump's data offsets were found while it was staged (no second pass over it)
    assert re.search(r"dump staged in [\d.]+ s, [1-9]\d* data offsets indexed", run.stderr)
    assert all(c["problems"] == [] and c["seconds"] > 0 for c in result["components"])
    source = world.repo.source
    assert table_rows(target.postgres) == table_rows(source.postgres)
    assert_same_redis(source.redis, target.redis)
    restored = bucket_objects(target.minio, target.buckets[0])
    assert restored == bucket_objects(source.minio, source.buckets[0])
    assert len(restored) == 20
    assert databases(target.postgres, target.postgres.dbname + "_%") == []  # empty one dropped


@pytest.mark.slow
def test_latest_of_one_store_is_its_newest_snapshot(
    world: World, target: StackEndpoints, tmp_path: Path
) -> None:
    """`latest` of all stores above was NEW (the Redis-only snapshot lacks two); of Redis, not."""
    config = world.repo.operator_config(tmp_path / "op.toml", {"t": target})
    result = restore(world, config, components=("redis",))
    assert result.snapshot_id == world.redis_id and result.ok
    assert [c.name for c in result.components] == ["redis"]
    assert_same_redis(world.repo.source.redis, target.redis)


def test_at_picks_the_snapshot_of_that_time(
    world: World, target: StackEndpoints, tmp_path: Path
) -> None:
    config = world.repo.operator_config(tmp_path / "op.toml", {"t": target})
    at = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
    result = restore(world, config, at=at, components=("postgres",))
    assert result.snapshot_id == world.old_id and result.ok
    assert execute(target.postgres, "SELECT count(*) FROM users WHERE username = 'marker'") == (0,)
    result = restore(world, config, ref=world.new_id, components=("postgres",), force=True,
                     drop_old=True)  # fmt: skip
    assert execute(target.postgres, "SELECT count(*) FROM users WHERE username = 'marker'") == (1,)


def test_dry_run_changes_nothing(world: World, target: StackEndpoints, tmp_path: Path) -> None:
    config = world.repo.operator_config(tmp_path / "op.toml", {"t": target})
    run = run_drtool("restore", "--target", "t", "--dry-run", "--json", config=config)
    assert run.returncode == 0, run.stderr
    plan = {p["component"]: p for p in json.loads(run.stdout)["plan"]}
    assert plan["postgres"]["holds"] == "an empty database" and not plan["postgres"]["replaces"]
    assert plan["minio"]["holds"] == "0 objects"
    assert table_rows(target.postgres) == {}
    assert bucket_objects(target.minio, target.buckets[0]) == {}


def _fill(target: StackEndpoints) -> None:
    execute(target.postgres, "CREATE TABLE keepme (v text)")
    execute(target.postgres, "INSERT INTO keepme VALUES ('live')")
    with redis.Redis(host=target.redis.host, port=target.redis.port,
                     password=target.redis.password) as client:  # fmt: skip
        client.set("live-key", "1")
    s3_client(target.minio).put_object(Bucket=target.buckets[0], Key="live.txt", Body=b"live")


def _untouched(target: StackEndpoints) -> None:
    assert table_rows(target.postgres) == {"public.keepme": ["(live)"]}
    assert databases(target.postgres, target.postgres.dbname + "_%") == []
    with redis.Redis(host=target.redis.host, port=target.redis.port,
                     password=target.redis.password) as client:  # fmt: skip
        assert client.keys("*") == [b"live-key"]
    assert list(bucket_objects(target.minio, target.buckets[0])) == ["live.txt"]


def test_non_empty_target_is_refused_untouched(
    world: World, target: StackEndpoints, tmp_path: Path
) -> None:
    _fill(target)
    config = world.repo.operator_config(tmp_path / "op.toml", {"t": target})
    run = run_drtool("restore", "--target", "t", "--yes", config=config)
    assert run.returncode == 2
    assert run.stderr.startswith("error: restore: the target is not empty (postgres ")
    assert "use --force" in run.stderr and len(run.stderr.strip().splitlines()) == 1
    _untouched(target)


def test_without_a_terminal_or_yes_nothing_happens(
    world: World, target: StackEndpoints, tmp_path: Path
) -> None:
    config = world.repo.operator_config(tmp_path / "op.toml", {"t": target})
    run = run_drtool("restore", "--target", "t", config=config)
    assert run.returncode == 2
    assert "error: restore: not a terminal, so nothing to confirm with; pass --yes" in run.stderr
    assert table_rows(target.postgres) == {}


@pytest.mark.slow
def test_force_restores_beside_and_keeps_the_old_database(
    world: World, target: StackEndpoints, tmp_path: Path
) -> None:
    _fill(target)
    config = world.repo.operator_config(tmp_path / "op.toml", {"t": target})
    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    opts = RestoreOptions(target="t", yes=True, force=True)
    result = run_restore(load_config(config, {}), home=tmp_path, options=opts,
                         confirm=lambda r: False, now=now)  # fmt: skip
    assert result.ok, result.components
    name = target.postgres.dbname
    old = f"{name}_pre_restore_20260102_030405"
    try:
        assert databases(target.postgres, name + "_%") == [old]
        assert table_rows(target.postgres) == table_rows(world.repo.source.postgres)
        kept = PostgresEndpoint(**{**target.postgres.__dict__, "dbname": old})
        assert table_rows(kept) == {"public.keepme": ["(live)"]}
        assert_same_redis(world.repo.source.redis, target.redis)  # live-key removed
        objects = bucket_objects(target.minio, target.buckets[0])
        assert objects.pop("live.txt")[0] == b"live"  # kept: not in the snapshot
        assert objects == bucket_objects(world.repo.source.minio, world.repo.source.buckets[0])
        again = restore(world, config, components=("minio",), force=True)
        assert again.components[0].detail.endswith(
            "0 put, 20 identical skipped, extra objects kept: 1"
        )
    finally:
        execute(
            PostgresEndpoint(**{**target.postgres.__dict__, "dbname": "postgres"}),
            f'DROP DATABASE IF EXISTS "{old}" WITH (FORCE)',
        )


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.slow
def test_damaged_objects_leave_the_target_untouched(
    world: World, target: StackEndpoints, tmp_path: Path
) -> None:
    copy = tmp_path / "repository"
    shutil.copytree(world.repo.directory / "repository", copy)
    config = world.repo.operator_config(tmp_path / "op.toml", {"t": target}, url=copy.as_uri())
    snap = copy / "snapshots" / world.new_id
    dump = snap / "postgres" / "dump.pgdump.zst.age"
    _flip(dump, dump.stat().st_size // 2)
    run = run_drtool("restore", "--target", "t", "--yes", config=config)
    assert run.returncode == 5, run.stderr
    assert run.stderr.startswith(f"error: snapshots/{world.new_id}/postgres/dump.pgdump.zst.age: ")
    assert "authentication failed at offset" in run.stderr
    assert table_rows(target.postgres) == {}
    assert databases(target.postgres, target.postgres.dbname + "_%") == []
    blob = sorted((copy / "blobs").rglob("*.zst.age"))[3]
    _flip(blob, blob.stat().st_size - 100)
    run = run_drtool("restore", "--target", "t", "--yes", "--component", "minio", config=config)
    assert run.returncode == 5, run.stderr
    assert f"error: blobs/{blob.parent.name}/{blob.name}: authentication failed at offset" in (
        run.stderr
    )
    assert bucket_objects(target.minio, target.buckets[0]) == {}
    with redis.Redis(host=target.redis.host, port=target.redis.port,
                     password=target.redis.password) as client:  # fmt: skip
        assert client.dbsize() == 0


def test_wrong_identity_exits_12(world: World, target: StackEndpoints, tmp_path: Path) -> None:
    other = tmp_path / "other.key"
    keys.write_identity(other, passphrase=None)
    config = world.repo.operator_config(tmp_path / "op.toml", {"t": target}, identity=other)
    run = run_drtool("restore", "--target", "t", "--yes", config=config)
    assert run.returncode == 12
    assert "no identity matches; encrypted to" in run.stderr
    assert table_rows(target.postgres) == {}


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs (skipped where mounting is not permitted)."""
    mount = tmp_path / f"tiny-{uuid.uuid4().hex[:6]}"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                          capture_output=True, check=False)  # fmt: skip
    if done.returncode != 0:
        skip_or_fail(f"cannot mount a tmpfs: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_full_scratch_dir_is_a_clear_error(
    world: World, target: StackEndpoints, tmp_path: Path, tiny_disk: Path
) -> None:
    config = world.repo.operator_config(tmp_path / "op.toml", {"t": target}, scratch=tiny_disk)
    run = run_drtool("restore", "--target", "t", "--yes", config=config)
    assert run.returncode == 2
    assert run.stderr.startswith(f"error: backup.scratch_dir: {tiny_disk} has ")
    assert "bytes free but the restore stages" in run.stderr
    assert table_rows(target.postgres) == {}
    assert list(tiny_disk.iterdir()) == []


@pytest.mark.slow
def test_kill_9_before_the_switch_leaves_the_live_database_and_a_rerun_succeeds(
    world: World, target: StackEndpoints, tmp_path: Path
) -> None:
    """R3: killed with the verified copy loaded beside the live database, not yet switched."""
    _fill(target)
    config = world.repo.operator_config(tmp_path / "op.toml", {"t": target})
    args = ("restore", "--target", "t", "--component", "postgres", "--yes", "--force")
    crash = {"DRTOOL_CRASH_AT": "restore-before-switch"}
    killed = run_drtool(*args, config=config, extra_env=crash)
    assert killed.returncode == 137, killed.stderr
    name = target.postgres.dbname
    assert table_rows(target.postgres) == {"public.keepme": ["(live)"]}  # the service's data
    (leftover,) = databases(target.postgres, name + "\\_restore\\_%")
    try:
        rerun = run_drtool(*args, "--drop-old", config=config)
        assert rerun.returncode == 0, rerun.stderr
        assert f"interrupted restore: {leftover} (drop them" in rerun.stderr
        assert table_rows(target.postgres) == table_rows(world.repo.source.postgres)
    finally:
        execute(replace(target.postgres, dbname="postgres"), f'DROP DATABASE "{leftover}"')


def test_restore_refuses_a_snapshot_with_a_wrong_signature(
    world: World, target: StackEndpoints, tmp_path: Path
) -> None:
    copy = tmp_path / "repository"
    shutil.copytree(world.repo.directory / "repository", copy)
    manifest = copy / "snapshots" / world.new_id / "manifest.json"
    doc = json.loads(manifest.read_text())
    doc["body"]["host"] = "forged"
    manifest.write_text(json.dumps(doc))
    config = world.repo.operator_config(tmp_path / "op.toml", {"t": target}, url=copy.as_uri())
    run = run_drtool("restore", world.new_id, "--target", "t", "--yes", config=config)
    assert run.returncode == IntegrityError.exit_code
    *warnings, error = run.stderr.strip().splitlines()
    assert error.startswith(f"error: snapshot {world.new_id} is INVALID: ")
    # the next snapshot's manifest recorded the original: the hash chain notices the change
    assert any("hash chain" in w and world.redis_id in w for w in warnings), warnings
    assert table_rows(target.postgres) == {}


def test_flipped_byte_is_never_shown_or_restored_as_good(
    world: World, target: StackEndpoints, tmp_path: Path
) -> None:
    """Issue 18.5: a flipped byte keeps the size, so listing cannot see it. ``list`` says so
    ("never verified"); ``--dry-run`` hash-checks what it would read and fails; once a signed
    ``verify`` found it, ``list`` says DAMAGED and ``restore latest`` passes over it."""
    copy = tmp_path / "repository"
    shutil.copytree(world.repo.directory / "repository", copy)
    config = world.repo.operator_config(tmp_path / "op.toml", {"t": target}, url=copy.as_uri())
    backup_side = tmp_path / "backup.toml"
    backup_side.write_text(
        world.repo.backup_config.read_text().replace(world.repo.url, copy.as_uri())
    )
    backup_side.chmod(0o600)
    dump_key = f"snapshots/{world.new_id}/postgres/dump.pgdump.zst.age"
    _flip(copy / dump_key, (copy / dump_key).stat().st_size // 2)

    rows = {r["id"]: r for r in json.loads(run_drtool("list", "--json", config=config).stdout)}
    assert rows[world.new_id]["verified"] == "never verified"  # no claim about the bytes
    run = run_drtool("restore", "--target", "t", "--dry-run", config=config)
    assert run.returncode == 5, (run.stdout, run.stderr)
    assert run.stderr.endswith(
        f"error: restore --dry-run: 1 of {run.stderr.split(' of ')[1].split()[0]} objects "
        f"damaged: {dump_key}: stored sha256 differs from the manifest\n"
    )
    run = run_drtool("restore", world.old_id, "--target", "t", "--dry-run", config=config)
    assert run.returncode == 0, run.stderr
    assert "objects the restore reads: stored size and sha256 match" in run.stdout

    # the backup host verifies (key-less, signed record): found, recorded, named
    run = run_drtool("verify", "--all", config=backup_side)
    assert run.returncode == 5, run.stderr
    rows = {r["id"]: r for r in json.loads(run_drtool("list", "--json", config=config).stdout)}
    assert rows[world.new_id]["status"] == "DAMAGED"
    assert rows[world.new_id]["verified"] == f"DAMAGED: {dump_key}"
    assert rows[world.old_id]["status"] == "VALID"
    assert rows[world.old_id]["verified"].startswith("verified ")
    assert rows[world.old_id]["verified"].endswith(" (hashes)")
    # `latest` of every store passes over the damaged snapshot; naming it is refused
    run = run_drtool("restore", "--target", "t", "--dry-run", "--json", config=config)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["snapshot_id"] == world.old_id
    run = run_drtool("restore", world.new_id, "--target", "t", "--dry-run", config=config)
    assert run.returncode == 5
    assert f"snapshot {world.new_id} is DAMAGED: {dump_key} failed its last verification" in (
        run.stderr
    )

    # a record signed by another key (anyone who can write the repository) is ignored
    keys.write_signing_key(tmp_path / "forger.key")
    forger = keys.load_signing_key(tmp_path / "forger.key")
    for record in (copy / "verifications" / world.new_id).glob("*.json"):
        doc = json.loads(record.read_text())
        doc["body"]["damaged"] = []
        doc["signature"] = keys.sign(forger, canonical(doc["body"]))
        record.write_text(json.dumps(doc))
    rows = {r["id"]: r for r in json.loads(run_drtool("list", "--json", config=config).stdout)}
    # the forged "not damaged" records cannot clear it: the signed verification summary
    # still says DAMAGED; without the summary, the forged records alone count for nothing
    assert rows[world.new_id]["verified"] == f"DAMAGED: {dump_key}"
    for summary in (copy / "verifications" / "summary").glob("*.json"):
        summary.unlink()
    rows = {r["id"]: r for r in json.loads(run_drtool("list", "--json", config=config).stdout)}
    assert rows[world.new_id]["verified"] == "never verified"
    assert table_rows(target.postgres) == {}


@pytest.mark.slow
def test_force_into_a_bucket_says_what_it_kept_and_mirror_removes_it(
    world: World, target: StackEndpoints, tmp_path: Path
) -> None:
    """Objects the snapshot lacks: counted and kept (merge), or planned and removed (mirror).

    The old restore kept them silently and reported PASS, so the bucket was not the snapshot's.
    """
    source = world.repo.source
    bucket = target.buckets[0]
    s3 = s3_client(target.minio)
    s3.put_object(Bucket=bucket, Key="live.txt", Body=b"live")
    config = world.repo.operator_config(tmp_path / "op.toml", {"t": target})
    args = ("restore", "--target", "t", "--component", "minio", "--yes", "--json", "--force")
    merged = run_drtool(*args, config=config)
    assert merged.returncode == 0, merged.stderr
    minio = json.loads(merged.stdout)["components"][0]
    assert minio["detail"].endswith("extra objects kept: 1")
    assert minio["counts"] == {"extra_objects_kept": 1, "extra_objects_removed": 0}
    assert "live.txt" in bucket_objects(target.minio, bucket)

    first = sorted(bucket_objects(source.minio, source.buckets[0]))[0]
    s3.put_object(Bucket=bucket, Key=first + ".extra", Body=b"extra")  # under the prefix
    dry = run_drtool(*args, "--dry-run", "--minio-mode", "mirror", "--prefix", first,
                     config=config)  # fmt: skip
    assert dry.returncode == 0, dry.stderr
    action = json.loads(dry.stdout)["plan"][0]["action"]
    assert f"1 objects under {first!r} not in the snapshot removed (--minio-mode mirror)" in action
    assert first + ".extra" in bucket_objects(target.minio, bucket)  # a dry run

    mirrored = run_drtool(*args, "--minio-mode", "mirror", "--prefix", first, config=config)
    assert mirrored.returncode == 0, mirrored.stderr
    minio = json.loads(mirrored.stdout)["components"][0]
    assert minio["detail"].endswith("extra objects removed: 1")
    assert minio["counts"] == {"extra_objects_kept": 0, "extra_objects_removed": 1}
    objects = bucket_objects(target.minio, bucket)
    assert first + ".extra" not in objects and "live.txt" in objects  # outside the prefix: kept

    whole = run_drtool(*args, "--minio-mode", "mirror", config=config)
    assert whole.returncode == 0, whole.stderr
    assert json.loads(whole.stdout)["components"][0]["counts"]["extra_objects_removed"] == 1
    assert bucket_objects(target.minio, bucket) == bucket_objects(source.minio, source.buckets[0])


def test_the_switch_says_it_ends_the_apps_connections_and_where_their_writes_go(
    world: World, target: StackEndpoints, tmp_path: Path
) -> None:
    """The plan (and --dry-run) count the apps' open connections; the result names the kept DB.

    The switch ends them and what they write meanwhile stays in the kept old database: the old
    restore said neither.
    """
    _fill(target)
    config = world.repo.operator_config(tmp_path / "op.toml", {"t": target})
    name = target.postgres.dbname
    args = ("restore", "--target", "t", "--component", "postgres", "--force")
    with psycopg.connect(**target.postgres.connect_kwargs()) as app:
        app.execute("SELECT 1")
        dry = run_drtool(*args, "--dry-run", config=config)
        assert dry.returncode == 0, dry.stderr
        assert (
            f"note (postgres): the switch ends every open connection to {name} (1 open now, "
            "drtool's own not counted)" in " ".join(dry.stdout.split())
        )
        notes = json.loads(run_drtool(*args, "--dry-run", "--json", config=config).stdout)
        assert notes["plan"][0]["notes"][1] == (
            f"whatever is written to {name} between the start of the restore and the switch "
            f"stays in the kept database {name}_pre_restore_<time>, not in the restored one"
        )
        now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
        opts = RestoreOptions(target="t", yes=True, force=True, components=("postgres",))
        result = run_restore(load_config(config, {}), home=tmp_path, options=opts,
                             confirm=lambda r: False, now=now)  # fmt: skip
        with pytest.raises(psycopg.OperationalError):
            app.execute("SELECT 1")  # ended by the switch
    old = f"{name}_pre_restore_20260102_030405"
    try:
        pg = result.components[0]
        assert pg.counts == {"connections_ended": 1}
        assert f"previous kept as {old} (anything written to {name} between the start of " in (
            pg.detail
        )
        assert pg.detail.endswith("1 open connections ended at the switch")
    finally:
        execute(
            PostgresEndpoint(**{**target.postgres.__dict__, "dbname": "postgres"}),
            f'DROP DATABASE IF EXISTS "{old}" WITH (FORCE)',
        )


def test_the_log_says_an_empty_previous_database_was_dropped(
    world: World, target: StackEndpoints, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """It said "the previous one is <db>_pre_restore_…" and then dropped it."""
    config = world.repo.operator_config(tmp_path / "op.toml", {"t": target})
    caplog.set_level(logging.INFO, logger="drtool")
    result = restore(world, config, components=("postgres",))
    assert result.ok
    name = target.postgres.dbname
    assert databases(target.postgres, name + "_%") == []
    said = [r.getMessage() for r in caplog.records if "switched in" in r.getMessage()]
    old = f"{name}_pre_restore_"
    assert len(said) == 2 and said[0].startswith(
        f"postgres: {name} switched in; the previous one, {old}"
    )
    assert said[0].endswith(", is being dropped")  # said at once, not only once dropped
    assert said[1] == f"postgres: {name} switched in; the previous one dropped (it held nothing)"
    assert "previous kept as" not in result.components[0].detail
    assert f"previous dropped ({old}" in result.components[0].detail
    assert result.components[0].previous_kept == ""


def test_an_empty_database_written_during_the_restore_is_kept_not_dropped(
    world: World,
    target: StackEndpoints,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An app writes into the (empty) live database while the restore runs: its write is kept.

    The old restore dropped the previous database because it had been empty at the start.
    The app's write is made at the restore's last step before the switch (its crash point).
    """
    from drtool.stores.postgres import restore as pg_restore

    def app_writes(name: str) -> None:
        execute(target.postgres, "CREATE TABLE written_meanwhile (v text)")

    monkeypatch.setattr(pg_restore, "crash_point", app_writes)
    caplog.set_level(logging.INFO, logger="drtool")
    config = world.repo.operator_config(tmp_path / "op.toml", {"t": target})
    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    opts = RestoreOptions(target="t", yes=True, components=("postgres",))
    result = run_restore(load_config(config, {}), home=tmp_path, options=opts,
                         confirm=lambda r: False, now=now)  # fmt: skip
    name = target.postgres.dbname
    old = f"{name}_pre_restore_20260102_030405"
    try:
        assert result.ok
        assert databases(target.postgres, name + "_%") == [old]
        kept = PostgresEndpoint(**{**target.postgres.__dict__, "dbname": old})
        assert list(table_rows(kept)) == ["public.written_meanwhile"]
        assert f"previous kept as {old}" in result.components[0].detail
        assert f"{old} was empty when the restore started but holds data now" in caplog.text
    finally:
        execute(
            PostgresEndpoint(**{**target.postgres.__dict__, "dbname": "postgres"}),
            f'DROP DATABASE IF EXISTS "{old}" WITH (FORCE)',
        )


def test_a_previous_database_that_cannot_be_dropped_is_kept_and_named_not_a_failed_restore(
    world: World,
    target: StackEndpoints,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The drop of the replaced database runs after the switch, off the restore's critical
    path; when the server refuses it, the restored database is live and verified: the restore
    succeeds, and says the previous one is kept and why.

    The old restore raised after the switch (exit 3 for a restore that had succeeded). The
    server's refusal is real: the live database is made a template just before the switch,
    and PostgreSQL never drops a template database.
    """
    from drtool.stores.postgres import restore as pg_restore

    admin = PostgresEndpoint(**{**target.postgres.__dict__, "dbname": "postgres"})
    name = target.postgres.dbname

    def made_a_template(point: str) -> None:
        execute(admin, f'ALTER DATABASE "{name}" IS_TEMPLATE true')

    monkeypatch.setattr(pg_restore, "crash_point", made_a_template)
    caplog.set_level(logging.INFO, logger="drtool")
    config = world.repo.operator_config(tmp_path / "op.toml", {"t": target})
    now = datetime(2026, 1, 2, 3, 4, 6, tzinfo=UTC)
    opts = RestoreOptions(target="t", yes=True, components=("postgres",), drop_old=True)
    old = f"{name}_pre_restore_20260102_030406"
    try:
        result = run_restore(load_config(config, {}), home=tmp_path, options=opts,
                             confirm=lambda r: False, now=now)  # fmt: skip
        assert result.ok
        assert databases(target.postgres, name + "_%") == [old]
        assert f"previous kept as {old}" in result.components[0].detail
        # the --drop-old that did not happen is in the JSON, not only in the free text
        assert asdict(result)["components"][0]["previous_kept"] == old
        assert f"the previous one kept as {old}: drop database {old}" in caplog.text
        assert "template" in caplog.text
    finally:
        execute(admin, "UPDATE pg_database SET datistemplate = false WHERE datname = %s", (old,))
        execute(admin, f'DROP DATABASE IF EXISTS "{old}" WITH (FORCE)')


@pytest.mark.slow
def test_the_stores_stage_side_by_side_and_all_before_any_target_changes(
    world: World, target: StackEndpoints, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Staging only reads the repository and writes the scratch dir, so the three stores'
    staging overlap (their RTOs no longer add up one after another); no target is touched
    before every one of them finished.

    Each real ``stage`` first meets the others at a barrier: staged one after another (the
    old code) the first waits alone, and the barrier's guard breaks it.
    """
    from drtool.stores.minio.store import MinioRestoring
    from drtool.stores.postgres.store import PostgresRestoring
    from drtool.stores.redis.store import RedisRestoring

    meet = threading.Barrier(3, timeout=30)
    staged: list[str] = []
    touched_before_all_staged: list[str] = []
    for cls in (PostgresRestoring, RedisRestoring, MinioRestoring):
        real_stage, real_restore = cls.stage, cls.restore

        def stage(self: Any, t: Any, work: Path, real: Any = real_stage, c: Any = cls) -> None:
            meet.wait()
            real(self, t, work)
            staged.append(c.__name__)

        def restore_(self: Any, t: Any, work: Path, stamp: str, real: Any = real_restore) -> Any:
            if len(staged) < 3:
                touched_before_all_staged.append(type(self).__name__)
            return real(self, t, work, stamp)

        monkeypatch.setattr(cls, "stage", stage)
        monkeypatch.setattr(cls, "restore", restore_)
    config = world.repo.operator_config(tmp_path / "op.toml", {"t": target})
    result = restore(world, config)
    assert result.ok and sorted(staged) == ["MinioRestoring", "PostgresRestoring", "RedisRestoring"]
    assert touched_before_all_staged == []
    assert table_rows(target.postgres) == table_rows(world.repo.source.postgres)


@pytest.mark.slow
def test_a_damaged_blob_stops_the_dump_staged_beside_it(
    world: World, target: StackEndpoints, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first staging failure cancels the other stores' staging (ADR 0034): the dump being
    decrypted beside a damaged MinIO blob stops at its next chunk instead of downloading to
    the end before the error is shown.

    The dump's stored bytes are held back until the MinIO staging has failed and, when the
    restore has one, its shared cancel event is set: the old code (no event, every store
    waited for) decrypts the whole dump; the fix stops it with ``stage.Cancelled``.
    """
    from drtool.storage.file import FileStorage
    from drtool.stores.minio.store import MinioRestoring
    from drtool.stores.postgres.store import PostgresRestoring

    copy = tmp_path / "repository"
    shutil.copytree(world.repo.directory / "repository", copy)
    config = world.repo.operator_config(tmp_path / "op.toml", {"t": target}, url=copy.as_uri())
    blob = sorted((copy / "blobs").rglob("*.zst.age"))[3]
    _flip(blob, blob.stat().st_size - 100)
    blob_failed = threading.Event()
    cancels: list[threading.Event] = []
    dump_outcome: list[str] = []
    real_get, real_pg, real_minio = FileStorage.get, PostgresRestoring.stage, MinioRestoring.stage

    def get(self: Any, key: str, *, version_id: str | None = None) -> Any:
        pieces = real_get(self, key, version_id=version_id)
        if not key.endswith("/postgres/dump.pgdump.zst.age"):
            return pieces

        def held_back() -> Iterator[bytes]:
            assert blob_failed.wait(60)
            for cancel in cancels:  # the restore's shared event (none in the old code)
                assert cancel.wait(60)
            yield from pieces

        return held_back()

    def pg_stage(self: Any, t: Any, work: Path) -> None:
        if (cancel := getattr(t, "cancel", None)) is not None:
            cancels.append(cancel)
        try:
            real_pg(self, t, work)
        except BaseException as exc:
            dump_outcome.append(type(exc).__name__)
            raise
        dump_outcome.append("staged")

    def minio_stage(self: Any, t: Any, work: Path) -> None:
        try:
            real_minio(self, t, work)
        except BaseException:
            blob_failed.set()
            raise

    monkeypatch.setattr(FileStorage, "get", get)
    monkeypatch.setattr(PostgresRestoring, "stage", pg_stage)
    monkeypatch.setattr(MinioRestoring, "stage", minio_stage)
    with pytest.raises(IntegrityError, match="authentication failed at offset"):
        restore(world, config)
    assert dump_outcome == ["Cancelled"]
    assert table_rows(target.postgres) == {}
    assert bucket_objects(target.minio, target.buckets[0]) == {}


@pytest.mark.slow
def test_a_store_failing_after_the_switch_names_the_replaced_database(
    world: World,
    target: StackEndpoints,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """PostgreSQL is switched in (its empty predecessor dropped after the switch) and then the
    MinIO restore fails: the error says PostgreSQL was already replaced, the switch was logged
    at INFO when it happened, and the drop was waited for before the error surfaced.

    The old code raised the MinIO error alone (the switch logged only at DEBUG, the drop left
    running).
    """
    from drtool.errors import SourceError
    from drtool.stores.minio.store import MinioRestoring

    def unreachable(self: Any, t: Any, work: Path, stamp: str) -> Any:
        raise SourceError("minio 127.0.0.1: connection refused")

    monkeypatch.setattr(MinioRestoring, "restore", unreachable)
    caplog.set_level(logging.INFO, logger="drtool")
    config = world.repo.operator_config(tmp_path / "op.toml", {"t": target})
    name = target.postgres.dbname
    with pytest.raises(SourceError) as raised:
        restore(world, config, force=True)
    message = str(raised.value)
    assert message.startswith("minio 127.0.0.1: connection refused; already restored before")
    assert f"postgres (database {name}; previous dropped ({name}_pre_restore_" in message
    assert "redis (" in message
    assert re.search(rf"{name} switched in; the previous one, {name}_pre_restore_\d+_\d+, is "
                     "being dropped", caplog.text)  # fmt: skip
    assert databases(target.postgres, name + "_%") == []  # the drop ended before the error
    assert table_rows(target.postgres) == table_rows(world.repo.source.postgres)


def test_a_driver_error_while_retiring_keeps_the_previous_database_not_the_results(
    world: World,
    target: StackEndpoints,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The replaced database's emptiness check after the switch fails with a driver error (not
    a SourceError): the restore still succeeds, the previous database is kept and named.
    The old ``_retire`` let it escape after every store restored: exit 1, results lost."""
    from drtool.sources import postgres as pg

    real = pg.database_is_empty

    def cancelled(endpoint: PostgresEndpoint, name: str) -> bool:
        if "_pre_restore_" in name:
            raise psycopg.errors.QueryCanceled("canceling statement due to statement timeout")
        return real(endpoint, name)

    monkeypatch.setattr(pg, "database_is_empty", cancelled)
    caplog.set_level(logging.INFO, logger="drtool")
    config = world.repo.operator_config(tmp_path / "op.toml", {"t": target})
    name = target.postgres.dbname
    old = f"{name}_pre_restore_20260102_030407"
    now = datetime(2026, 1, 2, 3, 4, 7, tzinfo=UTC)
    opts = RestoreOptions(target="t", yes=True, components=("postgres",))
    try:
        result = run_restore(load_config(config, {}), home=tmp_path, options=opts,
                             confirm=lambda r: False, now=now)  # fmt: skip
        assert result.ok
        assert f"previous kept as {old}" in result.components[0].detail
        assert f"the previous one kept as {old}: QueryCanceled: canceling statement" in caplog.text
        assert databases(target.postgres, name + "_%") == [old]
    finally:
        admin = PostgresEndpoint(**{**target.postgres.__dict__, "dbname": "postgres"})
        execute(admin, f'DROP DATABASE IF EXISTS "{old}" WITH (FORCE)')


def test_an_interrupt_while_staging_cancels_the_other_stores(tmp_path: Path) -> None:
    """Ctrl-C (SIGINT to the main thread, as the CLI gets it) while the stores stage side by
    side: the shared cancel event is set, the staging still running stops on it (it is not
    left downloading to its end), and the interrupt is raised once every thread stopped.

    Stub stores through the real ``_stage_all``: one sends the real SIGINT, the other waits
    for the cancel event (the old code had none: it returned as if fully staged)."""
    import signal
    from typing import cast

    from drtool.services.restore import run
    from drtool.stores.base import Restoring, Target
    from drtool.stores.stage import Cancelled

    both = threading.Barrier(2, timeout=30)
    stopped: list[str] = []

    class Staging:
        def __init__(self, interrupts: bool) -> None:
            self.interrupts = interrupts

        def staged_bytes(self, workers: int) -> int:
            return 0

        def stage(self, target: Target, work: Path) -> None:
            both.wait()
            if self.interrupts:
                signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)
                return
            cancel = getattr(target, "cancel", None)
            if cancel is not None and cancel.wait(60):
                stopped.append("cancelled")
                raise Cancelled("downloading: staging cancelled")
            stopped.append("ran to its end")

    stores = {"postgres": Staging(False), "minio": Staging(True)}
    with pytest.raises(KeyboardInterrupt):
        run._stage_all(
            cast(dict[str, Restoring], stores), Target(cast(StackEndpoints, None)), tmp_path
        )
    assert stopped == ["cancelled"]
