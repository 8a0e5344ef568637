"""``drtool backup``: one consistent, fingerprinted, encrypted snapshot of the stack.

Order: the registry's (drtool.stores.registry): PostgreSQL, then Redis, then MinIO (every
attachment the database references exists before the bucket is listed), each store writing
through the snapshot writer. Data objects first, each confirmed; the signed manifest last;
then the committed manifest is read back and verified against the objects the commit's listing
confirmed. Only then is the run a success.
"""

from __future__ import annotations

import logging
import socket
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from importlib.metadata import version
from pathlib import Path
from typing import Any

from drtool import keys
from drtool.config import Config
from drtool.errors import ConfigError, IntegrityError
from drtool.faults import crash_point, store_crash_point
from drtool.repository import catalog, chain, object_lock, verifications
from drtool.repository.access import Repo, open_repo
from drtool.repository.ids import new_id
from drtool.repository.locks import repository_lock
from drtool.repository.manifest import Manifest, manifest_sha256
from drtool.repository.writer import SnapshotWriter
from drtool.storage.base import ObjectInfo
from drtool.stores import registry
from drtool.stores.base import BackedUp, BackupContext, Progress, Store
from drtool.timing import Timer, timed

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ComponentSummary:
    """Figures of one component for the summary table."""

    name: str
    plain_bytes: int
    stored_bytes: int
    seconds: float
    detail: str = ""


@dataclass
class BackupResult:
    """A committed and verified snapshot."""

    snapshot_id: str
    components: list[ComponentSummary] = field(default_factory=list)
    seconds: float = 0.0
    #: what went wrong after the commit without touching the snapshot (a lock left behind)
    warnings: list[str] = field(default_factory=list)
    new_objects: int = 0  # written by this backup, hashed as they were sealed
    reused_objects: int = 0  # blobs earlier snapshots stored, named again without a re-read
    #: objects a verification found damaged (with the snapshots referencing them): this
    #: backup did not reuse them and uploaded the source's copy again where it still had it
    damaged_known: dict[str, list[str]] = field(default_factory=dict)
    #: stores' counters for monitoring (BackedUp.figures), e.g. unprotected_buckets
    figures: dict[str, int] = field(default_factory=dict)

    @property
    def verified(self) -> str:
        """Exactly what the commit checked (the summary's title says this, no more)."""
        return (
            "committed; manifest read back and its signature verified; every object's stored "
            f"size confirmed; {self.new_objects} new objects hashed as written; "
            f"{self.reused_objects} reused blobs not re-read"
        )


def refuse_identity(cfg: Config, env: Mapping[str, str]) -> None:
    """K1: the backup host holds recipients only; an identity in its config or env is refused."""
    if cfg.keys.identity_file:
        raise ConfigError(
            "keys.identity_file: the backup host must not hold an identity (a private key); "
            "remove it (restores and drills read it from their own config)"
        )
    for name, value in env.items():
        if keys.contains_identity(value):
            raise ConfigError(
                f"{name}: holds an age identity (AGE-SECRET-KEY-1...); the backup host must "
                "not have one, remove it from the environment"
            )


def state_dir(cfg: Config, home: Path) -> Path:
    """Where the backup host keeps its own state (the MinIO index cache)."""
    return Path(cfg.backup.state_dir) if cfg.backup.state_dir else home / "state"


