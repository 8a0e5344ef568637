"""``drtool schedule``: the long-running job loop of the backup-cron container, and its checks.

How it runs
    One dedicated :class:`schedule.Scheduler` decides *when*; it only queues a job. Jobs run
    **one at a time, in the main thread**: a job never overlaps itself (a trigger for a job
    already queued is dropped and logged) nor another job (backups, prune and verify share the
    repository lock anyway, and the NAS has memory for one at a time). A scheduled trigger is
    delayed by a random jitter of up to ``jitter_s``. A run missed while the container was
    down (the persisted last success is older than the schedule's previous slot) runs once at
    start; an interval job that is not late keeps its rhythm (last success + interval).

Failures
    A failed attempt is retried ``retries`` times with exponential backoff (retry_backoff_s,
    doubled each time, at most an hour) when its cause may pass (a lock held by another run,
    storage or source errors). Any exception is caught and recorded; the loop goes on.

Stopping (SIGTERM or Ctrl-C)
    No new job starts. The running job gets ``grace_s`` (default 30 s) to finish; then the
    alarm signal raises KeyboardInterrupt **in the main thread**, inside the job. That is why
    jobs run in the main thread: a signal interrupts a blocking read (pg_dump's pipe, a
    socket) there, while an exception posted to a worker thread would wait for the read to
    return. The backup unwinds as on Ctrl-C: the multipart upload is aborted, no manifest is
    written, the lock is released, so no partial snapshot is ever listed. A second signal
    aborts at once. The exit code is 0 after a clean stop, 143 after an abort (130 after Ctrl-C).

State
    ``<state_dir>/schedule/<job>.json`` per job (see :mod:`drtool.services.scheduling.jobs`) and
    ``<state_dir>/schedule/_runner.json`` (pid and start time, read by ``schedule health``).
"""

from __future__ import annotations

import contextvars
import functools
import heapq
import json
import logging
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import FrameType
from typing import Any

import schedule

from drtool import liveness
from drtool.config import Config
from drtool.errors import DrtoolError, Interrupted, NotFound, UsageError, interrupted
from drtool.repository.ids import id_time
from drtool.services import repo as repo_svc
from drtool.services.backup import state_dir as backup_state_dir
from drtool.services.scheduling import jobs as jobs_svc
from drtool.services.scheduling.jobs import JobSpec, JobState
from drtool.services.scheduling.metrics import Metrics

log = logging.getLogger(__name__)

DEFAULT_GRACE_S = 30.0
MAX_BACKOFF_S = 3600
TICK_S = 0.25
RUNNER_FILE = "_runner.json"
CURRENT_JOB: contextvars.ContextVar[str | None] = contextvars.ContextVar("job", default=None)


class JobLogFilter(logging.Filter):
    """Adds a ``job`` field to every record logged while a scheduled job runs."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Tag ``record`` with the current job's name (unless it names one already)."""
        job = CURRENT_JOB.get()
        if job and not hasattr(record, "job"):
            record.job = job
        return True


@contextmanager
def job_log_fields() -> Iterator[None]:
    """Tag the records of every root handler with the current job while the block runs."""
    tagger = JobLogFilter()
    handlers = list(logging.getLogger().handlers)
    for handler in handlers:
        handler.addFilter(tagger)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(tagger)


@dataclass
class Outcome:
    """One attempt of one job."""

    job: str
    exit_code: int
    message: str
    seconds: float
    snapshot: str | None = None
    error: BaseException | None = None


def _local(when: datetime) -> datetime:
    """An aware time as the naive local time the ``schedule`` library works in."""
    return when.astimezone().replace(tzinfo=None)


def _aware(naive_local: datetime) -> datetime:
    """A naive local time from ``schedule`` as an aware UTC time."""
    return naive_local.astimezone(UTC)


def add_job(
    scheduler: schedule.Scheduler, spec: JobSpec, callback: Callable[[], Any]
) -> schedule.Job:
    """Register ``spec``'s timing on ``scheduler``, calling ``callback`` when due."""
    if spec.every_s:
        job = scheduler.every(spec.every_s).seconds
    else:
        job = getattr(scheduler.every(), spec.on) if spec.on else scheduler.every().day
        job = job.at(spec.at, spec.timezone or None)
    return job.do(callback).tag(spec.name)


