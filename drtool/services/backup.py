"""``drtool backup``: one consistent, fingerprinted, encrypted snapshot of the stack.

Order: PostgreSQL, then Redis, then MinIO (every attachment the database references exists
before the bucket is listed). Data objects first, each confirmed; the signed manifest last;
then the committed manifest is read back and verified against the objects the commit's listing
confirmed. Only then is the run a success.
"""

from __future__ import annotations

import json
import logging
import socket
import tempfile
import time
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from importlib.metadata import version
from pathlib import Path
from typing import Any

from drtool import keys
from drtool.config import Config
from drtool.errors import ConfigError, IntegrityError
from drtool.faults import crash_point
from drtool.repository import catalog, layout, object_lock
from drtool.repository.access import open_repo
from drtool.repository.ids import new_id
from drtool.repository.locks import repository_lock
from drtool.repository.manifest import ComponentEntry, Manifest, ObjectEntry
from drtool.repository.minio_index import IndexEntry
from drtool.repository.writer import SnapshotWriter
from drtool.services import minio_snapshot
from drtool.services.pg_base import backup_pg_base
from drtool.sources import postgres as pg
from drtool.sources.minio import MinioStore
from drtool.sources.redis_fingerprint import fingerprint_rdb
from drtool.sources.redis_rdb import fetch_rdb, validate_rdb
from drtool.storage.base import ObjectInfo

log = logging.getLogger(__name__)

COMPONENTS = ("postgres", "redis", "minio")
#: asked for by name only (`--component postgres-base`), never part of the default set
OPTIONAL_COMPONENTS = ("postgres-base",)
_ORDER = ("postgres", "postgres-base", "redis", "minio")
Progress = Callable[[str, int], None]


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


def _check_components(components: tuple[str, ...]) -> None:
    unknown = [c for c in components if c not in COMPONENTS + OPTIONAL_COMPONENTS]
    if unknown:
        raise ConfigError(
            f"backup.components: unknown {', '.join(unknown)} (known: {', '.join(_ORDER)})"
        )


def run_backup(
    cfg: Config,
    *,
    home: Path,
    env: Mapping[str, str],
    components: tuple[str, ...],
    progress: Progress = lambda component, n: None,
    now: datetime | None = None,
) -> BackupResult:
    """Take, commit and verify one snapshot of ``components``."""
    _check_components(components)
    refuse_identity(cfg, env)
    started = time.monotonic()
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
        result = BackupResult(snapshot_id)
        entries: list[ComponentEntry] = []
        caches: list[tuple[Path, list[IndexEntry]]] = []
        scratch = Path(cfg.backup.scratch_dir or tempfile.gettempdir())
        for component in _ORDER:
            if component not in components:
                continue
            t0 = time.monotonic()
            log.info(
                "backing up %s", component, extra={"snapshot": snapshot_id, "component": component}
            )
            if component == "postgres":
                entry = _backup_postgres(cfg, writer, progress)
            elif component == "postgres-base":
                entry = backup_pg_base(cfg, writer, progress)
            elif component == "redis":
                entry = _backup_redis(cfg, writer, scratch, progress)
            else:
                entry, caches = _backup_minio(
                    cfg, writer, state_dir(cfg, home), repo.storage, progress
                )
            seconds = time.monotonic() - t0
            entry = replace(entry, duration_s=round(seconds, 3))
            entries.append(entry)
            result.components.append(
                ComponentSummary(
                    component,
                    entry.plain_bytes,
                    sum(o.size for o in entry.objects),
                    seconds,
                )
            )
            crash_point(f"after-{component}")
        manifest = Manifest(
            repo_id=repo.info.repo_id,
            snapshot_id=snapshot_id,
            started=now.isoformat(timespec="seconds"),
            finished=datetime.now(UTC).isoformat(timespec="seconds"),
            host=socket.gethostname(),
            stack=cfg.source or "co-talk",
            drtool_version=version("drtool"),
            components=tuple(entries),
            previous_id=previous.snapshot_id if previous else None,
            previous_sha256=previous.manifest_sha256 if previous else None,
        )
        crash_point("before-manifest")
        lock.ensure_held()
        writer.commit(manifest)
        crash_point("after-manifest")
        _verify_committed(repo, snapshot_id, writer.confirmed)
        for path, cache_entries in caches:
            minio_snapshot.write_cache(path, cache_entries)
        if retention_cache is not None:
            retention_cache.save(now)
    result.seconds = time.monotonic() - started
    if lock.left_behind:
        # ADR 0011: the snapshot is committed and verified, so the run succeeded (exit 0); the
        # lock left behind is a warning: no run waits for it, `drtool unlock` clears it
        result.warnings.append(lock.left_behind)
    log.info("snapshot %s committed and verified", snapshot_id, extra={"snapshot": snapshot_id})
    return result


