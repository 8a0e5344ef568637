"""SeaweedFS ``weed mini`` as the local S3 server (the MinIO stand-in and off-site target)."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from drtool.endpoints import S3Endpoint
from drtool.runtime.binaries import weed_binary
from drtool.runtime.procs import HOST, Daemon, check_socket_path, free_port_block
from drtool.runtime.server import Launch, LocalServer

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

# master, volume, filer, s3, admin on base+0..4; their gRPC ports are each +10000.
PORT_OFFSETS = (0, 1, 2, 3, 4, 10000, 10001, 10002, 10003, 10004)
_SERVICES = ("master", "volume", "filer", "s3", "admin")


class SeaweedServer(LocalServer):
    """``weed mini`` in ``base_dir`` with generated credentials; ports ``base_port``+0..4."""

    what = "SeaweedFS"
    log_name = "seaweed.log"

    def __init__(
        self,
        base_dir: Path,
        *,
        base_port: int | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        binary: Path | None = None,
        daemon: Daemon | None = None,
    ) -> None:
        super().__init__(base_dir, daemon)
        if base_port is None:
            base_port = free_port_block(PORT_OFFSETS, set())
        self.base_port = base_port
        self.access_key = access_key or f"drtool{secrets.token_hex(8)}"
        self.secret_key = secret_key or secrets.token_urlsafe(30)
        self.binary = binary if binary is not None else weed_binary()
        self._probe_client: S3Client | None = None

    @classmethod
    def from_state(
        cls, state: Mapping[str, object], access_key: str, secret_key: str
    ) -> SeaweedServer:
        """Rebuild a server recorded by :meth:`to_state`."""
        return cls(
            Path(str(state["base_dir"])),
            base_port=int(str(state["base_port"])),
            access_key=access_key,
            secret_key=secret_key,
            binary=Path(str(state["binary"])),
            daemon=Daemon.from_state(state) if "pid" in state else None,
        )

    def to_state(self) -> dict[str, object]:
        """Everything but the credentials."""
        return {
            "base_dir": str(self.base_dir),
            "base_port": self.base_port,
            "port": self.port,
            "binary": str(self.binary),
            **self._daemon_state(),
        }

    @property
    def port(self) -> int:
        """The S3 API port on 127.0.0.1."""
        return self.base_port + 3

    @property
    def ports(self) -> tuple[int, ...]:
        """All ten ports ``weed mini`` binds (HTTP and gRPC)."""
        return tuple(self.base_port + offset for offset in PORT_OFFSETS)

    @property
    def endpoint(self) -> S3Endpoint:
        """The S3 API and its admin credentials."""
        return S3Endpoint(f"http://{HOST}:{self.port}", self.access_key, self.secret_key)

    def create_bucket(self, name: str) -> None:
        """Create bucket ``name`` (no error if this server already has it)."""
        from drtool.s3session import s3_client  # boto3 only when a bucket is made (ADR 0032)

        client = s3_client(self.endpoint)
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
            client.create_bucket(Bucket=name)

    def _secrets(self) -> tuple[str, ...]:
        return (self.access_key, self.secret_key)

    def _socket_files(self) -> list[Path]:
        grpc = [
            Path(f"/tmp/seaweedfs-{service}-grpc-{port}.sock")  # weed hard-codes /tmp for these
            for service, port in zip(_SERVICES, self.ports[5:], strict=True)
        ]
        return [self.base_dir / "s3.sock", self.base_dir / "filer.sock", *grpc]

    def _prepare(self) -> Launch:
        """The ``weed mini`` command line: every port ours, loopback only, no auto-created buckets.

        The credentials go through the environment (never argv, visible in ps); the caller's own
        ``AWS_*`` variables are dropped so they cannot leak into the server.
        """
        data = self.base_dir / "data"
        data.mkdir(mode=0o700, parents=True, exist_ok=True)
        for sock in self._socket_files()[:2]:
            check_socket_path(sock)
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env |= {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}
        service_ports = zip(_SERVICES, self.ports[:5], strict=True)
        argv = [str(self.binary), "mini", f"-dir={data}", f"-ip={HOST}", f"-ip.bind={HOST}"]
        argv += [f"-{service}.port={port}" for service, port in service_ports]
        argv += [
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.telemetry=false",
            "-admin.ui=false",
            "-s3.autoCreateBucket=false",  # like MinIO: a missing bucket is an error
            "-volume.preStopSeconds=0",
            "-volume.max=5000",  # a volume per bucket: the auto limit stops near 76 buckets
            f"-s3.localSocket={self.base_dir / 's3.sock'}",
            f"-filer.localSocket={self.base_dir / 'filer.sock'}",
        ]
        return Launch(argv, cwd=self.base_dir, env=env)

    def _probe(self) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError

        from drtool.s3session import s3_client

        if self._probe_client is None:
            self._probe_client = s3_client(self.endpoint, timeout=2.0, attempts=1)
        try:
            self._probe_client.list_buckets()
        except (BotoCoreError, ClientError):
            return False
        return True
