"""WAL retention for ``prune``: keep every segment from the oldest kept base backup onward.

Point-in-time recovery replays WAL from a base backup's ``start_segment``; WAL older than the
oldest base backup prune keeps can serve no restore and is removed, in the same plan-then-delete
way as snapshot data: the plan is computed under prune's exclusive lock, a signed removal
record (drtool/wal/pruned.py) is committed, then the objects are deleted. Only segments whose
number is below the floor go, so no gap can open inside the window; history files (tiny, and
needed to follow any later timeline) always stay. With no base backup kept, all WAL stays and
the plan says so. Without a signing key the removal cannot be recorded, so nothing is removed.
See docs/decisions/0017-pitr-restore-and-wal-retention.md.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from datetime import UTC, datetime

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from drtool.repository import catalog
from drtool.repository.access import Repo
from drtool.wal.index import INDEX_PREFIX, WAL, load_index
from drtool.wal.names import DEFAULT_SEGMENT_SIZE, is_segment, parse_segment
from drtool.wal.pruned import PRUNED_PREFIX, append_pruned, load_pruned

BASE = "postgres-base"


@dataclass
class WalPrunePlan:
    """What WAL retention keeps and removes."""

    floor_segment: str | None = None  # the oldest kept base's start segment
    base_snapshot: str | None = None
    remove: list[str] = field(default_factory=list)  # WAL file names recorded as removed
    keys: list[str] = field(default_factory=list)  # stored objects to delete
    kept_segments: int = 0
    note: str = ""
    record: str | None = None  # the removal record written (after execution)
    segment_size: int = DEFAULT_SEGMENT_SIZE
    #: every valid base backup's start segment, by snapshot (a deferred one lowers the floor)
    starts: dict[str, str] = field(default_factory=dict)


def _name_of(key: str) -> str | None:
    """The WAL file name of a stored ``wal/<timeline>/<name>.zst.age`` key, else None."""
    if key.startswith((INDEX_PREFIX, PRUNED_PREFIX)) or not key.endswith(".zst.age"):
        return None
    name = key.rsplit("/", 1)[-1][: -len(".zst.age")]
    return name if is_segment(name) else None


def plan_wal(repo: Repo, records: list[catalog.SnapshotRecord], keep: set[str]) -> WalPrunePlan:
    """Which WAL segments lie wholly before the oldest kept base backup (reads only)."""
    index = load_index(repo.storage, repo.verify_keys, repo.info.repo_id)
    size = index.segment_size or DEFAULT_SEGMENT_SIZE
    bases = [
        (parse_segment(str(c.details["start_segment"]), size), r.snapshot_id)
        for r in records
        if r.valid and r.snapshot_id in keep and r.manifest is not None
        for c in r.manifest.components
        if c.name == BASE and is_segment(str(c.details.get("start_segment", "")))
    ]
    plan = WalPrunePlan(segment_size=size)
    plan.starts = {
        r.snapshot_id: str(c.details["start_segment"])
        for r in records
        if r.valid and r.manifest is not None
        for c in r.manifest.components
        if c.name == BASE and is_segment(str(c.details.get("start_segment", "")))
    }
    if not bases:
        plan.kept_segments = len(index.segments())
        plan.note = "no base backup is kept: all WAL kept (a restore to a moment needs one)"
        return plan
    if index.problems:
        plan.kept_segments = len(index.segments())
        plan.note = f"the WAL index has problems ({index.problems[0]}): all WAL kept"
        return plan
    floor, base_snapshot = min(bases)
    plan.floor_segment, plan.base_snapshot = floor.name(size), base_snapshot
    for obj in repo.storage.list(WAL):
        name = _name_of(obj.key)
        if name is not None and parse_segment(name, size).segno < floor.segno:
            plan.keys.append(obj.key)
            if name in index.entries:
                plan.remove.append(name)
    plan.kept_segments = len(index.segments()) - len(plan.remove)
    _describe(plan)
    return plan


def _describe(plan: WalPrunePlan, deferred: int = 0, behind: int = 0) -> None:
    plan.note = (
        f"WAL from {plan.floor_segment} on kept (the start of base backup "
        f"{plan.base_snapshot}, the oldest kept); {len(plan.keys)} older WAL objects to remove"
    )
    if deferred:
        plan.note += f"; {deferred} deferred that Object Lock retains" + (
            f", and the {behind} after them (no gap is opened)" if behind else ""
        )


def _segno(plan: WalPrunePlan, key: str) -> int:
    name = _name_of(key)
    assert name is not None  # planned keys are segment keys
    return parse_segment(name, plan.segment_size).segno


def defer_locked(
    plan: WalPrunePlan, retained: dict[str, datetime], deferred_snapshots: set[str]
) -> dict[str, str]:
    """Take out of ``plan`` the WAL that Object Lock retains, and the WAL it needs kept.

    Only a prefix of the WAL may go, or a gap opens in what stays: the first retained segment
    (in WAL order) and every planned one after it are kept (a lowered ``retain_days`` can
    leave older segments locked longer than newer ones). A forgotten snapshot deferred whole
    because its manifest is retained stays listed, so if it is a base backup its WAL stays
    too: the floor drops to its start. Returns the retained keys with their dates (ISO).
    """
    if plan.floor_segment is None:
        return {}  # nothing planned (no base kept, or the index has problems): its note stays
    size = plan.segment_size
    for sid in sorted(deferred_snapshots & set(plan.starts)):
        start = parse_segment(plan.starts[sid], size).segno
        if plan.floor_segment is None or start < parse_segment(plan.floor_segment, size).segno:
            plan.floor_segment, plan.base_snapshot = plan.starts[sid], sid
    floor = parse_segment(plan.floor_segment, size).segno
    ordered = [
        k for k in sorted(plan.keys, key=lambda k: _segno(plan, k)) if _segno(plan, k) < floor
    ]
    first_held = next((i for i, key in enumerate(ordered) if key in retained), len(ordered))
    held = {key: retained[key].isoformat(timespec="seconds") for key in ordered if key in retained}
    go = ordered[:first_held]
    behind = len(ordered) - first_held - len(held)
    names = {_name_of(key) for key in go}
    kept = [name for name in plan.remove if name not in names]
    plan.remove = [name for name in plan.remove if name in names]
    plan.kept_segments += len(kept)  # index segments only (stray uploads are not counted)
    plan.keys = go
    _describe(plan, len(held), behind)
    return held


def execute_wal(repo: Repo, plan: WalPrunePlan, signing_key: Ed25519PrivateKey | None) -> None:
    """Record the removal (signed), then delete. Without a signing key nothing is removed."""
    if not plan.keys:
        return
    if signing_key is None:
        plan.note += "; not removed: recording a removal needs keys.signing_key_file"
        plan.keys, plan.remove = [], []
        return
    assert plan.floor_segment is not None and plan.base_snapshot is not None
    if plan.remove:
        chain = load_pruned(repo.storage, repo.verify_keys, repo.info.repo_id)
        plan.record = append_pruned(
            repo.storage,
            chain,
            repo_id=repo.info.repo_id,
            signing_key=signing_key,
            host=socket.gethostname(),
            created=datetime.now(UTC).isoformat(timespec="seconds"),
            floor_segment=plan.floor_segment,
            base_snapshot=plan.base_snapshot,
            removed=sorted(plan.remove),
        )
    for key in plan.keys:
        repo.storage.delete(key)
