"""Retention: GFS selection, and prune applying it to a real repository (file and S3)."""

from __future__ import annotations

import json
import os
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from support.repo_kit import T0, RepoKit, Snap, blob_id

from drtool import keys
from drtool.config import load_config
from drtool.errors import ConfigError, Locked, StorageError, UsageError
from drtool.repository import chain, drill_log, layout
from drtool.repository.ids import new_id
from drtool.repository.locks import read_locks, repository_lock
from drtool.repository.manifest import manifest_sha256
from drtool.repository.retention import UNVERIFIED, Policy, select
from drtool.s3session import s3_client
from drtool.services import prune as prune_svc
from drtool.services import repo as svc
from drtool.storage.base import TEMP_PREFIX

# -- selection --------------------------------------------------------------------------------


def sid(t: datetime) -> str:
    return f"{t:%Y%m%dT%H%M%SZ}-0000"


def hourly_timeline() -> list[tuple[str, datetime]]:
    """One snapshot an hour from 2026-01-01 00:00 to 2026-03-01 23:00 (60 days)."""
    start = datetime(2026, 1, 1, tzinfo=UTC)
    times = [start + timedelta(hours=h) for h in range(60 * 24)]
    return [(sid(t), t) for t in times]


def at(month: int, day: int, hour: int = 23) -> str:
    return sid(datetime(2026, month, day, hour, tzinfo=UTC))


def test_gfs_selection_on_an_hourly_timeline() -> None:
    policy = Policy(last=3, daily=7, weekly=4, monthly=3)
    keep = select(hourly_timeline(), policy)
    # 2026-03-01 is a Sunday: ISO weeks end on Sundays 23:00
    assert keep == {
        at(3, 1): ["last", "daily", "weekly", "monthly"],
        at(3, 1, 22): ["last"],
        at(3, 1, 21): ["last"],
        at(2, 28): ["daily", "monthly"],
        at(2, 27): ["daily"],
        at(2, 26): ["daily"],
        at(2, 25): ["daily"],
        at(2, 24): ["daily"],
        at(2, 23): ["daily"],
        at(2, 22): ["weekly"],
        at(2, 15): ["weekly"],
        at(2, 8): ["weekly"],
        at(1, 31): ["monthly"],
    }


def test_hourly_rule_keeps_the_newest_of_each_hour() -> None:
    base = datetime(2026, 5, 4, 10, tzinfo=UTC)
    snaps = [
        (sid(base + timedelta(minutes=m)), base + timedelta(minutes=m)) for m in range(0, 180, 20)
    ]
    keep = select(snaps, Policy(hourly=2))
    assert keep == {
        sid(base + timedelta(minutes=160)): ["hourly"],
        sid(base + timedelta(minutes=100)): ["hourly"],
    }


def test_two_snapshots_of_one_second_keep_the_later_one() -> None:
    """Ids order snapshots within a second (the ms in the suffix); keep-last must follow them,
    not the input order: a tie once kept the older snapshot and forgot the newer one."""
    first, second = new_id(T0), new_id(T0 + timedelta(milliseconds=600))
    when = T0.replace(microsecond=0)  # catalog times come from ids: whole seconds
    assert first < second
    for snaps in ([(first, when), (second, when)], [(second, when), (first, when)]):
        assert select(snaps, Policy(last=1)) == {second: ["last"]}


def test_periods_without_snapshots_are_not_counted() -> None:
    """keep-monthly 3 keeps the newest of the last three months that *have* snapshots."""
    times = [datetime(2025, m, 10, tzinfo=UTC) for m in (1, 4, 9, 11)]
    keep = select([(sid(t), t) for t in times], Policy(monthly=3))
    assert sorted(keep) == [sid(times[1]), sid(times[2]), sid(times[3])]


def test_selection_does_not_depend_on_input_order() -> None:
    timeline = hourly_timeline()
    policy = Policy(last=2, daily=3, monthly=2)
    assert select(list(reversed(timeline)), policy) == select(timeline, policy)


@pytest.mark.parametrize(
    ("policy", "message"),
    [
        (Policy(), "this policy keeps nothing; give at least one --keep-\\* option"),
        (Policy(daily=-1, last=3), "--keep-\\* counts cannot be negative"),
    ],
)
def test_bad_policies_are_refused(policy: Policy, message: str) -> None:
    with pytest.raises(UsageError, match=message) as caught:
        select(hourly_timeline(), policy)
    assert caught.value.exit_code == 2


