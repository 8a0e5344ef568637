"""Keys, a backup-host config, an operator config and an initialised repository.

``drtool demo``, the benchmarks (bench/) and the tests (tests/support/) all start from this
set-up; it lives here, once, so the three cannot drift apart (they were five hand-written
copies). The keys are split as in a real installation: the backup host gets the recipient,
the signing key and the pinned verify key, never the identity; the operator gets the
identity and the verify key.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from drtool import keys
from drtool.config import load_config
from drtool.repository.layout import RepoInfo
from drtool.services import repo as repo_svc
from drtool.services.stack import write_config

IDENTITY_FILE = "operator.key"
SIGNING_KEY_FILE = "signing.key"


@dataclass(frozen=True)
class RepoKeys:
    """A fresh operator identity (age) and repository signing key (Ed25519), on disk, 0600."""

    identity_file: Path
    recipient: str
    signing_key_file: Path
    verify_key: str

    def backup_section(self) -> dict[str, Any]:
        """The backup host's ``[keys]``: encrypt to the recipient, sign, pin the verify key."""
        return {
            "recipients": [self.recipient],
            "signing_key_file": str(self.signing_key_file),
            "verify_key": self.verify_key,
        }

    def operator_section(self) -> dict[str, Any]:
        """The operator's ``[keys]``: the identity that decrypts, the pinned verify key."""
        return {"identity_file": str(self.identity_file), "verify_key": self.verify_key}


def generate_keys(key_dir: Path) -> RepoKeys:
    """Write a new identity and signing key (no passphrase) into ``key_dir`` (made 0700)."""
    key_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    identity = key_dir / IDENTITY_FILE
    recipient = keys.write_identity(identity, passphrase=None)
    verify_key = keys.write_signing_key(key_dir / SIGNING_KEY_FILE)
    return RepoKeys(identity, recipient, key_dir / SIGNING_KEY_FILE, verify_key)


@dataclass(frozen=True)
class RepoSetup:
    """The keys and the two config files written, with the documents they hold."""

    keys: RepoKeys
    backup_config: Path
    operator_config: Path
    backup_doc: dict[str, Any]
    operator_doc: dict[str, Any]


def write_configs(
    directory: Path,
    repo_keys: RepoKeys,
    repository: Mapping[str, Any],
    *,
    stores: Mapping[str, Any] | None = None,
    state_dir: Path | None = None,
    operator_stores: bool = False,
    operator_extra: Mapping[str, Any] | None = None,
    label: str = "a test",
) -> RepoSetup:
    """Write ``<directory>/backup.toml`` and ``<directory>/operator.toml``.

    ``stores`` are the postgres/redis/minio sections of the stack backed up; the operator
    config holds them only with ``operator_stores`` (the demo's stack is gone afterwards, and
    its operator config must keep working for list, show and verify). ``operator_extra`` adds
    sections (targets, restore settings) to the operator config.
    """
    backup_doc: dict[str, Any] = {
        **(stores or {}),
        "repository": dict(repository),
        "keys": repo_keys.backup_section(),
    }
    if state_dir is not None:
        backup_doc["backup"] = {"state_dir": str(state_dir)}
    operator_doc: dict[str, Any] = {
        **((stores or {}) if operator_stores else {}),
        "repository": dict(repository),
        "keys": repo_keys.operator_section(),
        **(operator_extra or {}),
    }
    backup_config = write_config(
        directory / "backup.toml",
        backup_doc,
        f"{label} backup host (recipients and signing key only)",
    )
    operator_config = write_config(
        directory / "operator.toml",
        operator_doc,
        f"{label} operator (holds the identity; restores and drills)",
    )
    return RepoSetup(repo_keys, backup_config, operator_config, backup_doc, operator_doc)


def init_from(setup: RepoSetup) -> RepoInfo:
    """Initialise the repository named by the backup-host config."""
    return repo_svc.init_repo(load_config(setup.backup_config, {}))


def set_up_repository(
    directory: Path,
    repository: Mapping[str, Any],
    *,
    stores: Mapping[str, Any] | None = None,
    state_dir: Path | None = None,
    operator_stores: bool = False,
    operator_extra: Mapping[str, Any] | None = None,
    label: str = "a test",
) -> RepoSetup:
    """Keys in ``<directory>/keys``, both configs (see :func:`write_configs`), repository
    initialised: everything a first backup needs."""
    setup = write_configs(
        directory,
        generate_keys(directory / "keys"),
        repository,
        stores=stores,
        state_dir=state_dir,
        operator_stores=operator_stores,
        operator_extra=operator_extra,
        label=label,
    )
    init_from(setup)
    return setup
