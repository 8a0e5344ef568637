"""The restore journal: every change of one entity restore, written before it is made.

One JSON file per restore in ``<state dir>/entity-journals/`` (directory 0700, file 0600: it
holds chat rows). Each write replaces the file atomically (temporary file, fsync, rename), so
a crash leaves the previous complete version. ``status`` moves ``applying`` (rows and objects
recorded, nothing changed yet) -> ``applied`` (or ``failed``: the row transaction rolled back)
-> ``undone``. The format is in docs/decisions/0019-entity-restore.md.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from drtool.errors import NotFound, UsageError

FORMAT = 1
DIRECTORY = "entity-journals"


def journal_dir(state: Path) -> Path:
    """The journals' directory under the state dir, created 0700."""
    path = state / DIRECTORY
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def write(path: Path, doc: dict[str, Any]) -> None:
    """Replace the journal atomically with ``doc``; 0600, synced before it counts."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        json.dump(doc, out, ensure_ascii=False, default=str)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def read(path: Path) -> dict[str, Any]:
    """A journal, checked to be one (NotFound / UsageError naming the file)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise NotFound(f"--undo: no journal at {path}") from None
    except OSError as exc:
        raise UsageError(f"--undo: cannot read {path} ({exc.strerror})") from None
    try:
        doc = json.loads(text)
    except ValueError:
        raise UsageError(f"--undo: {path} is not a restore-entity journal (not JSON)") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or "rows" not in doc:
        raise UsageError(f"--undo: {path} is not a restore-entity journal (format {FORMAT})")
    return doc
