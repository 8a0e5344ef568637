"""A local redis-server with a generated password (in its 0600 config file, never in argv)."""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from pathlib import Path

import redis

from drtool.endpoints import RedisEndpoint
from drtool.runtime.binaries import redis_server_binary
from drtool.runtime.procs import HOST, Daemon, free_port_block, write_secret
from drtool.runtime.server import Launch, LocalServer


class RedisServer(LocalServer):
    """redis-server in ``base_dir`` (redis.conf, data/dump.rdb); no persistence of its own."""

    what = "Redis"
    log_name = "redis.log"

    def __init__(
        self,
        base_dir: Path,
        *,
        port: int | None = None,
        password: str | None = None,
        binary: Path | None = None,
        daemon: Daemon | None = None,
    ) -> None:
        super().__init__(base_dir, daemon)
        self._port = port if port is not None else free_port_block((0,), set())
        self.password = password or secrets.token_urlsafe(24)
        self.binary = binary if binary is not None else redis_server_binary()

    @classmethod
    def from_state(cls, state: Mapping[str, object], password: str) -> RedisServer:
        """Rebuild a server recorded by :meth:`to_state`."""
        return cls(
            Path(str(state["base_dir"])),
            port=int(str(state["port"])),
            password=password,
            binary=Path(str(state["binary"])),
            daemon=Daemon.from_state(state) if "pid" in state else None,
        )

    def to_state(self) -> dict[str, object]:
        """Everything but the password."""
        return {
            "base_dir": str(self.base_dir),
            "port": self._port,
            "binary": str(self.binary),
            **self._daemon_state(),
        }

    @property
    def port(self) -> int:
        """The TCP port on 127.0.0.1."""
        return self._port

    @property
    def rdb_path(self) -> Path:
        """The RDB file the server loads at start (place one here before ``start``)."""
        return self.base_dir / "data" / "dump.rdb"

    @property
    def endpoint(self) -> RedisEndpoint:
        """Where to connect (db 0, default user)."""
        return RedisEndpoint(HOST, self._port, password=self.password)

    def _secrets(self) -> tuple[str, ...]:
        return (self.password,)

    def _prepare(self) -> Launch:
        """Write redis.conf (0600: it holds the password) and the command line.

        No save points and no AOF: the local stack is scratch; the RDB is written only on request.
        """
        self.rdb_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        conf = self.base_dir / "redis.conf"
        write_secret(
            conf,
            "\n".join(
                [
                    f"bind {HOST}",
                    f"port {self._port}",
                    "protected-mode yes",
                    "daemonize no",
                    'save ""',
                    "appendonly no",
                    "repl-diskless-sync-delay 0",  # a backup fetch need not wait 5 s here
                    f'dir "{self.rdb_path.parent}"',
                    f"dbfilename {self.rdb_path.name}",
                    'logfile ""',
                    f'requirepass "{self.password}"',
                    "",
                ]
            ),
        )
        return Launch([str(self.binary), str(conf)], cwd=self.base_dir)

    def _probe(self) -> bool:
        """Whether the server answers PING with our password (short timeouts: called in a loop)."""
        client = redis.Redis(
            host=HOST,
            port=self._port,
            password=self.password,
            socket_timeout=2,
            socket_connect_timeout=2,
        )
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()
