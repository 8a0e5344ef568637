"""`drtool keys signing-key --rotate` (ADR 0023): verify keys with validity periods.

A real repository (directory) with manifests signed before and after a rotation; readers
pinning either key; a manifest the retired key signs after its retirement is INVALID; a key an
attacker adds to the header without the current key's signature is not trusted (ADR 0014).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

from support.cli import run_drtool
from support.repo_kit import T0, RepoKit

from drtool import keys
from drtool.repository import catalog, layout, rotation, signing_keys


def _statuses(kit: RepoKit, verify_key: str) -> dict[str, tuple[str, str]]:
    config = kit.write_config(f"pin-{verify_key[-6:].replace('/', '_')}", verify_key=verify_key)
    listed = run_drtool("list", "--json", config=config)
    assert listed.returncode == 0, listed.stderr
    return {r["id"]: (r["status"], r["problem"] or "") for r in json.loads(listed.stdout)}


def test_signing_key_rotation_keeps_old_and_new_manifests_valid(repo_kit: RepoKit) -> None:
    kit = repo_kit
    old_snap = kit.snapshot(T0)
    old_key, old_verify = kit.signing_key, kit.verify_key
    new_path = kit.tmp / "keys" / "signing-2.key"

    done = run_drtool("keys", "signing-key", "--rotate", str(new_path), config=kit.config_file)
    assert done.returncode == 0, done.stderr
    new_verify = done.stdout.strip()
    assert new_verify == keys.verify_key_text(keys.load_signing_key(new_path).public_key())
    info = layout.read_repo_info(kit.storage)
    assert [e["key"] for e in info.signing_keys] == [old_verify, new_verify]
    assert new_verify in info.verify_keys

    now = datetime.now(UTC)
    kit.signing_key = keys.load_signing_key(new_path)
    new_snap = kit.snapshot(now + timedelta(minutes=1))
    kit.signing_key = old_key  # the retired key leaked: a snapshot it signs now
    forged = kit.snapshot(now + timedelta(minutes=2))

    for pinned in (old_verify, new_verify):  # either pin works, forward or backward
        found = _statuses(kit, pinned)
        assert found[old_snap.snapshot_id][0] == "VALID"
        assert found[new_snap.snapshot_id][0] == "VALID"
        status, problem = found[forged.snapshot_id]
        assert status == "INVALID" and "retired signing key" in problem
        # nor is the forgery the backup's chain link (else a rollback would pass unseen)
        info = layout.read_repo_info(kit.storage)
        trusted = catalog.trusted_verify_keys(info, pinned, "")
        previous = catalog.newest_authentic(kit.storage, trusted, info.repo_id)
        assert previous is not None and previous.snapshot_id == new_snap.snapshot_id

    # the hash chain over the rotation verifies (old -> new); the forged one is named
    operator = kit.write_config("verify", verify_key=new_verify)
    verified = run_drtool("verify", new_snap.snapshot_id, config=operator)
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_a_key_added_to_the_header_without_the_current_keys_signature_is_not_trusted(
    repo_kit: RepoKit,
) -> None:
    kit = repo_kit
    attacker_path = kit.tmp / "keys" / "attacker.key"
    attacker_verify = keys.write_signing_key(attacker_path)
    attacker = keys.load_signing_key(attacker_path)
    at = datetime.now(UTC).isoformat(timespec="seconds")
    info = layout.read_repo_info(kit.storage)
    data = signing_keys.statement(info.repo_id, attacker_verify, kit.verify_key, at)
    entries = (
        {"key": kit.verify_key, "not_before": None, "not_after": at},
        {
            "key": attacker_verify,
            "not_before": at,
            "not_after": None,
            "replaces": kit.verify_key,
            "signature_old": keys.sign(attacker, data),  # cannot sign with the current key
            "signature_new": keys.sign(attacker, data),
        },
    )
    poisoned = layout.RepoInfo(
        info.format_version,
        info.repo_id,
        info.created,
        info.recipients,
        (*info.verify_keys, attacker_verify),
        entries,
    )
    kit.storage.put_bytes(layout.REPO_FILE, poisoned.to_json())
    genuine = kit.snapshot(T0)
    kit.signing_key = attacker
    forged = kit.snapshot(T0 + timedelta(days=1))

    found = _statuses(kit, kit.verify_key)
    assert found[genuine.snapshot_id][0] == "VALID"  # the bogus hand-over retires nothing
    assert found[forged.snapshot_id][0] == "INVALID"


def test_rotation_refuses_a_signing_key_that_is_not_the_current_one(repo_kit: RepoKit) -> None:
    kit = repo_kit
    first = run_drtool(
        "keys", "signing-key", "--rotate", str(kit.tmp / "keys" / "k2.key"), config=kit.config_file
    )
    assert first.returncode == 0, first.stderr
    again = run_drtool(
        "keys", "signing-key", "--rotate", str(kit.tmp / "keys" / "k3.key"), config=kit.config_file
    )  # the config still names the retired key
    assert again.returncode == 2 and "current signing key" in again.stderr
    assert "Traceback" not in again.stderr
    assert not (kit.tmp / "keys" / "k3.key").exists()


def test_rotation_records_a_retired_key_signs_after_its_retirement_are_ignored(
    repo_kit: RepoKit,
) -> None:
    """A leaked retired key must not make other bytes "expected" through a rotation record."""
    kit = repo_kit
    snap = kit.snapshot(T0)
    old_key = kit.signing_key
    new_path = kit.tmp / "keys" / "signing-2.key"
    done = run_drtool("keys", "signing-key", "--rotate", str(new_path), config=kit.config_file)
    assert done.returncode == 0, done.stderr
    new_key = keys.load_signing_key(new_path)
    info = layout.read_repo_info(kit.storage)
    entry = snap.manifest.objects()[0]
    plan = rotation.Plan("r1", info.repo_id, T0.isoformat(), "x", info.recipients, info.recipients)
    change = rotation.Change(entry.key, entry.size, entry.sha256, entry.size, "f" * 64)
    trusted = catalog.trusted_verify_keys(info, kit.verify_key)
    assert len(trusted) == 2

    for signer, applied in ((old_key, False), (new_key, True)):
        kit.storage.put_bytes(
            rotation.plan_key("r1"), rotation.sign_record(rotation.plan_body(plan), signer)
        )
        kit.storage.put_bytes(
            rotation.batch_key("r1", 1, "done"),
            rotation.sign_record(rotation.batch_body(plan, 1, "done", [change]), signer),
        )
        rmap = rotation.load_map(kit.storage, trusted, info.repo_id)
        assert bool(rmap) is applied