def _next_run(job: schedule.Job) -> datetime:
    if job.next_run is None:  # pragma: no cover - set when the job is registered
        raise UsageError(f"schedule: job {job} has no next run")
    return job.next_run


def first_run(spec: JobSpec, job: schedule.Job, state: JobState, now: datetime) -> datetime | None:
    """When ``spec`` runs first after a start: None means now (missed or never run).

    An interval job keeps its rhythm: last success + interval. A timed job that missed its
    previous slot (last success before it) runs now; otherwise at its next slot.
    """
    last = state.success_time()
    if last is None:
        return None if spec.catch_up else _aware(_next_run(job))
    if spec.every_s:
        due = last + timedelta(seconds=spec.every_s)
        return None if due <= now and spec.catch_up else max(due, now)
    next_slot = _aware(_next_run(job))
    previous_slot = next_slot - timedelta(seconds=spec.period_s)
    return None if last < previous_slot and spec.catch_up else next_slot


class Runner:
    """Runs the jobs of the schedule files against one configuration."""

    def __init__(
        self,
        specs: list[JobSpec],
        cfg: Config,
        *,
        home: Path,
        env: Mapping[str, str],
        metrics: Metrics | None = None,
        grace_s: float = DEFAULT_GRACE_S,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        # the time source of the queue, jitter, retry backoff and job durations; tests pass
        # a fake pair so backoff and jitter are checked without waiting for them
        self._clock = clock
        self._pause = sleep
        jobs_svc.check_repositories(list(specs), cfg)
        self.specs = {s.name: s for s in specs}
        self.cfg = cfg
        self.home = home
        self.env = env
        self.metrics = metrics
        self.grace_s = grace_s
        self.rng = rng or random.Random()
        self.state_dir = backup_state_dir(cfg, home)
        self.scheduler = schedule.Scheduler()
        self.completed: dict[str, int] = dict.fromkeys(self.specs, 0)
        self._queue: list[tuple[float, int, str]] = []
        self._queued: set[str] = set()
        self._seq = 0
        self._running: str | None = None
        self._stopping = False
        self._aborted = False
        self._signal: int | None = None  # the stop signal: SIGTERM exits 143 (ADR 0008)
        self._abort_reason = ""

    # -- the loop ----------------------------------------------------------------------------

    def run(self, until: Callable[[Runner], bool] | None = None) -> None:
        """Run until SIGTERM/SIGINT (or until ``until(self)`` holds, checked between jobs).

        Raises Interrupted when a job had to be aborted.
        """
        if threading.current_thread() is not threading.main_thread():
            raise UsageError("schedule run: must run in the main thread (it handles signals)")
        now = datetime.now(UTC)
        self._write_runner(now)
        for spec in self.specs.values():
            state = jobs_svc.read_state(self.state_dir, spec.name)
            if state.scheduled_since is None:
                state.scheduled_since = now.isoformat(timespec="seconds")
                jobs_svc.write_state(self.state_dir, state)
            self._metrics_from_state(spec, state)
            job = add_job(self.scheduler, spec, functools.partial(self._trigger, spec.name))
            start = first_run(spec, job, state, now)
            if start is None:
                log.info(
                    "job %s: due (last success %s); running it now",
                    spec.name,
                    state.last_success or "never",
                    extra={"job": spec.name},
                )
                self._enqueue(spec.name, delay=0.0)
            else:
                job.next_run = _local(start)
            log.info(
                "job %s: %s, next run %s",
                spec.name,
                spec.describe(),
                "now" if start is None else start.isoformat(timespec="seconds"),
                extra={"job": spec.name},
            )
        previous = {
            sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)
        }
        previous_alarm = signal.signal(signal.SIGALRM, self._on_alarm)
        try:
            with job_log_fields():
                while not self._stopping and not (until is not None and until(self)):
                    self.scheduler.run_pending()
                    name = self._next_due()
                    if name is None:
                        self._pause(TICK_S)
                    else:
                        self._run_with_retries(self.specs[name])
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous_alarm)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if self._aborted:
            raise interrupted(
                self._signal,
                f"schedule: stopped; a job was aborted: {self._abort_reason} "
                "(no partial snapshot is listed)",
            )
        log.info("schedule: stopped")

    def run_once(self, name: str) -> Outcome:
        """Run job ``name`` now, once, without retries or jitter."""
        spec = self.specs.get(name)
        if spec is None:
            raise NotFound(f"job {name}: not in the schedule (known: {', '.join(self.specs)})")
        with job_log_fields():
            return self._attempt(spec)

    def _trigger(self, name: str) -> None:
        spec = self.specs[name]
        delay = self.rng.uniform(0, spec.jitter_s) if spec.jitter_s else 0.0
        self._enqueue(name, delay)

    def _enqueue(self, name: str, delay: float) -> None:
        if name in self._queued:
            log.warning(
                "job %s: still waiting to run; this trigger is skipped", name, extra={"job": name}
            )
            return
        self._seq += 1
        self._queued.add(name)
        heapq.heappush(self._queue, (self._clock() + delay, self._seq, name))

    def _next_due(self) -> str | None:
        if not self._queue or self._queue[0][0] > self._clock():
            return None
        _, _, name = heapq.heappop(self._queue)
        self._queued.discard(name)
        return name

    def _sleep(self, seconds: float) -> None:
        deadline = self._clock() + seconds
        while not self._stopping and self._clock() < deadline:
            self._pause(min(TICK_S, max(0.0, deadline - self._clock())))

    def _run_with_retries(self, spec: JobSpec) -> Outcome:
        """Retry what may pass next time (storage, locks) with backoff; never a config error.

        A stop request ends the retries, so SIGTERM never waits out a backoff.
        """
        attempt = 0
        while True:
            outcome = self._attempt(spec)
            retryable = isinstance(outcome.error, jobs_svc.RETRYABLE)
            if outcome.exit_code == 0 or self._stopping or attempt >= spec.retries or not retryable:
                self.completed[spec.name] += 1
                return outcome
            attempt += 1
            delay = min(spec.retry_backoff_s * 2 ** (attempt - 1), MAX_BACKOFF_S)
            log.warning(
                "job %s: attempt %d failed; retrying in %d s (%d of %d)",
                spec.name,
                attempt,
                delay,
                attempt,
                spec.retries,
                extra={"job": spec.name},
            )
            self._sleep(delay)
            if self._stopping:
                self.completed[spec.name] += 1
                return outcome

    # -- one attempt -------------------------------------------------------------------------

    def _attempt(self, spec: JobSpec) -> Outcome:
        """Run the job once with its name in every log line; the state is written either way.

        Errors are caught and recorded, not raised: one job failing never stops the others.
        """
        token = CURRENT_JOB.set(spec.name)
        started = datetime.now(UTC)
        t0 = self._clock()
        state = jobs_svc.read_state(self.state_dir, spec.name)
        state.last_attempt = started.isoformat(timespec="seconds")
        log.info("job %s started", spec.name, extra={"event": "job_started"})
        error: BaseException | None = None
        result: jobs_svc.JobResult | None = None
        try:
            self._running = spec.name
            try:
                result = jobs_svc.execute(spec, self.cfg, home=self.home, env=self.env)
            finally:
                self._running = None
                signal.setitimer(signal.ITIMER_REAL, 0)
        except KeyboardInterrupt:
            self._stopping = True
            error = interrupted(
                self._signal, f"job {spec.name}: interrupted; nothing was committed"
            )
        except Exception as exc:  # one job's failure never stops the loop
            error = exc
        finally:
            CURRENT_JOB.reset(token)
        seconds = self._clock() - t0
        outcome = self._record(spec, state, started, seconds, result, error)
        if result is not None:
            jobs_svc.send_heartbeat(spec)
        return outcome

    def _record(
        self,
        spec: JobSpec,
        state: JobState,
        started: datetime,
        seconds: float,
        result: jobs_svc.JobResult | None,
        error: BaseException | None,
    ) -> Outcome:
        """Persist the attempt (state file first), then log and export it.

        The state file is what `schedule health` and the metrics after a restart read, so it
        is written before anything that could fail on the way out.
        """
        state.duration_s = round(seconds, 3)
        extra: dict[str, Any] = {"job": spec.name, "duration_s": state.duration_s}
        if result is not None:
            state.last_success = started.isoformat(timespec="seconds")
            state.exit_code, state.message, state.snapshot = 0, result.message, result.snapshot
            state.failures_in_a_row = 0
            if result.drill_passed is not None:
                state.drill_passed = result.drill_passed
                state.drill_rto_s, state.drill_rpo_s = result.drill_rto_s, result.drill_rpo_s
            jobs_svc.write_state(self.state_dir, state)
            log.info(
                "job %s succeeded: %s",
                spec.name,
                result.message,
                extra={
                    **extra,
                    "event": "job_finished",
                    "snapshot": result.snapshot,
                    "exit_code": 0,
                },
            )
            self._metrics_success(spec, started, seconds, result)
            return Outcome(spec.name, 0, result.message, seconds, result.snapshot)
        assert error is not None
        code = error.exit_code if isinstance(error, DrtoolError) else 1
        message = (
            str(error) if isinstance(error, DrtoolError) else f"{type(error).__name__}: {error}"
        )
        cause = type(error).__name__
        state.exit_code, state.message = code, message
        state.failures_in_a_row += 1
        # a drill job that failed did not prove the backup restores; one stopped by a signal
        # reached no verdict and keeps the previous one
        drill_verdict = spec.kind == "drill" and not isinstance(error, Interrupted)
        if drill_verdict:
            state.drill_passed = False
        jobs_svc.write_state(self.state_dir, state)
        log.error(
            "job %s failed (exit %d): %s",
            spec.name,
            code,
            message,
            extra={**extra, "event": "job_finished", "exit_code": code, "cause": cause},
            exc_info=not isinstance(error, DrtoolError),
        )
        if self.metrics is not None:
            self.metrics.record_failure(spec.name, cause, seconds)
            if drill_verdict:
                self.metrics.record_drill(spec.name, False)
        return Outcome(spec.name, code, message, seconds, None, error)

    def _metrics_success(
        self, spec: JobSpec, started: datetime, seconds: float, result: jobs_svc.JobResult
    ) -> None:
        """Export a success: its time, the next deadline, sizes, and a drill's verdict.

        The deadline series moves with each success so the alert rule needs no job list.
        """
        if self.metrics is None:
            return
        self.metrics.record_success(spec.name, started, seconds)
        self.metrics.record_deadline(
            spec.name, spec.kind, started + timedelta(seconds=spec.threshold_s)
        )
        self.metrics.record_sizes(result.plain_bytes, result.stored_bytes)
        self.metrics.record_figures(result.figures)
        if result.drill_passed is not None:
            self.metrics.record_drill(
                spec.name, result.drill_passed, result.drill_rto_s, result.drill_rpo_s
            )
        if result.copy is not None:
            c = result.copy
            self.metrics.record_copy(
                c.repository,
                started,
                newest=id_time(c.newest) if c.newest else None,
                snapshots=c.snapshots,
                objects=c.objects,
                size=c.bytes,
            )
        if spec.kind not in ("drill", "copy"):
            try:
                records = repo_svc.list_records(self.cfg)
            except DrtoolError as exc:
                log.warning("could not count snapshots for the metrics: %s", exc)
                return
            self.metrics.record_snapshots("VALID" if r.valid else "INVALID" for r in records)

    def _metrics_from_state(self, spec: JobSpec, state: JobState) -> None:
        """What the persisted state knows, exported at start (nothing is guessed: a job that
        never ran a drill has no drill series)."""
        if self.metrics is None:
            return
        last = state.success_time()
        if last is not None:
            self.metrics.last_success.labels(spec.name).set(last.timestamp())
            if spec.kind == "copy":
                newest = state.snapshot
                self.metrics.record_copy(
                    spec.repository, last, newest=id_time(newest) if newest else None
                )
        since = last or _parse_time(state.scheduled_since) or datetime.now(UTC)
        self.metrics.record_deadline(
            spec.name, spec.kind, since + timedelta(seconds=spec.threshold_s)
        )
        if spec.kind == "drill" and state.drill_passed is not None:
            self.metrics.record_drill(
                spec.name,
                state.drill_passed,
                state.drill_rto_s if state.drill_passed else None,
                state.drill_rpo_s if state.drill_passed else None,
            )

    # -- signals -----------------------------------------------------------------------------

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        running = self._running
        self._signal = self._signal or signum
        if self._stopping and running:
            self._abort(running, f"a second {signal.Signals(signum).name} arrived")
        self._stopping = True
        if running:
            log.warning(
                "%s: letting job %s finish (up to %g s), then stopping",
                signal.Signals(signum).name,
                running,
                self.grace_s,
            )
            signal.setitimer(signal.ITIMER_REAL, max(self.grace_s, 0.001))
        else:
            log.info("%s: stopping", signal.Signals(signum).name)

    def _on_alarm(self, signum: int, frame: FrameType | None) -> None:
        running = self._running
        if running:
            self._abort(running, f"the {self.grace_s:g} s grace period is over")

    def _abort(self, job: str, why: str) -> None:
        self._aborted = True
        self._abort_reason = why
        self._running = None
        log.error("aborting job %s: %s", job, why)
        raise KeyboardInterrupt

    def _write_runner(self, now: datetime) -> None:
        path = self.state_dir / "schedule" / RUNNER_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        owner = liveness.current()  # so that health can tell whether this scheduler still runs
        path.write_text(
            json.dumps(
                {
                    "pid": owner.pid,
                    "started": now.isoformat(timespec="seconds"),
                    "host": owner.host,
                    "boot_id": owner.boot_id,
                    "container": owner.container,
                    "pid_start": owner.started,
                }
            )
        )


