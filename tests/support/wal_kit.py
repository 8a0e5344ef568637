"""A PostgreSQL streaming into a repository: what the WAL tests (stream, restore to a moment,
retention) share. ``wal_pg`` is a module-scoped PostgreSQL 15 (slots and restarts disturb no
other module); ``kit`` a repository with a backup-host config streaming from it and an
operator config; :func:`make_kit` builds one for any server (other majors).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest

from drtool import keys
from drtool.config import load_config
from drtool.endpoints import PostgresEndpoint
from drtool.pipeline.seal import unseal
from drtool.repository.access import open_repo
from drtool.runtime.pgserver import PostgresServer
from drtool.services import repo as repo_svc
from drtool.services.stack import write_config
from drtool.wal.index import WalEntry, WalIndex, load_index
from drtool.wal.names import parse_lsn, parse_segment, segment_of_lsn
from drtool.wal.pruned import append_pruned, load_pruned
from drtool.wal.sealer import Sealer, wal_header
from drtool.wal.spool import Spool
from support.cli import DRTOOL, run_drtool
from support.servers import servers_required

WAIT_S = 120.0
SEG = 16 * 1024 * 1024


def start_wal_server(runtime_root: Path, major: int) -> PostgresServer:
    """A started PostgreSQL of ``major`` for streaming (skipped/failed per the server policy)."""
    with servers_required():
        server = PostgresServer(
            runtime_root / f"pgwal{major}-{uuid.uuid4().hex[:6]}",
            major=major,
            settings={"fsync": "off", "synchronous_commit": "off"},
        )
    server.start()
    return server


@pytest.fixture(scope="module", name="wal_pg")
def wal_pg_fixture(runtime_root: Path) -> Iterator[PostgresServer]:
    """A PostgreSQL 15 of the module's own: slots and restarts disturb no other test.

    initdb's default pg_hba.conf already has ``host replication all 127.0.0.1/32``, and
    wal_level=replica and max_wal_senders=10 are the defaults: nothing more is needed.
    """
    server = start_wal_server(runtime_root, 15)
    yield server
    server.stop()


def start_standby(runtime_root: Path, primary: PostgresServer) -> PostgresServer:
    """A streaming standby of ``primary`` (``pg_basebackup -R``), started: the caller stops it."""
    base = runtime_root / f"standby-{uuid.uuid4().hex[:6]}"
    base.mkdir(mode=0o700)
    env = {**os.environ, **primary.endpoint.libpq_env()}
    tool = str(primary.bin_dir / "pg_basebackup")
    subprocess.run(
        [tool, "-D", str(base / "data"), "-R", "-X", "stream", "-c", "fast", "--no-password"],
        env=env,
        check=True,
        capture_output=True,
    )
    subprocess.run(["chown", "-R", "postgres:postgres", str(base)], check=True)
    standby = PostgresServer(base, password=primary.password, major=primary.major)
    standby.start(timeout=120)
    return standby


def wait_for(what: str, predicate: Callable[[], Any], timeout: float = WAIT_S) -> Any:
    """Poll ``predicate`` until truthy; fail naming ``what`` (a bound, not a timing check)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.2)


