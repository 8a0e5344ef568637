"""The hash chain of manifests: deleted or replaced snapshots do not go unnoticed.

Every manifest names the snapshot before it (``previous_id``) and the sha256 of that manifest
as stored. Two checks use the links (issue 18.7):

- ``verify`` walks them: a link to a manifest that is gone, or whose stored bytes hash
  differently, is reported. Prune forgets snapshots on purpose, so before it deletes a
  manifest it leaves a tombstone ``forgotten/<snapshot-id>.<manifest-sha256>`` (empty; one
  listing reads them all). The oldest remaining snapshot may point to a manifest that is gone
  without a tombstone: that is where the kept history starts (lifecycle rules expire the
  oldest first).
- The backup host remembers the id and manifest hash of the last snapshot it committed
  (``last-commit.json`` in its state dir) and refuses to chain past a repository whose newest
  authentic manifest is older or different: a rollback or a deleted snapshot, which the chain
  alone cannot show (nothing points to the newest manifest). ``--accept-rollback REASON``
  overrides, logged.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from drtool.errors import IntegrityError
from drtool.repository.ids import is_id
from drtool.storage.base import Storage

if TYPE_CHECKING:  # the catalog logs the links it lists: no import cycle at run time
    from drtool.repository.catalog import SnapshotRecord

log = logging.getLogger(__name__)

FORGOTTEN = "forgotten/"
LAST_COMMIT = "last-commit.json"


def tombstone_key(snapshot_id: str, manifest_sha256: str) -> str:
    """The (empty) object prune leaves for a snapshot it forgets."""
    return f"{FORGOTTEN}{snapshot_id}.{manifest_sha256}"


def tombstones(storage: Storage) -> dict[str, str]:
    """Snapshot id -> manifest sha256 of every snapshot prune forgot (one listing)."""
    found = {}
    for obj in storage.list(FORGOTTEN):
        name = obj.key.removeprefix(FORGOTTEN)
        snapshot_id, _, digest = name.partition(".")
        if is_id(snapshot_id) and len(digest) == 64:
            found[snapshot_id] = digest
    return found


def link_problems(records: list[SnapshotRecord], forgotten: dict[str, str]) -> dict[str, list[str]]:
    """Snapshot id -> what is wrong with its link to the previous manifest."""
    present = {r.snapshot_id: r for r in records}
    oldest = min(present, default="")
    problems: dict[str, list[str]] = {}
    for record in records:
        m = record.manifest
        if m is None or m.previous_id is None:
            continue
        prev_id, want = m.previous_id, m.previous_sha256
        prev = present.get(prev_id)
        if prev is not None:
            found = prev.manifest_sha256
        elif prev_id in forgotten:
            found = forgotten[prev_id]
        elif prev_id < oldest:
            continue  # the start of the kept history (older snapshots expired)
        else:
            problems.setdefault(record.snapshot_id, []).append(
                f"chain: the previous snapshot {prev_id} is missing (deleted, not pruned)"
            )
            continue
        if found != want:
            problems.setdefault(record.snapshot_id, []).append(
                f"chain: the manifest of the previous snapshot {prev_id} is not the one this "
                "snapshot recorded (replaced)"
            )
    return problems


class RollbackDetected(IntegrityError):
    """The repository is behind this host's last commit (exit 5).

    Its own class so the schedule's ``drtool_job_failures{cause="RollbackDetected"}`` tells
    it from a damaged object.
    """


@dataclass(frozen=True)
class LastCommit:
    """What the backup host committed last."""

    repo_id: str
    snapshot_id: str
    manifest_sha256: str


def read_last_commit(state_dir: Path) -> LastCommit | None:
    """The remembered last commit, or None before the first (or when unreadable: logged)."""
    path = state_dir / LAST_COMMIT
    try:
        data = json.loads(path.read_text())
        return LastCommit(str(data["repo_id"]), str(data["snapshot_id"]), str(data["sha256"]))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        log.warning("%s is unreadable; the rollback check starts over", path)
        return None


def remember_commit(state_dir: Path, commit: LastCommit) -> None:
    """Record the commit atomically (a crash leaves the old or the new record, never half).

    The snapshot is committed already: a state dir that cannot be written is logged loudly
    (the rollback check then compares with an older commit), not a failed backup.
    """
    path = state_dir / LAST_COMMIT
    tmp = path.with_name(f".{LAST_COMMIT}.tmp")
    doc = {
        "repo_id": commit.repo_id,
        "snapshot_id": commit.snapshot_id,
        "sha256": commit.manifest_sha256,
    }
    try:
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, path)
    except OSError as exc:
        log.error("cannot record the last commit in %s (%s); fix the state dir", path, exc.strerror)


def check_rollback(
    state_dir: Path, repo_id: str, newest: SnapshotRecord | None, accept_reason: str | None
) -> None:
    """IntegrityError when the repository is behind what this host committed last.

    The newest authentic manifest must be the remembered one (same hash) or newer. Anything
    else means manifests were deleted or the repository restored from an older copy; chaining
    on would hide it. ``accept_reason`` (``--accept-rollback``) lets the backup go on, logged.
    """
    last = read_last_commit(state_dir)
    if last is None or last.repo_id != repo_id:
        return
    if newest is not None and (
        newest.snapshot_id > last.snapshot_id
        or (
            newest.snapshot_id == last.snapshot_id
            and newest.manifest_sha256 == last.manifest_sha256
        )
    ):
        return
    found = (
        "no authentic snapshot"
        if newest is None
        else f"snapshot {newest.snapshot_id}"
        + (" with another manifest" if newest.snapshot_id == last.snapshot_id else "")
    )
    what = (
        f"repository rolled back: this host last committed snapshot {last.snapshot_id} "
        f"(manifest sha256 {last.manifest_sha256[:12]}…), the newest authentic one now is {found}"
    )
    if accept_reason:
        log.warning("%s; accepted (--accept-rollback): %s", what, accept_reason)
        return
    raise RollbackDetected(
        f"{what}; a manifest was deleted or the repository restored from an older copy. "
        "Nothing was backed up. Investigate (drtool verify --all), then rerun with "
        '--accept-rollback "REASON" if it is expected'
    )
