"""The one frozen configuration object, built once and passed explicitly.

Precedence: command-line flag > ``DRTOOL_<SECTION>_<FIELD>`` environment variable > TOML file >
default. Secrets are never literal in the TOML file: a secret field ``password`` is read from
``DRTOOL_POSTGRES_PASSWORD``, or from a file named by ``password_file`` (TOML) or
``DRTOOL_POSTGRES_PASSWORD_FILE`` (env). Errors read ``field: problem (got value)``.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal, get_type_hints

from drtool.endpoints import PostgresEndpoint, RedisEndpoint, S3Endpoint, StackEndpoints
from drtool.errors import ConfigError
from drtool.typed_load import check_keys, coerce

SECRET = {"secret": True}
#: The name of ``[repository]``, the one backups write to, among ``[repositories.NAME]``.
PRIMARY = "primary"
REPO_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,40}$")


def default_home() -> Path:
    """Where drtool keeps local state (stacks, the demo repository, keys) by default.

    As root it is /var/lib/drtool: a local PostgreSQL runs as the ``postgres`` user, which
    cannot enter /root.
    """
    if os.geteuid() == 0:
        return Path("/var/lib/drtool")
    xdg = os.environ.get("XDG_DATA_HOME")
    return Path(xdg) / "drtool" if xdg else Path.home() / ".local" / "share" / "drtool"


@dataclass(frozen=True)
class RepositoryConfig:
    """Where snapshots are stored and how to reach it."""

    url: str = ""
    endpoint_url: str = ""
    region: str = "us-east-1"
    access_key: str | None = field(default=None, repr=False, metadata=SECRET)
    secret_key: str | None = field(default=None, repr=False, metadata=SECRET)
    path_style: bool = True
    part_size_mb: int = 8  # x (2 in flight + 1) is the upload buffer; S3 minimum is 5
    object_lock_mode: str = ""
    retain_days: int = 0


@dataclass(frozen=True)
class KeysConfig:
    """Recipients and signing key (backup side); identity and verify key (restore side)."""

    recipients: tuple[str, ...] = ()
    signing_key_file: str = ""
    verify_key: str = ""
    identity_file: str = ""
    identity_passphrase: str | None = field(default=None, repr=False, metadata=SECRET)
    # `drtool doctor` warns when a recipient was not proven by a drill for this long (ADR 0023)
    prove_within_days: int = 30


#: backup.minio_workers: its bounds (each worker holds a MinIO and a repository connection)
MINIO_WORKERS = (1, 64)


@dataclass(frozen=True)
class BackupConfig:
    """How backups are produced."""

    components: tuple[str, ...] = ("postgres", "redis", "minio")
    compression_level: int = 3
    compression_threads: int = 0
    # MinIO objects read, sealed and uploaded at once by a backup (ADR 0035: on 2 cores the
    # requests' round trips, not the CPU, idle 4; the upload buffers share one 24 MiB budget)
    minio_workers: int = 8  # MINIO_WORKERS bounds it (checked at load)
    scratch_dir: str = ""
    state_dir: str = ""
    timeout_s: int = 6 * 3600


@dataclass(frozen=True)
class WalConfig:
    """``drtool wal stream``: continuous WAL capture (docs/decisions/0015-wal-streaming.md)."""

    spool_dir: str = ""  # default: <backup.state_dir or home/state>/wal-spool
    slot: str = "drtool_wal"
    flush_interval: float = 30.0  # seconds: close the segment (pg_switch_wal) when WAL advanced
    spool_max_bytes: int = 4 << 30  # past this the receiver pauses (the slot retains the WAL)
    restart_max_s: float = 60.0  # longest wait between pg_receivewal restarts
    window_policy_s: float = 7 * 86400.0  # how far back PITR should reach (the alert's bound)
    # streaming from a standby (ADR 0030): its primary, connected to only for pg_switch_wal()
    # (same role and password as [postgres]: a physical standby has the primary's roles);
    # "" = segments close only when the primary switches by itself (archive_timeout)
    primary_host: str = ""
    primary_port: int = 5432


@dataclass(frozen=True)
class CanaryConfig:
    """Canaries: a timed write to each store, so a restore measures what it lost.

    Written by ``drtool schedule run`` every ``interval_s`` while ``enabled`` (see
    drtool/stores/canary.py; on in the included stack's config, off by default elsewhere
    because drtool then writes into the stores it protects).
    """

    enabled: bool = False
    interval_s: float = 60.0
    keep_hours: float = 24.0  # older canary rows and objects are removed


@dataclass(frozen=True)
class CaptureConfig:
    """``drtool capture run``: continuous attachment capture (ADR 0025)."""

    enabled: bool = True  # false: `capture run` exits 0 at once (one switch for a service)
    interval_s: float = 60.0  # seconds between rounds
    gap_timeout_s: float = 3600.0  # an id not committed after this is dropped (rolled back)
    bucket: str = ""  # the attachments' bucket; "" = the first of minio.buckets
    workers: int = 4  # objects read and sealed at once in a round (each streamed)


@dataclass(frozen=True)
class RestoreConfig:
    """Restoring the whole stack to one moment (docs/decisions/0027-one-moment-restore.md)."""

    # the largest skew (the moment asked minus a store's effective moment) a restore to a
    # moment accepts without --accept-skew; 0: the interval (plus its jitter) of the
    # schedule's most frequent backup job holding Redis (Redis is the store a moment cannot
    # reach more closely)
    max_skew_s: float = 0.0


@dataclass(frozen=True)
class PostgresConfig:
    """The PostgreSQL server of the stack."""

    host: str = "127.0.0.1"
    port: int = 5432
    user: str = "postgres"
    dbname: str = "cotalk"
    password: str | None = field(default=None, repr=False, metadata=SECRET)
    bin_dir: str = ""
    # a streaming standby as the source: the dump is refused when its replay lags more
    max_standby_lag_s: float = 300.0
    # the server's Docker image (chat_stack/docker-compose.yml): `restore --into-volume`
    # recovers with it, so its major must be the base backup's
    image: str = "postgres:16-alpine"
    # no effect since fingerprint format 5 (ADR 0033: read off the dump, no scan to tune or
    # to save); still accepted so that configs written for ADR 0029 keep loading
    fingerprint_workers: int = 2
    fingerprint_reuse_days: float = 7.0


@dataclass(frozen=True)
class RedisConfig:
    """The Redis server of the stack."""

    host: str = "127.0.0.1"
    port: int = 6379
    username: str = ""
    password: str | None = field(default=None, repr=False, metadata=SECRET)
    tls: bool = False
    container: str = ""  # its Docker container: lets `restore --redis-mode offline` restart it
    # how the backup reads it: "rdb" over replication, "logical" (SCAN + DUMP, consistent per
    # key), "auto": the RDB, the logical dump when SYNC/PSYNC are refused (ADR 0021)
    method: Literal["auto", "rdb", "logical"] = "auto"
    cluster: bool = False  # a Redis Cluster: host/port is any node; every master is backed up


@dataclass(frozen=True)
class MinioConfig:
    """The S3-compatible attachment store of the stack."""

    endpoint_url: str = "http://127.0.0.1:9000"
    region: str = "us-east-1"
    access_key: str | None = field(default=None, repr=False, metadata=SECRET)
    secret_key: str | None = field(default=None, repr=False, metadata=SECRET)
    buckets: tuple[str, ...] = ("attachments",)


@dataclass(frozen=True)
class StackConfig:
    """The three stores of one co-talk stack: a backup source or a restore target."""

    postgres: PostgresConfig = PostgresConfig()
    redis: RedisConfig = RedisConfig()
    minio: MinioConfig = MinioConfig()

    def endpoints(self) -> StackEndpoints:
        """The stack as endpoints."""
        pg, rd, mn = self.postgres, self.redis, self.minio
        return StackEndpoints(
            postgres=PostgresEndpoint(pg.host, pg.port, pg.user, pg.dbname, pg.password),
            redis=RedisEndpoint(rd.host, rd.port, rd.username or None, rd.password, rd.tls),
            minio=S3Endpoint(mn.endpoint_url, mn.access_key or "", mn.secret_key or "", mn.region),
            buckets=mn.buckets,
        )


@dataclass(frozen=True)
class Config:
    """Everything drtool needs, resolved once."""

    repository: RepositoryConfig = RepositoryConfig()
    keys: KeysConfig = KeysConfig()
    backup: BackupConfig = BackupConfig()
    postgres: PostgresConfig = PostgresConfig()
    redis: RedisConfig = RedisConfig()
    minio: MinioConfig = MinioConfig()
    wal: WalConfig = WalConfig()
    canary: CanaryConfig = CanaryConfig()
    capture: CaptureConfig = CaptureConfig()
    restore: RestoreConfig = RestoreConfig()
    targets: Mapping[str, StackConfig] = field(default_factory=dict)
    #: further repositories by name (``[repositories.NAME]``): copies of the primary (3-2-1)
    repositories: Mapping[str, RepositoryConfig] = field(default_factory=dict)
    #: which repository ``repository`` is: PRIMARY, or a name from ``repositories``
    repository_name: str = PRIMARY
    source: str = ""  # the config file it came from, for messages

    def stack(self) -> StackEndpoints:
        """The configured (production) co-talk stack as endpoints."""
        return StackConfig(self.postgres, self.redis, self.minio).endpoints()

    def repository_names(self) -> list[str]:
        """Every configured repository: the primary first, then ``[repositories.*]``."""
        return [PRIMARY, *self.repositories]

    def repository_config(self, name: str) -> RepositoryConfig:
        """The settings of repository ``name`` (PRIMARY: ``[repository]``)."""
        if self.repository_name != PRIMARY:  # a caller bug: switch from the loaded config
            raise ValueError("repository_config of a config already switched to a repository")
        if name == PRIMARY:
            return self.repository
        if name not in self.repositories:
            known = ", ".join(self.repository_names())
            raise ConfigError(f"--repository: no repository named {name!r} (known: {known})")
        return self.repositories[name]

    def with_repository(self, name: str | None) -> Config:
        """This config reading and writing repository ``name`` instead of the primary.

        Every command works on ``cfg.repository``; ``--repository NAME`` swaps it here, so
        list, verify, restore, prune and drills read a copy exactly as they read the primary
        (same keys: a copy is the same repository, ADR 0022). None or PRIMARY: unchanged.
        """
        if name is None or name == self.repository_name:
            return self
        return replace(self, repository=self.repository_config(name), repository_name=name)


SECTIONS: dict[str, type] = {
    f.name: type(f.default)
    for f in fields(Config)
    if f.name not in ("source", "targets", "repositories", "repository_name")
}
STACK_SECTIONS: dict[str, type] = {f.name: type(f.default) for f in fields(StackConfig)}


def _read_secret_file(where: str, path: str) -> str:
    """The stripped content of a secret file; the error names the file, never its content."""
    try:
        return Path(path).read_text().strip()
    except OSError as exc:
        raise ConfigError(
            f"{where}: cannot read the secret file ({exc.strerror}: {path})"
        ) from None


def _section_values(
    name: str,
    cls: type,
    table: Mapping[str, Any],
    env: Mapping[str, str],
    flags: Mapping[str, Any],
) -> Any:
    """One section's values: flag, then env, then secret file, then TOML, then the default."""
    hints = get_type_hints(cls)
    secret_names = {f.name for f in fields(cls) if f.metadata.get("secret")}
    allowed = {f.name for f in fields(cls)} - secret_names | {f"{s}_file" for s in secret_names}
    for key in table:
        if key in secret_names:
            env_hint = "" if "." in name else f" or DRTOOL_{name.upper()}_{key.upper()}"
            raise ConfigError(
                f"{name}.{key}: secrets are not allowed in the config file; use {key}_file"
                f"{env_hint} (got a literal value)"
            )
    check_keys(name, table, allowed)
    values: dict[str, Any] = {}
    for f in fields(cls):
        where = f"{name}.{f.name}"
        env_name = f"DRTOOL_{name.upper()}_{f.name.upper()}"
        if f.name in flags and flags[f.name] is not None:
            values[f.name] = coerce(where, flags[f.name], hints[f.name], from_env=True)
        elif env_name in env:  # name the variable: the file may not mention the field at all
            values[f.name] = coerce(env_name, env[env_name], hints[f.name], from_env=True)
        elif f.name in secret_names and f"{env_name}_FILE" in env:
            values[f.name] = _read_secret_file(f"{env_name}_FILE", env[f"{env_name}_FILE"])
        elif f.name in secret_names and f"{f.name}_file" in table:
            path = coerce(f"{where}_file", table[f"{f.name}_file"], str, from_env=False)
            values[f.name] = _read_secret_file(f"{where}_file", path)
        elif f.name in table:
            values[f.name] = coerce(where, table[f.name], hints[f.name], from_env=False)
        elif f.default is MISSING:  # pragma: no cover - every field has a default
            raise ConfigError(f"{where}: required")
    return replace(cls(), **values)


