"""Prometheus metrics of the scheduler and of the WAL streamer, each on a dedicated registry
(no process-wide globals).

``drtool schedule run`` serves :class:`Metrics` over HTTP (default port 9465), ``drtool wal
stream`` serves :class:`WalMetrics` (default port 9467); monitoring/ holds the alert rules and
the Grafana dashboard that read them.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from drtool.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_PORT = 9465
WAL_DEFAULT_PORT = 9467


@dataclass
class Metrics:
    """Every drtool metric, registered on its own :class:`CollectorRegistry`."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.last_success = Gauge(
            "drtool_last_success_timestamp_seconds",
            "Unix time of the job's last successful (committed and verified) run.",
            ["job"],
            registry=r,
        )
        self.duration = Gauge(
            "drtool_job_duration_seconds", "Duration of the job's last run.", ["job"], registry=r
        )
        self.plain_bytes = Gauge(
            "drtool_backup_plain_bytes",
            "Plaintext bytes of the component in the newest snapshot.",
            ["component"],
            registry=r,
        )
        self.stored_bytes = Gauge(
            "drtool_backup_stored_bytes",
            "Stored (compressed, encrypted) bytes of the component in the newest snapshot.",
            ["component"],
            registry=r,
        )
        self._unprotected: Gauge | None = None
        self.snapshots = Gauge(
            "drtool_snapshots", "Snapshots in the repository by status.", ["status"], registry=r
        )
        self.failures = Counter(
            "drtool_job_failures",
            "Failed job attempts by cause (the error class name).",
            ["job", "cause"],
            registry=r,
        )
        # Series that mean "the last X was ..." carry the job and exist only once X happened:
        # an unlabelled Gauge would export 0 from start, i.e. "the last drill failed" on every
        # process, including backup-cron, which never runs one.
        self.drill_result = Gauge(
            "drtool_drill_result",
            "1 when the job's last restore drill passed, 0 when it failed (absent: none yet).",
            ["job"],
            registry=r,
        )
        self.drill_rto = Gauge(
            "drtool_drill_rto_seconds",
            "Restore time of the component in the job's last passing drill.",
            ["job", "component"],
            registry=r,
        )
        self.drill_rpo = Gauge(
            "drtool_drill_rpo_seconds",
            "Age of the drilled snapshot when the job's last passing drill ran.",
            ["job"],
            registry=r,
        )
        # per destination repository of `drtool copy` (ADR 0022); labelled, so absent until a
        # copy to that repository succeeded (ADR 0012)
        self.copy_last_success = Gauge(
            "drtool_copy_last_success_timestamp_seconds",
            "Unix time of the last successful copy into the repository.",
            ["repository"],
            registry=r,
        )
        self.copy_newest = Gauge(
            "drtool_copy_newest_snapshot_timestamp_seconds",
            "Start time of the newest snapshot the repository holds, as of its last copy "
            "(the copy's recovery point).",
            ["repository"],
            registry=r,
        )
        self.copy_snapshots = Gauge(
            "drtool_copy_snapshots_copied",
            "Snapshots the last successful copy committed into the repository.",
            ["repository"],
            registry=r,
        )
        self.copy_objects = Gauge(
            "drtool_copy_uploaded_objects",
            "Objects the last successful copy uploaded into the repository.",
            ["repository"],
            registry=r,
        )
        self.copy_bytes = Gauge(
            "drtool_copy_uploaded_bytes",
            "Bytes the last successful copy uploaded into the repository.",
            ["repository"],
            registry=r,
        )
        self.deadline = Gauge(
            "drtool_job_deadline_timestamp_seconds",
            "Unix time by which the job must succeed (its last success, or since when it has "
            "been scheduled, plus its max_age); exported from start for every scheduled job.",
            ["job", "kind"],
            registry=r,
        )

    def record_success(self, job: str, when: datetime, seconds: float) -> None:
        """A run of ``job`` succeeded at ``when`` after ``seconds``."""
        self.last_success.labels(job).set(when.timestamp())
        self.duration.labels(job).set(seconds)

    def record_failure(self, job: str, cause: str, seconds: float) -> None:
        """An attempt of ``job`` failed with an error of class ``cause``."""
        self.failures.labels(job, cause).inc()
        self.duration.labels(job).set(seconds)

    def record_sizes(self, plain: dict[str, int], stored: dict[str, int]) -> None:
        """The per-component sizes of the snapshot just committed."""
        for component, n in plain.items():
            self.plain_bytes.labels(component).set(n)
        for component, n in stored.items():
            self.stored_bytes.labels(component).set(n)

    def record_figures(self, figures: dict[str, int]) -> None:
        """A backup's counters: ``drtool_unprotected_buckets`` for the MinIO buckets the
        credential can see that no snapshot protects (absent until a MinIO backup ran)."""
        if "unprotected_buckets" not in figures:
            return
        if self._unprotected is None:  # created on first use: 0 before a check would be a claim
            self._unprotected = Gauge(
                "drtool_unprotected_buckets",
                "MinIO buckets the credential can see that minio.buckets leaves out "
                "(as of the last backup of MinIO).",
                registry=self.registry,
            )
        self._unprotected.set(figures["unprotected_buckets"])

    def record_snapshots(self, statuses: Iterable[str]) -> None:
        """The repository's snapshots counted by status (VALID, INVALID)."""
        counts = {"VALID": 0, "INVALID": 0}
        for status in statuses:
            counts[status] = counts.get(status, 0) + 1
        for status, n in counts.items():
            self.snapshots.labels(status).set(n)

    def record_copy(
        self,
        repository: str,
        when: datetime,
        *,
        newest: datetime | None = None,
        snapshots: int | None = None,
        objects: int | None = None,
        size: int | None = None,
    ) -> None:
        """A copy into ``repository`` succeeded at ``when``; its figures when known (not
        after a restart: only the time is persisted)."""
        self.copy_last_success.labels(repository).set(when.timestamp())
        if newest is not None:
            self.copy_newest.labels(repository).set(newest.timestamp())
        for gauge, value in (
            (self.copy_snapshots, snapshots),
            (self.copy_objects, objects),
            (self.copy_bytes, size),
        ):
            if value is not None:
                gauge.labels(repository).set(value)

    def record_deadline(self, job: str, kind: str, when: datetime) -> None:
        """``job`` (of ``kind``) must next succeed by ``when``."""
        self.deadline.labels(job, kind).set(when.timestamp())

    def record_drill(
        self,
        job: str,
        passed: bool,
        rto: dict[str, float] | None = None,
        rpo: float | None = None,
    ) -> None:
        """Job ``job``'s last drill outcome and, when it passed, its RTO per component and RPO."""
        self.drill_result.labels(job).set(1 if passed else 0)
        for component, seconds in (rto or {}).items():
            self.drill_rto.labels(job, component).set(seconds)
        if rpo is not None:
            self.drill_rpo.labels(job).set(rpo)


