"""Restore to a moment into a NEW Docker volume, with the chat stack's own PostgreSQL image.

The Docker deployment has no PostgreSQL server binaries beside drtool (the drtool image holds
the clients only), and the chat stack's data lives in a named volume. So the restored data
directory is a new volume the operator can later mount in place of the old one, and the
recovery runs in throw-away containers of the configured image (``postgres.image``, the
chat stack's ``postgres:16-alpine``): the server that will run the data is the one that
replays it, so its build (``postgres -V``: version and packager) is checked against the base
backup's ``source_version`` first (physical files never cross majors, and a data directory
carries its libc's collation order: a Debian build's indexes are not an Alpine build's) and
a difference is refused before anything is read or created. The image is resolved to its id
once, and every container of the restore runs that id (a tag moved meanwhile changes
nothing).

Order (ADR 0031): the volume name is checked to be new and the image's build to match; the
base and the first WAL are staged and checked on drtool's side exactly as for ``--into DIR``
(pitr.py); only then is the volume created. A preparation container (root, no network)
receives the verified base tar (``put_archive`` extracts it into the volume, streamed) and the
staged WAL (into a second, temporary volume), hands the data directory to ``postgres`` (0700)
and creates ``recovery.signal`` (a standby's base loses its ``standby.signal`` and its
``primary_conninfo``/``primary_slot_name`` lines, which may carry a password); into the WAL
volume it writes an hba file of its own (local ``trust`` only). The recovery container (user
``postgres``, no network, ``postgres -D`` with
the recovery settings and ``hba_file`` as ``-c`` options, so nothing of them is written into
the volume) replays to the target and promotes; drtool sees the promotion as for a directory
(``recovery.signal`` gone, ``postmaster.pid`` ``ready``), asks the server what it reached
over the container's own socket (no password is needed, none is passed), and stops it
(SIGINT: a fast shutdown, a clean checkpoint; checked, else said). The containers and the
WAL volume are removed; the data volume stays, labelled. On any failure before the end both
volumes and every container of this restore are removed: nothing is left half-made. Nothing
else is touched: an existing volume (the configured one included) is refused by name.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import secrets
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from docker.errors import APIError, DockerException, NotFound
from requests.exceptions import RequestException

from drtool.drills.runtime_docker import PG_DATA, engine, ensure_image, logs_tail
from drtool.endpoints import PostgresEndpoint
from drtool.errors import ConfigError, SourceError, UsageError
from drtool.services.restore.pitr_recover import (
    NOT_REACHED,
    REACHED_SQL,
    Outcome,
    last_transaction_in,
    promoted_by,
)

log = logging.getLogger(__name__)

LABEL = "drtool.pitr"
VOLUME_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]+")  # Docker's own rule for volume names
WAL_DIR = "/drtool-wal"
HBA_FILE = f"{WAL_DIR}/drtool-hba.conf"  # local trust, for drtool's own psql; never in the data
SOCKET_DIR = "/tmp"  # the image's /var/run/postgresql need not be writable by postgres
_BUILD = re.compile(r"\(PostgreSQL\) (\S.*)")
POLL_S = 0.3
STOP_TIMEOUT_S = 120
SHUT_DOWN = "database system is shut down"


def _any_case(name: str) -> str:
    """A sed pattern matching ``name`` in any case (settings' names are case-insensitive;
    busybox sed, in the Alpine images, has no case-insensitive address)."""
    return "".join(f"[{c.upper()}{c.lower()}]" if c.isalpha() else c for c in name)


PREPARE = f"""set -e
chown -R postgres:postgres {PG_DATA}
chmod 0700 {PG_DATA}
if [ ! -e {PG_DATA}/postgresql.conf ]; then
  echo '# written by drtool: the base backup held no postgresql.conf' > {PG_DATA}/postgresql.conf
fi
if [ ! -e {PG_DATA}/pg_hba.conf ]; then
  printf '# written by drtool: the base backup held no pg_hba.conf\\nlocal all all peer\\n\
host all all 127.0.0.1/32 scram-sha-256\\n' > {PG_DATA}/pg_hba.conf
fi
rm -f {PG_DATA}/standby.signal
for conf in {PG_DATA}/postgresql.conf {PG_DATA}/postgresql.auto.conf; do
  if [ -e "$conf" ]; then
    sed -i -E '/^[[:space:]]*({_any_case("primary_conninfo")}|{_any_case("primary_slot_name")})\
[[:space:]]*=/d' "$conf"
  fi
