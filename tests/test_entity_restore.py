"""``drtool restore-entity`` against real servers: a deleted room or a user's wiped messages come
back from a snapshot, merged into a production stack that kept being written to.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pty
import socket
import stat
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
from support.cli import drtool_argv, drtool_env, run_drtool
from support.compare import bucket_objects, table_rows
from support.stacks import Repository, make_repository, source_stack

from chat_stack import redis_layout
from chat_stack.entity_map import ROOM, USER
from chat_stack.traffic import run_traffic
from drtool import keys
from drtool.endpoints import PostgresEndpoint, S3Endpoint, StackEndpoints
from drtool.s3session import s3_client

pytestmark = pytest.mark.slow


@dataclass
class World:
    """A seeded production stack, a snapshot of it, and an operator config restoring into it."""

    stack: StackEndpoints
    repo: Repository
    snapshot: str
    config: Path
    home: Path

    def sql(self, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Rows of one autocommitted statement on production."""
        with psycopg.connect(**self.stack.postgres.connect_kwargs(), autocommit=True) as conn:
            conn.execute("SET TimeZone = 'UTC'")
            cur = conn.execute(query, params)
            return cur.fetchall() if cur.description else []

    def redis(self) -> redis.Redis:
        """A client of production's Redis (strings)."""
        r = self.stack.redis
        return redis.Redis(host=r.host, port=r.port, password=r.password, decode_responses=True)

    def run(self, *args: str) -> Any:
        """``drtool restore-entity ARGS`` with the operator config (stdin not a terminal)."""
        return run_drtool("restore-entity", *args, config=self.config, home=self.home)


@pytest.fixture
def world(tmp_path: Path, pg_server: PostgresEndpoint, s3_server: S3Endpoint) -> Iterator[World]:
    with source_stack(tmp_path, pg_server, s3_server) as stack:
        repo = make_repository(tmp_path / "repo", stack)
        snapshot = repo.backup()
        config = repo.operator_config(tmp_path / "op" / "op.toml")
        yield World(stack, repo, snapshot, config, tmp_path / "op")


def _rows_of(world: World, entity: Any, entity_id: int) -> dict[str, list[str]]:
    """The entity's closure rows in production, as sorted text (the map's own selection)."""
    out = {}
    where = {
        "room": {
            "chat_rooms": "id = %(id)s",
            "chat_room_members": "room_id = %(id)s",
            "messages": "room_id = %(id)s",
            "attachments": "(message_id, message_created_at) IN "
            "(SELECT id, created_at FROM messages WHERE room_id = %(id)s)",
            "read_receipts": "room_id = %(id)s",
        },
        "user": {
            "users": "id = %(id)s",
            "friendships": "user_id = %(id)s OR friend_id = %(id)s",
            "chat_room_members": "user_id = %(id)s",
            "messages": "sender_id = %(id)s",
            "attachments": "(message_id, message_created_at) IN "
            "(SELECT id, created_at FROM messages WHERE sender_id = %(id)s)",
            "read_receipts": "user_id = %(id)s",
        },
    }[entity.kind]
    with psycopg.connect(**world.stack.postgres.connect_kwargs()) as conn:
        conn.execute("SET TimeZone = 'UTC'")
        for table in entity.tables:
            rows = conn.execute(
                f"SELECT t::text FROM {table} t WHERE {where[table]}",
                {"id": entity_id},
            ).fetchall()
            out[table] = sorted(r[0] for r in rows)
    return out


def _derived_keys(world: World, rooms: list[int]) -> dict[str, Any]:
    """The recent lists and unread fields of ``rooms`` (the derived keys a restore rebuilds)."""
    client = world.redis()
    out: dict[str, Any] = {}
    for room in rooms:
        out[redis_layout.recent_key(room)] = client.lrange(redis_layout.recent_key(room), 0, -1)
        for key in client.scan_iter(match=redis_layout.UNREAD_PATTERN):
            value = client.hget(key, str(room))
            if value is not None:
                out[f"{key} {room}"] = value
    return out