def load_config(
    path: str | Path | None,
    env: Mapping[str, str],
    flags: Mapping[str, Mapping[str, Any]] | None = None,
) -> Config:
    """Build the configuration from a TOML file, the environment and flag overrides.

    ``path`` falls back to ``DRTOOL_CONFIG``; ``flags`` maps section -> field -> value for
    options given on the command line (``None`` values mean "not given").
    """
    path = path or env.get("DRTOOL_CONFIG") or None
    data: dict[str, Any] = {}
    if path:
        try:
            data = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config: file not found (got {path})") from None
        except OSError as exc:
            raise ConfigError(f"config: cannot read ({exc.strerror}: {path})") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config: not valid TOML: {exc} (in {path})") from None
    known = [*SECTIONS, "targets", "repositories"]
    for key, value in data.items():
        if key not in known:
            raise ConfigError(f"{key}: unknown section (known: {', '.join(known)})")
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a [{key}] table (got {value!r})")
    _check_env_names(env)
    flags = flags or {}
    sections = {
        name: _section_values(name, cls, data.get(name, {}), env, flags.get(name, {}))
        for name, cls in SECTIONS.items()
    }
    workers = sections["backup"].minio_workers
    if not MINIO_WORKERS[0] <= workers <= MINIO_WORKERS[1]:  # each one holds a connection
        raise ConfigError(
            f"backup.minio_workers: must be {MINIO_WORKERS[0]} to {MINIO_WORKERS[1]} "
            f"(got {workers})"
        )
    if sections["restore"].max_skew_s < 0:  # a negative limit would refuse every moment
        raise ConfigError(
            f"restore.max_skew_s: must be 0 (the schedule's Redis interval) or more seconds "
            f"(got {sections['restore'].max_skew_s:g})"
        )
    targets = {name: _target(name, table) for name, table in data.get("targets", {}).items()}
    repositories = {
        name: _repository(name, table) for name, table in data.get("repositories", {}).items()
    }
    return Config(**sections, targets=targets, repositories=repositories, source=str(path or ""))


