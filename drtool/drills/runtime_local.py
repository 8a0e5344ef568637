"""The ``local`` drill runtime: a scratch stack of server processes on loopback ports.

Each drill's stack lives in ``<home>/drills/<drill-id>/`` so that ``drtool drill cleanup``
finds and stops the leftovers of a drill that was killed before it could tear down.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from drtool.errors import DrtoolError
from drtool.runtime.endpoints import StackEndpoints
from drtool.runtime.local import LocalStack


def drills_dir(home: Path) -> Path:
    """Where local drill stacks live."""
    return home / "drills"


@contextmanager
def local_scratch(home: Path, drill_id: str, pg_major: int | None) -> Iterator[StackEndpoints]:
    """A fresh local stack for one drill, always torn down.

    Its PostgreSQL is of ``pg_major`` (the snapshot's): MissingBinary when that major is not
    installed, never a server of another major.
    """
    state_dir = drills_dir(home) / drill_id
    with LocalStack.up(state_dir, f"drill-{drill_id.lower()}", pg_major=pg_major) as stack:
        yield stack.endpoints


def cleanup_local(home: Path) -> list[str]:
    """Stop every leftover local drill stack; returns the drill ids cleaned."""
    cleaned = []
    root = drills_dir(home)
    for directory in sorted(root.iterdir()) if root.is_dir() else []:
        try:
            LocalStack.load(directory).down()
        except DrtoolError:
            continue
        cleaned.append(directory.name)
    return cleaned
