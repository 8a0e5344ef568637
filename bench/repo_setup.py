"""Shared set-up for the benchmarks: seed a local stack, keys, configs, a repository, a backup."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chat_stack.seed import SeedSizes, seed
from drtool.config import load_config
from drtool.runtime.local import LocalStack
from drtool.services.backup import run_backup
from drtool.services.repo_setup import set_up_repository
from drtool.services.stack import stack_config
from drtool.stores.registry import COMPONENTS

# the drtool of the venv running the benchmark
DRTOOL = Path(sys.executable).with_name("drtool")


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
    setup = set_up_repository(
        home,
        repository,
        stores=stack_config(src),
        state_dir=home / "state",
        operator_stores=True,
        operator_extra=operator_extra,
        label="bench",
    )
    cfg = load_config(setup.backup_config, {})
    t = time.perf_counter()
    run_backup(cfg, home=home, env={}, components=COMPONENTS)
    print(f"backup in {time.perf_counter() - t:.1f} s")
    return Prepared(setup.backup_config, setup.operator_config)