done
touch {PG_DATA}/recovery.signal
chown postgres:postgres {PG_DATA}/postgresql.conf {PG_DATA}/pg_hba.conf {PG_DATA}/recovery.signal
echo 'local all all trust' > {HBA_FILE}
chown postgres:postgres {HBA_FILE}
chmod 0600 {HBA_FILE}
"""
#: the two files pitr_recover.promoted_by reads, as one exec inside the recovery container
PROBE = (
    f"if [ -e {PG_DATA}/recovery.signal ]; then echo signal; else echo none; fi; "
    f"cat {PG_DATA}/postmaster.pid 2>/dev/null || true"
)


@contextlib.contextmanager
def docker_errors() -> Iterator[None]:
    """The engine's own errors as one line (exit 3), never a traceback."""
    try:
        yield
    except DockerException as exc:
        detail = exc.explanation if isinstance(exc, APIError) else type(exc).__name__
        raise SourceError(f"docker: restore to a moment into a volume failed: {detail}") from None
    except RequestException as exc:  # the engine did not answer in time (a read timeout)
        raise SourceError(
            f"docker: restore to a moment into a volume failed: the engine did not answer "
            f"({type(exc).__name__})"
        ) from None


def check_volume_name(name: str) -> None:
    """Docker's volume name rule, checked before anything is read."""
    if not VOLUME_NAME.fullmatch(name):
        raise UsageError(
            f"--into-volume: {name!r} is not a Docker volume name ([a-zA-Z0-9][a-zA-Z0-9_.-]+)"
        )


def image_build(client: Any, image: str) -> tuple[str, str]:
    """``image``'s id and its server's build (``postgres -V``: ``16.4``, ``15.18 (Debian
    15.18-0+deb12u1)``, as ``server_version`` says), from a throw-away container removed with
    its anonymous volumes (the image declares one at the data directory)."""
    ensure_image(client, image)
    try:
        image_id = str(client.images.get(image).id)
        probe = client.containers.create(
            image_id,
            ["-V"],
            entrypoint=["postgres"],
            network_mode="none",
            labels={LABEL: "probe"},
            tmpfs={PG_DATA: ""},
        )
        try:
            probe.start()
            probe.wait(timeout=STOP_TIMEOUT_S)
            out = bytes(probe.logs())
        finally:
            probe.remove(v=True, force=True)
    except (DockerException, RequestException) as exc:
        raise SourceError(
            f"postgres.image: {image} does not run `postgres -V` ({type(exc).__name__})"
        ) from None
    found = _BUILD.search(out.decode(errors="replace"))
    if found is None:
        raise SourceError(f"postgres.image: {image} has no PostgreSQL server (`postgres -V`)")
    return image_id, found.group(1).strip()


@dataclass
class VolumeTarget:
    """The engine, the image (by id) and the new volume's name, checked before any byte is
    staged."""

    client: Any
    image: str  # as configured, for messages
    image_id: str  # what every container runs
    volume: str
    build: str

    @classmethod
    def open(cls, volume: str, image: str, base_build: str) -> VolumeTarget:
        """Refuse an existing volume and an image of another build than the base's."""
        check_volume_name(volume)
        client = engine()
        try:
            with docker_errors():
                try:
                    client.volumes.get(volume)
                except NotFound:
                    pass
                else:
                    raise UsageError(
                        f"--into-volume: volume {volume} exists; a restore to a moment creates "
                        "a new one (the running cluster's volume is never written); nothing "
                        "changed"
                    )
                image_id, build = image_build(client, image)
            if build != base_build.strip():
                raise ConfigError(
                    f"postgres.image: {image} runs PostgreSQL {build}, the base backup was "
                    f"taken with PostgreSQL {base_build.strip()} (a data directory needs the "
                    "same major, and the same libc for its collations); set postgres.image "
                    "to an image of that build"
                )
        except BaseException:
            client.close()
            raise
        return cls(client, image, image_id, volume, build)


