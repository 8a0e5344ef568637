"""``drtool wal stream|status|verify``: the command handlers over drtool/wal/.

The streamer runs on the backup host (recipients and the signing key, never an identity);
status and key-less verify need only the repository and a verify key; ``verify --read-data``
also decrypts, with an identity.
"""

from __future__ import annotations

import hashlib
import logging
import socket
import threading
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from drtool import keys
from drtool.config import Config
from drtool.endpoints import PostgresEndpoint
from drtool.errors import ConfigError, IntegrityError, NotFound
from drtool.pipeline.seal import unseal
from drtool.repository.access import Repo, identities_of, open_repo
from drtool.services.scheduling.metrics import WalMetrics
from drtool.services.wal_monitor import WalMonitor
from drtool.wal import continuity
from drtool.wal.index import WAL, WalEntry, WalIndex, load_index
from drtool.wal.names import DEFAULT_SEGMENT_SIZE, is_segment
from drtool.wal.receiver import check_slot_name
from drtool.wal.sealer import Sealer, wal_header
from drtool.wal.spool import Spool
from drtool.wal.streamer import Streamer, StreamStats

log = logging.getLogger(__name__)


def spool_of(cfg: Config, home: Path) -> Spool:
    """The configured spool, by default ``<state dir>/wal-spool``."""
    if cfg.wal.spool_dir:
        return Spool(Path(cfg.wal.spool_dir))
    state = Path(cfg.backup.state_dir) if cfg.backup.state_dir else home / "state"
    return Spool(state / "wal-spool")


def _checked_index(repo: Repo) -> WalIndex:
    index = load_index(repo.storage, repo.verify_keys, repo.info.repo_id)
    if index.problems:
        raise IntegrityError(
            f"WAL index: {index.problems[0]}"
            + (f" (and {len(index.problems) - 1} more)" if len(index.problems) > 1 else "")
            + "; nothing appended (run `drtool wal verify`)"
        )
    return index


def _segment_size(index: WalIndex, spool: Spool) -> int:
    """The index's segment size, else a closed spool segment's size, else the default."""
    if index.segment_size:
        return index.segment_size
    for path in spool.closed():
        if is_segment(path.name):
            return path.stat().st_size
    return DEFAULT_SEGMENT_SIZE


def build_streamer(
    cfg: Config, home: Path, metrics: WalMetrics | None = None
) -> tuple[Streamer, Spool]:
    """Open the repository, load and check the index, and assemble a streamer (updating
    ``metrics`` every tick when given)."""
    if cfg.keys.identity_file:
        raise ConfigError(
            "keys.identity_file: the backup host must not hold an identity (a private key); "
            "remove it from the streamer's config"
        )
    if not cfg.keys.signing_key_file:
        raise ConfigError(
            "keys.signing_key_file: a signing key is needed (see `drtool keys signing-key`)"
        )
    if cfg.wal.flush_interval <= 0:
        raise ConfigError(f"wal.flush_interval: must be > 0 seconds (got {cfg.wal.flush_interval})")
    if cfg.wal.spool_max_bytes <= 0:
        raise ConfigError(f"wal.spool_max_bytes: must be > 0 (got {cfg.wal.spool_max_bytes})")
    check_slot_name(cfg.wal.slot)
    repo = open_repo(cfg)
    recipients = keys.load_recipients(cfg.keys.recipients)
    signing_key = keys.load_signing_key(Path(cfg.keys.signing_key_file))
    index = _checked_index(repo)
    spool = spool_of(cfg, home)
    sealer = Sealer(
        storage=repo.storage,
        index=index,
        spool=spool,
        recipients=recipients,
        signing_key=signing_key,
        host=socket.gethostname(),
        segment_size=_segment_size(index, spool),
        level=cfg.backup.compression_level,
        retain_days=cfg.repository.retain_days,
    )
    streamer = Streamer(
        sealer=sealer,
        spool=spool,
        endpoint=cfg.stack().postgres,
        bin_dir=cfg.postgres.bin_dir,
        slot=cfg.wal.slot,
        flush_interval=cfg.wal.flush_interval,
        spool_max_bytes=cfg.wal.spool_max_bytes,
        restart_max_s=cfg.wal.restart_max_s,
        primary=_primary_of(cfg),
    )
    if metrics is not None:
        streamer.observer = WalMonitor(
            metrics, repo, cfg.wal.slot, cfg.wal.spool_max_bytes, cfg.wal.window_policy_s
        )
    return streamer, spool


def _primary_of(cfg: Config) -> PostgresEndpoint | None:
    """``wal.primary_host``: the standby source's primary, with ``[postgres]``'s role (a
    physical standby has its primary's roles and passwords), used only for pg_switch_wal()."""
    if not cfg.wal.primary_host:
        return None
    source = cfg.stack().postgres
    return replace(source, host=cfg.wal.primary_host, port=cfg.wal.primary_port)


