"""Opening the configured repository, and reading its small objects whole.

Every command that reads or writes snapshots starts here: ``open_repo`` turns the config into a
storage backend, reads the repository header and decides which verify keys to trust;
``read_object`` fetches a small object (an index, fingerprints) with its stored hash checked
and its inner header authenticated. Command handlers live in ``drtool.services``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, cast

from drtool import keys
from drtool.config import Config
from drtool.errors import ConfigError, IntegrityError, NotFound
from drtool.pipeline.header import InnerHeader
from drtool.pipeline.seal import unseal
from drtool.repository import catalog, layout
from drtool.repository.manifest import Manifest, ObjectEntry
from drtool.storage import Storage, StorageOptions, open_storage

MiB = 1 << 20


@dataclass(frozen=True)
class Repo:
    """An opened repository: its storage, header and the keys trusted for its manifests."""

    storage: Storage
    info: layout.RepoInfo
    verify_keys: list[str]


def storage_for(cfg: Config) -> Storage:
    """The storage backend named by ``repository.url``."""
    r = cfg.repository
    if not r.url:
        raise ConfigError(
            "repository.url: not set (got nothing); e.g. s3://bucket/drtool or file:///srv/drtool"
        )
    mode = r.object_lock_mode.upper() or None
    if mode not in (None, "GOVERNANCE", "COMPLIANCE"):
        raise ConfigError(
            f"repository.object_lock_mode: expected GOVERNANCE or COMPLIANCE (got {mode})"
        )
    options = StorageOptions(
        endpoint_url=r.endpoint_url or None,
        region=r.region,
        access_key=r.access_key,
        secret_key=r.secret_key,
        path_style=r.path_style,
        part_size=r.part_size_mb * MiB,
        object_lock_mode=cast(Literal["GOVERNANCE", "COMPLIANCE"] | None, mode),
        parallel_puts=cfg.backup.minio_workers,
    )
    return open_storage(r.url, options)


def open_repo(cfg: Config) -> Repo:
    """Open the configured repository and decide which verify keys to trust (never the header's).

    The pinned ``keys.verify_key``, else the backup host's own signing key's; neither is a
    ConfigError (ADR 0014).
    """
    storage = storage_for(cfg)
    info = layout.read_repo_info(storage)
    own = ""
    if not cfg.keys.verify_key and cfg.keys.signing_key_file:
        own = keys.verify_key_text(keys.load_signing_key(cfg.keys.signing_key_file).public_key())
    return Repo(storage, info, catalog.trusted_verify_keys(info, cfg.keys.verify_key, own))


def identities_of(cfg: Config) -> list[str]:
    """The identities configured for reading (restore/drill side); empty when none."""
    if not cfg.keys.identity_file:
        return []
    return keys.load_identities(Path(cfg.keys.identity_file), cfg.keys.identity_passphrase)


def read_object(
    repo: Repo, entry: ObjectEntry, header: InnerHeader, identities: list[str]
) -> bytes:
    """Read a small object whole: stored hash checked, decrypted, header checked."""
    raw = repo.storage.get_bytes(entry.key)
    problem = entry.mismatch(len(raw), hashlib.sha256(raw).hexdigest())
    if problem:
        raise IntegrityError(problem)
    return b"".join(
        unseal(
            [raw],
            identities=identities,
            expected=header,
            name=entry.key,
            recipients_hint=list(repo.info.recipients),
        )
    )


def stored_problem(repo: Repo, entry: ObjectEntry) -> str | None:
    """Stream one object and compare its stored size and sha256 with the manifest (no key).

    None when they match; else what differs (or that it is missing).
    """
    digest = hashlib.sha256()
    size = 0
    try:
        for chunk in repo.storage.get(entry.key):
            digest.update(chunk)
            size += len(chunk)
    except NotFound as exc:
        return str(exc)
    return entry.mismatch(size, digest.hexdigest())


def snapshot_header(m: Manifest, component: str, kind: str) -> InnerHeader:
    """The inner header an object of snapshot ``m`` must carry."""
    return InnerHeader(m.repo_id, m.snapshot_id, component, kind)
