"""One capture round: new attachment rows -> their objects sealed as blobs -> journal + chain.

Order within a round, so a kill at any point neither loses nor uploads twice:

1. the rows (drtool/capture/follow.py) are read, each object HEAD then GET into a blob —
   unless the capture's cache or the MinIO backup's cache already holds the same key, ETag
   and size with its blob still stored; ``workers`` objects at once, each streamed (a round
   read one at a time took 38-84 s for ~600 objects: the attachments RPO is interval +
   round), the outcomes then taken in row order;
2. each uploaded blob is appended to the capture cache at once (a redone round finds it:
   no second upload; only a kill in the instant between an upload and its append costs one
   per object in flight);
3. the sealed journal, then the signed chain record (the commit);
4. the state (``high``, the ids still owed) is replaced last.

A kill before 4 redoes the round from the previous state: the objects are journaled again
(the newest entry per key wins, the bytes are the same), never uploaded again. The bucket is
never listed: one HEAD and one GET per new object, one HEAD of its blob when it is reused.
"""

from __future__ import annotations

import logging
import secrets
import threading
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg

from drtool.capture import cache
from drtool.capture import chain as capture_chain
from drtool.capture.follow import Row, follow, owed_too_long, start_high
from drtool.capture.state import CaptureState, load_state, save_state, state_path
from drtool.errors import IntegrityError, NotFound
from drtool.repository import layout
from drtool.repository.minio_index import IndexEntry
from drtool.repository.writer import SnapshotWriter
from drtool.sources.minio import MinioStore
from drtool.stores.minio.backup import cache_path, read_cache

log = logging.getLogger(__name__)

#: one row's capture: None (its object is not there), else (uploaded?, entry, captured at)
_Outcome = tuple[bool, IndexEntry, str] | None

#: an idle capture commits a heartbeat record at most this often
HEARTBEAT = timedelta(minutes=5)


@dataclass
class RoundResult:
    """What one round did."""

    rows: int = 0
    captured: int = 0
    uploaded: int = 0
    reused: int = 0
    absent: int = 0  # rows whose object was not there (retried next round)
    seq: int | None = None  # the chain record written, if any
    lost: list[int] = field(default_factory=list)  # rows whose object never appeared
    more: bool = False  # a full batch was read: the next round should not wait
    caught_up: bool = False  # every row committed before the round was read, nothing owed
    problems: list[str] = field(default_factory=list)


