"""`drtool stack` and `drtool demo` through the real command line, on real local servers."""

from __future__ import annotations

import json
import re
import signal
import stat
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from support.cli import run_drtool, start_drtool
from support.processes import alive, processes_in
from support.servers import servers_required

from drtool.config import load_config
from drtool.runtime import binaries
from drtool.sources.redis_client import connect as connect_redis

pytestmark = pytest.mark.slow  # every test starts local stacks and runs the CLI on them

SIZES = ["--messages", "500", "--attachments", "5", "--users", "20", "--rooms", "5"]


def last_error(result: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in result.stderr
    return result.stderr.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def servers_available() -> None:
    with servers_required():
        binaries.pg_bin_dir()
        binaries.redis_server_binary()
        binaries.weed_binary()


def new_home(runtime_root: Path) -> Path:
    """A --home the postgres user can enter (as root the servers run as postgres)."""
    home = runtime_root / f"home-{uuid.uuid4().hex[:8]}"
    home.mkdir(mode=0o711)
    home.chmod(0o711)
    return home


@pytest.fixture(scope="module")
def home(runtime_root: Path, servers_available: None) -> Iterator[Path]:
    home = new_home(runtime_root)
    yield home
    for name in ("src", "dst"):
        run_drtool("stack", "down", "--name", name, home=home)
    assert processes_in(home) == []


@pytest.fixture(scope="module")
def stacks(home: Path) -> dict[str, subprocess.CompletedProcess[str]]:
    """Two named stacks, side by side: `src` and `dst`."""
    return {name: run_drtool("stack", "up", "--name", name, home=home) for name in ("src", "dst")}


def status_json(home: Path, name: str) -> dict[str, object]:
    result = run_drtool("stack", "status", "--name", name, "--json", home=home)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert isinstance(data, dict)
    return data


def counts(status: dict[str, object]) -> dict[str, int]:
    rows = status["counts"]
    assert isinstance(rows, list)
    return {f"{store} {what}": count for store, what, count in rows}


def test_up_prints_a_config_that_works(
    home: Path, stacks: dict[str, subprocess.CompletedProcess[str]]
) -> None:
    ports = set()
    for name, result in stacks.items():
        assert result.returncode == 0, result.stderr
        assert f"stack {name!r} is up" in result.stdout
        config = home / "stacks" / name / "drtool.toml"
        assert result.stdout.strip().splitlines()[-1] == f"config: {config}"
        cfg = load_config(config, {})
        endpoints = cfg.stack()
        ports.add(endpoints.postgres.port)
        with psycopg.connect(**endpoints.postgres.connect_kwargs()) as conn:
            assert conn.execute("SELECT 1 + 1").fetchone() == (2,)
        client = connect_redis(endpoints.redis)
        try:
            assert client.ping()
        finally:
            client.close()
        # the config holds paths to the credentials, never the credentials
        text = config.read_text()
        assert cfg.postgres.password and cfg.postgres.password not in text
        assert cfg.minio.secret_key and cfg.minio.secret_key not in text
        secrets = sorted((home / "stacks" / name / "secrets").iterdir())
        assert [p.name for p in secrets] == [
            "pg_password",
            "redis_password",
            "s3_access_key",
            "s3_secret_key",
        ]
        for path in secrets:
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert len(ports) == 2  # two stacks, two servers


def test_seed_then_status_json_shows_the_counts(
    home: Path, stacks: dict[str, subprocess.CompletedProcess[str]]
) -> None:
    result = run_drtool("stack", "seed", "--name", "src", *SIZES, home=home)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("seeded stack 'src' in ")
    assert "messages 500" in result.stdout
    seeded = counts(status_json(home, "src"))
    assert seeded["postgres rows in public.messages"] == 500
    assert seeded["postgres rows in public.users"] == 20
    assert seeded["postgres rows in public.chat_rooms"] == 5
    assert seeded["postgres rows in public.attachments"] == 5
    assert seeded["minio objects in attachments"] == 5
    assert seeded["minio bytes in attachments"] > 0
    assert seeded["redis keys in db0"] > 0
    # the other stack is untouched
    other = counts(status_json(home, "dst"))
    assert "postgres rows in public.messages" not in other
    assert other["minio objects in attachments"] == 0
    # seeding again without --force refuses instead of doubling the data
    again = run_drtool("stack", "seed", "--name", "src", *SIZES, home=home)
    assert again.returncode == 2
    assert "--force" in last_error(again)
    assert counts(status_json(home, "src"))["postgres rows in public.messages"] == 500


def test_status_table_shows_each_server(
    home: Path, stacks: dict[str, subprocess.CompletedProcess[str]]
) -> None:
    result = run_drtool("stack", "status", "--name", "dst", home=home)
    assert result.returncode == 0, result.stderr
    for server in ("postgres", "redis", "minio"):
        assert re.search(rf"{server}\s+│ yes\s+│ \d+", result.stdout), result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--messages", "-1"], "error: --messages must be >= 0 (got -1)"),
        (["--attachments", "-5"], "error: --attachments must be >= 0 (got -5)"),
        (["--users", "1"], "error: --users must be >= 2 for anyone to chat (got 1)"),
        (["--messages", "many"], "Error: Invalid value for '--messages': 'many' is not a valid"),
    ],
)
def test_seed_rejects_nonsense_sizes(
    home: Path,
    stacks: dict[str, subprocess.CompletedProcess[str]],
    args: list[str],
    message: str,
) -> None:
    result = run_drtool("stack", "seed", "--name", "dst", *args, home=home)
    assert result.returncode == 2
    assert last_error(result).startswith(message)
    assert "postgres rows in public.messages" not in counts(status_json(home, "dst"))


