"""The signed catalog index (ADR 0020): bounded requests, and never the source of truth.

Real repositories (a directory; a SeaweedFS bucket) holding signed manifests; requests are
counted by wrapping the storage (tests/support/synthetic_catalog.py). No timing assertions.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from support.backup_kit import make_backup_kit
from support.cli import run_drtool
from support.repo_kit import RepoKit, Snap, blob_id
from support.synthetic_catalog import CountingStorage, write_history

from drtool.endpoints import PostgresEndpoint, RedisEndpoint, S3Endpoint
from drtool.errors import NotFound
from drtool.faults import EXIT_CODE
from drtool.repository import access, catalog, catalog_index, chain, layout, verifications
from drtool.repository.manifest import manifest_sha256
from drtool.repository.retention import Policy
from drtool.services import prune as prune_svc
from drtool.services import repo as svc
from drtool.storage.base import Storage

REDIS = ("redis",)


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def _rows(records: list[catalog.SnapshotRecord]) -> list[tuple[str, str]]:
    return [(r.snapshot_id, r.status) for r in records]


def _view(kit: RepoKit) -> dict[str, Any]:
    """What every reader sees: the full list, the last 3, latest (Redis), the chain link."""
    st: Storage = kit.storage
    keys, rid = [kit.verify_key], kit.info.repo_id
    previous = catalog.newest_authentic(st, keys, rid)
    return {
        "list": _rows(catalog.list_snapshots(st, keys, rid)),
        "last3": _rows(catalog.recent_snapshots(st, keys, rid, 3)),
        "latest": catalog.find(st, keys, rid, "latest", components=REDIS).snapshot_id,
        "previous": (previous.snapshot_id, previous.manifest_sha256) if previous else None,
    }


def _index_keys(kit: RepoKit) -> list[str]:
    return sorted(o.key for o in kit.storage.list(catalog_index.PREFIX))


def _drop_index(kit: RepoKit) -> None:
    for key in _index_keys(kit):
        kit.storage.delete(key)


@pytest.mark.slow
def test_ten_thousand_snapshots_cost_a_bounded_number_of_requests(repo_kit: RepoKit) -> None:
    """10,000 signed manifests: latest, --last 5 and the chain link take a handful of requests;
    the full list reads no manifest; dropping the index changes no answer."""
    keys, rid = [repo_kit.verify_key], repo_kit.info.repo_id
    history = write_history(
        repo_kit.storage,
        repo_kit.info,
        repo_kit.signing_key,
        10_000,
        newest=_now() - timedelta(minutes=5),
        root=repo_kit.tmp / "repo",
    )
    newest_id, newest_stored = history[-1]
    counting = CountingStorage(repo_kit.storage)
    # before the index: the chain link lists every snapshot's objects (20,000 keys)
    catalog.newest_authentic(counting, keys, rid)
    assert counting.calls["list"] >= 20
    before_list = _rows(catalog.list_snapshots(repo_kit.storage, keys, rid))

    catalog.rebuild_index(repo_kit.storage, repo_kit.signing_key, keys, rid)  # the next write
    assert len(_index_keys(repo_kit)) == 1

    counting.reset()
    latest = catalog.find(counting, keys, rid, "latest", components=REDIS)
    assert (latest.snapshot_id, latest.status) == (newest_id, "VALID")
    assert counting.requests <= 10, counting.calls  # index + tail days + one snapshot

    counting.reset()
    recent = catalog.recent_snapshots(counting, keys, rid, 5)
    assert [r.snapshot_id for r in recent] == [sid for sid, _ in history[-5:]]
    assert all(r.valid for r in recent)
    assert counting.requests <= 25, counting.calls  # + 3 per snapshot shown

    counting.reset()
    previous = catalog.newest_authentic(counting, keys, rid)
    assert previous is not None
    assert (previous.snapshot_id, previous.manifest_sha256) == (
        newest_id,
        manifest_sha256(newest_stored),
    )
    assert counting.requests <= 8, counting.calls

    counting.reset()
    listed = catalog.list_snapshots(counting, keys, rid)
    assert _rows(listed) == before_list
    assert len(listed) == 10_000 and all(r.valid for r in listed)
    assert counting.calls["get"] == 1, counting.calls  # the index page, no manifest

    _drop_index(repo_kit)  # a missing index: the same answers, read from the manifests
    assert _rows(catalog.list_snapshots(repo_kit.storage, keys, rid)) == before_list
    assert catalog.find(repo_kit.storage, keys, rid, "latest").snapshot_id == newest_id


@pytest.mark.slow
def test_latest_costs_the_same_at_twice_the_history(any_repo_kit: RepoKit) -> None:
    """On S3 too: doubling the history does not add a single request to latest or the link."""
    kit = any_repo_kit
    keys, rid = [kit.verify_key], kit.info.repo_id
    newest = _now() - timedelta(minutes=5)
    write_history(kit.storage, kit.info, kit.signing_key, 150, newest=newest)
    catalog.rebuild_index(kit.storage, kit.signing_key, keys, rid)
    counting = CountingStorage(kit.storage)
    costs = []
    for _ in range(2):
        counting.reset()
        assert catalog.find(counting, keys, rid, "latest", components=REDIS).valid
        catalog.newest_authentic(counting, keys, rid)
        catalog.recent_snapshots(counting, keys, rid, 5)
        costs.append(counting.requests)
        # as much history again, older (what months of hourly backups leave)
        write_history(
            kit.storage, kit.info, kit.signing_key, 150, newest=newest - timedelta(days=30)
        )
        catalog.rebuild_index(kit.storage, kit.signing_key, keys, rid)
    assert costs[0] == costs[1], costs


def test_the_index_is_a_cache_never_the_truth(
    any_repo_kit: RepoKit, caplog: pytest.LogCaptureFixture
) -> None:
    """Missing, stale or tampered index: the same snapshots, a forgotten one never shown."""
    kit = any_repo_kit
    keys, rid = [kit.verify_key], kit.info.repo_id
    now = _now()
    write_history(kit.storage, kit.info, kit.signing_key, 10, newest=now - timedelta(hours=2))
    catalog.rebuild_index(kit.storage, kit.signing_key, keys, rid)
    truth = _view(kit)

    # a crash between manifest and index: the manifest is there, no page names it
    late = kit.snapshot(now - timedelta(minutes=1), chain=False, dump=b"x" * 100)
    seen = _view(kit)
    assert seen["list"] == truth["list"] + [(late.snapshot_id, "VALID")]
    assert seen["last3"][-1] == (late.snapshot_id, "VALID")
    assert seen["previous"] == (late.snapshot_id, manifest_sha256(late.stored))
    found = catalog.find(kit.storage, keys, rid, "latest", components=("postgres",))
    assert found.snapshot_id == late.snapshot_id
    # the next write adds it to the index with its own snapshot
    later = kit.snapshot(now, chain=False, dump=b"y" * 100)
    catalog.record_commit(kit.storage, kit.signing_key, keys, rid, later.manifest, later.stored)
    index = catalog_index.read_index(kit.storage, keys, rid)
    assert index is not None and index.deltas == 1
    assert {late.snapshot_id, later.snapshot_id} <= set(index.entries)
    truth = _view(kit)

    _drop_index(kit)  # missing: the same answers, no warning
    caplog.clear()
    assert _view(kit) == truth
    assert "catalog index" not in caplog.text

    catalog.rebuild_index(kit.storage, kit.signing_key, keys, rid)
    (page,) = _index_keys(kit)
    doc = json.loads(kit.storage.get_bytes(page))
    doc["body"]["added"] = doc["body"]["added"][:-1]  # hide the newest snapshot
    kit.storage.put_bytes(page, json.dumps(doc).encode())
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert _view(kit) == truth
    assert "catalog index not used" in caplog.text and "signature" in caplog.text

    # prune forgets the newest, its page not written (no signing key there): stale index
    catalog.rebuild_index(kit.storage, kit.signing_key, keys, rid)
    stored = kit.storage.get_bytes(layout.manifest_key(later.snapshot_id))
    kit.storage.put_bytes(chain.tombstone_key(later.snapshot_id, manifest_sha256(stored)), b"")
    kit.storage.delete(layout.manifest_key(later.snapshot_id))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        seen = _view(kit)
    assert later.snapshot_id not in {sid for sid, _ in seen["list"]}
    assert later.snapshot_id not in {sid for sid, _ in seen["last3"]}
    assert seen["previous"] == (late.snapshot_id, manifest_sha256(late.stored))
    assert "manifest is gone" not in caplog.text  # forgotten on purpose: nothing to say
    # a manifest deleted without a tombstone is not shown either, and is named
    kit.storage.delete(layout.manifest_key(late.snapshot_id))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        latest = catalog.find(kit.storage, keys, rid, "latest", components=REDIS)
    assert latest.snapshot_id == truth["list"][-3][0]
    assert f"snapshot {late.snapshot_id}: the catalog index names it" in caplog.text
    with pytest.raises(NotFound):
        catalog.find(kit.storage, keys, rid, "latest", components=("postgres",))


def test_prune_forgets_in_the_index_and_compacts_it(repo_kit: RepoKit) -> None:
    """Prune leaves one full page without the forgotten snapshots; nothing shows them."""
    keys, rid = [repo_kit.verify_key], repo_kit.info.repo_id
    write_history(
        repo_kit.storage, repo_kit.info, repo_kit.signing_key, 6, newest=_now() - timedelta(hours=1)
    )
    catalog.rebuild_index(repo_kit.storage, repo_kit.signing_key, keys, rid)
    snap = repo_kit.snapshot(_now(), chain=False, dump=b"z" * 100)
    catalog.record_commit(
        repo_kit.storage, repo_kit.signing_key, keys, rid, snap.manifest, snap.stored
    )
    assert len(_index_keys(repo_kit)) == 2
    plan = prune_svc.prune(repo_kit.config(), Policy(last=2), dry_run=False, count_unverified=True)
    assert len(plan.forget) == 5
    assert len(_index_keys(repo_kit)) == 1  # compacted
    index = catalog_index.read_index(repo_kit.storage, keys, rid)
    assert index is not None and set(index.entries) == set(plan.keep)
    shown = {r.snapshot_id for r in catalog.recent_snapshots(repo_kit.storage, keys, rid, 10)}
    assert shown == set(plan.keep)


def test_list_last_from_the_cli(repo_kit: RepoKit) -> None:
    """``drtool list --last N`` shows the newest N, oldest first; a bad N is a one-line error."""
    history = write_history(
        repo_kit.storage, repo_kit.info, repo_kit.signing_key, 8, newest=_now() - timedelta(hours=1)
    )
    done = run_drtool("list", "--last", "3", "--json", config=repo_kit.config_file)
    assert done.returncode == 0, done.stderr
    assert [r["id"] for r in json.loads(done.stdout)] == [sid for sid, _ in history[-3:]]
    bad = run_drtool("list", "--last", "0", config=repo_kit.config_file)
    assert bad.returncode == 2 and "--last must be at least 1" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_a_backup_without_an_index_gets_one(repo_kit: RepoKit) -> None:
    """The first write to a repository without an index writes a full page of everything."""
    keys, rid = [repo_kit.verify_key], repo_kit.info.repo_id
    old = repo_kit.snapshot(_now() - timedelta(days=200), chain=False)
    assert _index_keys(repo_kit) == []
    snap = repo_kit.snapshot(_now(), chain=False)
    catalog.record_commit(
        repo_kit.storage, repo_kit.signing_key, keys, rid, snap.manifest, snap.stored
    )
    index = catalog_index.read_index(repo_kit.storage, keys, rid)
    assert index is not None and index.deltas == 0
    assert set(index.entries) == {old.snapshot_id, snap.snapshot_id}
    rows = [svc.record_summary(r) for r in svc.list_records(repo_kit.config(), 1)]
    assert [r["id"] for r in rows] == [snap.snapshot_id]


def test_pages_are_compacted_every_so_often(repo_kit: RepoKit) -> None:
    """A writer turns its delta into a full page after COMPACT_EVERY deltas: reads stay short."""
    keys, rid = [repo_kit.verify_key], repo_kit.info.repo_id
    start = _now() - timedelta(hours=2)
    for i in range(catalog_index.COMPACT_EVERY + 2):
        snap = repo_kit.snapshot(start + timedelta(minutes=i), chain=False, dump=b"d" * 10)
        catalog.record_commit(
            repo_kit.storage, repo_kit.signing_key, keys, rid, snap.manifest, snap.stored
        )
        index = catalog_index.read_index(repo_kit.storage, keys, rid)
        assert index is not None and index.deltas < catalog_index.COMPACT_EVERY
        assert len(index.entries) == i + 1


def test_a_replaced_manifest_of_the_same_size_is_caught(any_repo_kit: RepoKit) -> None:
    """The index's copy never stands in for the stored bytes where they matter: ``verify``
    reads every manifest (and on S3 the MD5 ETag makes ``list`` read it too)."""
    kit = any_repo_kit
    keys, rid = [kit.verify_key], kit.info.repo_id
    first = kit.snapshot(_now() - timedelta(minutes=2))
    second = kit.snapshot(_now() - timedelta(minutes=1))
    catalog.rebuild_index(kit.storage, kit.signing_key, keys, rid)
    forged = first.stored.replace(b'"host": "nas"', b'"host": "nbs"')
    assert len(forged) == len(first.stored) and forged != first.stored
    kit.storage.put_bytes(layout.manifest_key(first.snapshot_id), forged)
    outcomes = {o.snapshot_id: o.problems for o in svc.verify(kit.config(), None, read_data=False)}
    assert any("signature" in p for p in outcomes[first.snapshot_id])
    assert any("replaced" in p for p in outcomes[second.snapshot_id])
    if kit.url.startswith("s3://"):
        status = dict(_rows(catalog.list_snapshots(kit.storage, keys, rid)))
        assert status[first.snapshot_id] == "INVALID"


def test_latest_through_the_index_is_what_the_full_listing_resolves(
    any_repo_kit: RepoKit,
) -> None:
    """Damage on a shared blob (the newest record of any snapshot naming it), a missing
    object, ``--at`` and components: the bounded ``latest`` answers as ``resolve`` does."""
    kit = any_repo_kit
    keys, rid = [kit.verify_key], kit.info.repo_id
    b1, b2 = blob_id(), blob_id()
    base = _now() - timedelta(hours=5)
    s1 = kit.snapshot(base, blobs=(b1,))
    s2 = kit.snapshot(base + timedelta(hours=1), blobs=(b1, b2))
    s3 = kit.snapshot(base + timedelta(hours=2))
    s4 = kit.snapshot(base + timedelta(hours=3), blobs=(b2,))
    catalog.rebuild_index(kit.storage, kit.signing_key, keys, rid)

    def record(snap: Snap, damaged: tuple[str, ...], when: datetime) -> None:
        rec = verifications.Verification(
            rid, snap.snapshot_id, verifications.now_text(when), verifications.HASHES, 1, damaged
        )
        verifications.write_record(kit.storage, kit.signing_key, rec, when)

    record(s2, (), _now() - timedelta(minutes=30))  # s2 verified intact ...
    record(s1, (kit.blobs[b1].key,), _now() - timedelta(minutes=10))  # ... then b1 found bad

    def both(at: datetime | None, components: tuple[str, ...]) -> tuple[str, str]:
        answers = []
        for how in ("index", "full"):
            try:
                if how == "index":
                    got = catalog.find(
                        kit.storage, keys, rid, "latest", at=at, components=components
                    )
                else:
                    records = catalog.list_snapshots(kit.storage, keys, rid)
                    got = catalog.resolve(records, "latest", at=at, components=components)
                answers.append(got.snapshot_id)
            except NotFound as exc:
                answers.append(exc.message.removeprefix("snapshot: "))
        return answers[0], answers[1]

    cases = [
        (None, ("postgres",)),
        (None, ("postgres", "minio")),
        (base + timedelta(hours=2, minutes=30), ("postgres", "minio")),
        (base + timedelta(hours=2, minutes=30), ("postgres",)),
        (base + timedelta(minutes=30), ()),
    ]
    seen = [both(at, comps) for at, comps in cases]
    assert [a for a, b in seen] == [b for a, b in seen], seen
    assert seen[1][0] == s4.snapshot_id and seen[3][0] == s3.snapshot_id
    assert "no valid snapshot holding postgres, minio at or before" in seen[2][0]
    kit.storage.delete(s4.dump_key)  # s4 INVALID: nothing holding MinIO is valid
    again = both(None, ("postgres", "minio"))
    assert again[0] == again[1] and again[0].startswith("no valid snapshot holding")
    assert "(the newest holds postgres)" in again[0]


@pytest.mark.slow
def test_real_backups_keep_the_index_and_a_crash_before_the_page_hides_nothing(
    tmp_path: Path,
    pg_database: PostgresEndpoint,
    redis_db: RedisEndpoint,
    s3_server: S3Endpoint,
    s3_bucket: str,
) -> None:
    """``drtool backup`` writes the index; killed between its manifest and its page, the
    snapshot is still listed (``--last 1``), and the next backup links to it and indexes it."""
    kit = make_backup_kit(tmp_path, pg_database, redis_db, s3_server, s3_bucket)
    first = kit.backup_ok("redis")
    repo = access.open_repo(kit.operator())
    keys, rid = repo.verify_keys, repo.info.repo_id
    index = catalog_index.read_index(repo.storage, keys, rid)
    assert index is not None and set(index.entries) == {first}

    crashed = kit.backup("redis", env=kit.env(DRTOOL_CRASH_AT="after-manifest"))
    assert crashed.returncode == EXIT_CODE
    (crashed_id,) = set(kit.listed()) - {first}
    index = catalog_index.read_index(repo.storage, keys, rid)
    assert index is not None and crashed_id not in index.entries  # no page for it
    done = kit.drtool("list", "--last", "1", "--json", config=kit.operator_config)
    assert done.returncode == 0, done.stderr
    assert [(r["id"], r["status"]) for r in json.loads(done.stdout)] == [(crashed_id, "VALID")]

    third = kit.backup_ok("redis")
    assert kit.manifest(third).previous_id == crashed_id  # the chain link found it
    index = catalog_index.read_index(repo.storage, keys, rid)
    assert index is not None and {first, crashed_id, third} == set(index.entries)
    assert index.deltas == 1


def _s3_calls(storage: Storage) -> list[tuple[str, str]]:
    """The S3 operations ``storage`` makes from now on, with their keys (a botocore hook)."""
    from drtool.storage.s3 import S3Storage

    assert isinstance(storage, S3Storage)
    calls: list[tuple[str, str]] = []

    def seen(model: Any, params: dict[str, Any], **_: Any) -> None:
        calls.append((model.name, str(params.get("Key", params.get("Prefix", "")))))

    storage._client.meta.events.register("before-parameter-build.s3", seen)
    return calls


@pytest.mark.slow
def test_list_of_verified_snapshots_on_s3_reads_one_summary_not_a_record_each(
    tmp_path: Path, s3_server: S3Endpoint, s3_bucket: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Every snapshot verified (the daily ``verify unverified`` leaves a record on each): ``list``
    read one record per snapshot, 10,000 GETs (~30 s) at 10,000 on S3. Now ``verify`` leaves
    a signed summary and ``list`` reads it: only a record newer than the summary is read; a
    summary that does not verify is not used (the records are read, the verdicts unchanged)."""
    from support.repo_kit import s3_kit

    kit = s3_kit(tmp_path, s3_server, s3_bucket)
    keys, rid = [kit.verify_key], kit.info.repo_id
    history = write_history(kit.storage, kit.info, kit.signing_key, 40, newest=_now())
    catalog.rebuild_index(kit.storage, kit.signing_key, keys, rid)
    outcomes = svc.verify(kit.config(), "unverified", read_data=False)
    assert len(outcomes) == 40 and all(o.recorded for o in outcomes)
    newest_id = history[-1][0]
    later = datetime.now(UTC) + timedelta(seconds=5)  # a record the summary does not hold
    fresh = verifications.Verification(rid, newest_id, verifications.now_text(later), "hashes", 1)
    fresh_key = verifications.write_record(kit.storage, kit.signing_key, fresh, later)

    calls = _s3_calls(kit.storage)
    records = catalog.list_snapshots(kit.storage, keys, rid)
    assert [r.status for r in records] == ["VALID"] * 40, {r.status for r in records}
    assert all(r.verification is not None for r in records)
    assert records[-1].verification == fresh
    record_gets = [k for op, k in calls if op == "GetObject" and "verifications/" in k]
    summaries = [k for k in record_gets if k.startswith(f"drtool/{verifications.SUMMARY_PREFIX}")]
    assert len(summaries) == 1 and record_gets == [*summaries, f"drtool/{fresh_key}"], record_gets
    seen = {r.snapshot_id: r.verification for r in records}

    # a newer summary signed by a key nobody trusts: not used, every record read instead
    from drtool import keys as key_mod

    key_mod.write_signing_key(tmp_path / "forged.key")
    other = key_mod.load_signing_key(tmp_path / "forged.key")
    verifications.write_summary(kit.storage, other, keys, rid, later + timedelta(seconds=5))
    calls.clear()
    with caplog.at_level(logging.WARNING):
        again = catalog.list_snapshots(kit.storage, keys, rid)
    assert {r.snapshot_id: r.verification for r in again} == seen
    assert "verification summary" in caplog.text and "not used" in caplog.text
    assert len([k for op, k in calls if op == "GetObject" and "verifications/" in k]) == 41
