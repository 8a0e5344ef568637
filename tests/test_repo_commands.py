"""The repository commands as a user runs them: ``drtool`` in a subprocess, real storage.

Every failure must be one ``error: ...`` line on stderr (no traceback) and the documented exit
code: 2 usage/config, 4 storage, 5 integrity, 10 not found, 11 locked.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import tomli_w
from support.cli import run_drtool
from support.repo_kit import T0, RepoKit, blob_id, dead_pid, file_kit, plant_lock, s3_kit

from drtool import keys
from drtool.endpoints import S3Endpoint
from drtool.repository import chain, layout
from drtool.repository.locks import read_locks, repository_lock
from drtool.repository.manifest import manifest_sha256, sign_manifest


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rich tables as on a wide terminal: ids and messages stay on one line."""
    monkeypatch.setenv("COLUMNS", "250")


def drtool(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``drtool --config CONFIG ARGS...`` (no ``DRTOOL_*`` variables from the caller)."""
    return run_drtool(*args, config=config, home=config.parent / "home")


def failed(result: subprocess.CompletedProcess[str], code: int) -> str:
    """Assert a clean failure with ``code``; return the error message (after ``error: ``)."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    return errors[0].removeprefix("error: ")


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, (result.stdout, result.stderr)
    return result.stdout


def table_rows(out: str) -> list[list[str]]:
    """The body rows of the rich tables in ``out``, as lists of cell texts."""
    return [[c.strip() for c in line.split("│")] for line in out.splitlines() if "│" in line]


# -- init ------------------------------------------------------------------------------------


def test_init_creates_once_and_refuses_a_second_time(tmp_path: Path) -> None:
    repo_kit = file_kit(tmp_path)  # its repository exists already; make a fresh one beside it
    (tmp_path / "fresh").mkdir()
    doc = {**repo_kit.sections, "repository": {"url": (tmp_path / "fresh").as_uri()}}
    config = tmp_path / "fresh.toml"
    config.write_text(tomli_w.dumps(doc))
    out = ok(drtool(config, "init"))
    info = json.loads((tmp_path / "fresh" / layout.REPO_FILE).read_text())
    assert out.strip() == f"initialised repository {info['repo_id']} (format 1)"
    header = (tmp_path / "fresh" / layout.REPO_FILE).read_bytes()
    message = failed(drtool(config, "init"), 2)
    assert message == f"repository: {(tmp_path / 'fresh').as_uri()} is already a drtool " + (
        "repository; not touched"
    )
    assert (tmp_path / "fresh" / layout.REPO_FILE).read_bytes() == header


# -- list ------------------------------------------------------------------------------------


def test_list_json_shows_valid_and_invalid_snapshots(any_repo_kit: RepoKit) -> None:
    good = any_repo_kit.snapshot(T0, blobs=(blob_id(),))
    broken = any_repo_kit.snapshot(T0 + timedelta(hours=1))
    any_repo_kit.storage.delete(broken.dump_key)
    rows = json.loads(ok(drtool(any_repo_kit.config_file, "list", "--json")))
    assert [(r["id"], r["status"], r["problem"]) for r in rows] == [
        (good.snapshot_id, "VALID", None),
        (broken.snapshot_id, "INVALID", f"missing object {broken.dump_key}"),
    ]
    assert rows[0]["components"] == ["postgres", "minio"]
    assert rows[0]["stored_bytes"] == good.manifest.stored_bytes
    assert rows[0]["time"] == "2026-11-20T02:00:00+00:00"
    table = ok(drtool(any_repo_kit.config_file, "list"))
    rows_shown = {r[0]: r for r in table_rows(table)}
    assert rows_shown[good.snapshot_id][1:3] == ["VALID", "postgres,minio"]
    assert rows_shown[broken.snapshot_id][1] == "INVALID"
    assert rows_shown[broken.snapshot_id][-1] == f"missing object {broken.dump_key}"


def test_list_of_an_empty_repository_is_empty(repo_kit: RepoKit) -> None:
    assert json.loads(ok(drtool(repo_kit.config_file, "list", "--json"))) == []


def test_list_fails_loudly_when_the_listing_fails(looping_blobs: RepoKit) -> None:
    message = failed(drtool(looping_blobs.config_file, "list", "--json"), 4)
    assert "blobs/zz: cannot stat" in message


def test_list_of_a_bucket_that_does_not_exist_is_an_error(
    tmp_path: Path, s3_server: S3Endpoint, s3_bucket: str
) -> None:
    repo_kit = s3_kit(tmp_path, s3_server, s3_bucket)
    repo_kit.snapshot(T0)
    doc = {**repo_kit.sections}
    doc["repository"] = {**doc["repository"], "url": "s3://no-such-bucket-drtool/drtool"}
    config = tmp_path / "gone.toml"
    config.write_text(tomli_w.dumps(doc))
    result = drtool(config, "list", "--json")
    assert result.stdout == ""  # never an empty listing
    message = failed(result, 10)
    assert "no-such-bucket-drtool" in message


# -- show -------------------------------------------------------------------------------------


def test_show_missing_snapshot_exits_10(repo_kit: RepoKit) -> None:
    repo_kit.snapshot(T0)
    message = failed(drtool(repo_kit.config_file, "show", "20250101T000000Z-abcd"), 10)
    assert message == "snapshot 20250101T000000Z-abcd: not found (see `drtool list`)"
    message = failed(drtool(repo_kit.config_file, "verify", "20250101T000000Z-abcd"), 10)
    assert "20250101T000000Z-abcd: not found" in message


def test_show_prints_the_snapshot(repo_kit: RepoKit) -> None:
    snap = repo_kit.snapshot(T0)
    shown = json.loads(ok(drtool(repo_kit.config_file, "show", "latest", "--json")))
    assert shown["id"] == snap.snapshot_id
    assert shown["status"] == "VALID"
    assert shown["manifest"]["components"][0]["objects"][0]["key"] == snap.dump_key
    text = ok(drtool(repo_kit.config_file, "show", snap.snapshot_id))
    assert f"snapshot {snap.snapshot_id}: VALID" in text
    assert "host nas" in text


# -- verify -----------------------------------------------------------------------------------


def test_verify_good_data_exits_0(any_repo_kit: RepoKit) -> None:
    shared = blob_id()
    a = any_repo_kit.snapshot(T0, blobs=(shared,))
    b = any_repo_kit.snapshot(T0 + timedelta(hours=1), blobs=(shared,))
    keyless = any_repo_kit.write_config("keyless", identity_file=None)
    outcomes = json.loads(ok(drtool(keyless, "verify", "--all", "--json")))
    assert [(o["snapshot_id"], o["problems"]) for o in outcomes] == [
        (a.snapshot_id, []),
        (b.snapshot_id, []),
    ]
    table = ok(drtool(any_repo_kit.config_file, "verify", "--read-data"))
    assert table_rows(table) == [[b.snapshot_id, "2", "ok"]]
    assert a.snapshot_id not in table  # default: the latest only


def test_verify_flipped_byte_exits_5_naming_the_object(repo_kit: RepoKit) -> None:
    snap = repo_kit.snapshot(T0)
    path = Path(repo_kit.url.removeprefix("file://")) / snap.dump_key
    data = bytearray(path.read_bytes())
    data[100] ^= 0x80
    path.write_bytes(bytes(data))
    keyless = repo_kit.write_config("keyless", identity_file=None)
    message = failed(drtool(keyless, "verify"), 5)
    assert message == (
        f"verify: 1 of 1 snapshots failed: {snap.dump_key}: stored sha256 differs from the manifest"
    )
    message = failed(drtool(repo_kit.config_file, "verify", "--read-data", snap.snapshot_id), 5)
    assert message.startswith(f"verify: 1 of 1 snapshots failed: {snap.dump_key}")


def test_verify_all_blames_a_shared_damaged_blob_on_every_snapshot(any_repo_kit: RepoKit) -> None:
    """Issue 18.6: a blob shared by three snapshots is read once, and all three fail."""
    shared = blob_id()
    snaps = [any_repo_kit.snapshot(T0 + timedelta(hours=h), blobs=(shared,)) for h in range(3)]
    own = any_repo_kit.snapshot(T0 + timedelta(hours=3))  # does not name the blob
    key = layout.blob_key(shared)
    data = bytearray(any_repo_kit.storage.get_bytes(key))
    data[len(data) // 2] ^= 0x01
    any_repo_kit.storage.put_bytes(key, bytes(data))
    keyless = any_repo_kit.write_config("keyless", identity_file=None)
    for args in (["--json"], ["--read-data", "--json"]):
        config = keyless if "--read-data" not in args else any_repo_kit.config_file
        run = drtool(config, "verify", "--all", *args)
        message = failed(run, 5)
        outcomes = {o["snapshot_id"]: o for o in json.loads(run.stdout)}
        assert [outcomes[s.snapshot_id]["damaged"] for s in snaps] == [[key]] * 3
        assert outcomes[own.snapshot_id]["problems"] == []
        assert message.startswith(f"verify: 3 of 4 snapshots failed: {key}: ")
        assert message.count(key) == 1  # named once
    # the signed records make every one of them DAMAGED in `list`
    rows = {r["id"]: r for r in json.loads(ok(drtool(any_repo_kit.config_file, "list", "--json")))}
    assert [rows[s.snapshot_id]["status"] for s in snaps] == ["DAMAGED"] * 3
    assert rows[own.snapshot_id]["status"] == "VALID"


def test_verify_walks_the_chain_and_names_every_broken_link(any_repo_kit: RepoKit) -> None:
    """Issue 18.7: a manifest deleted in the middle, or replaced, breaks the next one's link.

    Prune forgets snapshots on purpose and leaves tombstones: those links are not broken.
    """
    repo_kit = any_repo_kit
    snaps = [repo_kit.snapshot(T0 + timedelta(days=d)) for d in range(6)]
    ids = [s.snapshot_id for s in snaps]
    ok(drtool(repo_kit.config_file, "prune", "--keep-last", "4", "--count-unverified"))
    ok(drtool(repo_kit.config_file, "verify"))  # ids[2]'s link to the pruned ids[1] holds
    repo_kit.storage.delete(layout.manifest_key(ids[3]))  # deleted, not pruned
    # ids[2]'s manifest replaced by another one (re-signed: the backup host's key was stolen)
    forged = replace(snaps[2].manifest, host="elsewhere")
    repo_kit.storage.put_bytes(
        layout.manifest_key(ids[2]), sign_manifest(forged, repo_kit.signing_key)
    )
    run = drtool(repo_kit.config_file, "verify", "--json")  # the latest only: the walk is whole
    message = failed(run, 5)
    outcomes = {o["snapshot_id"]: o["problems"] for o in json.loads(run.stdout)}
    assert outcomes == {
        ids[4]: [f"chain: the previous snapshot {ids[3]} is missing (deleted, not pruned)"],
        ids[5]: [],
    }
    assert message.startswith("verify: 1 of 2 snapshots failed: chain: ")
    repo_kit.storage.put_bytes(layout.manifest_key(ids[3]), snaps[3].stored)  # put back
    run = drtool(repo_kit.config_file, "verify", "--all", "--json")
    failed(run, 5)
    outcomes = {o["snapshot_id"]: o["problems"] for o in json.loads(run.stdout)}
    assert outcomes[ids[3]] == [
        f"chain: the manifest of the previous snapshot {ids[2]} is not the one this snapshot "
        "recorded (replaced)"
    ]
    assert [outcomes[i] for i in (ids[2], ids[4], ids[5])] == [[], [], []]


def test_verify_read_data_without_identity_exits_2(repo_kit: RepoKit) -> None:
    repo_kit.snapshot(T0)
    keyless = repo_kit.write_config("keyless", identity_file=None)
    message = failed(drtool(keyless, "verify", "--read-data"), 2)
    assert message == "keys.identity_file: --read-data needs an identity (got none)"


# -- configuration and repository-header errors -----------------------------------------------


def test_typo_in_config_exits_2_listing_known_settings(repo_kit: RepoKit, tmp_path: Path) -> None:
    config = tmp_path / "typo.toml"
    config.write_text(repo_kit.config_file.read_text().replace("url =", "urll =", 1))
    message = failed(drtool(config, "list"), 2)
    assert message.startswith("repository.urll: unknown setting (known: ")
    known = message.removeprefix("repository.urll: unknown setting (known: ").rstrip(")")
    assert "url" in known.split(", ")
    assert "access_key_file" in known.split(", ")


def test_newer_repository_format_exits_2_naming_both_versions(repo_kit: RepoKit) -> None:
    doc = json.loads(repo_kit.storage.get_bytes(layout.REPO_FILE))
    doc["format_version"] = 99
    repo_kit.storage.put_bytes(layout.REPO_FILE, json.dumps(doc).encode())
    message = failed(drtool(repo_kit.config_file, "list"), 2)
    assert message == (
        "repository: format version 99 is newer than this drtool supports (1); upgrade drtool"
    )


def test_missing_repository_exits_10_saying_run_init(repo_kit: RepoKit, tmp_path: Path) -> None:
    (tmp_path / "nothing").mkdir()
    config = tmp_path / "nothing.toml"
    config.write_text(
        repo_kit.config_file.read_text().replace(repo_kit.url, (tmp_path / "nothing").as_uri())
    )
    message = failed(drtool(config, "list"), 10)
    assert message == (
        f"repository: no drtool repository at {(tmp_path / 'nothing').as_uri()} "
        "(run `drtool init` first)"
    )


def test_no_pinned_verify_key_fails_closed_never_trusting_the_header(any_repo_kit: RepoKit) -> None:
    """Issue 18.8: a writer of the repository adds its own key to the header and signs a
    forged snapshot. A config without keys.verify_key used to trust it (VALID, restorable)."""
    repo_kit = any_repo_kit
    good = repo_kit.snapshot(T0)
    forger_key = repo_kit.tmp / "forger.key"
    forger_verify = keys.write_signing_key(forger_key)
    header = json.loads(repo_kit.storage.get_bytes(layout.REPO_FILE))
    header["verify_keys"].append(forger_verify)
    repo_kit.storage.put_bytes(layout.REPO_FILE, json.dumps(header).encode())
    repo_kit.signing_key = keys.load_signing_key(forger_key)
    forged = repo_kit.snapshot(T0 + timedelta(hours=1))
    # the operator side without a pinned key: refused, saying how to pin it
    unpinned = repo_kit.write_config("unpinned", verify_key=None, signing_key_file=None)
    for command in (["list"], ["verify"], ["show", "latest"], ["restore", "--dry-run"]):
        message = failed(drtool(unpinned, *command), 2)
        assert message.startswith("keys.verify_key: not set; drtool does not trust the keys in")
        assert "drtool keys verify-key SIGNING_KEY_FILE" in message
        assert forger_verify in message  # what the header lists, to compare
    # pinned: the forged snapshot is INVALID
    rows = {r["id"]: r for r in json.loads(ok(drtool(repo_kit.config_file, "list", "--json")))}
    assert rows[good.snapshot_id]["status"] == "VALID"
    assert rows[forged.snapshot_id]["status"] == "INVALID"
    # the backup host (its signing key, no pinned key) trusts its own key only
    host = repo_kit.write_config("host", verify_key=None, identity_file=None)
    rows = {r["id"]: r for r in json.loads(ok(drtool(host, "list", "--json")))}
    assert rows[forged.snapshot_id]["status"] == "INVALID"
    # the key to pin is printed from the signing key
    signing_key_file = str(repo_kit.sections["keys"]["signing_key_file"])
    out = ok(run_drtool("keys", "verify-key", signing_key_file, config=repo_kit.config_file))
    assert out.strip() == repo_kit.verify_key


# -- prune ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_prune_dry_run_then_real_run(any_repo_kit: RepoKit) -> None:
    snaps = [any_repo_kit.snapshot(T0 + timedelta(days=d)) for d in range(3)]
    before = any_repo_kit.keys_in_storage()
    out = ok(
        drtool(
            any_repo_kit.config_file, "prune", "--keep-last", "2", "--dry-run", "--count-unverified"
        )
    )
    assert "would delete 1 snapshots, 2 objects, 0 stale uploads" in out
    assert table_rows(out) == [
        [snaps[1].snapshot_id, "keep", "last"],
        [snaps[2].snapshot_id, "keep", "last"],
        [snaps[0].snapshot_id, "forget", "outside the policy"],
    ]
    assert any_repo_kit.keys_in_storage() == before
    out = ok(drtool(any_repo_kit.config_file, "prune", "--keep-last", "2", "--count-unverified"))
    assert "deleted 1 snapshots, 2 objects, 0 stale uploads" in out
    tombstone = chain.tombstone_key(snaps[0].snapshot_id, manifest_sha256(snaps[0].stored))
    assert any_repo_kit.keys_in_storage() == before - {
        layout.manifest_key(snaps[0].snapshot_id),
        snaps[0].dump_key,
    } | {tombstone, "catalog/9999999998.json"}  # the tombstone: what verify's chain walk
    # tells a pruned snapshot from a deleted one by; the page: the compacted index (ADR 0020)
    rows = json.loads(ok(drtool(any_repo_kit.config_file, "list", "--json")))
    assert [(r["id"], r["status"]) for r in rows] == [
        (snaps[1].snapshot_id, "VALID"),
        (snaps[2].snapshot_id, "VALID"),
    ]
    ok(drtool(any_repo_kit.config_file, "verify", "--all", "--read-data"))


def test_prune_without_a_policy_exits_2(repo_kit: RepoKit) -> None:
    repo_kit.snapshot(T0)
    before = repo_kit.keys_in_storage()
    message = failed(drtool(repo_kit.config_file, "prune"), 2)
    assert message.startswith("prune: this policy keeps nothing")
    message = failed(drtool(repo_kit.config_file, "prune", "--keep-last", "-1"), 2)
    assert message == "prune: --keep-* counts cannot be negative"
    assert repo_kit.keys_in_storage() == before


def test_prune_while_locked_exits_11_and_deletes_nothing(repo_kit: RepoKit) -> None:
    repo_kit.snapshot(T0)
    repo_kit.snapshot(T0 + timedelta(days=1))
    before = repo_kit.keys_in_storage()
    with repository_lock(repo_kit.storage, "backup") as held:
        message = failed(drtool(repo_kit.config_file, "prune", "--keep-last", "1"), 11)
        assert message.startswith(
            f"repository locked by {socket.gethostname()}/{os.getpid()} (backup) since {held.since}"
        )
    assert repo_kit.keys_in_storage() == before


def test_prune_listing_error_exits_4_and_deletes_nothing(looping_blobs: RepoKit) -> None:
    looping_blobs.snapshot(T0 + timedelta(days=1))
    root = Path(looping_blobs.url.removeprefix("file://"))
    before = set(root.rglob("*"))
    message = failed(drtool(looping_blobs.config_file, "prune", "--keep-last", "1"), 4)
    assert "cannot stat" in message
    assert set(root.rglob("*")) == before


# -- unlock -----------------------------------------------------------------------------------


def test_unlock_removes_stale_locks_and_all_with_all(repo_kit: RepoKit) -> None:
    assert ok(drtool(repo_kit.config_file, "unlock")).strip() == "no stale locks"
    since = datetime.now(UTC)
    pid = dead_pid()
    plant_lock(repo_kit, host=socket.gethostname(), pid=pid, since=since)
    plant_lock(repo_kit, host="other-nas", pid=1, since=since, op="prune")
    out = ok(drtool(repo_kit.config_file, "unlock"))
    assert out.strip() == (
        f"removed lock of {socket.gethostname()}/{pid} (backup) since {since.isoformat()}: "
        f"process {pid} is gone"
    )
    assert [(lk.host, lk.pid) for lk in read_locks(repo_kit.storage)] == [("other-nas", 1)]
    # the live lock still blocks a writer, until --all
    failed(drtool(repo_kit.config_file, "prune", "--keep-last", "1"), 11)
    out = ok(drtool(repo_kit.config_file, "unlock", "--all"))
    assert out.strip() == f"removed lock of other-nas/1 (prune) since {since.isoformat()}: --all"
    assert read_locks(repo_kit.storage) == []


@pytest.mark.parametrize("command", [["list"], ["verify"], ["prune", "--keep-last", "1"]])
def test_commands_without_a_repository_url_exit_2(tmp_path: Path, command: list[str]) -> None:
    config = tmp_path / "empty.toml"
    config.write_text("")
    message = failed(drtool(config, *command), 2)
    assert message.startswith("repository.url: not set")
