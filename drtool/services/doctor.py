"""``drtool doctor``: check a configured deployment the way an operator would before trusting it.

Each check is a named row — pass, warn or fail — with a one-line detail. Nothing is changed
except one probe object under ``doctor/`` in the repository (put, then a delete attempt that
must be refused: promise 6, the backup credential cannot delete backups).
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

from drtool.config import Config
from drtool.endpoints import RedisEndpoint
from drtool.errors import DrtoolError, SourceError, StorageError
from drtool.pipeline.age import recipient_fingerprint
from drtool.repository import catalog, layout, object_lock
from drtool.repository.access import open_repo, storage_for
from drtool.services import key_proof
from drtool.services.backup import refuse_identity
from drtool.sources import postgres as pg
from drtool.sources.minio import MinioStore, bucket_coverage, repository_bucket
from drtool.sources.redis_logical import probe_logical
from drtool.sources.redis_rdb import ReplicationRefused, probe_replication
from drtool.storage import Storage
from drtool.storage.base import Capabilities

Status = Literal["pass", "warn", "fail"]

PROBE_KEY = "doctor/delete-probe"
MAX_SKEW = timedelta(minutes=5)
MIN_FREE = 1 << 30  # bytes free in the scratch dir below which the check fails


@dataclass(frozen=True)
class Check:
    """One row of the doctor's table."""

    name: str
    status: Status
    detail: str


def _run(name: str, probe: Callable[[], tuple[Status, str]]) -> Check:
    """Run one probe; a drtool error is a failure with its one-line message."""
    try:
        status, detail = probe()
    except DrtoolError as exc:
        return Check(name, "fail", exc.message)
    except OSError as exc:
        return Check(name, "fail", f"{type(exc).__name__}: {exc.strerror or exc}")
    return Check(name, status, detail)


def run_doctor(
    cfg: Config, *, env: Mapping[str, str], now: Callable[[], datetime] | None = None
) -> list[Check]:
    """Every check, in the order an operator would look (sources, tools, repository, host)."""
    clock = now or (lambda: datetime.now(UTC))
    checks = [
        _run("no identity on the backup host", lambda: _no_identity(cfg, env)),
        _run("postgres reachable", lambda: _postgres(cfg)),
        _run("pg_dump version", lambda: _pg_dump(cfg)),
        _run("pg_restore present", lambda: _pg_restore(cfg)),
        _run("redis reachable", lambda: _redis(cfg)),
        _run("minio reachable", lambda: _minio(cfg)),
        _run("repository format", lambda: _repository(cfg)),
    ]
    storage: Storage | None = None
    with contextlib.suppress(DrtoolError):  # reported by the repository row
        storage = storage_for(cfg)
    why = "not an S3 repository" if storage is not None else "no repository"
    caps = storage.capabilities if storage is not None else Capabilities()
    for name, able, check in (
        ("object lock", caps.object_lock, lambda s: _object_lock(cfg, s)),
        ("snapshots locked whole", caps.object_lock, lambda s: _locked_whole(cfg, s)),
        ("credential cannot delete", caps.access_control, _delete_probe),
        ("clock skew", caps.server_clock, lambda s: _clock(s, clock)),
    ):
        if storage is not None and able:
            checks.append(_run(name, functools.partial(check, storage)))
        else:
            checks.append(Check(name, "warn", f"skipped: {why}"))
    checks.append(_run("scratch free space", lambda: _scratch(cfg)))
    checks.append(_run("key file permissions", lambda: _key_files(cfg)))
    checks.append(_run("every recipient proven", lambda: _recipients_proven(cfg, clock())))
    return checks


def _no_identity(cfg: Config, env: Mapping[str, str]) -> tuple[Status, str]:
    refuse_identity(cfg, env)
    return "pass", "no AGE-SECRET-KEY in the config or environment"


def _postgres(cfg: Config) -> tuple[Status, str]:
    endpoint = cfg.stack().postgres
    version = pg.server_version(endpoint)
    return "pass", f"{endpoint.host}:{endpoint.port} as {endpoint.user}: PostgreSQL {version}"


def _bin_dir(cfg: Config) -> Path | None:
    return Path(cfg.postgres.bin_dir) if cfg.postgres.bin_dir else None


def _tool(cfg: Config, name: str) -> str:
    bin_dir = _bin_dir(cfg)
    path = bin_dir / name if bin_dir else shutil.which(name)
    if path is None or not Path(path).is_file():
        where = str(bin_dir) if bin_dir else "PATH"
        raise SourceError(f"{name} not found in {where}; install a PostgreSQL client")
    return str(path)