@dataclass
class Capturer:
    """Captures one bucket's new attachment objects into one repository."""

    writer: SnapshotWriter  # put_blob / put_sealed only; its snapshot id is unused
    store: MinioStore
    bucket: str
    state_dir: Path
    host: str
    gap_timeout: timedelta
    chain: capture_chain.Chain
    from_start: bool = False
    #: objects read and sealed at once in a round (``capture.workers``); each one streamed
    workers: int = 4
    _snapshot_mtime: int | None = field(default=-1, repr=False)  # -1: not read yet

    @property
    def repo_id(self) -> str:
        """The repository's id."""
        return self.writer.repo.repo_id

    def state_file(self) -> Path:
        """This repository's capture state."""
        return state_path(self.state_dir, self.repo_id)

    def run_round(self, conn: psycopg.Connection[Any], now: datetime | None = None) -> RoundResult:
        """Follow the rows, capture their objects, commit a journal; save the state."""
        now = now or datetime.now(UTC)
        state = load_state(self.state_file())
        if state.high is None:
            state.high = 0 if self.from_start else start_high(conn)
            log.info("attachment capture: starting after id %d", state.high)
        followed = follow(conn, state, now, gap_timeout=self.gap_timeout)
        conn.rollback()  # no transaction stays open between rounds
        result = RoundResult(rows=len(followed.rows), more=followed.more)
        entries = self._capture(followed.rows, state, now, result)
        result.caught_up = not followed.more and not state.missing and not state.absent
        if entries or (result.caught_up and _heartbeat_due(state, now)):
            result.seq = self._commit(entries, now, caught_up=result.caught_up)
            state.seq, state.last_commit = result.seq, now.isoformat()
        state.cache_offset = cache.size_of(
            cache.captured_path(self.state_dir, self.repo_id, self.bucket)
        )
        state.captured += result.captured
        state.uploaded += result.uploaded
        state.gaps_dropped += followed.gaps_dropped
        result.lost += followed.objects_lost
        state.objects_lost += len(result.lost)
        if result.lost:
            result.problems.append(
                f"{len(result.lost)} attachment rows whose object never appeared "
                f"in {self.bucket} within {self.gap_timeout} (ids {sorted(result.lost)[:5]})"
            )
        state.last_round = now.isoformat()
        state.last_error = "; ".join(result.problems)
        save_state(self.state_file(), state)
        return result

    def _capture(
        self, rows: list[Row], state: CaptureState, now: datetime, result: RoundResult
    ) -> list[capture_chain.Captured]:
        """The round's objects read and sealed by :attr:`workers` at once; the outcome (counts,
        ids owed, journal entries) assembled afterwards in row order, as one at a time would.

        A row naming a key an earlier row of the round named waits for it (a later wave), so
        it finds that capture in the cache (one upload per key per round, as before). When one
        object fails, the objects not started are dropped, the ones in flight finish (their
        uploads reach the cache: the redone round reuses them) and the first failing row's
        error ends the round, its state unchanged.
        """
        captured_path = cache.captured_path(self.state_dir, self.repo_id, self.bucket)
        snapshot = self._snapshot_changed(captured_path, state)
        captured = cache.read_tail(captured_path, state.cache_offset)
        outcomes: dict[int, _Outcome] = {}
        for wave in _waves(rows):
            done = self._read_wave(wave, captured, snapshot, captured_path)
            for i, _row in wave:
                if (entry := done[i]) is not None:
                    captured[entry[1].key] = entry[1]
            outcomes.update(done)
        out: list[capture_chain.Captured] = []
        for i, row in enumerate(rows):
            outcome = outcomes[i]
            if outcome is None:
                first = state.absent.setdefault(row.id, now.isoformat())
                if owed_too_long(first, now, self.gap_timeout):
                    del state.absent[row.id]  # its object never appeared: given up, counted
                    result.lost.append(row.id)
                else:
                    result.absent += 1
                continue
            state.absent.pop(row.id, None)
            new, e, captured_at = outcome
            result.captured += 1
            result.uploaded += new
            result.reused += not new
            out.append(
                capture_chain.Captured(
                    captured_at=captured_at,
                    bucket=self.bucket,
                    key=e.key,
                    etag=e.etag,
                    size=e.size,
                    sha256=e.sha256,
                    content_type=e.content_type,
                    metadata=e.metadata,
                    blob=e.blob,
                    blob_size=e.blob_size,
                    blob_sha256=e.blob_sha256,
                )
            )
        return out

    def _read_wave(
        self,
        wave: list[tuple[int, Row]],
        captured: dict[str, IndexEntry],
        snapshot: dict[str, IndexEntry],
        captured_path: Path,
    ) -> dict[int, _Outcome]:
        """Each row's outcome by its index, at most :attr:`workers` objects in flight (each
        streamed: GET -> seal -> put, never held whole)."""
        appending = threading.Lock()

        def one(row: Row) -> _Outcome:
            found = self._one(row, captured.get(row.object_key) or snapshot.get(row.object_key))
            if found is None:
                return None
            if found[0]:  # at once: a kill right after the upload must not upload it again
                with appending:
                    cache.append_captured(captured_path, [found[1]])
            return found[0], found[1], datetime.now(UTC).isoformat()

        if self.workers <= 1 or len(wave) <= 1:
            return {i: one(row) for i, row in wave}
        with ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="capture") as pool:
            futures = {pool.submit(one, row): i for i, row in wave}
            try:
                wait(futures, return_when=FIRST_EXCEPTION)
            except BaseException:  # interrupted (Ctrl-C): the objects not started are dropped
                for f in futures:
                    f.cancel()
                raise
            if any(f.done() and f.exception() is not None for f in futures):
                for f in futures:
                    f.cancel()  # not started: dropped; in flight: finish and reach the cache
            wait(futures)
        failed = sorted(
            (i, exc)
            for f, i in futures.items()
            if not f.cancelled() and (exc := f.exception()) is not None
        )
        if failed:
            raise failed[0][1]
        return {i: f.result() for f, i in futures.items()}

    def _snapshot_changed(self, captured_path: Path, state: CaptureState) -> dict[str, IndexEntry]:
        """The MinIO backup's cache when it changed since this process last read it, else {}.

        Then (about once a day) the captured entries the snapshot took over are dropped from
        the capture's cache, which is rewritten; its committed offset becomes its new size.
        """
        path = cache_path(self.state_dir, self.repo_id, self.bucket)
        try:
            mtime: int | None = path.stat().st_mtime_ns
        except FileNotFoundError:
            mtime = None
        if mtime == self._snapshot_mtime:
            return {}
        self._snapshot_mtime = mtime
        snapshot = read_cache(path)
        captured = cache.read_captured(captured_path)
        gone = cache.taken_over(captured, snapshot)
        if gone:
            pending = cache.read_tail(captured_path, state.cache_offset)
            for key in gone:
                if key not in pending:  # an uncommitted round's entry stays
                    del captured[key]
            cache.write_captured(captured_path, captured)
            state.cache_offset = 0  # everything left is read back by the next lookups
        return snapshot

    def _one(self, row: Row, known: IndexEntry | None) -> tuple[bool, IndexEntry] | None:
        """(uploaded?, entry) for the row's object; None when the object is not there."""
        found = self.store.stat(self.bucket, row.object_key)
        if found is None:
            return None
        listed, meta = found
        same = known is not None and (known.size, known.etag) == (listed.size, listed.etag)
        if known is not None and same and self._blob_stored(known):
            entry = replace(known, content_type=meta.content_type, metadata=meta.metadata)
            return False, replace(entry, listed_mtime="")
        try:
            meta, stream = self.store.read(self.bucket, row.object_key)
        except NotFound:
            return None  # deleted between HEAD and GET
        blob_id = secrets.token_hex(16)
        written = self.writer.put_blob(blob_id, stream)
        if written.plain_bytes != listed.size:
            log.warning(
                "minio %s/%s changed while it was read; captured again next round",
                self.bucket,
                row.object_key,
            )
            return None
        if written.plain_sha256 != row.sha256:
            log.warning(
                "minio %s/%s: its bytes' sha256 differs from the attachment row's",
                self.bucket,
                row.object_key,
            )
        return True, IndexEntry(
            key=row.object_key,
            size=listed.size,
            etag=listed.etag,
            sha256=written.plain_sha256,
            content_type=meta.content_type,
            metadata=meta.metadata,
            blob=blob_id,
            blob_size=written.entry.size,
            blob_sha256=written.entry.sha256,
        )

    def _blob_stored(self, entry: IndexEntry) -> bool:
        try:
            return self.writer.storage.head(layout.blob_key(entry.blob)).size == entry.blob_size
        except NotFound:
            return False

    def _commit(
        self, entries: list[capture_chain.Captured], now: datetime, *, caught_up: bool
    ) -> int:
        """Write the sealed journal and the signed chain record that commits it (a heartbeat:
        an empty journal, first/last captured = the round's start)."""
        seq = self.chain.last_seq + 1
        header = capture_chain.journal_header(self.repo_id, seq)
        journal = self.writer.put_sealed(
            capture_chain.journal_key(seq), capture_chain.encode_journal(entries), header
        )
        blobs = {
            e.blob: capture_chain.Stored(layout.blob_key(e.blob), e.blob_size, e.blob_sha256)
            for e in entries
        }
        record = capture_chain.ChainRecord(
            repo_id=self.repo_id,
            seq=seq,
            previous_sha256=self.chain.last_sha256,
            created=now.isoformat(),
            host=self.host,
            bucket=self.bucket,
            journal=capture_chain.Stored(
                journal.entry.key, journal.entry.size, journal.entry.sha256
            ),
            blobs=tuple(blobs[b] for b in sorted(blobs)),
            first_captured=min((e.captured_at for e in entries), default=now.isoformat()),
            last_captured=max((e.captured_at for e in entries), default=now.isoformat()),
            caught_up=caught_up,
        )
        capture_chain.append_record(
            self.writer.storage,
            self.chain,
            record,
            capture_chain.sign_record(record, self.writer.signing_key),
            retain_until=self.writer.retain_until,
        )
        log.info(
            "attachment capture: %d objects journaled as %s",
            len(entries),
            capture_chain.chain_key(seq),
        )
        return seq