@dataclass
class WalKit:
    """A repository, a backup-host config streaming from ``wal_pg`` and an operator config."""

    root: Path
    server: PostgresServer
    config: Path
    operator: Path
    identity: Path
    slot: str

    @property
    def repo_dir(self) -> Path:
        return self.root / "repository"

    @property
    def spool(self) -> Spool:
        return Spool(self.root / "spool")

    @property
    def log(self) -> Path:
        return self.root / "stream.log"

    def index(self) -> WalIndex:
        cfg = load_config(self.operator, {})
        repo = open_repo(cfg)
        return load_index(repo.storage, repo.verify_keys, repo.info.repo_id)

    def segments(self) -> list[str]:
        return sorted(e.name for e in self.index().segments())

    def start(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        clean = {k: v for k, v in os.environ.items() if not k.startswith("DRTOOL_")}
        with self.log.open("ab") as log:
            return subprocess.Popen(
                [DRTOOL, "--config", str(self.config), "wal", "stream", *args],
                env={**clean, **(env or {})},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )

    def decrypt(self, entry: WalEntry) -> bytes:
        ids = keys.load_identities(self.identity, None)
        raw = (self.repo_dir / entry.key).read_bytes()
        return b"".join(
            unseal([raw], identities=ids, expected=wal_header(self.repo_id(), entry.name), name="x")
        )

    def repo_id(self) -> str:
        return open_repo(load_config(self.operator, {})).info.repo_id

    def forget(self, name: str, base: str) -> Path:
        """A signed removal record for WAL file ``name`` (as prune writes): the index then
        lacks it, a gap as a dropped slot leaves. Returns the record's file (delete it to undo)."""
        repo = open_repo(load_config(self.operator, {}))
        chain = load_pruned(repo.storage, repo.verify_keys, repo.info.repo_id)
        key = append_pruned(
            repo.storage,
            chain,
            repo_id=repo.info.repo_id,
            signing_key=keys.load_signing_key(self.root / "keys" / "signing.key"),
            host="test",
            created=datetime.now(UTC).isoformat(),
            floor_segment=name,
            base_snapshot=base,
            removed=[name],
        )
        return self.repo_dir / key

    def seal(self, files: list[Path]) -> list[str]:
        """Seal WAL ``files`` (copied out of a server's pg_wal) into the repository as the
        streamer does (the backup host's config and signing key); returns their names."""
        cfg = load_config(self.config, {})
        repo = open_repo(cfg)
        spool = self.root / f"extra-spool-{uuid.uuid4().hex[:6]}"
        spool.mkdir()
        for path in files:
            shutil.copyfile(path, spool / path.name)
        report = Sealer(
            storage=repo.storage,
            index=load_index(repo.storage, repo.verify_keys, repo.info.repo_id),
            spool=Spool(spool),
            recipients=list(cfg.keys.recipients),
            signing_key=keys.load_signing_key(Path(cfg.keys.signing_key_file)),
            host=socket.gethostname(),
            segment_size=SEG,
        ).seal_pending()
        return report.sealed


@pytest.fixture(name="kit")
def kit_fixture(tmp_path: Path, wal_pg: PostgresServer) -> Iterator[WalKit]:
    """A repository streaming from the module's PostgreSQL 15."""
    yield from make_kit(tmp_path, wal_pg)


def make_kit(
    tmp_path: Path, wal_pg: PostgresServer, repository: dict[str, Any] | None = None
) -> Iterator[WalKit]:
    """Keys, a repository and the two configs for ``wal_pg``; drops the test slots after.

    ``repository``: the ``[repository]`` section (e.g. an S3 bucket with Object Lock);
    default a directory (``WalKit.repo_dir``)."""
    (tmp_path / "keys").mkdir(mode=0o700)
    identity = tmp_path / "keys" / "operator.key"
    recipient = keys.write_identity(identity, passphrase=None)
    verify_key = keys.write_signing_key(tmp_path / "keys" / "signing.key")
    password = tmp_path / "keys" / "pg-password"
    password.write_text(wal_pg.password)
    password.chmod(0o600)
    slot = f"t_{uuid.uuid4().hex[:10]}"
    ep = wal_pg.endpoint
    section = repository or {"url": (tmp_path / "repository").as_uri()}
    postgres = {"host": ep.host, "port": ep.port, "user": ep.user, "dbname": ep.dbname}
    config = write_config(
        tmp_path / "backup.toml",
        {
            "repository": section,
            "keys": {
                "recipients": [recipient],
                "signing_key_file": str(tmp_path / "keys" / "signing.key"),
                "verify_key": verify_key,
            },
            "postgres": {**postgres, "password_file": str(password)},
            "wal": {
                "spool_dir": str(tmp_path / "spool"),
                "slot": slot,
                "flush_interval": 1.0,
                "restart_max_s": 2.0,
            },
        },
        "a test WAL streamer",
    )
    operator = write_config(
        tmp_path / "operator.toml",
        {
            "repository": section,
            "keys": {"identity_file": str(identity), "verify_key": verify_key},
            "postgres": {**postgres, "password_file": str(password)},
            "wal": {"spool_dir": str(tmp_path / "spool")},
        },
        "a test operator",
    )
    repo_svc.init_repo(load_config(config, {}))
    yield WalKit(tmp_path, wal_pg, config, operator, identity, slot)
    with admin(ep) as conn:  # a forgotten slot would pin WAL on the module's server
        conn.execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
            "WHERE NOT active AND slot_name LIKE 't\\_%' OR slot_name LIKE 'ref\\_%'"
        )