def run_backup(
    cfg: Config,
    *,
    home: Path,
    env: Mapping[str, str],
    components: tuple[str, ...],
    progress: Progress = lambda component, n: None,
    now: datetime | None = None,
    accept_rollback: str | None = None,
) -> BackupResult:
    """Take, commit and verify one snapshot of ``components``."""
    unknown = [c for c in components if c not in registry.all_components()]
    if unknown:
        raise ConfigError(
            f"backup.components: unknown {', '.join(unknown)} "
            f"(known: {', '.join(registry.all_components())})"
        )
    refuse_identity(cfg, env)
    clock = Timer()
    now = now or datetime.now(UTC)
    repo = open_repo(cfg)
    recipients = keys.load_recipients(cfg.keys.recipients)
    if set(recipients) != set(repo.info.recipients):
        log.warning("the configured recipients differ from those recorded in the repository header")
    if not cfg.keys.signing_key_file:
        raise ConfigError(
            "keys.signing_key_file: a signing key is needed (see `drtool keys signing-key`)"
        )
    signing_key = keys.load_signing_key(Path(cfg.keys.signing_key_file))
    retain_until = (
        now + timedelta(days=cfg.repository.retain_days) if cfg.repository.retain_days else None
    )
    retention_cache = (
        object_lock.RetentionCache.load(
            state_dir(cfg, home) / f"retention-{repo.info.repo_id}.json"
        )
        if retain_until is not None and cfg.repository.object_lock_mode
        else None
    )
    with repository_lock(repo.storage, "backup") as lock:
        previous = catalog.newest_authentic(repo.storage, repo.verify_keys, repo.info.repo_id)
        chain.check_rollback(state_dir(cfg, home), repo.info.repo_id, previous, accept_rollback)
        # only MinIO reuses stored objects (blobs); the other stores write everything anew
        damaged = known_damaged(repo) if "minio" in components else {}
        snapshot_id = new_id(now)
        writer = SnapshotWriter(
            storage=repo.storage,
            repo=repo.info,
            snapshot_id=snapshot_id,
            signing_key=signing_key,
            recipients=tuple(recipients),
            compression_level=cfg.backup.compression_level,
            compression_threads=cfg.backup.compression_threads,
            retain_until=retain_until,
            retention_cache=retention_cache,
            retention_margin=object_lock.default_margin(cfg.repository.retain_days),
        )
        ctx = BackupContext(
            cfg=cfg,
            writer=writer,
            storage=repo.storage,
            scratch=Path(cfg.backup.scratch_dir or tempfile.gettempdir()),
            state=state_dir(cfg, home),
            progress=progress,
            damaged=frozenset(damaged),
            previous=previous.manifest if previous is not None else None,
        )
        result = BackupResult(snapshot_id, damaged_known=damaged)
        # only the chosen stores are imported: a PostgreSQL backup loads no boto3 or redis
        backed_up = [_backup_one(store, ctx, result) for store in registry.backup_order(components)]
        manifest = Manifest(
            repo_id=repo.info.repo_id,
            snapshot_id=snapshot_id,
            started=now.isoformat(timespec="seconds"),
            finished=datetime.now(UTC).isoformat(timespec="seconds"),
            host=socket.gethostname(),
            stack=cfg.source or "co-talk",
            drtool_version=version("drtool"),
            components=tuple(b.entry for b in backed_up),
            previous_id=previous.snapshot_id if previous else None,
            previous_sha256=previous.manifest_sha256 if previous else None,
        )
        crash_point("before-manifest")
        lock.ensure_held()
        stored = writer.commit(manifest)
        crash_point("after-manifest")
        _verify_committed(repo, snapshot_id, writer.confirmed)
        named = {o.key for o in manifest.objects()}
        result.new_objects = len(named & writer.written)
        result.reused_objects = len(named) - result.new_objects
        last = chain.LastCommit(repo.info.repo_id, snapshot_id, manifest_sha256(stored))
        chain.remember_commit(state_dir(cfg, home), last)
        catalog.record_commit(
            repo.storage, signing_key, repo.verify_keys, repo.info.repo_id, manifest, stored
        )
        for b in backed_up:
            if b.after_commit is not None:
                b.after_commit()
        if retention_cache is not None:
            retention_cache.save(now)
    result.seconds = clock.elapsed()
    if lock.left_behind:
        # ADR 0011: the snapshot is committed and verified, so the run succeeded (exit 0); the
        # lock left behind is a warning: no run waits for it, `drtool unlock` clears it
        result.warnings.append(lock.left_behind)
    log.info("snapshot %s %s", snapshot_id, result.verified, extra={"snapshot": snapshot_id})
    return result


def known_damaged(repo: Repo) -> dict[str, list[str]]:
    """Objects signed verification records found damaged -> every snapshot referencing them.

    Issue 18.9: deduplication must not trust a stored blob a verification found bad, or every
    new snapshot inherits the damage. Costs one listing and one GET per verified snapshot;
    the manifests are read only when some record names damage.
    """
    ids = catalog.snapshot_ids(repo.storage)
    latest = verifications.latest_records(repo.storage, repo.verify_keys, repo.info.repo_id, ids)
    if not any(rec.damaged for rec in latest.values()):
        return {}
    records = catalog.list_snapshots(repo.storage, repo.verify_keys, repo.info.repo_id)
    damaged: dict[str, list[str]] = {}
    for record in records:
        for key in record.damaged:
            damaged.setdefault(key, []).append(record.snapshot_id)
    for key, snapshots in sorted(damaged.items()):
        log.warning(
            "%s was found damaged by a verification; snapshots referencing it: %s; this "
            "backup does not reuse it (the object is uploaded again from the source)",
            key,
            ", ".join(snapshots),
        )
    return damaged


def _backup_one(store: Store, ctx: BackupContext, result: BackupResult) -> BackedUp:
    """Back up one store, timed; its entry carries the duration, the summary its figures."""
    name = store.name
    snapshot_id = ctx.writer.snapshot_id
    started = datetime.now(UTC)
    with timed() as t:
        log.info("backing up %s", name, extra={"snapshot": snapshot_id, "component": name})
        done = store.backup(ctx)
    # when the part ran, for a restore to a moment (repository/part_times.py)
    entry = replace(
        done.entry,
        duration_s=round(t.seconds, 3),
        started=started.isoformat(),
        ended=datetime.now(UTC).isoformat(),
    )
    result.components.append(
        ComponentSummary(
            name, entry.plain_bytes, sum(o.size for o in entry.objects), t.seconds, done.detail
        )
    )
    result.figures.update(done.figures)
    store_crash_point(name)
    return replace(done, entry=entry)


def _verify_committed(repo: Any, snapshot_id: str, confirmed: dict[str, ObjectInfo]) -> None:
    """The manifest as stored reads back, verifies, and names what the commit confirmed."""
    manifest, _, problem = catalog.load_snapshot(
        repo.storage, snapshot_id, repo.verify_keys, repo.info.repo_id
    )
    if manifest is not None:
        problem = catalog.check_objects(manifest, confirmed)
    if problem:
        raise IntegrityError(f"snapshot {snapshot_id}: committed but does not verify: {problem}")