def test_up_refuses_a_stack_that_is_up(
    home: Path, stacks: dict[str, subprocess.CompletedProcess[str]]
) -> None:
    before = status_json(home, "dst")
    result = run_drtool("stack", "up", "--name", "dst", home=home)
    assert result.returncode == 2
    assert "`drtool stack down`" in last_error(result)
    assert status_json(home, "dst")["servers"] == before["servers"]


def test_down_leaves_no_process(runtime_root: Path, servers_available: None) -> None:
    home = new_home(runtime_root)
    assert run_drtool("stack", "up", "--name", "gone", home=home).returncode == 0
    servers = status_json(home, "gone")["servers"]
    assert isinstance(servers, dict)
    pids = [server["pid"] for server in servers.values()]
    assert all(alive(pid) for pid in pids)
    result = run_drtool("stack", "down", "--name", "gone", home=home)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "stack 'gone' is down"
    assert [pid for pid in pids if alive(pid)] == []
    assert processes_in(home) == []
    assert not (home / "stacks" / "gone").exists()
    assert run_drtool("stack", "down", "--name", "gone", home=home).returncode == 10


def test_status_of_a_stack_that_is_not_up(tmp_path: Path) -> None:
    result = run_drtool("stack", "status", "--name", "nothing", home=tmp_path)
    assert result.returncode == 10
    assert last_error(result).endswith("start one with `drtool stack up`")
    assert result.stdout == ""


def test_a_bad_stack_name_is_a_usage_error(tmp_path: Path) -> None:
    result = run_drtool("stack", "up", "--name", "../etc", home=tmp_path)
    assert result.returncode == 2
    assert last_error(result).startswith("error: stack name '../etc': use 1-31 lowercase")
    assert not (tmp_path / "etc").exists()


