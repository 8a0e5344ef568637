"""The ``local`` drill runtime: a scratch stack of server processes on loopback ports.

Each drill's stack lives in ``<home>/drills/<drill-id>/`` so that ``drtool drill cleanup``
finds and stops the leftovers of a drill that was killed before it could tear down. Beside it,
``<drill-id>.owner.json`` names the drill's process (:mod:`drtool.liveness`): cleanup stops
only the stacks of dead drills, never a running one.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

from drtool import liveness
from drtool.endpoints import StackEndpoints
from drtool.errors import DrtoolError
from drtool.runtime.local import LocalStack
from drtool.runtime.rediscluster import stop_recorded

SCRATCH_CLUSTER = "redis-cluster"
"""Where, in a drill's stack dir, a Redis Cluster snapshot's scratch cluster lives."""


def drills_dir(home: Path) -> Path:
    """Where local drill stacks live."""
    return home / "drills"


LEGACY_AFTER_S = 12 * 3600  # a stack without an owner file (older drtool) counts as dead after


def _owner_file(directory: Path) -> Path:
    return directory.with_name(f"{directory.name}.owner.json")


@contextmanager
def local_scratch(home: Path, drill_id: str, pg_major: int | None) -> Iterator[StackEndpoints]:
    """A fresh local stack for one drill, always torn down.

    Its PostgreSQL is of ``pg_major`` (the snapshot's): MissingBinary when that major is not
    installed, never a server of another major.
    """
    directory = drills_dir(home) / drill_id
    owner = _owner_file(directory)
    owner.parent.mkdir(parents=True, exist_ok=True)
    owner.write_text(json.dumps(asdict(liveness.current())))
    try:
        with LocalStack.up(directory, f"drill-{drill_id.lower()}", pg_major=pg_major) as stack:
            yield stack.endpoints
    finally:
        owner.unlink(missing_ok=True)


def _is_dead(directory: Path) -> tuple[bool, str]:
    """(dead, why) for the drill whose stack is in ``directory``."""
    try:
        owner = liveness.Owner(**json.loads(_owner_file(directory).read_text()))
    except FileNotFoundError:
        age = time.time() - directory.stat().st_mtime
        if age > LEGACY_AFTER_S:
            return True, "no owner recorded (an older drtool), older than 12 h"
        return False, "no owner recorded (an older drtool) and less than 12 h old"
    except (OSError, ValueError, TypeError):
        return False, "its owner file is unreadable"
    alive, why = liveness.process_verdict(owner)
    if alive is None:
        return False, f"its drill ran on {owner.describe()}: run `drtool drill cleanup` there"
    return (not alive), (f"its drill runs ({owner.describe()})" if alive else why)


def cleanup_local(home: Path) -> tuple[list[str], list[str]]:
    """Stop the leftover local stacks of dead drills: (drill ids cleaned, kept with why)."""
    cleaned: list[str] = []
    kept: list[str] = []
    root = drills_dir(home)
    for directory in sorted(root.iterdir()) if root.is_dir() else []:
        if not directory.is_dir():
            continue  # owner files: each goes with its stack (below, or when a drill ends)
        dead, why = _is_dead(directory)
        if not dead:
            kept.append(f"local stack {directory.name}: {why}")
            continue
        try:
            stop_recorded(directory / SCRATCH_CLUSTER)  # a cluster drill's scratch cluster
            LocalStack.load(directory).down()
        except DrtoolError:
            continue
        _owner_file(directory).unlink(missing_ok=True)
        cleaned.append(directory.name)
    return cleaned, kept