def admin(ep: PostgresEndpoint) -> psycopg.Connection[Any]:
    return psycopg.connect(**ep.connect_kwargs(), autocommit=True)


def write_rows(ep: PostgresEndpoint) -> None:
    """Commit some rows: WAL for --until-idle to close and seal."""
    with admin(ep) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS walt (id bigserial, body text)")
        conn.execute("INSERT INTO walt (body) SELECT md5(g::text) FROM generate_series(1, 1000) g")


def stop_streamer(proc: subprocess.Popen[bytes]) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(60)


def one(conn: psycopg.Connection[Any], query: str) -> str:
    row = conn.execute(query).fetchone()
    assert row is not None
    return str(row[0])


def restored_notes(
    result: subprocess.CompletedProcess[str], password: str, *, restart: bool = False
) -> list[str]:
    """The notes the restored copy holds (after a plain ``pg_ctl restart`` when ``restart``:
    the copy must not need the staged WAL, long gone); then it is stopped."""
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    data_dir = Path(out["data_dir"])
    ep = PostgresEndpoint("127.0.0.1", out["port"], "postgres", "cotalk", password)

    def pg_ctl(*args: str) -> None:
        subprocess.run(
            [out["pg_ctl"], "-D", str(data_dir), "-m", "fast", "-w", *args],
            user="postgres",
            check=True,
            capture_output=True,
            cwd=data_dir.parent,
        )

    try:
        if restart:
            pg_ctl("-l", out["log"], "restart")
        with admin(ep) as conn:
            assert one(conn, "SELECT pg_is_in_recovery()") == "False"
            return [str(r[0]) for r in conn.execute("SELECT note FROM marks ORDER BY note")]
    finally:
        pg_ctl("stop")


def base_backup(kit: WalKit) -> str:
    """A ``postgres-base`` snapshot through the library (the CLI path is tested elsewhere)."""
    from drtool.services.backup import run_backup

    cfg = load_config(kit.config, {})
    return run_backup(cfg, home=kit.root, env={}, components=("postgres-base",)).snapshot_id


@dataclass
class History:
    """What happened on the source, and where it is stored."""

    kit: WalKit
    base: str
    before_base: datetime  # a moment before the oldest base backup finished
    at: datetime  # after A committed, before B did
    lsn: str  # the WAL position after A's commit, before B's
    scratch: Path  # a directory the postgres user can enter, for restored data dirs

    def restore(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run_drtool(
            "restore", "--component", "postgres", "--yes", *args, config=self.kit.operator
        )

    def new_dir(self) -> Path:
        return self.scratch / f"restored-{uuid.uuid4().hex[:6]}"


def record_history(kit: WalKit, scratch: Path) -> History:
    ep = kit.server.endpoint
    write_rows(ep)
    proc = kit.start()
    try:
        wait_for("the streamer to seal", lambda: len(kit.segments()) >= 1)
        with admin(ep) as conn:
            before_base = datetime.fromisoformat(one(conn, "SELECT clock_timestamp()"))
        time.sleep(1.1)  # the base's snapshot finishes strictly later (ids have 1 s steps)
        base = base_backup(kit)
        with admin(ep) as conn:
            conn.execute("CREATE TABLE marks (note text)")
            conn.execute("INSERT INTO marks VALUES ('A')")
            at = datetime.fromisoformat(one(conn, "SELECT clock_timestamp()"))
            lsn = one(conn, "SELECT pg_current_wal_insert_lsn()")
            time.sleep(0.05)  # B's commit time is strictly after the target
            conn.execute("INSERT INTO marks VALUES ('B')")
            end = parse_lsn(one(conn, "SELECT pg_current_wal_insert_lsn()"))
        needed = segment_of_lsn(end, 1, SEG).segno + 1  # and one after it (the gap test)
        write_rows(ep)
        wait_for(
            "the segment after B's sealed",
            lambda: any(parse_segment(n, SEG).segno >= needed for n in kit.segments()),
        )
        assert stop_streamer(proc) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    return History(kit, base, before_base, at, lsn, scratch)
