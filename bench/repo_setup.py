"""Shared set-up for the benchmarks: seed a local stack, keys, configs, a repository, a backup."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chat_stack.seed import SeedSizes, seed
from drtool import keys
from drtool.config import load_config
from drtool.runtime.local import LocalStack
from drtool.services import repo as repo_svc
from drtool.services.backup import run_backup
from drtool.services.stack import stack_config, write_config
from drtool.stores.registry import COMPONENTS


@dataclass(frozen=True)
class Prepared:
    """The configs of a seeded stack with one snapshot in its repository."""

    backup_config: Path
    operator_config: Path


def seed_and_back_up(
    home: Path,
    src: LocalStack,
    repository: dict[str, str],
    *,
    messages: int,
    attachments: int,
    operator_extra: dict[str, Any] | None = None,
) -> Prepared:
    """Seed ``src``, write backup/operator configs for ``repository``, init it, back up once."""
    users = max(100, messages // 100)
    sizes = SeedSizes(users, max(10, users // 10), messages, attachments)
    t = time.perf_counter()
    seed(src.endpoints, sizes, 1, progress=False)
    print(f"seeded {messages:,} messages in {time.perf_counter() - t:.1f} s")
    identity = home / "operator.key"
    recipient = keys.write_identity(identity, passphrase=None)
    verify_key = keys.write_signing_key(home / "signing.key")
    sections = stack_config(src)
    backup_cfg = write_config(
        home / "backup.toml",
        {
            **sections,
            "repository": repository,
            "keys": {
                "recipients": [recipient],
                "signing_key_file": str(home / "signing.key"),
                "verify_key": verify_key,
            },
            "backup": {"state_dir": str(home / "state")},
        },
        "bench backup",
    )
    operator_cfg = write_config(
        home / "operator.toml",
        {
            **sections,
            "repository": repository,
            "keys": {"identity_file": str(identity), "verify_key": verify_key},
            **(operator_extra or {}),
        },
        "bench operator",
    )
    cfg = load_config(backup_cfg, {})
    repo_svc.init_repo(cfg)
    t = time.perf_counter()
    run_backup(cfg, home=home, env={}, components=COMPONENTS)
    print(f"backup in {time.perf_counter() - t:.1f} s")
    return Prepared(backup_cfg, operator_cfg)
