"""The drill history kept in the repository: one clear summary per drill.

``drills/<drill-id>/summary.json`` holds what needs no key to read (pass/fail, the snapshot,
RTO, RPO); the full report beside it is encrypted. Prune reads the summaries so that it never
removes the newest snapshot a drill proved restorable.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from drtool.errors import NotFound
from drtool.repository import layout
from drtool.storage.base import Storage

log = logging.getLogger(__name__)


def summary_key(drill_id: str) -> str:
    """Where a drill's clear summary is stored."""
    return f"{layout.DRILLS}{drill_id}/summary.json"


def read_summaries(storage: Storage) -> list[dict[str, Any]]:
    """Every drill summary in the repository, oldest first (unreadable ones are skipped)."""
    summaries = []
    for obj in storage.list(layout.DRILLS):
        if obj.key.endswith("/summary.json"):
            try:
                summaries.append(json.loads(storage.get_bytes(obj.key)))
            except (ValueError, NotFound):
                log.warning("unreadable drill summary %s", obj.key)
    return sorted(summaries, key=lambda s: str(s.get("drill_id")))


def drilled(storage: Storage) -> set[str]:
    """Every snapshot a drill restored and passed."""
    return {str(s.get("snapshot_id")) for s in read_summaries(storage) if s.get("passed")}


def newest_drilled(storage: Storage, candidates: set[str]) -> str | None:
    """The newest of ``candidates`` that a drill restored and passed, if any."""
    return max(drilled(storage) & candidates, default=None)
