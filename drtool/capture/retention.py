"""Journal retention: chain records no kept snapshot needs are removed behind a signed marker.

The bucket at a moment needs a valid MinIO snapshot started at or before it plus the journal
after that start (drtool/capture/at.py). Records whose every capture is older than the start
of the oldest valid MinIO snapshot therefore serve no moment any more: they, and their
journals, are removed, after the signed marker ``capture/pruned.json`` says up to which
record and with which sha256 the chain now starts (so it still verifies key-less). Their
blobs are then referenced by nothing but the snapshots that reuse them; ``drtool prune``
sweeps the rest after its grace period.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from drtool.capture import chain
from drtool.errors import IntegrityError
from drtool.repository import catalog
from drtool.repository.access import Repo
from drtool.repository.signed import sign_body


@dataclass
class JournalPrune:
    """What a journal prune removed (or would, with ``dry_run``)."""

    oldest_snapshot: str | None = None
    upto_seq: int | None = None
    removed: list[str] = field(default_factory=list)
    done: bool = False


def oldest_minio_snapshot(repo: Repo) -> catalog.SnapshotRecord | None:
    """The oldest valid snapshot holding MinIO (the journal before it serves no moment)."""
    records = catalog.list_snapshots(repo.storage, repo.verify_keys, repo.info.repo_id)
    held = [r for r in records if r.valid and r.manifest and r.manifest.component("minio")]
    return min(held, key=lambda r: r.time, default=None)


def prune_journal(
    repo: Repo,
    signing_key: Ed25519PrivateKey,
    *,
    host: str,
    now: datetime,
    dry_run: bool,
) -> JournalPrune:
    """Remove the head of the chain captured before the oldest valid MinIO snapshot started.

    Refused (IntegrityError) on a chain with a problem: what is removed must be proved first.
    """
    result = JournalPrune()
    oldest = oldest_minio_snapshot(repo)
    if oldest is None:
        return result
    result.oldest_snapshot = oldest.snapshot_id
    found = chain.load_chain(repo.storage, repo.verify_keys, repo.info.repo_id)
    if found.problems:
        raise IntegrityError(
            f"capture chain: {found.problems[0]}; nothing pruned (run `drtool capture verify`)"
        )
    head = []
    for key, record in found.records:
        if datetime.fromisoformat(record.last_captured) >= oldest.time:
            break
        head.append((key, record))
    if not head:
        return result
    last_key, last = head[-1]
    result.upto_seq = last.seq
    result.removed = [k for key, r in head for k in (key, r.journal.key)]
    if dry_run:
        return result
    marker = chain.Pruned(
        repo_id=repo.info.repo_id,
        upto_seq=last.seq,
        upto_sha256=hashlib.sha256(repo.storage.get_bytes(last_key)).hexdigest(),
        created=now.isoformat(),
        host=host,
    )
    repo.storage.put_bytes(chain.PRUNED_KEY, sign_body(marker.to_dict(), signing_key))
    for key in result.removed:  # oldest first: an interrupted prune leaves a shorter head
        repo.storage.delete(key)
    result.done = True
    return result