@dataclass
class WalMetrics:
    """The WAL streamer's metrics, every series labelled with the replication ``slot``.

    A labelled gauge exports nothing until a value is set, so each series appears only once
    what it describes happened (ADR 0012): no ``last segment`` before a segment is stored, no
    window before a base backup is covered by unbroken WAL, no lag before the server's WAL
    position was read, no slot loss before one.
    """

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.last_segment = Gauge(
            "drtool_wal_last_segment_timestamp_seconds",
            "Unix time the newest WAL segment in the repository was sealed (committed to the "
            "WAL index).",
            ["slot"],
            registry=r,
        )
        self.lag = Gauge(
            "drtool_wal_lag_seconds",
            "Age of the oldest WAL the server wrote that is not yet in the repository (0: all "
            "of it is stored).",
            ["slot"],
            registry=r,
        )
        self.window_start = Gauge(
            "drtool_pitr_window_start_timestamp_seconds",
            "Earliest moment a point-in-time restore can reach: the end of the oldest base "
            "backup followed by unbroken WAL up to the newest segment.",
            ["slot"],
            registry=r,
        )
        self.window_end = Gauge(
            "drtool_pitr_window_end_timestamp_seconds",
            "Latest moment a point-in-time restore can reach (the newest segment of that "
            "unbroken WAL was sealed then; its WAL was written before).",
            ["slot"],
            registry=r,
        )
        self.window_policy = Gauge(
            "drtool_pitr_window_policy_seconds",
            "How far back point-in-time restore should reach (wal.window_policy_s).",
            ["slot"],
            registry=r,
        )
        self.spool_bytes = Gauge(
            "drtool_wal_spool_bytes",
            "Bytes in the local WAL spool (received, not yet confirmed stored).",
            ["slot"],
            registry=r,
        )
        self.spool_max_bytes = Gauge(
            "drtool_wal_spool_max_bytes",
            "The spool's bound (wal.spool_max_bytes): past it the receiver pauses.",
            ["slot"],
            registry=r,
        )
        self.slot_lost = Gauge(
            "drtool_wal_slot_lost_timestamp_seconds",
            "Unix time the streamer last found its replication slot missing although WAL had "
            "been streamed through it (WAL written meanwhile may be lost).",
            ["slot"],
            registry=r,
        )


class MetricsServer:
    """The HTTP endpoint serving one metrics registry, stopped by :meth:`close`."""

    def __init__(self, metrics: Metrics | WalMetrics, address: str, port: int) -> None:
        try:
            server, thread = start_http_server(port, address, registry=metrics.registry)
        except OSError as exc:
            raise ConfigError(
                f"metrics: cannot listen on {address}:{port} ({exc.strerror or exc})"
            ) from None
        self._server: WSGIServer = server
        self._thread: threading.Thread = thread
        self.port = server.server_port
        log.info("metrics on http://%s:%d/metrics", address, self.port)

    def close(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
