"""A local PostgreSQL server: initdb with a generated password, postgres on a loopback port."""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import signal
import stat
import subprocess
from collections.abc import Mapping
from pathlib import Path

import psycopg
from psycopg import sql

from drtool.endpoints import PostgresEndpoint
from drtool.errors import SourceError
from drtool.runtime.binaries import pg_bin_dir, server_major
from drtool.runtime.procs import HOST, Daemon, check_socket_path, free_port_block, write_secret
from drtool.runtime.server import Launch, LocalServer

SUPERUSER = "postgres"
SYSTEM_USER = "postgres"  # initdb and postgres refuse to run as root


def _run_as() -> str | None:
    return SYSTEM_USER if os.geteuid() == 0 else None


def _check_searchable(path: Path, user: str) -> None:
    """Refuse a directory that ``user`` (primary group only) cannot reach."""
    account = pwd.getpwnam(user)
    for parent in reversed(path.parents):
        st = parent.stat()
        if st.st_uid == account.pw_uid:
            bit = stat.S_IXUSR
        elif st.st_gid == account.pw_gid:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not st.st_mode & bit:
            raise SourceError(
                f"the {user} user cannot enter {parent}, so PostgreSQL cannot use {path}; "
                f"choose a state directory it can reach (e.g. under /var/tmp) or chmod o+x {parent}"
            )


class PostgresServer(LocalServer):
    """PostgreSQL in ``base_dir`` (data/, sock/), superuser ``postgres`` with a password."""

    what = "PostgreSQL"
    log_name = "postgres.log"
    graceful_signal = signal.SIGINT  # fast shutdown: does not wait for clients

    def __init__(
        self,
        base_dir: Path,
        *,
        port: int | None = None,
        password: str | None = None,
        dbname: str = "cotalk",
        bin_dir: Path | None = None,
        major: int | None = None,
        daemon: Daemon | None = None,
        settings: Mapping[str, str] | None = None,
    ) -> None:
        """``major`` picks that PostgreSQL major's binaries (MissingBinary when absent, never
        another major's); ``bin_dir`` names them directly; neither: Debian's newest."""
        super().__init__(base_dir, daemon)
        self.settings = dict(settings or {})
        self._port = port if port is not None else free_port_block((0,), set())
        self.password = password or secrets.token_urlsafe(24)
        self.dbname = dbname
        if bin_dir is None or major is not None:
            bin_dir = pg_bin_dir(bin_dir, major=major)
        self.bin_dir = bin_dir

    @classmethod
    def from_state(cls, state: Mapping[str, object], password: str) -> PostgresServer:
        """Rebuild a server recorded by :meth:`to_state`."""
        return cls(
            Path(str(state["base_dir"])),
            port=int(str(state["port"])),
            password=password,
            dbname=str(state["dbname"]),
            bin_dir=Path(str(state["bin_dir"])),
            daemon=Daemon.from_state(state) if "pid" in state else None,
        )

    def to_state(self) -> dict[str, object]:
        """Everything but the password."""
        return {
            "base_dir": str(self.base_dir),
            "port": self._port,
            "dbname": self.dbname,
            "bin_dir": str(self.bin_dir),
            **self._daemon_state(),
        }

    @property
    def major(self) -> int:
        """The PostgreSQL major of this server's binaries."""
        return server_major(self.bin_dir)

    @property
    def port(self) -> int:
        """The TCP port on 127.0.0.1."""
        return self._port

    @property
    def data_dir(self) -> Path:
        """PGDATA."""
        return self.base_dir / "data"

    @property
    def socket_dir(self) -> Path:
        """The private Unix socket directory (``-k``)."""
        return self.base_dir / "sock"

    @property
    def endpoint(self) -> PostgresEndpoint:
        """Where to connect, as the superuser, to the stack's database."""
        return PostgresEndpoint(HOST, self._port, SUPERUSER, self.dbname, self.password)

    def _secrets(self) -> tuple[str, ...]:
        return (self.password,)

    def _socket_files(self) -> list[Path]:
        sock = self.socket_dir / f".s.PGSQL.{self._port}"
        return [sock, sock.with_name(sock.name + ".lock")]

    def _prepare(self) -> Launch:
        """Directories, initdb on first use, and the postmaster's command line.

        As root the server runs as ``postgres`` (it refuses root), so the directories are handed to
        it and every parent must be searchable by it.
        """
        run_as = _run_as()
        pg_bin_dir(self.bin_dir)  # still there, with initdb and postgres
        check_socket_path(self._socket_files()[1])
        for directory in (self.base_dir, self.socket_dir):
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            if run_as is not None:
                shutil.chown(directory, run_as, run_as)
        if run_as is not None:
            _check_searchable(self.base_dir, run_as)
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb(run_as)
        argv = [str(self.bin_dir / "postgres"), "-D", str(self.data_dir), "-p", str(self._port)]
        argv += ["-k", str(self.socket_dir), "-c", f"listen_addresses={HOST}"]
        for name, value in self.settings.items():
            argv += ["-c", f"{name}={value}"]
        return Launch(argv, cwd=self.base_dir, run_as=run_as)

    def _initdb(self, run_as: str | None) -> None:
        """Create the cluster (SCRAM, UTF8, C locale); the password in a 0600 file, not argv."""
        pwfile = self.base_dir / ".initdb-pwfile"
        write_secret(pwfile, self.password)
        try:
            if run_as is not None:
                shutil.chown(pwfile, run_as, run_as)
            argv = [str(self.bin_dir / "initdb"), "-D", str(self.data_dir), "-U", SUPERUSER]
            argv += ["--auth=scram-sha-256", f"--pwfile={pwfile}", "--no-sync"]
            argv += ["--no-instructions", "-E", "UTF8", "--locale=C"]
            user_kwargs: dict[str, object] = {}
            if run_as is not None:
                user_kwargs = {"user": run_as, "group": run_as, "extra_groups": []}
            done = subprocess.run(
                argv,
                cwd=self.base_dir,
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
                **user_kwargs,  # type: ignore[call-overload]
            )
        finally:
            pwfile.unlink(missing_ok=True)
        if done.returncode != 0:
            tail = " | ".join(done.stderr.strip().splitlines()[-3:])
            raise SourceError(f"initdb exited {done.returncode} for {self.data_dir}: {tail}")

    def _probe(self) -> bool:
        try:
            with psycopg.connect(
                self.endpoint.conninfo("postgres"), password=self.password, connect_timeout=2
            ) as conn:
                conn.execute("SELECT 1")
        except psycopg.OperationalError:
            return False
        return True

    def _after_ready(self) -> None:
        with psycopg.connect(
            self.endpoint.conninfo("postgres"), password=self.password, autocommit=True
        ) as conn:
            exists = conn.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (self.dbname,)
            ).fetchone()
            if exists is None:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.dbname)))