def _pg_dump(cfg: Config) -> tuple[Status, str]:
    binary = _tool(cfg, "pg_dump")
    client = pg.client_version(binary)
    server = pg.server_version(cfg.stack().postgres)
    if client < server:
        return "fail", f"pg_dump {client} is older than the server ({server})"
    return "pass", f"pg_dump {client} >= server {server}"


def _pg_restore(cfg: Config) -> tuple[Status, str]:
    binary = _tool(cfg, "pg_restore")
    return "pass", f"pg_restore {pg.client_version(binary)} at {binary}"


def _redis(cfg: Config) -> tuple[Status, str]:
    """What the backup itself runs (AUTH, REPLCONF, PSYNC/SYNC), not INFO: the user
    docs/OPERATIONS.md recommends (+sync +psync +replconf) may not run INFO."""
    endpoint = cfg.stack().redis
    where = f"{endpoint.host}:{endpoint.port}"
    if cfg.redis.method == "logical":
        return _redis_logical(where, endpoint)
    try:
        version = probe_replication(endpoint)
    except ReplicationRefused as exc:
        if cfg.redis.method == "rdb":
            return "fail", exc.message
        try:  # auto: the backup falls back to a logical dump (ADR 0021)
            _, detail = _redis_logical(where, endpoint)
        except SourceError:
            return "fail", exc.message
        return "warn", f"{detail}; replication refused, so backups fall back to it"
    except SourceError as exc:
        if "authentication" in exc.message and "failed" in exc.message:
            return "fail", f"{where}: authentication failed"
        return "fail", exc.message
    shown = f"Redis {version}" if version else "Redis (version not shown: INFO not permitted)"
    return "pass", f"{where}: {shown}; replication (REPLCONF, PSYNC) permitted"


def _redis_logical(where: str, endpoint: RedisEndpoint) -> tuple[Status, str]:
    """The logical dump's commands (INFO, SCAN, DUMP + PTTL of one key) are permitted."""
    version = probe_logical(endpoint)
    return "pass", (
        f"{where}: Redis {version}; logical dump (SCAN, DUMP, PTTL) permitted: consistent per "
        "key, not per instant"
    )


def _minio(cfg: Config) -> tuple[Status, str]:
    """Each protected bucket lists; a visible bucket left out of the backup is a warning."""
    endpoints = cfg.stack()
    store = MinioStore(endpoints.minio)
    coverage = bucket_coverage(
        store,
        endpoints.buckets,
        repository=repository_bucket(
            cfg.repository.url, cfg.repository.endpoint_url, endpoints.minio.endpoint_url
        ),
    )
    for bucket in coverage.protected:
        next(iter(store.list_objects(bucket)), None)
    listed = f"{endpoints.minio.endpoint_url}: buckets {', '.join(coverage.protected)} listed"
    if (left_out := coverage.warning()) is not None:
        return "warn", f"{listed}; {left_out}"
    return "pass", listed


def _repository(cfg: Config) -> tuple[Status, str]:
    storage = storage_for(cfg)
    info = layout.read_repo_info(storage)
    return (
        "pass",
        f"{storage.url}: format {info.format_version} (supported: {layout.FORMAT_VERSION})",
    )


def _object_lock(cfg: Config, storage: Storage) -> tuple[Status, str]:
    enabled = storage.object_lock_enabled()
    if not enabled:
        return "fail", "Object Lock is not enabled on the bucket; backups can be deleted"
    if not cfg.repository.object_lock_mode or not cfg.repository.retain_days:
        return "warn", "Object Lock enabled, but repository.object_lock_mode/retain_days unset"
    mode, days = cfg.repository.object_lock_mode.upper(), cfg.repository.retain_days
    return "pass", f"Object Lock enabled; objects retained {days} days ({mode})"


#: How many of the newest valid snapshots doctor checks object by object (a request each).
LOCK_CHECKED_SNAPSHOTS = 3