def test_bad_policy_refused_before_touching_a_repository(repo_kit: RepoKit) -> None:
    repo_kit.snapshot(T0)
    before = repo_kit.keys_in_storage()
    with pytest.raises(UsageError, match="keeps nothing"):
        prune_svc.prune(repo_kit.config(), Policy(), dry_run=False)
    assert repo_kit.keys_in_storage() == before


# -- prune ------------------------------------------------------------------------------------


def test_prune_with_a_signing_key_the_repository_does_not_trust_deletes_nothing(
    repo_kit: RepoKit,
) -> None:
    """Prune signs WAL removal records and the catalog index: with a key no reader trusts,
    those records would stop the WAL streamer and every later prune; refused up front."""
    for day in range(3):
        repo_kit.snapshot(T0 + timedelta(days=day))
    stranger = repo_kit.tmp / "keys" / "stranger.key"
    keys.write_signing_key(stranger)
    config = repo_kit.write_config("stranger", signing_key_file=str(stranger))
    before = repo_kit.keys_in_storage()
    with pytest.raises(ConfigError, match="not a signing key this repository trusts"):
        prune_svc.prune(
            load_config(config, {}), Policy(last=1), dry_run=False, count_unverified=True
        )
    assert repo_kit.keys_in_storage() == before


@dataclass
class History:
    snaps: list[Snap]
    shared: str  # a blob every snapshot uses
    old_only: str  # a blob only the two oldest use
    orphans: set[str]  # a crashed backup's objects (no manifest)


def build_history(repo_kit: RepoKit) -> History:
    """Five daily snapshots; a blob shared by all, one only in the two oldest; garbage."""
    shared, old_only = blob_id(), blob_id()
    snaps = [
        repo_kit.snapshot(T0 + timedelta(days=d), blobs=(shared, old_only) if d < 2 else (shared,))
        for d in range(5)
    ]
    # a crashed backup's leftovers: an object of a snapshot without a manifest, and a blob
    crashed = repo_kit.writer(new_id(T0 + timedelta(days=5)))
    orphan_obj = crashed.put_snapshot_object("redis", "dump.rdb", [b"x"], kind="redis_rdb")
    orphan_blob = crashed.put_blob(blob_id(), [b"y"])
    return History(
        snaps,
        layout.blob_key(shared),
        layout.blob_key(old_only),
        {orphan_obj.entry.key, orphan_blob.entry.key},
    )


def test_prune_dry_run_then_real_run(any_repo_kit: RepoKit) -> None:
    repo_kit = any_repo_kit
    history = build_history(repo_kit)
    ids = [s.snapshot_id for s in history.snaps]
    policy = Policy(last=2)
    before = repo_kit.keys_in_storage()
    later = datetime.now(UTC) + timedelta(days=2)  # everything unreferenced is past the grace

    plan = prune_svc.prune(
        repo_kit.config(), policy, dry_run=True, now=later, count_unverified=True
    )
    assert plan.keep == {ids[4]: ["last"], ids[3]: ["last"]}
    assert plan.forget == ids[:3]
    assert plan.invalid == []
    assert not plan.done
    assert repo_kit.keys_in_storage() == before  # a dry run changes nothing
    assert read_locks(repo_kit.storage) == []

    plan = prune_svc.prune(
        repo_kit.config(), policy, dry_run=False, now=later, count_unverified=True
    )
    assert plan.done
    forgotten = {k for sid in ids[:3] for k in own_keys_of(before, sid)}
    assert len(forgotten) == 6  # a manifest and a dump each
    expected_gone = forgotten | {history.old_only} | history.orphans
    assert set(plan.garbage) == expected_gone
    after = repo_kit.keys_in_storage()
    tombstones = {
        chain.tombstone_key(s.snapshot_id, manifest_sha256(s.stored)) for s in history.snaps[:3]
    }
    # and the catalog index, compacted into one full page (ADR 0020)
    assert {k for k in after if k.startswith("catalog/")} == {"catalog/9999999998.json"}
    assert after - {"catalog/9999999998.json"} == (before - expected_gone) | tombstones
    assert history.shared in after  # still used by the kept snapshots
    assert read_locks(repo_kit.storage) == []
    # what is kept still lists and verifies, with the data read
    rows = [svc.record_summary(r) for r in svc.list_records(repo_kit.config())]
    assert [(r["id"], r["status"]) for r in rows] == [(ids[3], "VALID"), (ids[4], "VALID")]
    outcomes = svc.verify(repo_kit.config(), None, read_data=True)
    assert [(o.snapshot_id, o.problems) for o in outcomes] == [(ids[3], []), (ids[4], [])]
    # a second run has nothing left to do
    again = prune_svc.prune(
        repo_kit.config(), policy, dry_run=False, now=later, count_unverified=True
    )
    assert (again.forget, again.garbage) == ([], [])
    records = {k for k in repo_kit.keys_in_storage() if k.startswith("verifications/")}
    assert repo_kit.keys_in_storage() - records == after  # verify added its signed records only


