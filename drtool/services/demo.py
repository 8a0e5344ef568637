"""``drtool demo``: the main job end to end on embedded defaults, no set-up needed.

A throw-away local stack is started and seeded, keys are generated, a local ``file://``
repository is created, a snapshot is taken, verified with the operator's key and listed, a
restore drill restores it into a second scratch stack and proves the messages intact, then
the stacks are torn down (always). Repository, keys, configs and the drill report stay in
``<home>/demo/`` for a look afterwards.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from chat_stack.seed import SeedResult
from drtool.config import load_config
from drtool.drills.definition import DrillDefinition, ReportSettings
from drtool.drills.report import DrillReport
from drtool.errors import IntegrityError, NotFound, SourceError
from drtool.repository.catalog import SnapshotRecord
from drtool.services import canary as canary_svc
from drtool.services import repo as repo_svc
from drtool.services import repo_setup as setup_svc
from drtool.services import stack as stack_svc
from drtool.services.backup import BackupResult, run_backup
from drtool.services.drill import run_drill
from drtool.stores.base import Progress
from drtool.stores.registry import COMPONENTS

log = logging.getLogger(__name__)

STACK = "demo"


@dataclass(frozen=True)
class DemoSizes:
    """How much chat data the demo seeds."""

    users: int = 200
    rooms: int = 40
    messages: int = 20_000
    attachments: int = 200


@dataclass
class DemoResult:
    """What the demo did, step by step."""

    directory: Path
    backup_config: Path
    operator_config: Path
    seeded: SeedResult | None = None
    backup: BackupResult | None = None
    snapshots: list[SnapshotRecord] | None = None
    drill: DrillReport | None = None


def run_demo(
    home: Path,
    env: Mapping[str, str],
    sizes: DemoSizes,
    *,
    step: Callable[[str], None] = lambda text: None,
    progress: Progress = lambda component, n: None,
) -> DemoResult:
    """Stack up, seed, keys, init, backup, verify, list, drill; stacks go down whatever happens."""
    directory = home / "demo"
    try:
        stack_svc.stack_down(home, STACK)  # a stack left by an interrupted demo
    except NotFound:
        log.debug("no earlier demo stack to stop")
    shutil.rmtree(directory, ignore_errors=True)
    (directory / "repository").mkdir(parents=True)
    result = DemoResult(directory, directory / "backup.toml", directory / "operator.toml")

    step("generating keys: an operator identity (off the NAS) and a signing key (on it)")
    demo_keys = setup_svc.generate_keys(directory / "keys")

    step("starting the included co-talk stack as local processes")
    started = stack_svc.stack_up(home, STACK)
    try:
        repository = {"url": (directory / "repository").as_uri()}
        # no stack sections for the operator: the demo stack (and its secret files) is gone
        # afterwards, and the operator config must keep working for list, show and verify
        setup_svc.write_configs(
            directory,
            demo_keys,
            repository,
            stores=stack_svc.stack_config(started.stack),
            state_dir=directory / "state",
            label="the demo",
        )
        step(f"seeding {sizes.messages:,} messages and {sizes.attachments} attachments")
        result.seeded = stack_svc.stack_seed(
            home,
            STACK,
            users=sizes.users,
            rooms=sizes.rooms,
            messages=sizes.messages,
            attachments=sizes.attachments,
            seed=1,
            progress=False,
        )
        backup_cfg = load_config(result.backup_config, {})
        step(f"creating the repository {repository['url']}")
        repo_svc.init_repo(backup_cfg)
        step("writing a canary to each store (the drill measures what each store lost by it)")
        written = canary_svc.write(backup_cfg)
        if written.failed:
            raise SourceError(f"demo: canary not written: {next(iter(written.failed.values()))}")
        step("backing up PostgreSQL, Redis and MinIO")
        result.backup = run_backup(
            backup_cfg, home=home, env=env, components=COMPONENTS, progress=progress
        )
        step("verifying every object with the operator's identity")
        operator_cfg = load_config(result.operator_config, {})
        outcomes = repo_svc.verify(operator_cfg, result.backup.snapshot_id, read_data=True)
        for outcome in outcomes:
            if outcome.problems:
                raise IntegrityError(f"demo: verify failed: {outcome.problems[0]}")
        result.snapshots = repo_svc.list_records(operator_cfg)
        step("restore drill: restoring the snapshot into a scratch stack and checking it")
        spec = DrillDefinition(name="demo", report=ReportSettings(dir=str(directory / "reports")))
        result.drill = run_drill(operator_cfg, home=home, spec=spec)
    finally:
        step("stopping the stack")
        started.stack.down()
    return result