def _parse_time(text: str | None) -> datetime | None:
    try:
        return datetime.fromisoformat(text) if text else None
    except ValueError:
        return None


# -- list and health -------------------------------------------------------------------------


@dataclass(frozen=True)
class JobRow:
    """One job for ``schedule list`` and ``schedule health``."""

    job: str
    kind: str
    schedule: str
    next_run: str
    last_attempt: str | None
    last_success: str | None
    exit_code: int | None
    message: str
    healthy: bool
    why: str


def _runner_started(state_dir: Path) -> tuple[datetime | None, str]:
    """When the scheduler started, if it still runs; else (None, why none runs, or "").

    After ``kill -9`` the runner file stays; its pid (and the pid's start time, boot id and
    container: :mod:`drtool.liveness`) tell that its process is gone, so "the scheduler
    started recently" is not said for a scheduler that no longer runs.
    """
    try:
        data = json.loads((state_dir / "schedule" / RUNNER_FILE).read_text())
        started = datetime.fromisoformat(data["started"])
        owner = liveness.Owner(
            str(data.get("host", "")),
            str(data.get("boot_id", "")),
            str(data.get("container", "")),
            int(data["pid"]),
            data.get("pid_start"),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None, ""
    alive, why = liveness.process_verdict(owner)
    if alive is False:
        return None, f"the scheduler started {data['started']} no longer runs ({why})"
    return started, ""


def _health(
    spec: JobSpec, state: JobState, runner: tuple[datetime | None, str], now: datetime
) -> tuple[bool, str]:
    """Healthy when the last success is younger than the job's threshold.

    A job that never succeeded is given the threshold from the scheduler's start, but only
    while that scheduler still runs: after a kill -9 "started recently" would be a lie.
    """
    threshold = timedelta(seconds=spec.threshold_s)
    last = state.success_time()
    runner_started, gone = runner
    if last is None:
        if runner_started is not None and now - runner_started < threshold:
            return True, "no success yet; the scheduler started recently"
        if gone:
            return False, f"never succeeded, and {gone}"
        return False, f"never succeeded (threshold {jobs_svc.human_seconds(spec.threshold_s)})"
    age = now - last
    if age > threshold:
        return False, (
            f"last success {last.isoformat(timespec='seconds')} is {_ago(age)} old, "
            f"older than {jobs_svc.human_seconds(spec.threshold_s)}; last exit {state.exit_code}: "
            f"{state.message}"
        )
    return True, f"last success {_ago(age)} ago"


def _ago(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds / 3600:.1f}h"


def job_rows(
    specs: list[JobSpec], cfg: Config, home: Path, now: datetime | None = None
) -> list[JobRow]:
    """Every job with its next run, last result and health, as the runner would see them."""
    now = now or datetime.now(UTC)
    state_dir = backup_state_dir(cfg, home)
    started = _runner_started(state_dir)
    scheduler = schedule.Scheduler()
    rows = []
    for spec in specs:
        state = jobs_svc.read_state(state_dir, spec.name)
        start = first_run(spec, add_job(scheduler, spec, lambda: None), state, now)
        healthy, why = _health(spec, state, started, now)
        rows.append(
            JobRow(
                job=spec.name,
                kind=spec.kind,
                schedule=spec.describe(),
                next_run="now (due)"
                if start is None
                else start.astimezone().isoformat(timespec="minutes"),
                last_attempt=state.last_attempt,
                last_success=state.last_success,
                exit_code=state.exit_code,
                message=state.message,
                healthy=healthy,
                why=why,
            )
        )
    return rows
