"""The store registry is the only place that names stores (ADR 0006).

A fourth store, added to the registry alone, is backed up into a real (file://, encrypted,
signed) repository and restored from it by the unchanged backup and restore services.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import pytest
from support.stacks import make_repository

from drtool.config import load_config
from drtool.drills import definition
from drtool.endpoints import PostgresEndpoint, RedisEndpoint, S3Endpoint, StackEndpoints
from drtool.repository.access import read_object, snapshot_header
from drtool.repository.manifest import ComponentEntry, ObjectEntry
from drtool.services.restore.run import RestoreOptions, run_restore
from drtool.stores import registry
from drtool.stores.base import (
    BackedUp,
    BackupContext,
    DrillCheck,
    PlanItem,
    Restored,
    SnapshotSource,
    Store,
    Target,
)


def test_the_registry_orders_the_stores_and_names_the_components() -> None:
    assert registry.COMPONENTS == ("postgres", "redis", "minio")
    assert definition.COMPONENTS is registry.COMPONENTS
    # drill checks in the order reports always had them
    needs = [sorted(c.needs) for s in registry.STORES for c in s.drill_checks()]
    assert needs == [["minio", "postgres"], ["minio", "postgres"], ["postgres", "redis"]]


@dataclass
class NotesRestoring:
    """The restore side of the test store: one file written whole, then compared."""

    target: Path
    data: bytes

    def reads(self) -> list[ObjectEntry]:
        return []  # its only object is read whole by load

    def plan(self, target: Target) -> list[PlanItem]:
        holds = "a file" if self.target.exists() else "nothing"
        return [
            PlanItem(
                "notes",
                f"{len(self.data)} bytes",
                str(self.target),
                len(self.data),
                holds,
                self.target.exists(),
                "write the file",
            )
        ]

    def staged_bytes(self, workers: int) -> int:
        return len(self.data)

    def stage(self, target: Target, work: Path) -> None:
        (work / "notes.txt").write_bytes(self.data)

    def restore(self, target: Target, work: Path, stamp: str) -> Restored:
        (work / "notes.txt").replace(self.target)
        same = (
            hashlib.sha256(self.target.read_bytes()).digest() == hashlib.sha256(self.data).digest()
        )
        return Restored([] if same else ["notes: the restored file differs"], "1 file written")


@dataclass
class NotesStore:
    """A fourth kind of store: a text file, as a store module would add it."""

    source: Path
    target: Path

    @property
    def name(self) -> str:
        return "notes"

    def backup(self, ctx: BackupContext) -> BackedUp:
        written = ctx.writer.put_snapshot_object(
            "notes", "notes.txt", [self.source.read_bytes()], kind="notes"
        )
        return BackedUp(ComponentEntry("notes", (written.entry,), written.plain_bytes, 0.0, ""))

    def load(self, source: SnapshotSource, entry: ComponentEntry, target: Target) -> NotesRestoring:
        obj = entry.objects[0]
        header = snapshot_header(source.manifest, "notes", obj.kind)
        data = read_object(source.repo, obj, header, source.identities)
        return NotesRestoring(self.target, data)

    def counts(self, endpoints: StackEndpoints) -> list[list[object]]:
        return [["notes", "bytes", self.target.stat().st_size if self.target.exists() else 0]]

    def drill_checks(self) -> tuple[DrillCheck, ...]:
        return ()


def test_a_store_added_to_the_registry_alone_is_backed_up_and_restored(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    pg_server: PostgresEndpoint,
    redis_server: RedisEndpoint,
    s3_server: S3Endpoint,
) -> None:
    source, target = tmp_path / "notes-source.txt", tmp_path / "notes-restored.txt"
    source.write_text("the fourth store\n" * 1000)
    notes: Store = NotesStore(source, target)
    monkeypatch.setattr(registry, "STORES", registry.STORES.plus(notes))
    # COMPONENTS is derived from STORES when the registry is imported
    monkeypatch.setattr(registry, "COMPONENTS", (*registry.COMPONENTS, "notes"))
    stack = StackEndpoints(pg_server, redis_server, s3_server, ("unused",))
    repo = make_repository(tmp_path / "kit", stack)

    snapshot_id = repo.backup(components=("notes",))

    cfg = load_config(repo.operator_config(tmp_path / "operator.toml"), {})
    result = run_restore(
        cfg,
        home=tmp_path / "home",
        options=RestoreOptions(ref=snapshot_id, components=("notes",), yes=True),
        confirm=lambda r: True,
    )
    assert [c.name for c in result.components] == ["notes"]
    assert result.ok, result.components
    assert target.read_bytes() == source.read_bytes()
    assert [item.component for item in result.plan] == ["notes"]
