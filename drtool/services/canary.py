"""``drtool canary write|show`` and the scheduler's canary loop (drtool/stores/canary.py)."""

from __future__ import annotations

import logging
import threading
from datetime import datetime, timedelta

from drtool.config import Config
from drtool.endpoints import StackEndpoints
from drtool.errors import ConfigError, DrtoolError
from drtool.sources import minio as s3_source
from drtool.stores import canary

log = logging.getLogger(__name__)


def protected_buckets(cfg: Config, endpoints: StackEndpoints) -> tuple[str, ...]:
    """The buckets a MinIO backup protects (``["*"]`` expanded, the repository's left out)."""
    store = s3_source.MinioStore(endpoints.minio)
    coverage = s3_source.bucket_coverage(
        store,
        endpoints.buckets,
        repository=s3_source.repository_bucket(
            cfg.repository.url, cfg.repository.endpoint_url, endpoints.minio.endpoint_url
        ),
    )
    return tuple(coverage.protected)


def check_settings(cfg: Config) -> None:
    """Refuse settings that would make the canaries meaningless."""
    if cfg.canary.interval_s <= 0:
        raise ConfigError(f"canary.interval_s: must be > 0 (got {cfg.canary.interval_s})")
    if cfg.canary.keep_hours * 3600 < 2 * cfg.canary.interval_s:
        raise ConfigError(
            f"canary.keep_hours: must keep at least two intervals (got {cfg.canary.keep_hours})"
        )


def write(cfg: Config, *, now: datetime | None = None) -> canary.CanaryWrite:
    """One canary into each store of the configured stack.

    MinIO unreachable (its buckets cannot even be listed) fails only MinIO's canaries: the
    PostgreSQL and Redis ones are still written.
    """
    check_settings(cfg)
    endpoints = cfg.stack()
    try:
        buckets: tuple[str, ...] = protected_buckets(cfg, endpoints)
        unlisted = None
    except DrtoolError as exc:
        buckets, unlisted = (), exc.message
    result = canary.write_canaries(
        endpoints, buckets, now=now, keep=timedelta(hours=cfg.canary.keep_hours)
    )
    if unlisted is not None:
        result.failed["minio"] = unlisted
    return result


def newest(cfg: Config, endpoints: StackEndpoints | None = None) -> dict[str, datetime | None]:
    """The newest canary of each store of ``endpoints`` (default: the configured stack)."""
    endpoints = endpoints or cfg.stack()
    buckets = endpoints.buckets
    if s3_source.ALL_BUCKETS in buckets:  # ["*"]: the buckets a backup protects
        buckets = protected_buckets(cfg, endpoints)
    return canary.newest_canaries(endpoints, buckets)


class CanaryLoop:
    """Canaries every ``interval_s`` in a thread of ``drtool schedule run``.

    Apart from the job queue on purpose: jobs run one at a time, and a canary that waits for a
    long backup would leave a gap that later reads as data loss.
    """

    def __init__(self, cfg: Config) -> None:
        check_settings(cfg)
        self.cfg = cfg
        self.stop = threading.Event()
        self.last: canary.CanaryWrite | None = None
        self._thread = threading.Thread(target=self._run, name="drtool-canary", daemon=True)

    def start(self) -> None:
        """Write the first canary now, then one every interval."""
        self._thread.start()

    def close(self) -> None:
        """Stop after the write in progress, if any."""
        self.stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        failing: set[str] = set()
        while not self.stop.is_set():
            try:
                self.last = result = write(self.cfg)
            except Exception as exc:  # the loop must outlive any one round; named, not raised
                log.warning("canary: the round failed (%s)", type(exc).__name__)
            else:
                for name, why in result.failed.items():
                    if name not in failing:  # once per outage, not every minute
                        log.warning("canary: %s not written: %s", name, why)
                for name in failing - set(result.failed):
                    log.info("canary: %s written again", name)
                failing = set(result.failed)
            self.stop.wait(self.cfg.canary.interval_s)