def own_keys_of(keys: set[str], snapshot_id: str) -> set[str]:
    prefix = layout.snapshot_prefix(snapshot_id)
    return {k for k in keys if k.startswith(prefix)}


def test_prune_leaves_young_unreferenced_data_alone(repo_kit: RepoKit) -> None:
    """A backup running elsewhere has written objects but no manifest yet: they stay."""
    history = build_history(repo_kit)
    root = Path(repo_kit.url.removeprefix("file://"))
    # one leftover blob is three days old: it goes; the rest were written just now
    [aged] = [k for k in history.orphans if k.startswith("blobs/")]
    old = time.time() - 3 * 86400
    os.utime(root / aged, (old, old))
    plan = prune_svc.prune(repo_kit.config(), Policy(last=2), dry_run=False, count_unverified=True)
    after = repo_kit.keys_in_storage()
    assert aged not in after
    assert history.orphans - {aged} <= after
    # the blob only the forgotten snapshots used is young too: it waits for the grace period
    assert history.old_only in after
    assert {layout.manifest_key(s.snapshot_id) for s in history.snaps[:3]}.isdisjoint(after)
    assert aged in plan.garbage


def test_invalid_snapshots_are_not_counted_as_kept(repo_kit: RepoKit) -> None:
    """M2: keep-last 1 keeps the newest *valid* snapshot, not a newer broken one."""
    older = repo_kit.snapshot(T0)
    good = repo_kit.snapshot(T0 + timedelta(days=1))
    broken = repo_kit.snapshot(T0 + timedelta(days=2))
    repo_kit.storage.delete(broken.dump_key)
    plan = prune_svc.prune(repo_kit.config(), Policy(last=1), dry_run=False, count_unverified=True)
    assert plan.keep == {good.snapshot_id: ["last"]}
    assert plan.forget == [older.snapshot_id]
    assert plan.invalid == [broken.snapshot_id]
    records = repo_kit.records()
    assert list(records) == [good.snapshot_id, broken.snapshot_id]
    assert records[good.snapshot_id].valid


def test_prune_never_sweeps_an_invalid_snapshot(repo_kit: RepoKit) -> None:
    """An INVALID snapshot (tampered, or signed by a rotated key) is evidence: prune keeps it."""
    good = repo_kit.snapshot(T0)
    broken = repo_kit.snapshot(T0 + timedelta(days=1))
    repo_kit.storage.delete(broken.dump_key)
    before = {k for k in repo_kit.keys_in_storage() if broken.snapshot_id in k}
    later = datetime.now(UTC) + timedelta(days=30)  # far past the grace period
    plan = prune_svc.prune(repo_kit.config(), Policy(last=1), dry_run=False, now=later)
    assert plan.invalid == [broken.snapshot_id]
    assert before <= repo_kit.keys_in_storage()
    assert repo_kit.records()[good.snapshot_id].valid


def plant_stale_upload(repo_kit: RepoKit, request: pytest.FixtureRequest) -> None:
    """An unfinished write from a crashed backup (temp file / multipart upload)."""
    key = f"{layout.snapshot_prefix(new_id(T0))}postgres/dump.pgdump.zst.age"
    if repo_kit.url.startswith("file://"):
        path = Path(repo_kit.url.removeprefix("file://")) / key
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{TEMP_PREFIX}{secrets.token_hex(6)}-{path.name}")
        tmp.write_bytes(b"partial")
    else:
        bucket, prefix = repo_kit.url.removeprefix("s3://").split("/", 1)
        client = s3_client(request.getfixturevalue("s3_server"))
        client.create_multipart_upload(Bucket=bucket, Key=f"{prefix}/{key}")


