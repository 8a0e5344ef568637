"""The local runtime: real PostgreSQL, Redis and SeaweedFS processes on loopback ports."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import redis
from botocore.exceptions import ClientError
from support.servers import servers_required

from drtool.endpoints import PostgresEndpoint, RedisEndpoint, S3Endpoint
from drtool.errors import NotFound, SourceError
from drtool.runtime import binaries
from drtool.runtime.local import LocalStack, StackPorts
from drtool.runtime.pgserver import PostgresServer
from drtool.runtime.s3server import PORT_OFFSETS
from drtool.s3session import s3_client

REPO = Path(__file__).resolve().parent.parent


def _up(state_dir: Path, name: str = "test") -> LocalStack:
    with servers_required():
        return LocalStack.up(state_dir, name)


def _up_binaries() -> None:
    """Look up every binary ``LocalStack.up`` needs (MissingBinary if one is absent)."""
    binaries.pg_bin_dir()
    binaries.redis_server_binary()
    binaries.weed_binary()


def _process_running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"  # a zombie has exited


def _port_answers(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _socket_files(state_dir: Path, status: dict[str, dict[str, object]]) -> list[Path]:
    base = int(str(status["minio"]["port"])) - 3
    pg_sock = state_dir / "postgres" / "sock" / f".s.PGSQL.{status['postgres']['port']}"
    found = [pg_sock, state_dir / "minio/s3.sock", state_dir / "minio/filer.sock"]
    for offset in PORT_OFFSETS[5:]:
        found += Path("/tmp").glob(f"seaweedfs-*-grpc-{base + offset}.sock")
    return [p for p in found if p.exists()]


def _assert_all_gone(state_dir: Path, status: dict[str, dict[str, object]]) -> None:
    """No server process, listening port or socket file of the stack is left."""
    for server, info in status.items():
        assert not _process_running(int(str(info["pid"]))), f"{server} still runs"
    base = int(str(status["minio"]["port"])) - 3
    ports = [int(str(status[s]["port"])) for s in ("postgres", "redis")]
    ports += [base + offset for offset in PORT_OFFSETS]
    assert [p for p in ports if _port_answers(p)] == []
    assert _socket_files(state_dir, status) == []


def _pg_query(ep: PostgresEndpoint, query: str) -> list[tuple[object, ...]]:
    with psycopg.connect(ep.conninfo(), password=ep.password, autocommit=True) as conn:
        cur = conn.execute(query)
        return cur.fetchall() if cur.description else []


def _redis(ep: RedisEndpoint) -> redis.Redis:
    return redis.Redis(host=ep.host, port=ep.port, password=ep.password)


def _child_code(state_dir: Path, statement: str) -> str:
    return (
        "import json; from pathlib import Path; from drtool.runtime.local import LocalStack; "
        f"d = Path({str(state_dir)!r}); {statement}"
    )


def _in_child(state_dir: Path, statement: str) -> str:
    """Run ``statement`` in a new Python process (``d`` is the state dir); return its stdout."""
    code = _child_code(state_dir, statement)
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture
def stack_dir(runtime_root: Path) -> Iterator[Path]:
    """A not-yet-existing state dir; a stack a failed test left up there is taken down."""
    path = runtime_root / f"stack-{uuid.uuid4().hex[:8]}"
    yield path
    if (path / "stack.json").exists():
        LocalStack.load(path).down()


@pytest.mark.slow
def test_stack_serves_sql_redis_and_s3_then_down_leaves_nothing(stack_dir: Path) -> None:
    stack = _up(stack_dir, "main")
    eps = stack.endpoints
    status = stack.status()
    assert {s: info["running"] for s, info in status.items()} == dict.fromkeys(status, True)

    assert eps.postgres.dbname == "cotalk"
    _pg_query(eps.postgres, "CREATE TABLE messages (id int PRIMARY KEY, body text)")
    _pg_query(eps.postgres, "INSERT INTO messages VALUES (1, 'hello')")
    assert _pg_query(eps.postgres, "SELECT body FROM messages") == [("hello",)]
    with _redis(eps.redis) as client:
        client.set("room:1:last", "42")
        assert client.get("room:1:last") == b"42"
    s3 = s3_client(eps.minio)
    s3.put_object(Bucket="attachments", Key="a/b.png", Body=b"\x89PNG")
    assert s3.get_object(Bucket="attachments", Key="a/b.png")["Body"].read() == b"\x89PNG"

    stack.down(keep_data=True)
    _assert_all_gone(stack_dir, status)
    assert (stack_dir / "postgres" / "data" / "PG_VERSION").exists()
    stack.down()  # idempotent; now removes the state dir
    assert not stack_dir.exists()


@pytest.mark.slow
def test_secrets_stay_out_of_state_argv_and_status(stack_dir: Path) -> None:
    with _up(stack_dir) as stack:
        eps = stack.endpoints
        secrets = [eps.postgres.password, eps.redis.password]
        secrets += [eps.minio.access_key, eps.minio.secret_key]
        public = (stack_dir / "stack.json").read_text() + json.dumps(stack.status())
        for info in stack.status().values():
            public += Path(f"/proc/{info['pid']}/cmdline").read_text()
        assert [s for s in secrets if s and s in public] == []
        modes = {p.name: p.stat().st_mode & 0o777 for p in (stack_dir / "secrets").iterdir()}
        assert set(modes.values()) == {0o600}
        assert len(modes) == 4


@pytest.mark.slow
def test_stack_loaded_in_another_process_reports_and_goes_down(stack_dir: Path) -> None:
    # `drtool stack up` and `stack down` are separate processes: the servers must outlive the first
    with servers_required():
        StackPorts.pick()
        _up_binaries()
    _in_child(stack_dir, "LocalStack.up(d, 'cli')")
    status = json.loads(_in_child(stack_dir, "print(json.dumps(LocalStack.load(d).status()))"))
    assert [info["running"] for info in status.values()] == [True, True, True]
    eps = LocalStack.load(stack_dir).endpoints
    assert _pg_query(eps.postgres, "SELECT current_database()") == [("cotalk",)]

    _in_child(stack_dir, "LocalStack.load(d).down()")
    _assert_all_gone(stack_dir, status)
    assert not stack_dir.exists()


@pytest.mark.slow
def test_exception_inside_with_block_tears_the_stack_down(stack_dir: Path) -> None:
    with pytest.raises(RuntimeError, match="drill check failed"), _up(stack_dir) as stack:
        status = stack.status()
        raise RuntimeError("drill check failed")
    _assert_all_gone(stack_dir, status)
    assert not stack_dir.exists()


@pytest.mark.slow
def test_ctrl_c_during_up_stops_what_already_started(stack_dir: Path) -> None:
    with servers_required():
        _up_binaries()
    code = _child_code(stack_dir, "LocalStack.up(d, 'interrupted')")
    child = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stderr=subprocess.PIPE)
    seaweed_log = stack_dir / "minio" / "seaweed.log"
    while not seaweed_log.exists() and child.poll() is None:
        time.sleep(0.01)  # PostgreSQL and Redis are up once SeaweedFS (the slowest) is spawned
    assert child.poll() is None, "up ended before SeaweedFS started"
    state = json.loads((stack_dir / "stack.json").read_text())
    child.send_signal(signal.SIGINT)
    _, stderr = child.communicate()
    assert b"KeyboardInterrupt" in stderr
    assert child.returncode != 0
    for server in ("postgres", "redis"):
        assert not _process_running(state["servers"][server]["pid"])
        assert not _port_answers(state["servers"][server]["port"])
    base = state["servers"]["minio"]["base_port"]
    assert [o for o in PORT_OFFSETS if _port_answers(base + o)] == []
    assert not stack_dir.exists()


@pytest.mark.parametrize("which", ["postgres", "s3 grpc"])
def test_taken_port_gives_a_clear_error_and_starts_nothing(stack_dir: Path, which: str) -> None:
    with socket.socket() as holder:
        for _ in range(20):  # a port picked free may be taken by another process before the bind
            ports = StackPorts.pick()
            taken = ports.postgres if which == "postgres" else ports.s3_base + 10003
            try:
                holder.bind(("127.0.0.1", taken))
                break
            except OSError:
                continue
        else:
            pytest.fail("no free port block to hold a port of")
        holder.listen()
        message = f"port {taken} on 127.0.0.1 is in use"
        with pytest.raises(SourceError, match=message) as err, servers_required():
            LocalStack.up(stack_dir, "busy", ports=ports)
    assert err.value.exit_code == 3
    assert not stack_dir.exists()
    assert not _port_answers(ports.redis)


@pytest.mark.slow
def test_two_named_stacks_run_side_by_side(runtime_root: Path) -> None:
    a_dir = runtime_root / f"a-{uuid.uuid4().hex[:6]}"
    b_dir = runtime_root / f"b-{uuid.uuid4().hex[:6]}"
    with _up(a_dir, "alpha") as alpha, _up(b_dir, "beta") as beta:
        a, b = alpha.endpoints, beta.endpoints
        ports_a = {int(str(i["port"])) for i in alpha.status().values()}
        assert ports_a.isdisjoint(int(str(i["port"])) for i in beta.status().values())
        _pg_query(a.postgres, "CREATE TABLE only_in_alpha (id int)")
        with _redis(a.redis) as ra, _redis(b.redis) as rb:
            ra.set("k", "alpha")
            assert rb.get("k") is None
        s3_client(a.minio).put_object(Bucket="attachments", Key="x", Body=b"alpha")
        assert s3_client(b.minio).list_objects_v2(Bucket="attachments")["KeyCount"] == 0
        assert _pg_query(b.postgres, "SELECT to_regclass('only_in_alpha')::text") == [(None,)]
    assert not a_dir.exists() and not b_dir.exists()


def test_load_without_a_stack_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match=r"no local stack in .*stack up") as err:
        LocalStack.load(tmp_path)
    assert err.value.exit_code == 10


def test_missing_postgres_binaries_name_the_package(stack_dir: Path, tmp_path: Path) -> None:
    message = r"initdb not found in .*Debian package postgresql"
    with pytest.raises(binaries.MissingBinary, match=message):
        LocalStack.up(stack_dir, "nobin", pg_bin_dir=tmp_path)
    assert not stack_dir.exists()


@pytest.mark.slow
def test_server_that_dies_at_startup_reports_its_log(runtime_root: Path) -> None:
    with servers_required():
        server = PostgresServer(runtime_root / f"broken-{uuid.uuid4().hex[:6]}")
    server.start()
    server.stop()
    with open(server.data_dir / "postgresql.conf", "a") as conf:
        conf.write("shared_buffers = lots\n")
    with pytest.raises(SourceError, match=r'PostgreSQL exited.*"shared_buffers"') as err:
        server.start()
    assert server.password not in str(err.value)
    assert not server.running


@pytest.mark.slow
def test_servers_refuse_clients_without_the_password(
    pg_server: PostgresEndpoint, redis_server: RedisEndpoint, s3_server: S3Endpoint
) -> None:
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(pg_server.conninfo(), password="wrong")
    with (
        redis.Redis(host=redis_server.host, port=redis_server.port) as client,
        pytest.raises(redis.AuthenticationError),
    ):
        client.ping()
    wrong = S3Endpoint(s3_server.endpoint_url, s3_server.access_key, "wrong")
    with pytest.raises(ClientError, match="SignatureDoesNotMatch"):
        s3_client(wrong).list_buckets()


@pytest.mark.parametrize("run", [1, 2])
def test_pg_database_is_fresh_per_test(pg_database: PostgresEndpoint, run: int) -> None:
    _pg_query(pg_database, "CREATE TABLE t (run int)")  # fails if a database were reused
    _pg_query(pg_database, f"INSERT INTO t VALUES ({run})")
    assert _pg_query(pg_database, "SELECT run FROM t") == [(run,)]


@pytest.mark.parametrize("run", [1, 2])
def test_redis_db_is_flushed_per_test(redis_db: RedisEndpoint, run: int) -> None:
    with _redis(redis_db) as client:
        assert client.dbsize() == 0
        client.set("left-behind", run)


@pytest.mark.parametrize("run", [1, 2])
def test_s3_bucket_is_fresh_per_test(s3_server: S3Endpoint, s3_bucket: str, run: int) -> None:
    s3 = s3_client(s3_server)
    assert s3.list_objects_v2(Bucket=s3_bucket)["KeyCount"] == 0
    s3.put_object(Bucket=s3_bucket, Key="left-behind", Body=str(run).encode())
