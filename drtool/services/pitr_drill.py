"""Physical-chain drills: ``snapshot = "pitr:lsn-of-latest"`` or ``"pitr:random-within:7d"``.

``pitr:lsn-of-latest`` restores PostgreSQL from a base backup plus the streamed WAL to the
``consistent_lsn`` recorded with the newest logical snapshot (ADR 0018) and compares the
copy's fingerprints with that snapshot's: the physical and the logical chains check each
other, row for row. Equality is exact by construction (the LSN is the consistent point of the
slot whose snapshot the dump used), so any difference is a defect of one of the chains, not
noise. ``pitr:random-within:W`` restores to a random moment of the window (at most ``W``
back) and checks the copy as the app would read it: it starts, its latest messages read, and
its newest canary says how much the copy lost before the moment (ADR 0026).

Both restore into a new data directory under the drill's work directory, on a free loopback
port (``run_pitr``: everything staged and checked before the directory is created), and stop
and remove the copy afterwards whatever happens.
"""

from __future__ import annotations

import logging
import random
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import psycopg

from drtool.config import Config
from drtool.drills.definition import moment_of
from drtool.drills.report import DrillReport
from drtool.endpoints import StackEndpoints
from drtool.errors import DrtoolError, NotFound
from drtool.repository import catalog
from drtool.repository.access import identities_of, open_repo
from drtool.runtime.binaries import pg_bin_dir
from drtool.services.restore import moment as moment_plan
from drtool.services.restore import pitr_plan, pitr_recover
from drtool.services.restore.pitr import PitrOptions, PitrResult, run_pitr
from drtool.services.restore.stack_at import moment_endpoints
from drtool.sources.pg_fingerprint import compare, compute_fingerprints
from drtool.stores import canary, checks
from drtool.stores.postgres import restore as pg_restore
from drtool.timing import Timer
from drtool.wal.index import load_index

log = logging.getLogger(__name__)

LSN_OF_LATEST = "pitr:lsn-of-latest"
RANDOM_PREFIX = "pitr:random-within:"


@dataclass(frozen=True)
class PitrChoice:
    """What a ``pitr:`` drill restores to."""

    newest: datetime  # the logical snapshot's time, or the window's end
    lsn: str | None = None
    at: datetime | None = None
    snapshot_id: str = ""  # lsn-of-latest: the logical snapshot whose LSN it is
    window: str = ""


def is_pitr(choice: str) -> bool:
    """Whether a drill's snapshot choice is a point-in-time one."""
    return choice.startswith("pitr:")


def choose(
    cfg: Config,
    choice: str,
    window: timedelta | None,
    now: datetime,
    components: tuple[str, ...] = ("postgres",),
) -> PitrChoice:
    """The LSN of the newest logical snapshot recording one, or a random moment of the window.

    For the whole stack (``components`` beyond postgres) the random moment is drawn from the
    part of the window where Redis and the buckets have a copy too (ADR 0027): a drill of
    the window, not of the days before the first snapshot.

    NotFound when there is nothing to drill (no snapshot with a consistent LSN; no base
    backup followed by WAL): a drill that cannot prove what it should fails with a report.
    """
    repo = open_repo(cfg)
    records = catalog.list_snapshots(repo.storage, repo.verify_keys, repo.info.repo_id)
    if choice == LSN_OF_LATEST:
        for record in reversed(records):
            comp = record.manifest.component("postgres") if record.manifest else None
            if record.valid and comp is not None and comp.details.get("consistent_lsn"):
                return PitrChoice(
                    record.time,
                    lsn=str(comp.details["consistent_lsn"]),
                    snapshot_id=record.snapshot_id,
                )
        raise NotFound(
            "pitr:lsn-of-latest: no valid snapshot records a consistent LSN (the source needs "
            "wal_level = logical and a REPLICATION role: ADR 0018)"
        )
    at = moment_of(choice)
    if at is not None:  # an explicit moment: the planner says whether the window holds it
        return PitrChoice(at, at=at)
    index = load_index(repo.storage, repo.verify_keys, repo.info.repo_id)
    size = index.segment_size
    bases = pitr_plan.bases_of(records, size) if size else []
    if not bases or size is None:
        raise NotFound("pitr:random-within: no base backup with WAL in the repository")
    run, _ = pitr_plan.run_from(index, bases[-1], size)
    end = datetime.fromisoformat(run[-1].sealed) if run else bases[-1].finished
    start = bases[0].finished
    others = moment_plan.earliest_reachable(records, components)
    if others is not None:
        start = max(start, others)
    if window is not None:
        start = max(start, now - window)
    if end <= start:
        raise NotFound(
            f"pitr:random-within: the window {pitr_plan.window_text(bases, index, size)} holds "
            "no moment within the drill's range"
        )
    moment = start + (end - start) * random.SystemRandom().random()
    return PitrChoice(end, at=moment, window=pitr_plan.window_text(bases, index, size))