def run_stream(
    cfg: Config,
    home: Path,
    *,
    mode: str,
    stop: threading.Event | None = None,
    metrics: WalMetrics | None = None,
) -> StreamStats:
    """``mode``: ``forever`` (until ``stop``), ``once`` (seal the spool, no server) or
    ``until-idle`` (receive until caught up with a forced switch, seal, exit)."""
    streamer, spool = build_streamer(cfg, home, metrics)
    if stop is not None:
        streamer.stop = stop
    with spool.locked():
        if mode == "once":
            report = streamer.sealer.seal_pending()  # storage errors are fatal here
            streamer.stats.add(report)
            return streamer.stats
        return streamer.run(until_idle=mode == "until-idle")


# --- status -------------------------------------------------------------------------------


def _entry_view(entry: WalEntry | None) -> dict[str, Any] | None:
    return None if entry is None else {"segment": entry.name, "sealed": entry.sealed}


def wal_status(cfg: Config, home: Path) -> dict[str, Any]:
    """The recoverable WAL stretch, gaps, the spool and the age of the newest sealed segment."""
    repo = open_repo(cfg)
    index = load_index(repo.storage, repo.verify_keys, repo.info.repo_id)
    cont = continuity.check(index)
    spool = spool_of(cfg, home)
    lag = None
    if cont.last is not None:
        sealed = datetime.fromisoformat(cont.last.sealed)
        lag = max(0.0, (datetime.now(UTC) - sealed).total_seconds())
    state = spool.read_state() or {}
    return {
        "source": {  # as the streamer last reported it (its heartbeat in the spool)
            "server": state.get("source"),
            "role": state.get("source_role"),
            "segments_closed_by": state.get("segments_closed_by"),
        },
        "window": {"from": _entry_view(cont.first), "to": _entry_view(cont.last)},
        "oldest": _entry_view(cont.oldest),
        "segments": cont.segments,
        "stored_bytes": sum(e.size for e in index.entries.values()),
        "gaps": [g.describe() for g in cont.gaps],
        "problems": index.problems + cont.problems,
        "newest_sealed_age_s": lag,
        "spool": {
            "dir": str(spool.dir),
            "bytes": spool.size(),
            "closed_waiting": len(spool.closed()),
            "receiving": spool.partial(),
            "streamer": state or None,
        },
    }


# --- verify -------------------------------------------------------------------------------


@dataclass
class WalVerifyOutcome:
    """What ``wal verify`` found."""

    files: int = 0
    segments: int = 0
    window_from: str | None = None
    window_to: str | None = None
    problems: list[str] = field(default_factory=list)
    read_data: bool = False


def _check_object(repo: Repo, entry: WalEntry, identities: list[str]) -> str | None:
    """Stream one sealed file: stored size and sha256; with identities, decrypt it too."""
    digest, size = hashlib.sha256(), 0
    plain_digest, plain_size = hashlib.sha256(), 0

    def counted() -> Any:
        nonlocal size
        for chunk in repo.storage.get(entry.key):
            digest.update(chunk)
            size += len(chunk)
            yield chunk

    try:
        if identities:
            for piece in unseal(
                counted(),
                identities=identities,
                expected=wal_header(repo.info.repo_id, entry.name),
                name=entry.key,
                recipients_hint=list(repo.info.recipients),
            ):
                plain_digest.update(piece)
                plain_size += len(piece)
        else:
            for _ in counted():
                pass
    except NotFound:
        return f"{entry.key}: missing from the repository (WAL {entry.name})"
    except IntegrityError as exc:
        return str(exc)
    problem = entry.mismatch(size, digest.hexdigest())
    plain = (plain_size, plain_digest.hexdigest())
    if problem is None and identities and plain != (entry.plain_size, entry.plain_sha256):
        problem = f"{entry.key}: decrypted content differs from the WAL index"
    return problem


def wal_verify(cfg: Config, *, read_data: bool) -> WalVerifyOutcome:
    """Check the index chain and signatures, every sealed file's size and sha256 (and, with
    ``read_data``, its decrypted content), and continuity: gaps and timeline history files."""
    repo = open_repo(cfg)
    identities = identities_of(cfg) if read_data else []
    if read_data and not identities:
        raise ConfigError("keys.identity_file: --read-data needs an identity (got none)")
    index = load_index(repo.storage, repo.verify_keys, repo.info.repo_id)
    if not index.entries and not index.problems:
        raise NotFound("wal verify: the repository holds no WAL (is `drtool wal stream` running?)")
    outcome = WalVerifyOutcome(read_data=read_data, problems=list(index.problems))
    listed = {o.key: o.size for o in repo.storage.list(WAL) if not o.key.startswith("wal/index/")}
    for entry in sorted(index.entries.values(), key=lambda e: (e.name[8:], e.name[:8])):
        outcome.files += 1
        if entry.key not in listed:
            outcome.problems.append(f"{entry.key}: missing from the repository (WAL {entry.name})")
            continue
        problem = _check_object(repo, entry, identities)
        if problem:
            outcome.problems.append(problem)
    cont = continuity.check(index)
    outcome.segments = cont.segments
    outcome.problems += [g.describe() for g in cont.gaps] + cont.problems
    outcome.window_from = cont.first.name if cont.first else None
    outcome.window_to = cont.last.name if cont.last else None
    return outcome