def test_prune_aborts_stale_uploads(any_repo_kit: RepoKit, request: pytest.FixtureRequest) -> None:
    any_repo_kit.snapshot(T0)
    plant_stale_upload(any_repo_kit, request)
    cutoff_now = datetime.now(UTC)
    assert len(any_repo_kit.storage.stale_uploads(cutoff_now + timedelta(minutes=1))) == 1
    # within the grace period an unfinished upload may be a running backup: it stays
    fresh = prune_svc.prune(any_repo_kit.config(), Policy(last=1), dry_run=False)
    assert fresh.stale_uploads == 0
    assert len(any_repo_kit.storage.stale_uploads(cutoff_now + timedelta(minutes=1))) == 1
    later = datetime.now(UTC) + timedelta(days=2)
    dry = prune_svc.prune(any_repo_kit.config(), Policy(last=1), dry_run=True, now=later)
    assert dry.stale_uploads == 1
    assert len(any_repo_kit.storage.stale_uploads(later)) == 1
    done = prune_svc.prune(any_repo_kit.config(), Policy(last=1), dry_run=False, now=later)
    assert done.stale_uploads == 1
    assert any_repo_kit.storage.stale_uploads(later) == []


def test_prune_listing_error_deletes_nothing(looping_blobs: RepoKit) -> None:
    """U5: a listing that fails is an error, never "no objects"; nothing is deleted."""
    repo_kit = looping_blobs
    repo_kit.snapshot(T0 + timedelta(days=1))
    repo_kit.snapshot(T0 + timedelta(days=2))
    root = Path(repo_kit.url.removeprefix("file://"))
    before = {p for p in root.rglob("*")}
    later = datetime.now(UTC) + timedelta(days=2)
    with pytest.raises(StorageError, match="cannot stat"):
        prune_svc.prune(repo_kit.config(), Policy(last=1), dry_run=False, now=later)
    assert {p for p in root.rglob("*")} == before
    assert read_locks(repo_kit.storage) == []


def test_prune_waits_for_a_running_writer(repo_kit: RepoKit) -> None:
    repo_kit.snapshot(T0)
    repo_kit.snapshot(T0 + timedelta(days=1))
    before = repo_kit.keys_in_storage()
    with repository_lock(repo_kit.storage, "backup"), pytest.raises(Locked, match="locked by"):
        prune_svc.prune(repo_kit.config(), Policy(last=1), dry_run=False)
    assert repo_kit.keys_in_storage() == before


def test_prune_keeps_the_newest_drilled_snapshot(repo_kit: RepoKit) -> None:
    """M2: keep-last 1 still keeps the newest snapshot a drill proved, not only the newest."""
    older = repo_kit.snapshot(T0)
    drilled = repo_kit.snapshot(T0 + timedelta(days=1))
    failed_drill = repo_kit.snapshot(T0 + timedelta(days=2))
    newest = repo_kit.snapshot(T0 + timedelta(days=3))
    for drill_id, snap, passed in (
        ("20261101T040000Z-0001", drilled, True),
        ("20261102T040000Z-0002", failed_drill, False),
    ):
        summary = {"drill_id": drill_id, "snapshot_id": snap.snapshot_id, "passed": passed}
        repo_kit.storage.put_bytes(drill_log.summary_key(drill_id), json.dumps(summary).encode())
    plan = prune_svc.prune(repo_kit.config(), Policy(last=1), dry_run=False, count_unverified=True)
    assert plan.keep == {
        newest.snapshot_id: ["last"],
        drilled.snapshot_id: ["newest drilled", "newest verified postgres"],
    }
    assert sorted(plan.forget) == sorted([older.snapshot_id, failed_drill.snapshot_id])
    assert repo_kit.records()[drilled.snapshot_id].valid


# -- issue 18.10: retention never deletes the last good copy --------------------------------


