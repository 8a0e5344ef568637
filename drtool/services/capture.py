"""``drtool capture run|status|verify``: the command handlers over drtool/capture/.

The capture runs on the backup host beside ``drtool wal stream`` (recipients and the signing
key, never an identity): it reads ``attachments`` (SELECT only) and the objects the rows name,
and appends to the repository. Status reads the host's state; key-less verify needs only
the repository and a verify key; ``verify --read-data`` also decrypts, with an identity.
"""

from __future__ import annotations

import fcntl
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg

from drtool import keys
from drtool.capture.capturer import Capturer, RoundResult, checked_chain
from drtool.capture.retention import JournalPrune, prune_journal
from drtool.capture.state import load_state, save_state, state_path
from drtool.capture.verify import CaptureVerifyOutcome, verify_capture
from drtool.config import Config
from drtool.endpoints import PostgresEndpoint
from drtool.errors import ConfigError, DrtoolError, Locked, NotFound, SourceError
from drtool.repository.access import identities_of, open_repo
from drtool.repository.writer import SnapshotWriter
from drtool.services.backup import state_dir
from drtool.sources.minio import ALL_BUCKETS, MinioStore

log = logging.getLogger(__name__)


def capture_bucket(cfg: Config) -> str:
    """``capture.bucket``, else the first of ``minio.buckets`` (never ``*``)."""
    bucket = cfg.capture.bucket or (cfg.minio.buckets[0] if cfg.minio.buckets else "")
    if not bucket or bucket == ALL_BUCKETS:
        raise ConfigError(
            f"capture.bucket: name the attachments' bucket (got {bucket or 'nothing'!r}; "
            "minio.buckets gives no single bucket)"
        )
    return bucket


def build_capturer(cfg: Config, home: Path, *, from_start: bool = False) -> Capturer:
    """Open the repository, check the chain, and assemble a capturer for the configured bucket."""
    if cfg.keys.identity_file:
        raise ConfigError(
            "keys.identity_file: the backup host must not hold an identity (a private key); "
            "remove it from the capture's config"
        )
    if not cfg.keys.signing_key_file:
        raise ConfigError(
            "keys.signing_key_file: a signing key is needed (see `drtool keys signing-key`)"
        )
    if cfg.capture.interval_s <= 0:
        raise ConfigError(f"capture.interval_s: must be > 0 seconds (got {cfg.capture.interval_s})")
    if cfg.capture.gap_timeout_s <= 0:
        raise ConfigError(
            f"capture.gap_timeout_s: must be > 0 seconds (got {cfg.capture.gap_timeout_s})"
        )
    if cfg.capture.workers < 1:
        raise ConfigError(f"capture.workers: must be >= 1 (got {cfg.capture.workers})")
    bucket = capture_bucket(cfg)
    repo = open_repo(cfg)
    recipients = keys.load_recipients(cfg.keys.recipients)
    writer = SnapshotWriter(
        storage=repo.storage,
        repo=repo.info,
        snapshot_id="capture",  # unused: the capture writes blobs and journals only
        signing_key=keys.load_signing_key(Path(cfg.keys.signing_key_file)),
        recipients=tuple(recipients),
        compression_level=cfg.backup.compression_level,
    )
    return Capturer(
        writer=writer,
        store=MinioStore(cfg.stack().minio, max_pool=max(8, cfg.capture.workers)),
        bucket=bucket,
        state_dir=state_dir(cfg, home),
        host=socket.gethostname(),
        gap_timeout=timedelta(seconds=cfg.capture.gap_timeout_s),
        chain=checked_chain(repo.storage, repo.verify_keys, repo.info.repo_id),
        from_start=from_start,
        workers=cfg.capture.workers,
    )