def _all_derived(world: World) -> dict[str, Any]:
    """Every unread hash and recent list (ephemeral keys expire on their own, so not compared)."""
    client = world.redis()
    out: dict[str, Any] = {}
    for key in client.scan_iter(match=redis_layout.UNREAD_PATTERN):
        out[key] = client.hgetall(key)
    for key in client.scan_iter(match=redis_layout.RECENT_PATTERN):
        out[key] = client.lrange(key, 0, -1)
    return out


def _objects(world: World, keys_: list[str]) -> dict[str, str | None]:
    """sha256 of each object (None: missing)."""
    s3 = s3_client(world.stack.minio)
    bucket = world.stack.buckets[0]
    out: dict[str, str | None] = {}
    for key in keys_:
        try:
            out[key] = hashlib.sha256(
                s3.get_object(Bucket=bucket, Key=key)["Body"].read()
            ).hexdigest()
        except s3.exceptions.NoSuchKey:
            out[key] = None
    return out


def _plan_table(stdout: str) -> dict[str, list[str]]:
    """The plan's table: per table, [in snapshot, insert, conflict, identical]."""
    out = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.split("│")]
        if len(cells) == 5 and cells[1].isdigit():
            out[cells[0]] = cells[1:]
    return out


def _busiest_room_with_attachments(world: World) -> int:
    return int(
        world.sql(
            "SELECT room_id FROM attachments GROUP BY room_id "
            "ORDER BY count(*) DESC, room_id LIMIT 1"
        )[0][0]
    )


def _delete_room(world: World, room: int) -> list[str]:
    """What the app does when a room is deleted: rows (cascade), objects, derived keys."""
    keys_ = [
        r[0] for r in world.sql("SELECT object_key FROM attachments WHERE room_id = %s", (room,))
    ]
    members = [
        r[0] for r in world.sql("SELECT user_id FROM chat_room_members WHERE room_id = %s", (room,))
    ]
    world.sql("DELETE FROM chat_rooms WHERE id = %s", (room,))
    s3 = s3_client(world.stack.minio)
    for key in keys_:
        s3.delete_object(Bucket=world.stack.buckets[0], Key=key)
    client = world.redis()
    client.delete(redis_layout.recent_key(room))
    for user in members:
        client.hdel(redis_layout.unread_key(user), str(room))
    return keys_


def _traffic(world: World, seconds: float, seed: int) -> None:
    run_traffic(world.stack, 40.0, seconds, seed, threading.Event())


def _other_rooms(world: World, room: int) -> list[tuple[Any, ...]]:
    return world.sql(
        "SELECT m::text FROM messages m WHERE room_id <> %s ORDER BY id", (room,)
    ) + world.sql("SELECT r::text FROM read_receipts r WHERE room_id <> %s ORDER BY 1", (room,))


def test_a_deleted_room_comes_back_whole_while_other_rooms_keep_their_new_messages(
    world: World,
) -> None:
    room = _busiest_room_with_attachments(world)
    rows_at_backup = _rows_of(world, ROOM, room)
    keys_at_backup = _derived_keys(world, [room])
    object_keys = [
        r[0] for r in world.sql("SELECT object_key FROM attachments WHERE room_id = %s", (room,))
    ]
    objects_at_backup = _objects(world, object_keys)
    assert object_keys and all(objects_at_backup.values())

    _traffic(world, 1.5, seed=11)  # writes after the backup, in every room
    _delete_room(world, room)
    _traffic(world, 1.5, seed=12)  # the deleted room gets none of these
    others = _other_rooms(world, room)
    newest = world.sql("SELECT max(id) FROM messages")[0][0]
    seq_before = world.sql("SELECT last_value FROM messages_id_seq")[0][0]

    run = world.run("room", str(room), "--yes")
    assert run.returncode == 0, run.stderr
    assert f"restored room {room}" in run.stdout
    assert _rows_of(world, ROOM, room) == rows_at_backup
    assert _objects(world, object_keys) == objects_at_backup
    assert _derived_keys(world, [room]) == keys_at_backup
    assert _other_rooms(world, room) == others  # written after the deletion: untouched
    assert world.sql("SELECT max(id) FROM messages")[0][0] == newest
    assert world.sql("SELECT last_value FROM messages_id_seq")[0][0] == seq_before  # not moved back

    journal = Path(run.stdout.split("journal: ")[1].split(" ")[0])
    assert stat.S_IMODE(journal.stat().st_mode) == 0o600
    assert journal.parent == world.home / "state" / "entity-journals"
    doc = json.loads(journal.read_text())
    assert doc["status"] == "applied"
    assert len(doc["rows"]["messages"]["inserted"]) == len(rows_at_backup["messages"])
    assert sorted(o["key"] for o in doc["objects"]["added"]) == sorted(object_keys)

    again = world.run("room", str(room), "--dry-run")
    assert again.returncode == 0, again.stderr
    assert "(0 of " in again.stdout  # every derived key already right
    assert _plan_table(again.stdout)["messages"][1:3] == ["0", "0"]  # no insert, no conflict


