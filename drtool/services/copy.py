"""``drtool copy``: a second repository for the 3-2-1 rule, filled without any key.

The destination is the same repository (same id, keys and objects) in another store: the
encrypted objects are copied as they are, so the backup host, which holds no identity, runs
it. Order makes it safe to kill at any point: the destination's header first (only into an
empty store), prune tombstones, then per snapshot (oldest first) every object it names,
checked on the destination, then its manifest, byte for byte: a snapshot appears there only
complete. The WAL index chunks follow the same rule. Each repository keeps its own retention
(``drtool prune --repository NAME``), verification records and Object Lock: the
destination's ``retain_days`` and ``object_lock_mode`` apply to what is copied into it.
See docs/decisions/0022-repository-copy.md.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from drtool.config import PRIMARY, Config
from drtool.errors import ConfigError, IntegrityError, NotFound, UsageError
from drtool.faults import crash_point
from drtool.repository import catalog, chain, layout, object_lock, rotation
from drtool.repository.access import Repo, open_repo, storage_for
from drtool.repository.copying import ObjectCopier, SourceDamaged, Wanted, put_small
from drtool.repository.locks import HeldLock, repository_lock
from drtool.services.backup import state_dir
from drtool.storage.base import ObjectInfo, Storage
from drtool.timing import Timer
from drtool.wal import index as wal_index
from drtool.wal.pruned import PRUNED_PREFIX, load_pruned

log = logging.getLogger(__name__)

DEFAULT_WORKERS = 4
#: Where signed key-rotation records live (``drtool keys rotate``, issue 15.1, ADR 0023).
ROTATIONS = "rotations/"


@dataclass
class CopyResult:
    """What one copy did; ``problems`` non-empty means it did not finish (exit 5)."""

    source: str
    destination: str
    initialised: bool = False
    copied: list[str] = field(default_factory=list)  # snapshots committed on the destination
    already: int = 0  # chosen snapshots the destination had already
    skipped: dict[str, str] = field(default_factory=dict)  # snapshot -> why not copied
    tombstones: int = 0
    wal_chunks: int = 0
    uploaded: int = 0
    uploaded_bytes: int = 0
    checked: int = 0
    trusted: int = 0
    newest: str | None = None  # the newest snapshot the destination holds after the run
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0


def run_copy(
    cfg: Config,
    *,
    home: Path,
    destination: str,
    source: str = PRIMARY,
    snapshots: Sequence[str] = (),
    workers: int = DEFAULT_WORKERS,
    now: datetime | None = None,
) -> CopyResult:
    """Copy the chosen snapshots (default: every valid one the destination lacks) and, when
    copying everything, the WAL index, from repository ``source`` to ``destination``."""
    if source == destination:
        raise UsageError(f"copy: --from and --to name the same repository ({source})")
    if workers < 1:
        raise UsageError(f"copy: --jobs must be at least 1 (got {workers})")
    clock = Timer()
    now = now or datetime.now(UTC)
    src_cfg, dst_cfg = cfg.with_repository(source), cfg.with_repository(destination)
    src = open_repo(src_cfg)
    dest = storage_for(dst_cfg)
    result = CopyResult(source, destination)
    records = catalog.list_snapshots(src.storage, src.verify_keys, src.info.repo_id)
    chosen = _choose(records, snapshots, result)
    result.initialised = _prepare_destination(src, dest)
    retain_days = dst_cfg.repository.retain_days
    retain_until = now + timedelta(days=retain_days) if retain_days else None
    cache = (
        object_lock.RetentionCache.load(
            state_dir(cfg, home) / f"retention-{src.info.repo_id}-{destination}.json"
        )
        if retain_until is not None and dst_cfg.repository.object_lock_mode
        else None
    )
    margin = object_lock.default_margin(retain_days)
    with repository_lock(dest, "copy") as lock:
        present = {o.key: o for o in dest.list()}
        copier = ObjectCopier(
            src.storage, dest, present, retain_until=retain_until, workers=workers
        )
        have = _committed(dest, src, copier)
        result.tombstones = _copy_tombstones(src, dest, present, have)
        rotated = _copy_rotations(src, dest, present)
        if rotated:
            # objects the destination holds may be the pre-rotation bytes: check them all
            # against what the source now expects (read back; uploaded again where they differ)
            copier.trusted.clear()
            for record in chosen:
                if record.snapshot_id in have and record.manifest is not None:
                    _ensure(copier, record, result)
        for record in chosen:
            if record.snapshot_id in have or layout.manifest_key(record.snapshot_id) in present:
                result.already += 1
                continue
            _copy_snapshot(src, dest, record, copier, lock, retain_until, cache, margin, result)
        if not snapshots:
            _copy_wal(src, dest, present, copier, lock, retain_until, result, recheck=rotated)
        if cache is not None:
            cache.save(now)
    stats = copier.stats
    result.uploaded, result.uploaded_bytes = stats.uploaded, stats.uploaded_bytes
    result.checked, result.trusted = stats.checked, stats.trusted
    ids = catalog.snapshot_ids(dest)
    result.newest = ids[-1] if ids else None
    result.seconds = clock.elapsed()
    log.info(
        "copy %s -> %s: %d snapshots copied, %d already there, %d objects uploaded (%d bytes), "
        "%d found already there and checked, %d WAL index chunks",
        source,
        destination,
        len(result.copied),
        result.already,
        result.uploaded,
        result.uploaded_bytes,
        result.checked,
        result.wal_chunks,
    )
    return result


def _choose(
    records: list[catalog.SnapshotRecord], refs: Sequence[str], result: CopyResult
) -> list[catalog.SnapshotRecord]:
    """The valid snapshots to copy, oldest first (so the destination's hash chain holds).

    Without ``refs`` every valid one; an INVALID or DAMAGED one is passed over and named. A
    named snapshot that is not valid refuses the whole copy before anything is written.
    """
    if refs:
        picked = {catalog.resolve(records, ref).snapshot_id for ref in refs}
        return [r for r in records if r.snapshot_id in picked]
    for record in records:
        if not record.valid:
            result.skipped[record.snapshot_id] = f"{record.status} on the source: {record.reason}"
            log.warning(
                "snapshot %s not copied: %s", record.snapshot_id, result.skipped[record.snapshot_id]
            )
    return [r for r in records if r.valid]


def _prepare_destination(src: Repo, dest: Storage) -> bool:
    """Check that ``dest`` is a copy of the source, or make an empty one so; True if made.

    A copy keeps the source's repository id: every manifest and every object's inner header
    names it, so snapshots cannot move into a repository made by ``drtool init``. A store
    holding anything else is refused untouched.
    """
    try:
        info = layout.read_repo_info(dest)
    except NotFound:
        info = None
    if info is not None:
        if info.repo_id != src.info.repo_id:
            raise ConfigError(
                f"copy: the destination {dest.url} is repository {info.repo_id} (created "
                f"{info.created}), not a copy of the source's repository {src.info.repo_id}. "
                "A copy keeps the source's repository id, which every manifest and object "
                "header names, so snapshots cannot move into another repository. Give an "
                "empty bucket prefix or directory (drtool copy makes it a copy); nothing "
                "was written"
            )
        header = src.storage.get_bytes(layout.REPO_FILE)
        if dest.get_bytes(layout.REPO_FILE) != header:
            # same repository, newer header (a key rotation: recipients, verify keys and their
            # hand-overs): the source's is the one its objects and manifests go with; readers
            # never trust a header's keys by themselves (ADR 0014)
            log.info("copy: the destination's header differs from the source's; replaced")
            put_small(dest, layout.REPO_FILE, header)
        return False
    try:
        first = next(iter(dest.list()), None)
    except NotFound:
        first = None  # a directory not created yet
    if first is not None:
        raise ConfigError(
            f"copy: the destination {dest.url} holds objects (e.g. {first.key}) but no "
            f"{layout.REPO_FILE}: it is not a drtool repository; give an empty bucket prefix "
            "or directory; nothing was written"
        )
    dest.create_root()
    put_small(dest, layout.REPO_FILE, src.storage.get_bytes(layout.REPO_FILE))
    log.info("copy: %s initialised as a copy of repository %s", dest.url, src.info.repo_id)
    return True


def _committed(dest: Storage, src: Repo, copier: ObjectCopier) -> set[str]:
    """Snapshots the destination holds; the objects its valid ones name are trusted."""
    records = catalog.list_snapshots(dest, src.verify_keys, src.info.repo_id)
    for record in records:
        if record.valid and record.manifest is not None:
            copier.trust([o.key for o in record.manifest.objects()])
        elif record.manifest is not None or record.problem:
            log.warning(
                "copy: snapshot %s is %s on the destination (%s); it is not copied over",
                record.snapshot_id,
                record.status,
                record.reason,
            )
    return {r.snapshot_id for r in records}


def _copy_tombstones(
    src: Repo, dest: Storage, present: dict[str, ObjectInfo], have: set[str]
) -> int:
    """Prune's tombstones of snapshots the destination never got, so its chain still verifies.

    A snapshot pruned at the source before it was copied leaves a gap in the destination's
    chain; its tombstone says the gap is a prune, not a deletion (ADR 0022).
    """
    copied = 0
    for snapshot_id, digest in chain.tombstones(src.storage).items():
        key = chain.tombstone_key(snapshot_id, digest)
        if snapshot_id in have or key in present:
            continue
        put_small(dest, key, b"")
        copied += 1
    return copied


def _copy_rotations(src: Repo, dest: Storage, present: dict[str, ObjectInfo]) -> bool:
    """The signed key-rotation records (``rotations/``, issue 15.1) the destination lacks.

    A rotation rewrites objects' age headers at the source and records their new sizes and
    hashes there; the destination needs the same records to expect the copied bytes.
    True when any was copied (the destination's older objects must then be checked again).
    """
    copied = False
    for obj in src.storage.list(ROTATIONS):
        there = present.get(obj.key)
        if there is not None and there.size == obj.size:
            continue
        put_small(dest, obj.key, src.storage.get_bytes(obj.key))
        copied = True
    return copied


def _ensure(copier: ObjectCopier, record: catalog.SnapshotRecord, result: CopyResult) -> None:
    """Every object of a snapshot the destination holds, checked again (after a rotation)."""
    assert record.manifest is not None
    try:
        copier.ensure(Wanted(o.key, o.size, o.sha256) for o in record.manifest.objects())
    except SourceDamaged as exc:
        result.problems.append(f"snapshot {record.snapshot_id}: {exc}")


def _copy_snapshot(
    src: Repo,
    dest: Storage,
    record: catalog.SnapshotRecord,
    copier: ObjectCopier,
    lock: HeldLock,
    retain_until: datetime | None,
    cache: object_lock.RetentionCache | None,
    margin: timedelta,
    result: CopyResult,
) -> None:
    """Every object the snapshot names, checked on the destination; then its manifest."""
    manifest = record.manifest
    assert manifest is not None
    sid = record.snapshot_id
    wanted = [Wanted(o.key, o.size, o.sha256) for o in manifest.objects()]
    try:
        copier.ensure(wanted)
        stored = src.storage.get_bytes(layout.manifest_key(sid))
    except (SourceDamaged, NotFound) as exc:
        _skip(result, sid, str(exc))
        return
    if hashlib.sha256(stored).hexdigest() != record.manifest_sha256:
        _skip(result, sid, "its manifest changed on the source while copying")
        return
    if retain_until is not None and cache is not None:
        reused = [w.key for w in wanted if w.key not in copier.stats.keys_uploaded]
        object_lock.protect(
            dest,
            reused,
            retain_until,
            margin=margin,
            cache=cache,
        )
    crash_point("copy-before-manifest")
    lock.ensure_held()
    put_small(dest, layout.manifest_key(sid), stored, retain_until=retain_until)
    _, digest, problem = catalog.load_snapshot(dest, sid, src.verify_keys, src.info.repo_id)
    if problem or digest != record.manifest_sha256:
        raise IntegrityError(f"copy: snapshot {sid} does not verify on the destination: {problem}")
    result.copied.append(sid)
    log.info("copy: snapshot %s committed on the destination", sid, extra={"snapshot": sid})


def _skip(result: CopyResult, snapshot_id: str, why: str) -> None:
    result.skipped[snapshot_id] = why
    result.problems.append(f"snapshot {snapshot_id}: {why}")
    log.error("copy: snapshot %s not copied: %s", snapshot_id, why)


def _copy_wal(
    src: Repo,
    dest: Storage,
    present: dict[str, ObjectInfo],
    copier: ObjectCopier,
    lock: HeldLock,
    retain_until: datetime | None,
    result: CopyResult,
    *,
    recheck: bool = False,
) -> None:
    """The WAL index chunks in sequence, each after the WAL files it names (checked).

    Stops at the first chunk that does not verify on the source (the chain would break) or
    that differs from the destination's chunk of the same number (the two diverged). The
    source's WAL removal records (prune, ADR 0017) are copied first and the files they name
    are not asked for; a file a key rotation rewrote (ADR 0023) is expected as it is now,
    and with ``recheck`` (rotation records just arrived) the files already on the
    destination are checked again instead of trusted.
    """
    rmap = rotation.load_map(src.storage, src.verify_keys, src.info.repo_id)
    pruned = load_pruned(src.storage, src.verify_keys, src.info.repo_id)
    if pruned.problems:
        result.problems.append(f"WAL removal records: {pruned.problems[0]}; no WAL copied")
        return
    for obj in src.storage.list(PRUNED_PREFIX):
        there = present.get(obj.key)
        if there is None or there.size != obj.size:
            put_small(dest, obj.key, src.storage.get_bytes(obj.key), retain_until=retain_until)
    found = sorted(
        (seq, obj.key)
        for obj in src.storage.list(wal_index.INDEX_PREFIX)
        if (seq := _seq_of(obj.key)) is not None
    )
    previous: str | None = None
    for position, (seq, key) in enumerate(found, start=1):
        if seq != position:
            result.problems.append(f"WAL index: chunk {seq} found where {position} was expected")
            return
        stored = src.storage.get_bytes(key)
        try:
            chunk = wal_index.open_chunk(stored, src.verify_keys, name=key)
        except IntegrityError as exc:
            result.problems.append(f"WAL index: {exc}; the chunks after it are not copied")
            return
        if chunk.repo_id != src.info.repo_id or chunk.previous_sha256 != previous:
            result.problems.append(f"WAL index: {key} does not follow the previous chunk")
            return
        previous = hashlib.sha256(stored).hexdigest()
        entries = [
            Wanted(e.key, *rmap.current(e.key, e.size, e.sha256))
            for e in chunk.entries
            if e.name not in pruned.removed
        ]
        there = present.get(key)
        if there is not None:
            if there.size != len(stored):
                result.problems.append(
                    f"WAL index: {key} on the destination differs from the source's"
                )
                return
            if not recheck:
                copier.trust([e.key for e in entries])
                continue
            try:
                copier.ensure(entries)
            except SourceDamaged as exc:
                result.problems.append(f"WAL index: {exc}; chunks from {key} on not checked")
                return
            continue
        try:
            copier.ensure(entries)
        except SourceDamaged as exc:
            result.problems.append(f"WAL index: {exc}; the chunks from {key} on are not copied")
            return
        lock.ensure_held()
        put_small(dest, key, stored, retain_until=retain_until)
        result.wal_chunks += 1


def _seq_of(key: str) -> int | None:
    """The sequence number of a WAL index chunk key (None for anything else)."""
    stem = key[len(wal_index.INDEX_PREFIX) :].split("-", 1)[0]
    return int(stem) if stem.isdigit() and key.endswith(".json") else None
