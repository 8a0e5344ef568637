"""Where things live in a repository, and the ``drtool-repo.json`` header.

```
drtool-repo.json                         format version, repo id, recipients, verify keys
snapshots/<id>/manifest.json             written last, signed
snapshots/<id>/<component>/<name>.age    age(zstd(data)) objects of one snapshot
blobs/<xx>/<blob-id>.zst.age             MinIO objects, shared across snapshots
drills/<id>/report.json                  drill history
verifications/<id>/<time-id>.json        signed verification records (verifications.py)
verifications/summary/<time-id>.json     signed summary of every snapshot's newest record
forgotten/<id>.<manifest-sha256>         tombstones of pruned snapshots (chain.py)
catalog/<9999999999 - seq>.json          signed catalog index pages (catalog_index.py)
locks/<lock-id>.json                     writer locks
```
"""

from __future__ import annotations

import json
import secrets
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from drtool.errors import ConfigError, IntegrityError, NotFound
from drtool.storage.base import Storage

FORMAT_VERSION = 1
REPO_FILE = "drtool-repo.json"
SNAPSHOTS = "snapshots/"
BLOBS = "blobs/"
LOCKS = "locks/"
DRILLS = "drills/"


def snapshot_prefix(snapshot_id: str) -> str:
    """The key prefix of one snapshot's own objects."""
    return f"{SNAPSHOTS}{snapshot_id}/"


def manifest_key(snapshot_id: str) -> str:
    """The key of a snapshot's manifest."""
    return f"{SNAPSHOTS}{snapshot_id}/manifest.json"


def blob_key(blob_id: str) -> str:
    """The key of a shared content blob."""
    return f"{BLOBS}{blob_id[:2]}/{blob_id}.zst.age"


@dataclass(frozen=True)
class RepoInfo:
    """The contents of ``drtool-repo.json``."""

    format_version: int
    repo_id: str
    created: str
    recipients: tuple[str, ...]
    verify_keys: tuple[str, ...]
    # signing-key rotations with validity periods (signing_keys.py); absent before the first
    signing_keys: tuple[dict[str, Any], ...] = ()

    def to_json(self) -> bytes:
        """The stored form."""
        data = asdict(self)
        if not self.signing_keys:
            del data["signing_keys"]
        return json.dumps(data, indent=2).encode()


def new_repo_info(recipients: list[str], verify_key: str) -> RepoInfo:
    """A fresh repository header for the given public keys."""
    return RepoInfo(
        format_version=FORMAT_VERSION,
        repo_id=secrets.token_hex(8),
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        recipients=tuple(recipients),
        verify_keys=(verify_key,),
    )


def init_repository(storage: Storage, recipients: list[str], verify_key: str) -> RepoInfo:
    """Write ``drtool-repo.json``; refuses when a repository is already there."""
    if not recipients:
        raise ConfigError("keys.recipients: at least one recipient is needed (got none)")
    if not verify_key:
        raise ConfigError("keys.signing_key_file: a signing key is needed to init (got none)")
    storage.create_root()
    if storage.exists(REPO_FILE):
        raise ConfigError(f"repository: {storage.url} is already a drtool repository; not touched")
    info = new_repo_info(recipients, verify_key)
    storage.put_bytes(REPO_FILE, info.to_json())
    return info


def read_repo_info(storage: Storage) -> RepoInfo:
    """Read and check ``drtool-repo.json``; refuses a format newer than this drtool."""
    try:
        raw = storage.get_bytes(REPO_FILE)
    except NotFound:
        storage.check()  # a missing bucket or directory says so, rather than "run init"
        raise NotFound(
            f"repository: no drtool repository at {storage.url} (run `drtool init` first)"
        ) from None
    try:
        data: dict[str, Any] = json.loads(raw)
        version = int(data["format_version"])
    except (ValueError, KeyError, TypeError):
        raise IntegrityError(f"repository: {REPO_FILE} at {storage.url} is unreadable") from None
    if version > FORMAT_VERSION:
        raise ConfigError(
            f"repository: format version {version} is newer than this drtool supports "
            f"({FORMAT_VERSION}); upgrade drtool"
        )
    return RepoInfo(
        format_version=version,
        repo_id=str(data["repo_id"]),
        created=str(data["created"]),
        recipients=tuple(data["recipients"]),
        verify_keys=tuple(data["verify_keys"]),
        signing_keys=_entries(data.get("signing_keys")),
    )


def _entries(value: Any) -> tuple[dict[str, Any], ...]:
    """The header's ``signing_keys`` entries; anything malformed is dropped (never trusted:
    an entry counts only once both keys' signatures verify, signing_keys.py)."""
    return tuple(e for e in value if isinstance(e, dict)) if isinstance(value, list) else ()