@contextmanager
def host_lock(path: Path) -> Iterator[None]:
    """One capture per repository on this host (a second one is refused, exit 11)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Locked(f"{path}: another `drtool capture run` holds it") from None
        yield


def _connect(endpoint: PostgresEndpoint) -> psycopg.Connection[Any]:
    try:
        return psycopg.connect(**endpoint.connect_kwargs(), connect_timeout=10)
    except psycopg.Error as exc:
        raise _pg_error(endpoint, exc) from None


def _pg_error(endpoint: PostgresEndpoint, exc: psycopg.Error) -> SourceError:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if endpoint.password:
        first = first.replace(endpoint.password, "***")
    return SourceError(f"PostgreSQL {endpoint.host}:{endpoint.port}: attachment capture: {first}")


def run_capture(
    cfg: Config,
    home: Path,
    *,
    once: bool,
    from_start: bool = False,
    stop: threading.Event | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> RoundResult:
    """Rounds every ``capture.interval_s`` until ``stop`` (``once``: one round, errors raise).

    Rounds *start* every interval: the wait after a round is the interval minus the round's
    own time (none when it took longer). Waiting a whole interval after each round would put
    rounds ``interval + round`` apart, and the worst attachments RPO (the rows just after a
    round started, sealed at the end of the next one) would be ``interval + 2 x round``
    instead of ``interval + round`` — measured by bench/bench_capture.py at 100 messages/s,
    where a round reading ~600 objects took tens of seconds.

    A failed round (the server or the bucket away, the repository unreachable) is logged and
    recorded as the state's ``last_error``; the next round retries from the same state.
    Returns the totals of the rounds run.
    """
    if not cfg.capture.enabled:
        log.warning("attachment capture is off (capture.enabled = false); nothing to do")
        return RoundResult()
    capturer = build_capturer(cfg, home, from_start=from_start)
    endpoint = cfg.stack().postgres
    stop = stop or threading.Event()
    total = RoundResult()
    lock = capturer.state_file().with_suffix(".lock")
    with host_lock(lock):
        conn: psycopg.Connection[Any] | None = None
        try:
            while True:
                started = clock()
                if cfg.repository.retain_days:
                    capturer.writer.retain_until = datetime.now(UTC) + timedelta(
                        days=cfg.repository.retain_days
                    )
                try:
                    if conn is None or conn.closed:
                        conn = _connect(endpoint)
                    one = capturer.run_round(conn)
                    _add(total, one)
                    if one.more and not once and not stop.is_set():
                        continue  # catching up: the next batch at once
                except (DrtoolError, psycopg.Error) as exc:
                    error = _pg_error(endpoint, exc) if isinstance(exc, psycopg.Error) else exc
                    if once:
                        raise error from None
                    log.error("attachment capture round failed: %s", error)
                    _record_error(capturer, str(error))
                    if conn is not None:
                        conn.close()
                        conn = None
                if once or stop.wait(max(0.0, cfg.capture.interval_s - (clock() - started))):
                    break
        finally:
            if conn is not None:
                conn.close()
    return total


def _add(total: RoundResult, one: RoundResult) -> None:
    total.rows += one.rows
    total.captured += one.captured
    total.uploaded += one.uploaded
    total.reused += one.reused
    total.absent = one.absent
    total.seq = one.seq if one.seq is not None else total.seq
    total.problems += one.problems
    total.lost += one.lost


def _record_error(capturer: Capturer, error: str) -> None:
    try:
        state = load_state(capturer.state_file())
        state.last_error = error
        save_state(capturer.state_file(), state)
    except (DrtoolError, OSError):
        pass  # the log has it


def capture_status(cfg: Config, home: Path) -> dict[str, Any]:
    """The host's capture state: high, ids owed, last round, totals, last error."""
    repo = open_repo(cfg)
    path = state_path(state_dir(cfg, home), repo.info.repo_id)
    state = load_state(path)
    doc = asdict(state)
    del doc["missing"], doc["absent"]
    last_age = None
    if state.last_round:
        last = datetime.fromisoformat(state.last_round)
        last_age = max(0.0, (datetime.now(UTC) - last).total_seconds())
    return {
        **doc,
        "state_file": str(path),
        "bucket": capture_bucket(cfg),
        "missing": len(state.missing),
        "absent": len(state.absent),
        "last_round_age_s": last_age,
    }


def capture_verify(cfg: Config, *, read_data: bool) -> CaptureVerifyOutcome:
    """Prove the chain key-less; with ``read_data`` decrypt the journals too."""
    repo = open_repo(cfg)
    identities = identities_of(cfg) if read_data else []
    if read_data and not identities:
        raise ConfigError("keys.identity_file: --read-data needs an identity (got none)")
    outcome = verify_capture(repo, identities)
    if not outcome.records and not outcome.problems:
        raise NotFound(
            "capture verify: the repository holds no capture (is `drtool capture run` running?)"
        )
    return outcome


def capture_prune(cfg: Config, *, dry_run: bool) -> JournalPrune:
    """Remove the chain's head that no kept MinIO snapshot needs (signing key required)."""
    if not cfg.keys.signing_key_file:
        raise ConfigError(
            "keys.signing_key_file: a signing key is needed to sign the prune marker "
            "(see `drtool keys signing-key`)"
        )
    repo = open_repo(cfg)
    signing_key = keys.load_signing_key(Path(cfg.keys.signing_key_file))
    return prune_journal(
        repo, signing_key, host=socket.gethostname(), now=datetime.now(UTC), dry_run=dry_run
    )