def _wal_tar(files: list[Path]) -> Iterator[bytes]:
    """A tar of ``files`` (flat, 0644), streamed in pieces: the WAL for ``put_archive``."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w|") as tar:
        for path in files:
            info = tar.gettarinfo(str(path), arcname=path.name)
            info.mode, info.uid, info.gid, info.uname, info.gname = 0o644, 0, 0, "", ""
            with path.open("rb") as f:
                tar.addfile(info, f)
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
    yield buffer.getvalue()


@dataclass
class VolumeRestore:
    """The volumes and containers of one restore into a new volume, and their clean-up."""

    target: VolumeTarget
    run_id: str = field(default_factory=lambda: secrets.token_hex(4))
    container: Any = None
    created: bool = False
    _settings: list[tuple[str, str]] | None = None

    @property
    def labels(self) -> dict[str, str]:
        return {LABEL: self.run_id}

    @property
    def wal_volume(self) -> str:
        return f"{self.target.volume}-drtool-wal-{self.run_id}"

    def _mounts(self) -> dict[str, dict[str, str]]:
        return {
            self.target.volume: {"bind": PG_DATA, "mode": "rw"},
            self.wal_volume: {"bind": WAL_DIR, "mode": "rw"},
        }

    def populate(self, base_tar: Path, wal: list[Path], *, timeout: float) -> None:
        """Create both volumes; extract the checked base and copy the staged WAL into them
        (``timeout``: for the preparation, whose ``chown -R`` grows with the base)."""
        client = self.target.client
        for name in (self.target.volume, self.wal_volume):
            # creating an existing volume returns it: only our label proves it is new
            made = client.volumes.create(name, labels=self.labels)
            if (made.attrs.get("Labels") or {}).get(LABEL) != self.run_id:
                raise UsageError(
                    f"--into-volume: volume {name} appeared while the restore was staged "
                    "(another restore?); it was not written; nothing changed"
                )
            self.created = self.created or name == self.target.volume
        prep = client.containers.create(
            self.target.image_id,
            ["-c", PREPARE],
            entrypoint=["sh"],
            user="root",
            network_mode="none",
            volumes=self._mounts(),
            labels=self.labels,
            name=f"drtool-pitr-{self.run_id}-prepare",
        )
        try:
            with base_tar.open("rb") as f:
                if not prep.put_archive(PG_DATA, f):
                    raise SourceError(f"docker: the base backup could not be put into {PG_DATA}")
            self._put_wal(prep, wal)
            prep.start()
            status = prep.wait(timeout=timeout)
            if status.get("StatusCode") != 0:
                raise SourceError(
                    f"docker: preparing volume {self.target.volume} failed: {logs_tail(prep)}"
                )
        finally:
            prep.remove(force=True)

    def _put_wal(self, container: Any, wal: list[Path]) -> None:
        if wal and not container.put_archive(WAL_DIR, _wal_tar(wal)):
            raise SourceError("docker: the staged WAL could not be copied into its volume")

    def add_wal(self, wal: list[Path]) -> None:
        """More checked WAL for the next start (into the stopped recovery container)."""
        assert self.container is not None
        self._put_wal(self.container, wal)

    def recover(self, settings: list[tuple[str, str]], *, timeout: float) -> Outcome:
        """Start recovery with ``settings`` and wait until promoted or stopped."""
        client = self.target.client
        if self.container is None or settings != self._settings:
            if self.container is not None:
                self.container.remove(force=True)
            self._settings = settings
            self.container = client.containers.create(
                self.target.image_id,
                ["-D", PG_DATA, *_args(settings)],
                entrypoint=["postgres"],
                user="postgres",
                network_mode="none",
                volumes=self._mounts(),
                labels=self.labels,
                name=f"drtool-pitr-{self.run_id}-recover",
                stop_signal="SIGINT",
            )
        container = self.container
        offset = len(bytes(container.logs()))
        container.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            container.reload()
            if container.status in ("exited", "dead"):
                fresh = bytes(container.logs())[offset:].decode(errors="replace")
                return Outcome(False, NOT_REACHED in fresh, logs_tail(container))
            try:
                code, out = container.exec_run(["sh", "-c", PROBE], user="postgres")
            except (APIError, NotFound):
                # PostgreSQL exited between the reload and the exec (409: not running):
                # the next reload sees it stopped and reads its log
                time.sleep(POLL_S)
                continue
            signal, _, pid_file = bytes(out).decode(errors="replace").partition("\n")
            if code == 0 and promoted_by(signal != "none", pid_file or None):
                return Outcome(True)
            time.sleep(POLL_S)
        container.stop(timeout=STOP_TIMEOUT_S)
        raise SourceError(
            f"restore to a moment: recovery in volume {self.target.volume} did not finish "
            f"within {timeout:.0f} s: {logs_tail(container)}"
        )

    def reached(self, endpoint: PostgresEndpoint) -> tuple[str | None, str | None]:
        """The last replayed commit and WAL position, asked inside the container over its
        socket as the configured role (the copy has the source's roles; drtool's hba file
        trusts local connections, so no password is needed or passed); else the log line."""
        assert self.container is not None
        argv = ["psql", "-h", SOCKET_DIR, "-U", endpoint.user, "-d", endpoint.dbname]
        argv += ["-X", "-A", "-t", "-F", "|", "-c", REACHED_SQL]
        env = {"PGCONNECT_TIMEOUT": "10"}
        code, out = self.container.exec_run(argv, user="postgres", environment=env)
        fields = bytes(out).decode(errors="replace").strip().split("|")
        if code == 0 and len(fields) == 2:
            moment = fields[0] or None
            with contextlib.suppress(ValueError):  # psql's text form, as the local path gives it
                moment = datetime.fromisoformat(fields[0]).isoformat() if moment else None
            return moment, fields[1] or None
        text = bytes(self.container.logs()).decode(errors="replace")
        return last_transaction_in(text), None

    def finish(self) -> str | None:
        """Stop the promoted server, remove the containers and WAL. A clean shutdown is
        checked (exit 0 and PostgreSQL's own "shut down" line), else the note saying so."""
        note = None
        if self.container is not None:
            self.container.stop(timeout=STOP_TIMEOUT_S)
            status = self.container.wait(timeout=STOP_TIMEOUT_S)
            tail = bytes(self.container.logs(tail=20)).decode(errors="replace")
            if status.get("StatusCode") != 0 or SHUT_DOWN not in tail:
                note = (
                    f"the restored server in volume {self.target.volume} did not shut down "
                    f"cleanly (exit {status.get('StatusCode')}): its first start will run "
                    "crash recovery (the promoted data is kept)"
                )
            self.container.remove(force=True)
            self.container = None
        self._remove_wal_volume()
        return note

    @contextlib.contextmanager
    def abandoned_on_failure(self) -> Iterator[None]:
        """Whatever ends the block early (an error, Ctrl-C) removes what was made."""
        try:
            yield
        except BaseException:
            self.abandon()  # nothing half-made is left: the new volume goes too
            raise

    def abandon(self) -> None:
        """After a failure: remove everything this restore made, the new volume too."""
        try:
            if self.container is not None:
                self.container.remove(force=True)
                self.container = None
            self._remove_wal_volume()
            if self.created:
                self.target.client.volumes.get(self.target.volume).remove(force=True)
        except DockerException as exc:
            log.warning(
                "docker: cleaning up after the failed restore failed (%s); remove what is "
                "labelled %s=%s by hand",
                type(exc).__name__,
                LABEL,
                self.run_id,
            )

    def _remove_wal_volume(self) -> None:
        with contextlib.suppress(NotFound):
            self.target.client.volumes.get(self.wal_volume).remove(force=True)


def _args(settings: list[tuple[str, str]]) -> list[str]:
    """The recovery settings and the copy's isolation, as ``postgres`` options."""
    kept = [
        ("listen_addresses", "127.0.0.1"),
        ("port", "5432"),  # the source's own port may be in its configuration
        ("unix_socket_directories", SOCKET_DIR),
        ("archive_mode", "off"),
        ("primary_conninfo", ""),
        ("hba_file", HBA_FILE),
    ]
    return [arg for key, value in [*kept, *settings] for arg in ("-c", f"{key}={value}")]