def _waves(rows: list[Row]) -> list[list[tuple[int, Row]]]:
    """The rows (with their index) in waves read one after the other: the n-th row naming a
    key goes in wave n, so it sees the capture of the key by the rows before it."""
    waves: list[list[tuple[int, Row]]] = []
    seen: dict[str, int] = {}
    for i, row in enumerate(rows):
        n = seen.get(row.object_key, 0)
        seen[row.object_key] = n + 1
        if n == len(waves):
            waves.append([])
        waves[n].append((i, row))
    return waves


def _heartbeat_due(state: CaptureState, now: datetime) -> bool:
    """A caught-up round that captured nothing still commits a (heartbeat) record when none
    was committed for :data:`HEARTBEAT`: a restore to a moment in a quiet period needs a
    signed proof that the capture was following then (ADR 0027)."""
    if not state.last_commit:
        return True
    return now - datetime.fromisoformat(state.last_commit) >= HEARTBEAT


def checked_chain(storage: Any, verify_keys: list[str], repo_id: str) -> capture_chain.Chain:
    """The chain, refused when anything is wrong with it (nothing is appended then)."""
    found = capture_chain.load_chain(storage, verify_keys, repo_id)
    if found.problems:
        raise IntegrityError(
            f"capture chain: {found.problems[0]}"
            + (f" (and {len(found.problems) - 1} more)" if len(found.problems) > 1 else "")
            + "; nothing appended (run `drtool capture verify`)"
        )
    found.records.clear()  # the capture needs only the chain's end
    return found