# Variables with a section's prefix that are not settings: the compose file's own.
NOT_SETTINGS = frozenset({"DRTOOL_BACKUP_CONFIG"})


def _check_env_names(env: Mapping[str, str]) -> None:
    """Refuse ``DRTOOL_<SECTION>_<X>`` where X is no setting (a typo would be ignored silently).

    Variables without a section prefix (``DRTOOL_CONFIG``, ``DRTOOL_HOME``, the image and test
    variables) are not drtool settings and are left alone.
    """
    for name in sorted(env):
        section = next((s for s in SECTIONS if name.startswith(f"DRTOOL_{s.upper()}_")), None)
        if section is None or name in NOT_SETTINGS:
            continue
        cls = SECTIONS[section]
        prefix = f"DRTOOL_{section.upper()}_"
        known = set()
        for f in fields(cls):
            known.add(prefix + f.name.upper())
            if f.metadata.get("secret"):
                known.add(f"{prefix}{f.name.upper()}_FILE")
        if name not in known:
            raise ConfigError(
                f"{name}: unknown setting of [{section}] (known: {', '.join(sorted(known))})"
            )


def _target(name: str, table: Any) -> StackConfig:
    """One ``[targets.NAME.*]`` restore target; its secrets come from ``*_file`` paths only."""
    if not isinstance(table, dict):
        raise ConfigError(f"targets.{name}: expected a table (got {table!r})")
    for key, value in table.items():
        if key not in STACK_SECTIONS:
            raise ConfigError(
                f"targets.{name}.{key}: unknown section (known: {', '.join(STACK_SECTIONS)})"
            )
        if not isinstance(value, dict):
            raise ConfigError(
                f"targets.{name}.{key}: expected a [targets.{name}.{key}] table (got {value!r})"
            )
    return StackConfig(
        **{
            section: _section_values(
                f"targets.{name}.{section}", cls, table.get(section, {}), {}, {}
            )
            for section, cls in STACK_SECTIONS.items()
        }
    )


def _repository(name: str, table: Any) -> RepositoryConfig:
    """One ``[repositories.NAME]``: the keys of ``[repository]``, secrets from ``*_file`` only."""
    if not REPO_NAME_RE.match(name) or name == PRIMARY:
        raise ConfigError(
            f"repositories.{name}: a repository name is 1-41 lowercase letters, digits, '-' or "
            f"'_', and not {PRIMARY!r} (the name of [repository]) (got {name!r})"
        )
    if not isinstance(table, dict):
        raise ConfigError(f"repositories.{name}: expected a table (got {table!r})")
    return _section_values(f"repositories.{name}", RepositoryConfig, table, {}, {})