def test_undo_puts_back_the_state_before_the_restore_exactly(world: World) -> None:
    room = _busiest_room_with_attachments(world)
    _delete_room(world, room)
    _traffic(world, 1.0, seed=21)
    before_rows = table_rows(world.stack.postgres)
    before_objects = bucket_objects(world.stack.minio, world.stack.buckets[0])
    before_keys = _all_derived(world)

    run = world.run("room", str(room), "--yes")
    assert run.returncode == 0, run.stderr
    assert table_rows(world.stack.postgres) != before_rows
    journal = run.stdout.split("journal: ")[1].split(" ")[0]

    undo = world.run("--undo", journal, "--yes")
    assert undo.returncode == 0, undo.stderr
    assert "left:" not in undo.stdout
    assert table_rows(world.stack.postgres) == before_rows
    assert bucket_objects(world.stack.minio, world.stack.buckets[0]) == before_objects
    assert _all_derived(world) == before_keys
    assert json.loads(Path(journal).read_text())["status"] == "undone"

    twice = world.run("--undo", journal, "--yes")
    assert twice.returncode == 2
    assert twice.stderr.count("\n") == 1 and "already undone" in twice.stderr


def test_a_conflicting_edited_row_is_reported_not_overwritten_unless_preferred(
    world: World,
) -> None:
    room = _busiest_room_with_attachments(world)
    rows_at_backup = _rows_of(world, ROOM, room)
    edited, latest = (
        world.sql(
            "SELECT min(id), max(id) FROM messages WHERE room_id = %s AND kind = 'text'", (room,)
        )
    )[0]
    world.sql(
        "UPDATE messages SET content = 'edited after the backup', edited_at = created_at "
        "+ interval '1 day' WHERE id = %s",
        (edited,),
    )
    world.sql("DELETE FROM messages WHERE id = %s", (latest,))
    run = world.run("room", str(room), "--yes")
    assert run.returncode == 0, run.stderr
    assert f"conflict kept: messages (id={edited}, " in run.stdout
    assert "content, edited_at differ" in run.stdout
    assert "1 rows inserted" in run.stdout
    assert world.sql("SELECT content FROM messages WHERE id = %s", (edited,)) == [
        ("edited after the backup",)
    ]
    assert world.sql("SELECT count(*) FROM messages WHERE id = %s", (latest,)) == [(1,)]

    prefer = world.run("room", str(room), "--yes", "--prefer", "snapshot")
    assert prefer.returncode == 0, prefer.stderr
    assert "1 replaced" in prefer.stdout
    assert _rows_of(world, ROOM, room) == rows_at_backup
    undo = world.run("--undo", prefer.stdout.split("journal: ")[1].split(" ")[0], "--yes")
    assert undo.returncode == 0, undo.stderr
    assert "1 put back" in undo.stdout
    assert world.sql("SELECT content FROM messages WHERE id = %s", (edited,)) == [
        ("edited after the backup",)
    ]