def _verify_committed(repo: Any, snapshot_id: str, confirmed: dict[str, ObjectInfo]) -> None:
    """The manifest as stored reads back, verifies, and names what the commit confirmed."""
    manifest, _, problem = catalog.load_snapshot(
        repo.storage, snapshot_id, repo.verify_keys, repo.info.repo_id
    )
    if manifest is not None:
        problem = catalog.check_objects(manifest, confirmed)
    if problem:
        raise IntegrityError(f"snapshot {snapshot_id}: committed but does not verify: {problem}")


def _json_chunks(data: Any) -> list[bytes]:
    return [json.dumps(data, sort_keys=True, ensure_ascii=False).encode()]


def _backup_postgres(cfg: Config, writer: SnapshotWriter, progress: Progress) -> ComponentEntry:
    endpoint = cfg.stack().postgres
    bin_dir = Path(cfg.postgres.bin_dir) if cfg.postgres.bin_dir else None
    objects: list[ObjectEntry] = []
    with pg.dump(endpoint, pg_bin_dir=bin_dir, timeout=cfg.backup.timeout_s) as dump:
        written = writer.put_snapshot_object(
            "postgres", "dump.pgdump", _counting(dump.stream, "postgres", progress), kind="pg_dump"
        )
        fingerprints = dump.fingerprints
        server_version = dump.server_version
    objects.append(written.entry)
    plain = written.plain_bytes
    globals_sql = pg.dump_globals(endpoint, pg_bin_dir=bin_dir, timeout=cfg.backup.timeout_s)
    if globals_sql is not None:
        g = writer.put_snapshot_object("postgres", "globals.sql", [globals_sql], kind="pg_globals")
        objects.append(g.entry)
    prints = {
        "fingerprints": fingerprints.to_dict(),
        "dump": {"size": written.plain_bytes, "sha256": written.plain_sha256},
    }
    fp = writer.put_snapshot_object(
        "postgres", "fingerprints.json", _json_chunks(prints), kind="fingerprints"
    )
    objects.append(fp.entry)
    return ComponentEntry("postgres", tuple(objects), plain, 0.0, server_version)


def _backup_redis(
    cfg: Config, writer: SnapshotWriter, scratch: Path, progress: Progress
) -> ComponentEntry:
    endpoint = cfg.stack().redis
    with ExitStack() as stack:
        tmp = Path(
            stack.enter_context(tempfile.TemporaryDirectory(dir=scratch, prefix="drtool-redis-"))
        )
        rdb = tmp / "dump.rdb"
        info = fetch_rdb(endpoint, rdb, timeout=cfg.backup.timeout_s)
        validate_rdb(rdb)
        fingerprints = fingerprint_rdb(rdb)
        written = writer.put_snapshot_object(
            "redis", "dump.rdb", _counting(_file_chunks(rdb), "redis", progress), kind="redis_rdb"
        )
        if written.plain_sha256 != info.sha256:
            raise IntegrityError(
                "redis: the RDB changed on the scratch disk between fetch and upload"
            )
        prints = {
            "fingerprints": fingerprints.to_dict(),
            "rdb": {"size": info.size, "sha256": info.sha256},
        }
        fp = writer.put_snapshot_object(
            "redis", "fingerprints.json", _json_chunks(prints), kind="fingerprints"
        )
    return ComponentEntry("redis", (written.entry, fp.entry), info.size, 0.0, info.redis_version)


def _backup_minio(
    cfg: Config, writer: SnapshotWriter, state: Path, storage: Any, progress: Progress
) -> tuple[ComponentEntry, list[tuple[Path, list[IndexEntry]]]]:
    endpoints = cfg.stack()
    store = MinioStore(endpoints.minio)
    stored_blobs = {o.key: o.size for o in storage.list(layout.BLOBS)}
    objects: list[ObjectEntry] = []
    blobs: dict[str, ObjectEntry] = {}
    caches = []
    plain = 0
    details: dict[str, Any] = {}
    for bucket in endpoints.buckets:
        path = minio_snapshot.cache_path(state, writer.repo.repo_id, bucket)
        result = minio_snapshot.snapshot_bucket(
            store,
            bucket,
            writer,
            previous=minio_snapshot.read_cache(path),
            stored_blobs=stored_blobs,
            on_object=lambda n: progress("minio", n),
        )
        objects.append(result.index)
        for e in result.entries:
            blobs.setdefault(e.blob, e.blob_entry())
        caches.append((path, result.entries))
        plain += result.plain_bytes
        details[bucket] = {"uploaded": result.uploaded, "reused": result.reused}
        log.info(
            "minio bucket %s: %d objects uploaded, %d reused",
            bucket,
            result.uploaded,
            result.reused,
        )
    objects.extend(blobs[b] for b in sorted(blobs))
    return ComponentEntry("minio", tuple(objects), plain, 0.0, "", details), caches


def _file_chunks(path: Path, size: int = 1 << 20) -> Any:
    with path.open("rb") as fh:
        while chunk := fh.read(size):
            yield chunk


def _counting(chunks: Any, component: str, progress: Progress) -> Any:
    for chunk in chunks:
        progress(component, len(chunk))
        yield chunk
