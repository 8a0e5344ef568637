"""Sealing closed WAL files from the spool into ``wal/`` and committing them to the index.

Order for each batch: every file is hashed, sealed (zstd -> age, inner header binding it to
the repository and its name), uploaded and its stored size confirmed; then ONE index chunk
naming the batch is committed; only then are the files removed from the spool. A kill at any
point leaves the files in the spool: an upload without an index entry is simply redone (its key
is not in the index, so nothing refers to the old bytes), and a file whose entry was committed
is recognised by its plaintext sha256 and removed without a second entry. A file with the
name of a committed entry and other bytes is an integrity error: the WAL history forked
(a restored or re-initialised server streaming into the same repository) and nothing is stored.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from drtool.errors import IntegrityError
from drtool.faults import crash_point
from drtool.pipeline.header import InnerHeader
from drtool.pipeline.meter import measure
from drtool.pipeline.seal import seal
from drtool.storage.base import Storage
from drtool.wal.index import WalEntry, WalIndex, append_chunk, object_key
from drtool.wal.names import is_history, timeline_of
from drtool.wal.spool import Spool

log = logging.getLogger(__name__)

READ_SIZE = 1 << 20
MAX_BATCH = 64  # files per index chunk: bounds the work a failed commit redoes
COMPONENT = "wal"


def wal_header(repo_id: str, name: str) -> InnerHeader:
    """The inner header of the sealed WAL file ``name`` (the name sits in ``snapshot_id``)."""
    kind = "wal-history" if is_history(name) else "wal-segment"
    return InnerHeader(repo_id, name, COMPONENT, kind)


def _read(path: Path) -> Iterator[bytes]:
    with path.open("rb") as f:
        while piece := f.read(READ_SIZE):
            yield piece


@dataclass
class SealReport:
    """What one pass over the spool did."""

    sealed: list[str] = field(default_factory=list)
    already_stored: list[str] = field(default_factory=list)
    stored_bytes: int = 0


@dataclass
class Sealer:
    """Seals spool files into one repository for one streamer."""

    storage: Storage
    index: WalIndex
    spool: Spool
    recipients: list[str]
    signing_key: Ed25519PrivateKey
    host: str
    segment_size: int
    level: int = 3
    #: ``repository.retain_days``: each WAL file and index chunk is stored with Object Lock
    #: retention until ``now + retain_days`` (ADR 0007, as a snapshot's objects are), so WAL
    #: is as protected as the base backups it extends; 0: none
    retain_days: int = 0

    def _retain_until(self) -> datetime | None:
        if not self.retain_days:
            return None
        return datetime.now(UTC) + timedelta(days=self.retain_days)

    def _upload(self, path: Path, plain_size: int, plain_sha256: str) -> WalEntry:
        name = path.name
        key = object_key(name)
        sealed = seal(
            _read(path),
            header=wal_header(self.index.repo_id, name),
            recipients=self.recipients,
            level=self.level,
        )
        info = self.storage.put(
            key, sealed.stream, expected_size=plain_size, retain_until=self._retain_until()
        )
        if info.size != sealed.stored.size:
            raise IntegrityError(f"{key}: stored {info.size} bytes, sent {sealed.stored.size}")
        if (sealed.plain.size, sealed.plain.sha256) != (plain_size, plain_sha256):
            raise IntegrityError(f"{path}: changed while it was sealed; not committed")
        return WalEntry(
            name=name,
            kind="history" if is_history(name) else "segment",
            timeline=timeline_of(name),
            key=key,
            size=info.size,
            sha256=sealed.stored.sha256,
            plain_size=plain_size,
            plain_sha256=plain_sha256,
            sealed=datetime.now(UTC).isoformat(timespec="seconds"),
        )

    def seal_pending(self) -> SealReport:
        """Seal and commit every closed file in the spool, in batches; remove them after.

        Storage errors propagate with the files still in the spool (nothing is lost);
        IntegrityError when a file contradicts a committed entry.
        """
        report = SealReport()
        batch: list[WalEntry] = []
        batch_paths: list[Path] = []
        done: list[Path] = []
        for path in self.spool.closed():
            plain_size, plain_sha256 = measure(_read(path))
            committed = self.index.entries.get(path.name)
            if committed is not None:
                if (committed.plain_size, committed.plain_sha256) != (plain_size, plain_sha256):
                    raise IntegrityError(
                        f"{path.name}: the spool holds other bytes than the copy stored in the "
                        f"repository ({committed.key}); not stored. The WAL history forked "
                        "(another cluster streams into this repository?); move the file away "
                        "after checking"
                    )
                report.already_stored.append(path.name)
                done.append(path)
                continue
            entry = self._upload(path, plain_size, plain_sha256)
            crash_point("wal-after-upload")
            batch.append(entry)
            batch_paths.append(path)
            report.stored_bytes += entry.size
            if len(batch) >= MAX_BATCH:
                self._commit(batch, batch_paths, report)
                batch, batch_paths = [], []
        if batch:
            self._commit(batch, batch_paths, report)
        if done:
            log.info("%d WAL files were already stored; removed from the spool", len(done))
            self.spool.remove(done)
        return report

    def _commit(self, batch: list[WalEntry], paths: list[Path], report: SealReport) -> None:
        key = append_chunk(
            self.storage,
            self.index,
            batch,
            signing_key=self.signing_key,
            host=self.host,
            created=datetime.now(UTC).isoformat(timespec="seconds"),
            segment_size=self.segment_size,
            retain_until=self._retain_until(),
        )
        crash_point("wal-after-index")
        self.spool.remove(paths)
        report.sealed += [e.name for e in batch]
        log.info("sealed %d WAL files up to %s (%s)", len(batch), batch[-1].name, key)