def flip(repo_kit: RepoKit, key: str) -> None:
    """A flipped byte: same size, so only a hash check can tell."""
    data = bytearray(repo_kit.storage.get_bytes(key))
    data[len(data) // 2] ^= 0x01
    repo_kit.storage.put_bytes(key, bytes(data))


def test_prune_never_deletes_the_last_good_copy(any_repo_kit: RepoKit) -> None:
    """keep-last 1 with the newest snapshot damaged used to keep only it: nothing restorable.

    Only verified snapshots count toward the rules; the newest read-data verified one stays
    whatever the policy; with nothing verified, nothing is forgotten.
    """
    repo_kit = any_repo_kit
    snaps = [repo_kit.snapshot(T0 + timedelta(days=d)) for d in range(4)]
    ids = [s.snapshot_id for s in snaps]
    later = datetime.now(UTC) + timedelta(days=2)
    # nothing verified yet: no rule is satisfied, nothing goes
    plan = prune_svc.prune(repo_kit.config(), Policy(last=1), dry_run=True, now=later)
    assert plan.forget == [] and plan.verified == []
    assert plan.keep[ids[3]] == ["last" + UNVERIFIED]
    # the two oldest verified with the data read; then the newest's dump rots unseen
    svc.verify(repo_kit.config(), ids[0], read_data=True)
    svc.verify(repo_kit.config(), ids[1], read_data=True)
    flip(repo_kit, snaps[3].dump_key)
    plan = prune_svc.prune(repo_kit.config(), Policy(last=1), dry_run=False, now=later)
    assert plan.keep == {
        ids[3]: ["last" + UNVERIFIED],
        ids[2]: ["last" + UNVERIFIED],
        ids[1]: ["last", "newest read-data verified", "newest verified postgres"],
    }
    assert plan.forget == [ids[0]]
    # the good copy is still there and restorable; the damaged one never was good
    outcomes = {o.snapshot_id: o for o in svc.verify(repo_kit.config(), None, read_data=True)}
    assert outcomes[ids[1]].problems == []
    assert outcomes[ids[3]].damaged == [snaps[3].dump_key]
    # once verify has recorded the damage, the damaged one is not counted (nor pruned: evidence)
    svc.verify(repo_kit.config(), ids[2], read_data=False)
    plan = prune_svc.prune(repo_kit.config(), Policy(last=1), dry_run=False, now=later)
    assert plan.invalid == [ids[3]]
    assert plan.keep == {
        ids[2]: ["last", "newest verified postgres"],
        ids[1]: ["newest read-data verified"],
    }
    # --count-unverified restores the old counting, the anchors still hold
    repo_kit.snapshot(T0 + timedelta(days=5))
    plan = prune_svc.prune(
        repo_kit.config(), Policy(last=1), dry_run=True, now=later, count_unverified=True
    )
    assert plan.keep[repo_kit.snaps[-1].snapshot_id] == ["last"]
    assert plan.keep[ids[1]] == ["newest read-data verified"]
    assert plan.keep[ids[2]] == ["newest verified postgres"]


def test_prune_keeps_the_newest_verified_snapshot_of_every_store(repo_kit: RepoKit) -> None:
    """Redis-only snapshots satisfying keep-last must not take the last verified PostgreSQL."""
    full = repo_kit.snapshot(T0, blobs=(blob_id(),))  # postgres + minio
    svc.verify(repo_kit.config(), None, read_data=False)
    # three newer snapshots holding postgres only... and verified: then minio has one copy
    newer = [repo_kit.snapshot(T0 + timedelta(hours=h)) for h in (1, 2, 3)]
    # the scheduled verify: only snapshots never verified, only objects never found intact
    outcomes = svc.verify(repo_kit.config(), svc.UNVERIFIED, read_data=False)
    assert [(o.snapshot_id, o.objects) for o in outcomes] == [(s.snapshot_id, 1) for s in newer]
    assert svc.verify(repo_kit.config(), svc.UNVERIFIED, read_data=False) == []
    plan = prune_svc.prune(repo_kit.config(), Policy(last=1), dry_run=False)
    assert plan.keep == {
        newer[-1].snapshot_id: ["last", "newest verified postgres"],
        full.snapshot_id: ["newest verified minio"],
    }
    assert repo_kit.records()[full.snapshot_id].valid
