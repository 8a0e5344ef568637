"""The capture's position on the backup host: which attachment ids it has seen.

``high``: every id at or below it was captured, or is in ``missing`` (not committed yet, or
rolled back) or ``absent`` (the row is there, its object not yet). Both map an id to when it
was first noticed, so a gap that never fills is dropped after ``gap_timeout_s``. The file is
replaced atomically: a kill leaves the previous round's state, and that round is redone
(see ADR 0025 for why nothing is then uploaded twice).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from drtool.errors import ConfigError


@dataclass
class CaptureState:
    """Where the capture stands, and what its rounds did (for ``capture status``)."""

    high: int | None = None  # None: never ran (the first round starts at max(id))
    missing: dict[int, str] = field(default_factory=dict)  # id -> first noticed (ISO)
    absent: dict[int, str] = field(default_factory=dict)  # row seen, object not (yet)
    seq: int = 0  # the last chain record this host committed
    cache_offset: int = 0  # the captured cache's size when the last round committed
    last_round: str = ""
    last_commit: str = ""  # the last round that committed a chain record (heartbeats: ADR 0027)
    last_error: str = ""
    captured: int = 0  # objects captured in all rounds
    uploaded: int = 0  # of them, blobs uploaded (the rest reused)
    gaps_dropped: int = 0  # ids never committed within the gap timeout
    objects_lost: int = 0  # rows whose object never appeared within the gap timeout

    def to_json(self) -> bytes:
        """The stored form (ids as strings: JSON keys)."""
        doc = asdict(self)
        doc["missing"] = {str(k): v for k, v in self.missing.items()}
        doc["absent"] = {str(k): v for k, v in self.absent.items()}
        return json.dumps(doc, indent=1, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes, *, name: str) -> CaptureState:
        """Parse the stored form; a damaged file is a ConfigError naming it."""
        try:
            doc: dict[str, Any] = json.loads(data)
            doc["missing"] = {int(k): v for k, v in doc.get("missing", {}).items()}
            doc["absent"] = {int(k): v for k, v in doc.get("absent", {}).items()}
            return cls(**doc)
        except (ValueError, TypeError, AttributeError) as exc:
            raise ConfigError(
                f"{name}: the capture state is unreadable ({type(exc).__name__}); "
                "move it away and run `drtool capture run --from-start` or let it restart "
                "at the newest row"
            ) from None


def state_path(state_dir: Path, repo_id: str) -> Path:
    """``<state_dir>/capture/<repo_id>.json``."""
    return state_dir / "capture" / f"{repo_id}.json"


def load_state(path: Path) -> CaptureState:
    """The stored state, or a fresh one when there is none."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return CaptureState()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the capture state ({exc.strerror})") from None
    return CaptureState.from_json(data, name=str(path))


def save_state(path: Path, state: CaptureState) -> None:
    """Replace the state atomically (write, fsync, rename)."""
    write_atomic(path, state.to_json())


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so a reader sees the old or the new content, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