def _locked_whole(cfg: Config, storage: Storage) -> tuple[Status, str]:
    """The newest snapshots: is every object locked at least as long as the snapshot itself?

    A reused blob locked for less can be deleted while a snapshot still needs it.
    """
    repo = open_repo(cfg)
    records = catalog.list_snapshots(repo.storage, repo.verify_keys, repo.info.repo_id)
    newest = [r for r in records if r.valid and r.manifest][-LOCK_CHECKED_SNAPSHOTS:]
    short = {
        r.snapshot_id: object_lock.short_locked(storage, r.manifest)
        for r in newest
        if r.manifest is not None
    }
    if newest and all(keys is None for keys in short.values()):
        return "warn", "the newest snapshots carry no Object Lock retention"
    bad = {sid: keys for sid, keys in short.items() if keys}
    if bad:
        named = "; ".join(f"{sid}: {len(keys)} (e.g. {keys[0]})" for sid, keys in bad.items())
        return "fail", f"objects locked for less than their snapshot: {named}"
    if not newest:
        return "warn", "no valid snapshot to check yet"
    return "pass", f"the newest {len(newest)} snapshots: every object locked as long as they are"


def _delete_probe(storage: Storage) -> tuple[Status, str]:
    """Put a probe object, try to delete it: a refusal passes, success fails."""
    info = storage.put_bytes(PROBE_KEY, b"drtool doctor: this credential must not delete\n")
    try:
        storage.delete(PROBE_KEY)
    except StorageError as exc:
        if "access denied" in exc.message:
            return "pass", "a delete was refused (access denied)"
        raise
    if info.version_id:  # best effort: remove the version too (a delete marker was added)
        with contextlib.suppress(StorageError):
            storage.delete(PROBE_KEY, version_id=info.version_id)
    return "fail", "this credential can delete backups; give it no delete right (Object Lock)"


def _clock(storage: Storage, clock: Callable[[], datetime]) -> tuple[Status, str]:
    server = storage.server_time()
    if server is None:
        return "warn", "the S3 server sent no Date header"
    skew = server - clock()
    minutes = abs(skew.total_seconds()) / 60
    if abs(skew) >= MAX_SKEW:
        return "fail", f"clock skew {minutes:.0f} min against the S3 server; check NTP"
    return "pass", f"{abs(skew.total_seconds()):.0f} s off the S3 server's clock"


def _scratch(cfg: Config) -> tuple[Status, str]:
    directory = Path(cfg.backup.scratch_dir or tempfile.gettempdir())
    free = shutil.disk_usage(directory).free
    if free < MIN_FREE:
        return "fail", f"{directory}: {free:,} bytes free (less than 1 GiB)"
    return "pass", f"{directory}: {free / (1 << 30):.1f} GiB free"


def _key_files(cfg: Config) -> tuple[Status, str]:
    """Key files must be 0600: others who read them could forge snapshots or decrypt them."""
    paths = [p for p in (cfg.keys.signing_key_file, cfg.keys.identity_file) if p]
    if not paths:
        return "warn", "no key file configured"
    loose = []
    for path in paths:
        mode = stat.S_IMODE(os.stat(path).st_mode)
        if mode & 0o077:
            loose.append(f"{path} is {mode:o}")
    if loose:
        return "fail", f"{'; '.join(loose)}: chmod 600"
    return "pass", f"{', '.join(paths)}: 600"


def _recipients_proven(cfg: Config, now: datetime) -> tuple[Status, str]:
    """Each header recipient decrypted a sample in a drill within keys.prove_within_days.

    A recipient nobody proved may be a key nobody holds any more (key_proof.py, ADR 0023).
    """
    storage = storage_for(cfg)
    info = layout.read_repo_info(storage)
    proven = key_proof.last_proven(storage)
    limit = timedelta(days=cfg.keys.prove_within_days)
    stale = []
    for recipient in info.recipients:
        when = proven.get(recipient)
        if when is None or now - when > limit:
            since = "never" if when is None else f"last {when:%Y-%m-%d}"
            stale.append(f"{recipient_fingerprint(recipient)} ({since})")
    problems = []
    if cfg.keys.recipients and set(cfg.keys.recipients) != set(info.recipients):
        header = ", ".join(recipient_fingerprint(r) for r in info.recipients)
        problems.append(
            f"keys.recipients differ from the repository header ({header}): new objects are "
            "sealed for the configured ones; after a key rotation set them to the header's"
        )
    if stale:
        problems.append(
            f"not proven by a drill in {cfg.keys.prove_within_days} days: {', '.join(stale)}; "
            "run drtool drill run --identity FILE for each"
        )
    if problems:
        return "warn", "; ".join(problems)
    return "pass", f"{len(info.recipients)} recipient(s) proven within {limit.days} days"