def test_demo_runs_the_whole_loop(runtime_root: Path, servers_available: None) -> None:
    home = new_home(runtime_root)
    result = run_drtool("demo", "--messages", "2000", "--attachments", "20", timeout=600, home=home)
    assert result.returncode == 0, result.stderr
    [snapshot] = re.findall(r"^snapshot (\S+): VALID$", result.stdout, re.MULTILINE)
    assert re.search(r"^ messages\s+│ 2000", result.stdout, re.MULTILINE)
    assert f"backup {snapshot}" in result.stdout
    operator = home / "demo" / "operator.toml"
    assert f"drtool --config {operator} list" in result.stdout
    # the stack is gone, its servers too
    assert processes_in(home) == []
    assert not (home / "stacks" / "demo").exists()
    # every log line on stderr (not a terminal) is JSON; the rest are the demo's steps
    for line in result.stderr.splitlines():
        if line.startswith("{"):
            assert {"time", "level", "message"} <= json.loads(line).keys()
        else:
            assert line.startswith("-> "), line
    # what the demo tells the user to run next works
    verify = run_drtool("verify", "--read-data", config=operator)
    assert verify.returncode == 0, verify.stderr
    listed = run_drtool("list", "--json", config=operator)
    assert listed.returncode == 0, listed.stderr
    [record, base] = json.loads(listed.stdout)
    assert (record["id"], record["status"]) == (snapshot, "VALID")
    # continuous protection: a base backup and WAL, and a drill restoring to a moment between
    # two canaries; the copy held the first and not the second
    assert base["status"] == "VALID" and f"base backup {base['id']}" in result.stdout
    assert len(re.findall(r"^# Restore drill \S+: PASSED$", result.stdout, re.MULTILINE)) == 2
    assert re.search(
        r"^\| nothing past the moment \| pass \| postgres: its newest canary is 1\.\d s before",
        result.stdout,
        re.MULTILINE,
    )
    assert len(list((home / "demo" / "reports").glob("*.json"))) == 2
    wal = run_drtool("wal", "verify", config=operator)
    assert wal.returncode == 0, wal.stderr
    # the demo host config holds recipients only, never the identity
    assert "AGE-SECRET-KEY" not in (home / "demo" / "backup.toml").read_text()


def test_sigterm_stops_the_demo_and_its_servers(
    runtime_root: Path, servers_available: None
) -> None:
    home = new_home(runtime_root)
    process = start_drtool("demo", "--messages", "50000000", home=home)
    try:
        assert process.stderr is not None
        for line in process.stderr:  # wait until the stack is up and seeding has begun
            if line.startswith("-> seeding"):
                break
        else:
            pytest.fail(f"the demo ended before seeding: {process.wait()}")
        state = json.loads((home / "stacks" / "demo" / "stack.json").read_text())
        pids = [server["pid"] for server in state["servers"].values()]
        assert all(alive(pid) for pid in pids)
        process.send_signal(signal.SIGTERM)
        rest = process.stderr.read()
        assert process.wait(timeout=120) == 143  # SIGTERM: 128 + 15 (ADR 0008)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert "-> stopping the stack" in rest
    assert rest.strip().splitlines()[-1] == "error: interrupted"
    assert [pid for pid in pids if alive(pid)] == []
    assert processes_in(home) == []


BIG = ["--messages", "50000000"]


def other_clients(conn: psycopg.Connection[Any]) -> int:
    """Other clients connected to this server now."""
    row = conn.execute(
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE pid <> pg_backend_pid() AND backend_type = 'client backend'"
    ).fetchone()
    return row[0] if row else 0


def test_sigterm_during_seed_keeps_the_stack(runtime_root: Path, servers_available: None) -> None:
    home = new_home(runtime_root)
    assert run_drtool("stack", "up", "--name", "busy", home=home).returncode == 0
    try:
        endpoints = load_config(home / "stacks" / "busy" / "drtool.toml", {}).stack()
        process = start_drtool("stack", "seed", "--name", "busy", *BIG, home=home)
        try:
            with psycopg.connect(**endpoints.postgres.connect_kwargs()) as conn:
                conn.autocommit = True
                # wait until the seeder is connected and working (its handlers are installed)
                while process.poll() is None and not other_clients(conn):
                    time.sleep(0.05)
            assert process.poll() is None
            process.send_signal(signal.SIGTERM)
            _, stderr = process.communicate(timeout=120)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        assert process.returncode == 143
        assert stderr.strip().splitlines()[-1] == "error: interrupted"
        # Ctrl-C on a seed stops the seed, not the stack
        servers = status_json(home, "busy")["servers"]
        assert isinstance(servers, dict)
        assert all(server["running"] for server in servers.values())
    finally:
        assert run_drtool("stack", "down", "--name", "busy", home=home).returncode == 0
    assert processes_in(home) == []