def test_a_user_whose_messages_were_wiped_comes_back(world: World) -> None:
    user = int(
        world.sql(
            "SELECT uploader_id FROM attachments GROUP BY 1 ORDER BY count(*) DESC, 1 LIMIT 1"
        )[0][0]
    )
    rows_at_backup = _rows_of(world, USER, user)
    rooms = [
        r[0]
        for r in world.sql("SELECT DISTINCT room_id FROM messages WHERE sender_id = %s", (user,))
    ]
    keys_at_backup = _derived_keys(world, rooms)
    # the buggy migration: the user's messages (attachments cascade) and friendships are gone
    world.sql("DELETE FROM messages WHERE sender_id = %s", (user,))
    world.sql("DELETE FROM friendships WHERE user_id = %s OR friend_id = %s", (user, user))
    assert _rows_of(world, USER, user) != rows_at_backup

    dry = world.run("user", str(user), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "(dry run, nothing changed)" in dry.stdout
    assert _rows_of(world, USER, user) != rows_at_backup

    run = world.run("user", str(user), "--yes")
    assert run.returncode == 0, run.stderr
    assert _rows_of(world, USER, user) == rows_at_backup
    assert _derived_keys(world, rooms) == keys_at_backup


def test_dry_run_changes_nothing(world: World) -> None:
    room = _busiest_room_with_attachments(world)
    _delete_room(world, room)
    before = (table_rows(world.stack.postgres), _all_derived(world))
    objects = bucket_objects(world.stack.minio, world.stack.buckets[0])
    run = world.run("room", str(room), "--dry-run")
    assert run.returncode == 0, run.stderr
    assert "(dry run, nothing changed)" in run.stdout
    assert (table_rows(world.stack.postgres), _all_derived(world)) == before
    assert bucket_objects(world.stack.minio, world.stack.buckets[0]) == objects
    assert not (world.home / "state" / "entity-journals").exists() or not any(
        (world.home / "state" / "entity-journals").iterdir()
    )
    plan = _plan_table(run.stdout)
    assert set(plan) == set(ROOM.tables)
    assert int(plan["messages"][1]) == int(plan["messages"][0]) > 0  # all to insert
    as_json = json.loads(world.run("room", str(room), "--dry-run", "--json").stdout)
    assert as_json["dry_run"] is True and as_json["journal"] is None
    counts = {t["table"]: t for t in as_json["plan"]["tables"]}
    assert counts["messages"]["insert"] == int(plan["messages"][1])
    assert as_json["plan"]["keys_to_change"] > 0
    assert (table_rows(world.stack.postgres), _all_derived(world)) == before


def test_bad_input_is_one_line_nothing_changed(world: World, tmp_path: Path) -> None:
    before = table_rows(world.stack.postgres)
    cases = [
        (("room", "999999", "--yes"), 10, "room 999999: not in the snapshot"),
        (("room", "1", "--yes", "--from", "no-such-snapshot"), 10, "snapshot no-such-snapshot"),
        (("room", "abc", "--yes"), 2, "must be a positive integer"),
        (("planet", "1", "--yes"), 2, "room or user"),
        (("room", "1"), 2, "not a terminal"),
        (("--undo", str(tmp_path / "missing.json"), "--yes"), 10, "no journal"),
    ]
    world.sql("DELETE FROM chat_rooms WHERE id = 1")  # so that `room 1` has something to do
    before = table_rows(world.stack.postgres)
    for args, code, text in cases:
        run = world.run(*args)
        assert run.returncode == code, (args, run.stderr)
        assert run.stderr.count("\n") == 1 and text in run.stderr, (args, run.stderr)
        assert "Traceback" not in run.stderr
    other = tmp_path / "other.key"
    keys.write_identity(other, passphrase=None)
    wrong = world.repo.operator_config(tmp_path / "wrong" / "op.toml", identity=other)
    run = run_drtool("restore-entity", "room", "1", "--yes", config=wrong, home=tmp_path / "wrong")
    assert run.returncode == 12, run.stderr
    assert run.stderr.count("\n") == 1
    assert table_rows(world.stack.postgres) == before


def test_a_missing_parent_is_named_and_nothing_changes(world: World) -> None:
    room = _busiest_room_with_attachments(world)
    user = int(
        world.sql("SELECT min(user_id) FROM chat_room_members WHERE room_id = %s", (room,))[0][0]
    )
    world.sql("DELETE FROM chat_rooms WHERE id = %s", (room,))  # the user's room is gone too
    world.sql("DELETE FROM messages WHERE sender_id = %s", (user,))
    before = table_rows(world.stack.postgres)
    dry = world.run("user", str(user), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert (
        f"blocked: chat_room_members(room_id) -> chat_rooms(id): chat_rooms {room} missing "
        "in production" in dry.stdout
    )
    run = world.run("user", str(user), "--yes")
    assert run.returncode == 2
    assert run.stderr.count("\n") == 1 and "restore the parent first" in run.stderr
    assert table_rows(world.stack.postgres) == before
    assert not any((world.home / "state" / "entity-journals").glob("*.json"))


def test_an_object_with_other_bytes_is_never_overwritten(world: World) -> None:
    room = _busiest_room_with_attachments(world)
    keys_ = _delete_room(world, room)
    s3 = s3_client(world.stack.minio)
    s3.put_object(Bucket=world.stack.buckets[0], Key=keys_[0], Body=b"someone else's bytes")
    run = world.run("room", str(room), "--yes")
    assert run.returncode == 0, run.stderr
    assert f"{len(keys_) - 1} objects added" in run.stdout
    got = s3.get_object(Bucket=world.stack.buckets[0], Key=keys_[0])["Body"].read()
    assert got == b"someone else's bytes"
    dry = world.run("room", str(room), "--dry-run")
    assert f"object {keys_[0]}: conflict" in dry.stdout


def test_undo_refuses_to_cascade_into_rows_written_since(world: World) -> None:
    room = _busiest_room_with_attachments(world)
    _delete_room(world, room)
    run = world.run("room", str(room), "--yes")
    assert run.returncode == 0, run.stderr
    sender = world.sql("SELECT min(user_id) FROM chat_room_members WHERE room_id = %s", (room,))
    world.sql(
        "INSERT INTO messages (room_id, sender_id, content, created_at) "
        "VALUES (%s, %s, 'written after the restore', now())",
        (room, sender[0][0]),
    )
    before = table_rows(world.stack.postgres)
    undo = world.run("--undo", run.stdout.split("journal: ")[1].split(" ")[0], "--yes")
    assert undo.returncode == 2
    assert "depend on the restored rows" in undo.stderr and "messages (1)" in undo.stderr
    assert table_rows(world.stack.postgres) == before


def test_sequences_move_forward_past_restored_ids_never_back(world: World) -> None:
    room = _busiest_room_with_attachments(world)
    top = world.sql("SELECT max(id) FROM messages WHERE room_id = %s", (room,))[0][0]
    _delete_room(world, room)
    world.sql("SELECT setval('messages_id_seq', 1)")  # as after a botched migration
    run = world.run("room", str(room), "--yes")
    assert run.returncode == 0, run.stderr
    assert f"sequence messages_id_seq moved forward to {top}" in run.stdout
    assert world.sql("SELECT last_value, is_called FROM messages_id_seq") == [(top, True)]


def test_killed_before_the_commit_the_journal_already_lists_what_undo_removes(
    world: World,
) -> None:
    room = _busiest_room_with_attachments(world)
    _delete_room(world, room)
    before = (table_rows(world.stack.postgres), _all_derived(world))
    objects = bucket_objects(world.stack.minio, world.stack.buckets[0])
    crashed = run_drtool(
        "restore-entity",
        "room",
        str(room),
        "--yes",
        config=world.config,
        home=world.home,
        extra_env={"DRTOOL_CRASH_AT": "entity-before-commit"},
    )
    assert crashed.returncode == 137
    assert (table_rows(world.stack.postgres), _all_derived(world)) == before  # not committed
    [journal] = (world.home / "state" / "entity-journals").glob("*.json")
    doc = json.loads(journal.read_text())
    assert doc["status"] == "applying" and doc["objects"]["added"]  # the objects were put
    assert bucket_objects(world.stack.minio, world.stack.buckets[0]) != objects
    undo = world.run("--undo", str(journal), "--yes")
    assert undo.returncode == 0, undo.stderr
    assert bucket_objects(world.stack.minio, world.stack.buckets[0]) == objects
    assert (table_rows(world.stack.postgres), _all_derived(world)) == before
    assert not [
        db for db in world.sql("SELECT datname FROM pg_database") if "_entity_" in db[0]
    ]  # the scratch database was dropped before the merge began


def test_a_production_schema_the_map_does_not_cover_is_refused(world: World) -> None:
    room = _busiest_room_with_attachments(world)
    _delete_room(world, room)
    world.sql(
        "CREATE TABLE reactions (message_id bigint, message_created_at timestamptz, "
        "emoji text, FOREIGN KEY (message_id, message_created_at) "
        "REFERENCES messages (id, created_at) ON DELETE CASCADE)"
    )
    before = table_rows(world.stack.postgres)
    run = world.run("room", str(room), "--yes")
    assert run.returncode == 2
    assert run.stderr.count("\n") == 1
    assert "does not cover the production schema: table reactions is in no entity" in run.stderr
    assert table_rows(world.stack.postgres) == before


def _on_a_terminal(world: World, answer: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``restore-entity ARGS`` with a pseudo-terminal as stdin, answering ``answer``."""
    primary, secondary = pty.openpty()
    try:
        os.write(primary, answer.encode() + b"\n")
        return subprocess.run(
            drtool_argv("restore-entity", *args, config=world.config, home=world.home),
            stdin=secondary,
            capture_output=True,
            text=True,
            env=drtool_env(),
            timeout=600,
        )
    finally:
        os.close(primary)
        os.close(secondary)


def test_a_terminal_shows_the_plan_and_asks(world: World) -> None:
    room = _busiest_room_with_attachments(world)
    _delete_room(world, room)
    before = table_rows(world.stack.postgres)
    no = _on_a_terminal(world, "n", "room", str(room))
    assert no.returncode == 2 and "not confirmed; nothing changed" in no.stderr
    assert "restore-entity plan: room" in no.stdout and f"Merge room {room}" in no.stdout
    assert table_rows(world.stack.postgres) == before
    yes = _on_a_terminal(world, "y", "room", str(room))
    assert yes.returncode == 0, yes.stderr
    assert f"restored room {room}" in yes.stdout


def test_an_unreachable_redis_fails_before_any_change(world: World, tmp_path: Path) -> None:
    room = _busiest_room_with_attachments(world)
    _delete_room(world, room)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nothing listens there once closed
    stack = dataclasses.replace(
        world.stack, redis=dataclasses.replace(world.stack.redis, port=port)
    )
    config = dataclasses.replace(world.repo, source=stack).operator_config(
        tmp_path / "noredis" / "op.toml"
    )
    before = table_rows(world.stack.postgres)
    objects = bucket_objects(world.stack.minio, world.stack.buckets[0])
    run = run_drtool("restore-entity", "room", str(room), "--yes", config=config, home=world.home)
    assert run.returncode == 3, run.stderr
    assert run.stderr.count("\n") == 1 and f"Redis at 127.0.0.1:{port}" in run.stderr
    assert "nothing changed" in run.stderr
    assert table_rows(world.stack.postgres) == before
    assert bucket_objects(world.stack.minio, world.stack.buckets[0]) == objects


def test_a_deleted_account_comes_back_unless_its_username_was_taken(world: World) -> None:
    user = int(
        world.sql("SELECT sender_id FROM messages GROUP BY 1 ORDER BY count(*) DESC, 1 LIMIT 1")[0][
            0
        ]
    )
    rows_at_backup = _rows_of(world, USER, user)
    [(username,)] = world.sql("SELECT username FROM users WHERE id = %s", (user,))
    world.sql("DELETE FROM messages WHERE sender_id = %s", (user,))
    world.sql("UPDATE chat_rooms SET created_by = 1 WHERE created_by = %s", (user,))
    world.sql("DELETE FROM users WHERE id = %s", (user,))  # friendships, memberships cascade
    world.sql(
        "INSERT INTO users (username, display_name, email, created_at) "
        "VALUES (%s, 'Someone else', 'else@example.com', now())",
        (username,),
    )
    before = table_rows(world.stack.postgres)
    run = world.run("user", str(user), "--yes")
    assert run.returncode == 2
    assert f"users(username): held by another row in production (e.g. {username})" in run.stderr
    assert table_rows(world.stack.postgres) == before

    world.sql("DELETE FROM users WHERE username = %s", (username,))
    run = world.run("user", str(user), "--yes")
    assert run.returncode == 0, run.stderr
    assert _rows_of(world, USER, user) == rows_at_backup
