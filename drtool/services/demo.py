"""``drtool demo``: the main job end to end on embedded defaults, no set-up needed.

A throw-away local stack is started and seeded, keys are generated, a local ``file://``
repository is created, a snapshot is taken, verified with the operator's key and listed, a
restore drill restores it into a second scratch stack and proves the messages intact, then
then continuous protection is shown: PostgreSQL's WAL is streamed into the repository
(``wal stream --until-idle``), a base backup taken, a canary written, a moment marked, a second
canary written, and a drill restores PostgreSQL to that moment from the base and the WAL: the
copy must hold the first canary and not the second (its measured RPO is the gap between the
first canary and the moment). Then the stacks are torn down (always). Repository, keys,
configs and the drill reports stay in ``<home>/demo/`` for a look afterwards.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

from chat_stack.seed import SeedResult
from drtool.config import Config, load_config
from drtool.drills.definition import DrillDefinition, ReportSettings
from drtool.drills.report import DrillReport
from drtool.errors import IntegrityError, NotFound, SourceError
from drtool.repository.catalog import SnapshotRecord
from drtool.services import canary as canary_svc
from drtool.services import repo as repo_svc
from drtool.services import repo_setup as setup_svc
from drtool.services import stack as stack_svc
from drtool.services import wal as wal_svc
from drtool.services.backup import BackupResult, run_backup
from drtool.services.drill import run_drill
from drtool.stores.base import Progress
from drtool.stores.registry import COMPONENTS

log = logging.getLogger(__name__)

STACK = "demo"
#: the moment the demo restores to lies this long after its first canary (the RPO a drill
#: measures: the copy must hold that canary) and as long before its second (which the copy
#: must not hold); commit times are the server's, canary times this host's: the same clock
MOMENT_GAP = timedelta(seconds=1)


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
    base: BackupResult | None = None  # the base backup the restore to a moment starts from
    moment: datetime | None = None
    moment_drill: DrillReport | None = None


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
            stores={
                **stack_svc.stack_config(started.stack),
                # continuous protection: the slot is the demo's, gone with its stack
                "wal": {"spool_dir": str(directory / "wal-spool"), "slot": "drtool_demo"},
            },
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
        _restore_to_a_moment(result, backup_cfg, operator_cfg, home, env, step)
    finally:
        step("stopping the stack")
        started.stack.down()
    return result


def _restore_to_a_moment(
    result: DemoResult,
    backup_cfg: Config,
    operator_cfg: Config,
    home: Path,
    env: Mapping[str, str],
    step: Callable[[str], None],
) -> None:
    """WAL streamed, a base backup, canary - moment - canary, a drill restoring to the moment.

    The drill's checks are the ``pitr:at:`` drill's own (services/pitr_drill.py): the copy
    reached the moment, its messages read, and the measured RPO by its newest canary, which
    is negative, and the drill failed, had the copy held the canary written after the moment.
    """
    step("streaming PostgreSQL's WAL into the repository (a replication slot from now on)")
    wal_svc.run_stream(backup_cfg, home, mode="until-idle", stop=threading.Event())
    step("taking a base backup (pg_basebackup) for restores to a moment")
    result.base = run_backup(backup_cfg, home=home, env=env, components=("postgres-base",))
    step("writing a canary, marking a moment 1 s later, then writing another canary")
    first = canary_svc.write(backup_cfg)
    moment = first.at + MOMENT_GAP
    time.sleep(max(0.0, (moment + MOMENT_GAP - datetime.now(UTC)).total_seconds()))
    second = canary_svc.write(backup_cfg)
    failed = {**first.failed, **second.failed}
    if "postgres" in failed:
        raise SourceError(f"demo: canary not written: {failed['postgres']}")
    result.moment = moment
    wal_svc.run_stream(backup_cfg, home, mode="until-idle", stop=threading.Event())
    step(f"restore drill to {moment.isoformat(timespec='milliseconds')}: the base plus the WAL")
    # the drill connects to the copy as the source's role: the operator config keeps no
    # [postgres] (the demo stack is gone afterwards), so it borrows the backup host's here
    pitr_cfg = replace(operator_cfg, postgres=backup_cfg.postgres)
    spec = DrillDefinition(
        name="demo-moment",
        snapshot=f"pitr:at:{moment.isoformat()}",
        components=("postgres",),
        report=ReportSettings(dir=str(result.directory / "reports")),
    )
    result.moment_drill = run_drill(pitr_cfg, home=home, spec=spec)
