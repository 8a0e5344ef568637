"""A real, initialised repository (a directory or an S3 bucket) with its keys and one config
holding all of them, and a factory of synthetic snapshots written with the real
:class:`SnapshotWriter` (sealed with age, signed with Ed25519). Used by the repository,
retention and repository-command tests through the ``repo_kit`` fixtures (tests/conftest.py).
"""

from __future__ import annotations

import json
import secrets
import subprocess
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import tomli_w
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from drtool import keys
from drtool.config import Config, load_config
from drtool.endpoints import S3Endpoint
from drtool.repository import catalog, layout
from drtool.repository.ids import new_id
from drtool.repository.locks import LockInfo
from drtool.repository.manifest import (
    ComponentEntry,
    Manifest,
    ObjectEntry,
    manifest_sha256,
)
from drtool.repository.writer import SnapshotWriter
from drtool.services import repo as svc
from drtool.services.repo_setup import generate_keys
from drtool.storage import Storage

T0 = datetime(2026, 11, 20, 2, 0, tzinfo=UTC)


# -- the kit: a real repository with synthetic snapshots -------------------------------------


@dataclass
class Snap:
    """One committed synthetic snapshot."""

    snapshot_id: str
    manifest: Manifest
    stored: bytes  # the manifest as stored
    dump: bytes  # the plaintext of its own object

    @property
    def dump_key(self) -> str:
        return f"{layout.snapshot_prefix(self.snapshot_id)}postgres/dump.pgdump.zst.age"


@dataclass
class RepoKit:
    """An initialised repository, its keys and config files, and a snapshot factory."""

    tmp: Path
    url: str
    config_file: Path  # recipients, signing key, verify key and the identity
    storage: Storage
    info: layout.RepoInfo
    signing_key: Ed25519PrivateKey
    verify_key: str
    recipient: str
    identity_file: Path
    sections: dict[str, dict[str, object]]
    blobs: dict[str, ObjectEntry] = field(default_factory=dict)
    snaps: list[Snap] = field(default_factory=list)

    def config(self, **keys_section: object) -> Config:
        """The config, with ``keys`` settings replaced (a value of None removes the setting)."""
        return load_config(self.write_config("", **keys_section), {})

    def write_config(self, name: str = "", **keys_section: object) -> Path:
        """Write a config file like the kit's, ``keys`` settings replaced; return its path."""
        if not keys_section and not name:
            return self.config_file
        section = {**self.sections["keys"], **keys_section}
        doc = {**self.sections, "keys": {k: v for k, v in section.items() if v is not None}}
        path = self.tmp / f"drtool-{name or secrets.token_hex(3)}.toml"
        path.write_text(tomli_w.dumps(doc))
        return path

    def writer(self, snapshot_id: str) -> SnapshotWriter:
        return SnapshotWriter(
            self.storage, self.info, snapshot_id, self.signing_key, (self.recipient,)
        )

    def snapshot(
        self,
        when: datetime,
        *,
        blobs: tuple[str, ...] = (),
        dump: bytes | None = None,
        chain: bool = True,
    ) -> Snap:
        """Write and commit a snapshot started at ``when``: one pg dump object plus ``blobs``.

        A blob already in the repository is reused (shared), as the MinIO backup does.
        """
        snapshot_id = new_id(when)
        writer = self.writer(snapshot_id)
        dump = dump if dump is not None else b"PGDMP" + secrets.token_bytes(3000)
        written = writer.put_snapshot_object("postgres", "dump.pgdump", [dump], kind="pg_dump")
        blob_entries = []
        for blob_id in blobs:
            if blob_id not in self.blobs:
                content = f"attachment {blob_id}".encode() * 50
                self.blobs[blob_id] = writer.put_blob(blob_id, [content]).entry
            blob_entries.append(self.blobs[blob_id])
        components = [
            ComponentEntry("postgres", (written.entry,), written.plain_bytes, 0.5, "16.4")
        ]
        if blob_entries:
            components.append(ComponentEntry("minio", tuple(blob_entries), 1000, 0.2))
        previous = self.snaps[-1] if chain and self.snaps else None
        manifest = Manifest(
            repo_id=self.info.repo_id,
            snapshot_id=snapshot_id,
            started=when.isoformat(timespec="seconds"),
            finished=(when + timedelta(minutes=3)).isoformat(timespec="seconds"),
            host="nas",
            stack="co-talk",
            drtool_version="0.1.0",
            components=tuple(components),
            previous_id=previous.snapshot_id if previous else None,
            previous_sha256=manifest_sha256(previous.stored) if previous else None,
        )
        stored = writer.commit(manifest)
        snap = Snap(snapshot_id, manifest, stored, dump)
        self.snaps.append(snap)
        return snap

    def records(self) -> dict[str, catalog.SnapshotRecord]:
        """The catalog's listing, by id."""
        listed = catalog.list_snapshots(self.storage, [self.verify_key], self.info.repo_id)
        return {r.snapshot_id: r for r in listed}

    def keys_in_storage(self) -> set[str]:
        return {o.key for o in self.storage.list()}


def blob_id() -> str:
    return secrets.token_hex(16)


def make_repo_kit(tmp: Path, url: str, s3: S3Endpoint | None = None) -> RepoKit:
    """Keys, a config file and an initialised repository at ``url``."""
    key_dir = tmp / "keys"
    repo_keys = generate_keys(key_dir)
    repository: dict[str, object] = {"url": url}
    if s3 is not None:
        (key_dir / "s3-access").write_text(s3.access_key)
        (key_dir / "s3-secret").write_text(s3.secret_key)
        repository |= {
            "endpoint_url": s3.endpoint_url,
            "access_key_file": str(key_dir / "s3-access"),
            "secret_key_file": str(key_dir / "s3-secret"),
        }
    sections: dict[str, dict[str, object]] = {
        "repository": repository,
        "keys": {**repo_keys.backup_section(), **repo_keys.operator_section()},
    }
    config_file = tmp / "drtool.toml"
    config_file.write_text(tomli_w.dumps(sections))
    cfg = load_config(config_file, {})
    info = svc.init_repo(cfg)
    return RepoKit(
        tmp=tmp,
        url=url,
        config_file=config_file,
        storage=svc.storage_for(cfg),
        info=info,
        signing_key=keys.load_signing_key(repo_keys.signing_key_file),
        verify_key=repo_keys.verify_key,
        recipient=repo_keys.recipient,
        identity_file=repo_keys.identity_file,
        sections=sections,
    )


def file_kit(tmp: Path) -> RepoKit:
    (tmp / "repo").mkdir()
    return make_repo_kit(tmp, (tmp / "repo").as_uri())


def s3_kit(tmp: Path, s3: S3Endpoint, bucket: str) -> RepoKit:
    return make_repo_kit(tmp, f"s3://{bucket}/drtool", s3)


def dead_pid() -> int:
    """A pid that existed and is gone (reaped)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def plant_lock(
    kit: RepoKit, *, host: str, pid: int, since: datetime, op: str = "backup", **holder: Any
) -> str:
    """A lock object as a holder would write it; ``holder``: boot_id, pid_start, heartbeat..."""
    lock = LockInfo(
        f"{since:%Y%m%dT%H%M%S}-{secrets.token_hex(4)}", host, pid, op, since.isoformat(), **holder
    )
    kit.storage.put_bytes(lock.key, json.dumps(asdict(lock)).encode())
    return lock.key
