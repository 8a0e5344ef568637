"""``drtool restore --at TIME|--lsn LSN --component postgres --into DIR``: a moment, not a snapshot.

Order (docs/decisions/0017-pitr-restore-and-wal-retention.md): the signed WAL index and the
snapshot list are read; the base backup and the WAL run are chosen (pitr_plan: a target
outside the window, or behind a gap, is refused here, with nothing created); the plan is
shown and confirmed; then, in a staging directory beside the new data directory, the base
tar and every WAL file up to the target (plus a margin) are fetched, authenticated, decrypted
and checked against the signed records (sizes, sha256, each segment's cluster and position)
BEFORE the data directory is created. Then: extract, recovery settings, the same-major
``pg_ctl``, while the rest of the run is staged alongside (pitr_prefetch: for a moment, which
segment holds it is only estimated from sealed times), each file checked the same way before
PostgreSQL can read it; should one it needed fail its checks, or a gap stop it short, the new
data directory is removed before the error (nothing is left, the running cluster was never
involved). At the end of an unbroken run it recovers to the end of the WAL held and says where
the server's recovery ended (short of the last segment held is an error, nothing kept).
The result names the moment and WAL position reached. The running cluster is never touched:
the copy runs on its own loopback port with archiving off.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import psycopg

from drtool.config import Config
from drtool.errors import ConfigError, IntegrityError, NotFound, SourceError, UsageError
from drtool.repository import catalog
from drtool.repository.access import (
    Repo,
    identities_of,
    open_repo,
    snapshot_header,
    stored_problem,
)
from drtool.runtime.binaries import MissingBinary, pg_bin_dir, pg_major_of
from drtool.runtime.procs import free_port_block
from drtool.services.restore import pitr_plan, pitr_prefetch, pitr_recover, pitr_volume
from drtool.stores.stage import Plain, check_free_space, stage
from drtool.timing import Timer
from drtool.wal.fetch import fetch_checked, read_histories
from drtool.wal.history import Branch, parse_history
from drtool.wal.index import WalEntry, load_index
from drtool.wal.names import is_history, parse_lsn, parse_segment

RECOVERY_TIMEOUT_S = 3600.0
log_ = logging.getLogger(__name__)


@dataclass(frozen=True)
class PitrOptions:
    """Where to, and to which moment or position."""

    at: datetime | None = None
    lsn: str | None = None
    into: Path | None = None
    into_volume: str | None = None  # a new Docker volume, recovered with postgres.image
    dry_run: bool = False
    yes: bool = False
    port: int | None = None


@dataclass
class PitrResult:
    """The plan and, unless a dry run, what the restore reached."""

    target: str
    base_snapshot: str
    base_finished: str
    window: str
    data_dir: str
    dry_run: bool
    segments_planned: int
    port: int = 0
    segments_staged: int = 0
    staged_bytes: int = 0
    reached_time: str | None = None  # the last transaction replayed (its commit time)
    reached_lsn: str | None = None
    seconds: float = 0.0
    pg_ctl: str = ""
    log: str = ""
    volume: str = ""  # --into-volume: the new Docker volume holding the data directory
    image: str = ""  # --into-volume: the image that recovered it (as configured)
    image_id: str = ""  # --into-volume: that image's id, which every container ran
    hash_checked: int = 0  # dry run: objects whose stored size and sha256 were checked
    recovery_starts: int = 0  # more than 1: recovered again, to the end of the WAL held
    #: False: the WAL held ended before the target (a sealed time does not prove a segment's
    #: WAL reaches the moment), so the copy is as at ``reached_time``, not at the target
    target_reached: bool = True
    #: seconds of each phase: stage (base + first WAL, checked), extract, recover
    phases: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def check_options(options: PitrOptions) -> None:
    """Exactly one target; a time with its zone; a new (absent or empty) data directory."""
    if (options.at is None) == (options.lsn is None):
        raise UsageError("restore to a moment: give --at TIME or --lsn LSN (one of them)")
    if options.at is not None and options.at.tzinfo is None:
        raise UsageError(
            f"--at: give the time with its zone, e.g. 2026-11-25T02:00:00Z or +01:00 "
            f"(got {options.at.isoformat()})"
        )
    if options.lsn is not None:
        try:
            pitr_plan.parse_lsn(options.lsn)
        except ValueError:
            raise UsageError(
                f"--lsn: not a WAL position like 16/B374D848 (got {options.lsn})"
            ) from None
    if (options.into is None) == (options.into_volume is None):
        raise UsageError(
            "restore to a moment: give --into DIR (a new data directory) or --into-volume NAME "
            "(a new Docker volume), one of them; the running cluster is never replaced by a "
            "point-in-time restore"
        )
    if options.into_volume is not None:
        pitr_volume.check_volume_name(options.into_volume)
        if options.port is not None:
            raise UsageError("--port: only with --into DIR (the volume's copy is stopped)")
        return
    into = options.into
    assert into is not None
    if into.exists() and (not into.is_dir() or any(into.iterdir())):
        raise UsageError(f"--into: {into} exists and is not an empty directory; nothing changed")
    if not into.parent.is_dir():
        raise UsageError(f"--into: {into.parent} does not exist")


def run_pitr(
    cfg: Config, *, options: PitrOptions, confirm: Callable[[PitrResult], bool]
) -> PitrResult:
    """Plan, confirm, stage and check everything, then recover into ``options.into`` (or a
    new Docker volume, ``options.into_volume``)."""
    clock = Timer()
    check_options(options)
    identities = identities_of(cfg)
    if not identities:
        raise ConfigError("keys.identity_file: restore needs the operators' identity (got none)")
    repo = open_repo(cfg)
    index = load_index(repo.storage, repo.verify_keys, repo.info.repo_id)
    records = catalog.list_snapshots(repo.storage, repo.verify_keys, repo.info.repo_id)
    target = pitr_plan.Target(options.at, options.lsn)
    histories = read_histories(
        repo.storage,
        repo.info.repo_id,
        [e for e in index.entries.values() if is_history(e.name)],
        identities,
        list(repo.info.recipients),
    )
    chosen = pitr_plan.plan(records, index, target, histories)
    base = chosen.base
    major = pg_major_of(base.component.source_version)
    if major is None:
        raise SourceError(
            f"restore to a moment: the base backup records no PostgreSQL version "
            f"({base.component.source_version!r})"
        )
    if options.into_volume is not None:
        return _run_into_volume(cfg, repo, identities, chosen, options, confirm, clock)
    assert options.into is not None
    into = options.into.resolve() if options.into.exists() else options.into.absolute()
    try:
        bin_dir = pg_bin_dir(major=major)
    except MissingBinary as exc:
        raise MissingBinary(
            f"restore to a moment: a physical restore needs the base backup's major "
            f"(PostgreSQL {major}); {exc.message}"
        ) from None
    result = _result(chosen, str(into), options)
    result.pg_ctl = str(bin_dir / "pg_ctl")
    if options.dry_run:
        result.hash_checked = _hash_check(repo, chosen)
        return result
    if not options.yes and not confirm(result):
        raise UsageError("restore: not confirmed; nothing changed")
    _stage_and_recover(cfg, repo, identities, chosen, bin_dir, into, options, result)
    result.seconds = round(clock.elapsed(), 3)
    return result


def _result(chosen: pitr_plan.PitrPlan, where: str, options: PitrOptions) -> PitrResult:
    return PitrResult(
        chosen.target.describe(),
        chosen.base.snapshot_id,
        chosen.base.finished.isoformat(),
        chosen.window,
        where,
        options.dry_run,
        chosen.stage_count,
        notes=list(chosen.notes),
    )


def _hash_check(repo: Repo, chosen: pitr_plan.PitrPlan) -> int:
    """Dry run: the key-less check of the base and the WAL first staged (stored sha256)."""
    entry = next(o for o in chosen.base.component.objects if o.kind == "pg_basebackup")
    problems = [p for p in [stored_problem(repo, entry)] if p]
    wal = chosen.history + chosen.staged_first()
    for e in wal:
        digest, size = hashlib.sha256(), 0
        try:
            for chunk in repo.storage.get(e.key):
                digest.update(chunk)
                size += len(chunk)
        except NotFound:
            problems.append(f"{e.key}: missing from the repository (WAL {e.name})")
            continue
        problem = e.mismatch(size, digest.hexdigest())
        if problem:
            problems.append(problem)
    if problems:
        raise IntegrityError(
            f"restore --dry-run: {len(problems)} of {len(wal) + 1} objects damaged: "
            + "; ".join(problems)
        )
    return len(wal) + 1


@dataclass
class _Stager:
    """Fetches checked WAL into the staging directory and counts it."""

    repo: Repo
    identities: list[str]
    wal_dir: Path
    staging: Path
    segment_size: int
    system_identifier: str
    result: PitrResult
    #: each timeline's history, read from its staged history file (staged before segments)
    branches: dict[int, list[Branch]] = field(default_factory=dict)

    def fetch(self, entries: list[WalEntry]) -> None:
        for e in entries:
            path = fetch_checked(
                self.repo.storage,
                self.repo.info.repo_id,
                e,
                self.identities,
                list(self.repo.info.recipients),
                self.wal_dir,
                segment_size=self.segment_size,
                system_identifier=self.system_identifier,
                branches=self.branches.get(e.timeline),
            )
            if e.kind == "history":
                text = path.read_text(errors="replace")
                self.branches[e.timeline] = parse_history(text, name=e.name)
            self.result.segments_staged += 1 if e.kind == "segment" else 0
            self.result.staged_bytes += e.plain_size
        pitr_recover.chown_tree(self.staging)


def _stage_base(repo: Repo, base: pitr_plan.Base, identities: list[str], tar: Path) -> None:
    """The base tar, decrypted and checked against the manifest (size, sha256)."""
    comp = base.component
    entry = next(o for o in comp.objects if o.kind == "pg_basebackup")
    plain = Plain(comp.plain_bytes, str(comp.details.get("plain_sha256") or "") or None)
    header = snapshot_header(base.manifest, pitr_plan.BASE, entry.kind)
    stage(repo, entry, header, identities, tar, plain)


@contextmanager
def _staged(
    repo: Repo,
    identities: list[str],
    chosen: pitr_plan.PitrPlan,
    parent: Path,
    prefix: str,
    result: PitrResult,
) -> Iterator[tuple[_Stager, Path, list[WalEntry]]]:
    """A staging directory in ``parent`` holding the base tar and the first WAL, fetched and
    checked (nothing is created for PostgreSQL before this); removed on the way out, however
    it is left. One way for a directory and a volume."""
    clock = Timer()
    staging = Path(tempfile.mkdtemp(dir=parent, prefix=prefix))
    try:
        wal_dir = staging / "wal"
        wal_dir.mkdir()
        tar = staging / "base.tar"
        _stage_base(repo, chosen.base, identities, tar)
        stager = _Stager(
            repo,
            identities,
            wal_dir,
            staging,
            chosen.segment_size,
            chosen.base.system_identifier,
            result,
        )
        first = chosen.history + chosen.staged_first()
        stager.fetch(first)
        result.phases["stage"] = round(clock.elapsed(), 3)
        yield stager, tar, first
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _stage_and_recover(
    cfg: Config,
    repo: Repo,
    identities: list[str],
    chosen: pitr_plan.PitrPlan,
    bin_dir: Path,
    into: Path,
    options: PitrOptions,
    result: PitrResult,
) -> None:
    """Stage and check everything, then create, recover and promote ``into``."""
    base, size = chosen.base, chosen.segment_size
    check_free_space(into.parent, base.component.plain_bytes * 2 + size * (chosen.stage_count + 1))
    log = into.parent / f"{into.name}.restore.log"
    clock = Timer()
    prefix = f".{into.name}.staging-"
    with _staged(repo, identities, chosen, into.parent, prefix, result) as (stager, tar, _):
        # everything read so far is authentic: only now is anything created for PostgreSQL
        result.port = options.port or free_port_block((0,), set())
        try:
            pitr_recover.extract(tar, into, timeout=RECOVERY_TIMEOUT_S)
        except BaseException:
            shutil.rmtree(into, ignore_errors=True)  # ours, new, and of no use half-extracted
            raise
        tar.unlink()
        result.phases["extract"] = round(clock.elapsed() - result.phases["stage"], 3)
        log.touch()
        pitr_recover.chown_tree(log)
        result.log = str(log)
        try:
            command = pitr_prefetch.write_script(stager.staging, chosen.run)
            pitr_recover.chown_tree(stager.staging)
            prefetcher = pitr_prefetch.Prefetcher(
                stager.staging, chosen.run, chosen.stage_count, stager.fetch
            )
            prefetcher.start()
            try:
                recovery = _DirRecovery(
                    stager, bin_dir, into, log, result.port, command, prefetcher
                )
                to_end = _recover(chosen, recovery, options, result)
            finally:
                prefetcher.stop()
            result.phases["recover"] = round(clock.elapsed() - sum(result.phases.values()), 3)
            pitr_recover.remove_recovery_block(into)
            result.reached_time, result.reached_lsn = _reached(cfg, result.port, log)
            if to_end:
                _end_of_wal(chosen, result)
        except (IntegrityError, NotFound):
            # WAL staged on demand failed its checks, or a gap stops recovery short of the
            # target: the copy cannot be completed, so nothing of it is left behind (it never
            # served anything)
            pitr_recover.stop(bin_dir, into)
            shutil.rmtree(into, ignore_errors=True)
            log.unlink(missing_ok=True)
            raise


class _Recovery(Protocol):
    """Where recovery runs (a new directory, a new Docker volume): what the one loop needs."""

    @property
    def where(self) -> str:
        """For messages: what is left and where its log is."""
        ...

    def settings(
        self, target_time: str | None, target_lsn: str | None
    ) -> pitr_recover.RecoverySettings:
        """The recovery settings there (no target: to the end of the WAL held)."""
        ...

    def start(self, settings: pitr_recover.RecoverySettings) -> pitr_recover.Outcome:
        """Start recovery with ``settings`` and wait until promoted or stopped."""
        ...

    def more(self) -> bool:
        """After a start that ended short: stage more of the run for the next start (checked
        as the first); False when none is left. Raises a staging failure recovery needed."""
        ...


def _recover(
    chosen: pitr_plan.PitrPlan, recovery: _Recovery, options: PitrOptions, result: PitrResult
) -> bool:
    """Recover to the target; a start that ended short of it gets more of the run and starts
    again; at the end of an unbroken run, recover to the end of the WAL held (True then); a
    gap after the run is an error."""
    at = options.at.isoformat() if options.at is not None else None
    settings = recovery.settings(at, options.lsn)
    to_end = False
    while True:
        outcome = recovery.start(settings)
        result.recovery_starts += 1
        if outcome.promoted:
            return to_end
        if not outcome.not_reached:
            raise SourceError(
                f"restore to a moment: PostgreSQL stopped during recovery ({recovery.where}): "
                f"{outcome.log_tail}"
            )
        if recovery.more():
            continue
        if settings.target_time is None and settings.target_lsn is None:
            raise SourceError(f"restore to a moment: recovery failed: {outcome.log_tail}")
        _no_gap(chosen)
        to_end = True
        settings = recovery.settings(None, None)


@dataclass
class _DirRecovery:
    """Recovery in a new data directory with the local ``pg_ctl``, the rest of the run staged
    alongside while PostgreSQL replays (pitr_prefetch)."""

    stager: _Stager
    bin_dir: Path
    into: Path
    log: Path
    port: int
    command: str
    prefetcher: pitr_prefetch.Prefetcher

    @property
    def where(self) -> str:
        return f"{self.into} kept; its log: {self.log}"

    def settings(
        self, target_time: str | None, target_lsn: str | None
    ) -> pitr_recover.RecoverySettings:
        return pitr_recover.RecoverySettings(
            self.stager.wal_dir,
            self.port,
            target_time=target_time,
            target_lsn=target_lsn,
            restore_command=self.command,
        )

    def start(self, settings: pitr_recover.RecoverySettings) -> pitr_recover.Outcome:
        pitr_recover.write_settings(self.into, settings)
        return pitr_recover.start_and_wait(
            self.bin_dir, self.into, self.log, timeout=RECOVERY_TIMEOUT_S
        )

    def more(self) -> bool:
        """Staging ran alongside until the run ended or a file failed its checks (recovery
        only runs short once it has): nothing more to stage."""
        self.prefetcher.stop()
        if self.prefetcher.error is not None:
            raise self.prefetcher.error  # recovery needed what failed its checks
        return False


@dataclass
class _VolumeRecovery:
    """Recovery in containers of ``postgres.image`` (pitr_volume). No on-demand staging while
    PostgreSQL replays (pitr_prefetch needs the staged directory shared with the server): a
    start that ended short gets the next 8, 16, 32 ... segments; it resumes from the last
    restartpoint the previous start made (the base's checkpoint when it made none)."""

    chosen: pitr_plan.PitrPlan
    stager: _Stager
    restore: pitr_volume.VolumeRestore
    staged: int
    chunk: int = pitr_prefetch.LOOKAHEAD

    @property
    def where(self) -> str:
        return f"in volume {self.restore.target.volume}"

    def settings(
        self, target_time: str | None, target_lsn: str | None
    ) -> pitr_recover.RecoverySettings:
        wal = Path(pitr_volume.WAL_DIR)
        return pitr_recover.RecoverySettings(wal, 0, target_time=target_time, target_lsn=target_lsn)

    def start(self, settings: pitr_recover.RecoverySettings) -> pitr_recover.Outcome:
        return self.restore.recover(settings.pairs(), timeout=RECOVERY_TIMEOUT_S)

    def more(self) -> bool:
        run = self.chosen.run
        if self.staged >= len(run):
            return False
        more = run[self.staged : self.staged + self.chunk]
        self.staged, self.chunk = self.staged + len(more), self.chunk * 2
        self.stager.fetch(more)
        self.restore.add_wal([self.stager.wal_dir / e.name for e in more])
        _drop(self.stager.wal_dir, more)
        return True


def _no_gap(chosen: pitr_plan.PitrPlan) -> None:
    """The whole run replayed without reaching the target: a gap after it is an error."""
    if chosen.missing is not None:
        last = chosen.run[-1]
        raise NotFound(
            f"restore to {chosen.target.describe()}: WAL segment {chosen.missing} is "
            f"missing (a gap in the WAL from base backup {chosen.base.snapshot_id}); the "
            f"latest reachable moment is {last.sealed} (through segment {last.name})"
        )


def _end_of_wal(chosen: pitr_plan.PitrPlan, result: PitrResult) -> None:
    """Recovered to the end of the WAL held: say where the server's recovery ended (its own
    answer, not the plan's). Ending before the last segment held is an error: PostgreSQL
    did not read WAL the plan holds, so the copy is not what was planned."""
    last = chosen.run[-1]
    last_start = parse_segment(last.name, chosen.segment_size).segno * chosen.segment_size
    reached = result.reached_lsn
    if reached is not None and parse_lsn(reached) < last_start:
        raise NotFound(
            f"restore to {chosen.target.describe()}: PostgreSQL's recovery ended at LSN "
            f"{reached}, before the last WAL segment held ({last.name}) of the unbroken run "
            f"from base backup {chosen.base.snapshot_id}; nothing kept (`drtool wal verify`)"
        )
    where = f"LSN {reached}" if reached is not None else "the server did not say its LSN"
    result.target_reached = False
    log_.warning(
        "the WAL held ends before %s: restored to the end recovery reached (%s)",
        chosen.target.describe(),
        where,
    )
    result.notes.append(
        f"the WAL held ends before {chosen.target.describe()} was reached: restored to the "
        f"end recovery reached ({where}, last transaction {result.reached_time}); the WAL "
        f"held runs through segment {last.name}, sealed {last.sealed}"
    )


def _reached(cfg: Config, port: int, log: Path) -> tuple[str | None, str | None]:
    """The last replayed transaction's commit time and the last replayed WAL position.

    Asked of the restored server as the configured role (the copy has the source's roles);
    if that fails, the commit time PostgreSQL logged at the end of recovery.
    """
    ep = cfg.stack().postgres
    kwargs: dict[str, Any] = {**ep.connect_kwargs(), "host": "127.0.0.1", "port": port}
    try:
        with psycopg.connect(**kwargs, connect_timeout=10, autocommit=True) as conn:
            row = conn.execute(pitr_recover.REACHED_SQL).fetchone()
    except psycopg.Error:
        return pitr_recover.last_transaction_from_log(log), None
    if row is None:
        return None, None
    moment = row[0].isoformat() if row[0] is not None else None
    return moment, row[1]


def _run_into_volume(
    cfg: Config,
    repo: Repo,
    identities: list[str],
    chosen: pitr_plan.PitrPlan,
    options: PitrOptions,
    confirm: Callable[[PitrResult], bool],
    clock: Timer,
) -> PitrResult:
    """``--into-volume``: the same staging and checks; recovery in containers of
    ``postgres.image`` (pitr_volume.py). The volume is created only after the checks."""
    assert options.into_volume is not None
    build = chosen.base.component.source_version
    target = pitr_volume.VolumeTarget.open(options.into_volume, cfg.postgres.image, build)
    try:
        result = _result(chosen, f"docker volume {options.into_volume}", options)
        result.volume, result.image = options.into_volume, target.image
        result.image_id = target.image_id
        if options.dry_run:
            result.hash_checked = _hash_check(repo, chosen)
            return result
        if not options.yes and not confirm(result):
            raise UsageError("restore: not confirmed; nothing changed")
        scratch = Path(cfg.backup.scratch_dir or tempfile.gettempdir())
        wal_bytes = chosen.segment_size * (chosen.stage_count + 1)
        check_free_space(scratch, chosen.base.component.plain_bytes + wal_bytes)
        restore = pitr_volume.VolumeRestore(target)
        phases = Timer()
        with (
            pitr_volume.docker_errors(),
            restore.abandoned_on_failure(),
            _staged(repo, identities, chosen, scratch, ".pitr-staging-", result) as staged,
        ):
            stager, tar, first = staged
            # everything read so far is authentic: only now is a volume created
            restore.populate(
                tar, [stager.wal_dir / e.name for e in first], timeout=RECOVERY_TIMEOUT_S
            )
            tar.unlink()
            _drop(stager.wal_dir, first)
            recovery = _VolumeRecovery(chosen, stager, restore, chosen.stage_count)
            to_end = _recover(chosen, recovery, options, result)
            result.phases["recover"] = round(phases.elapsed() - result.phases["stage"], 3)
            result.reached_time, result.reached_lsn = restore.reached(cfg.stack().postgres)
            if to_end:
                _end_of_wal(chosen, result)
            note = restore.finish()
            if note is not None:
                log_.warning("%s", note)
                result.notes.append(note)
    finally:
        target.client.close()
    result.seconds = round(clock.elapsed(), 3)
    return result


def _drop(wal_dir: Path, entries: list[WalEntry]) -> None:
    """Staged WAL already copied into the volume: the local copy is not needed any more."""
    for e in entries:
        (wal_dir / e.name).unlink(missing_ok=True)