def run_pitr_drill(cfg: Config, home: Path, choice: PitrChoice, report: DrillReport) -> None:
    """Restore to the choice, check the copy, fill ``report`` (checks, RTO, measured RPO)."""
    work = work_dir(home, report.drill_id)
    result: PitrResult | None = None
    clock = Timer()
    try:
        options = PitrOptions(at=choice.at, lsn=choice.lsn, into=work / "data", yes=True)
        result = run_pitr(cfg, options=options, confirm=lambda r: True)
        report.restore_s = report.phases_s["restore"] = round(clock.elapsed(), 3)
        report.rto_s["postgres"] = report.restore_s
        endpoints = moment_endpoints(cfg, home, "", result.port)
        report.checks.append(
            checks.CheckResult(
                "restored to the moment",
                True,
                f"{result.target}: reached {result.reached_time or '?'} "
                f"(LSN {result.reached_lsn or '?'}) from base {result.base_snapshot}",
            )
        )
        if choice.lsn is not None:
            bin_dir = Path(result.pg_ctl).parent if result.pg_ctl else None
            report.checks.append(_fingerprints_equal(cfg, choice, endpoints, bin_dir))
        else:
            report.checks.append(_messages_readable(endpoints))
            assert choice.at is not None
            newest = canary.newest_postgres(endpoints)
            report.measured_rpo_s = canary.measured_rpo(choice.at, {"postgres": newest})
            report.checks.append(_nothing_past_the_moment(report.measured_rpo_s))
    finally:
        stop_copy(work / "data", result)
        shutil.rmtree(work, ignore_errors=True)
    report.passed = all(c.passed for c in report.checks)


def _nothing_past_the_moment(measured: dict[str, float | None]) -> checks.CheckResult:
    """The copy holds no canary written after the moment: recovery stopped where it was told.

    Without a canary (canaries off) nothing can be measured and the check says so, passed:
    the measured RPO stays empty rather than 0.
    """
    past = canary.past_the_moment(measured)
    value = measured.get("postgres")
    if past:
        detail = "; ".join(past)
    elif value is None:
        detail = "no canary in the copy: not measured"
    else:
        detail = f"postgres: its newest canary is {value:.1f} s before the moment"
    return checks.CheckResult(
        "nothing past the moment", not past, detail, {"measured_rpo_s": value}
    )


def work_dir(home: Path, drill_id: str) -> Path:
    """A new directory under ``home`` for the copy's data directory (``work/data``), which
    the postgres user can enter: the copy's server runs as that user when we are root."""
    work = Path(tempfile.mkdtemp(prefix=f"pitr-{drill_id}-", dir=home))
    work.chmod(0o711)
    return work


def stop_copy(data: Path, result: PitrResult | None) -> None:
    """Stop the restored copy if a server runs on it, whatever stopped the drill (a deadline
    can strike while recovery runs, before ``run_pitr`` returned its result)."""
    if not (data / "postmaster.pid").exists():
        return
    if result is not None and result.pg_ctl:
        bin_dir = Path(result.pg_ctl).parent
    else:
        try:
            bin_dir = pg_bin_dir(major=int((data / "PG_VERSION").read_text().strip()))
        except (OSError, ValueError, DrtoolError):
            log.error("pitr drill: cannot find pg_ctl to stop the copy in %s", data)
            return
    pitr_recover.stop(bin_dir, data)


def _messages_readable(endpoints: StackEndpoints) -> checks.CheckResult:
    """The copy answers the app's queries: rooms, messages, the newest message of the busiest
    room. PostgreSQL only: the attachments of a moment are the whole-stack restore's part."""
    with psycopg.connect(**endpoints.postgres.connect_kwargs(), connect_timeout=10) as conn:
        rooms = conn.execute("SELECT count(*) FROM chat_rooms").fetchone()
        messages = conn.execute("SELECT count(*), max(created_at) FROM messages").fetchone()
    n_rooms = int(rooms[0]) if rooms else 0
    n_messages, newest = (int(messages[0]), messages[1]) if messages else (0, None)
    return checks.CheckResult(
        "messages readable at the moment",
        n_messages > 0,
        f"{n_rooms} rooms, {n_messages} messages, the newest written {newest}",
        {"rooms": n_rooms, "messages": n_messages},
    )


def _fingerprints_equal(
    cfg: Config, choice: PitrChoice, endpoints: StackEndpoints, bin_dir: Path | None
) -> checks.CheckResult:
    """The copy at the logical snapshot's LSN against that snapshot's fingerprints.

    Format 5 (COPY text in pg_dump's order): the copy at that LSN holds the very heap pages
    pg_dump read in the snapshot (a row version never moves within a heap without a rewrite,
    which pg_dump's lock excludes, and the versions written after the LSN are invisible to
    the snapshot), so its COPY from the first block gives the same text. Formats 1-4: the
    row-hash scan, as before.
    """
    repo = open_repo(cfg)
    record = catalog.find(repo.storage, repo.verify_keys, repo.info.repo_id, choice.snapshot_id)
    assert record.manifest is not None
    comp = record.manifest.component("postgres")
    assert comp is not None
    expected = pg_restore.load(repo, record.manifest, comp, identities_of(cfg)).fingerprints
    if expected.streamed:
        pg = endpoints.postgres
        actual = pg_restore.fingerprints_of(pg, pg.dbname, expected, workers=2, pg_bin_dir=bin_dir)
    else:
        with psycopg.connect(**endpoints.postgres.connect_kwargs(), connect_timeout=10) as conn:
            actual = compute_fingerprints(conn)
    problems = compare(expected, actual)
    tables = len(expected.tables)
    rows = sum(fp.rows for fp in expected.tables.values())
    name = f"physical chain at {choice.snapshot_id}'s LSN equals its fingerprints"
    if problems:
        return checks.CheckResult(
            name,
            False,
            f"{len(problems)} difference(s) at LSN {choice.lsn}: {problems[0]}",
            examples=problems[: checks.MAX_EXAMPLES],
        )
    return checks.CheckResult(name, True, f"{tables} tables, {rows} rows equal at LSN {choice.lsn}")
