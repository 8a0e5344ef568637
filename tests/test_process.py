"""Commands as byte streams: exit status, stderr tail, timeouts and process-group cleanup."""

from __future__ import annotations

import logging
import os
import time
from contextlib import closing
from pathlib import Path

import pytest

from drtool.errors import SourceError
from drtool.sources.process import CommandFailed, child_env, command_stream, run_checked

ENV = child_env({})


def sh(script: str, *, min_bytes: int = 0) -> list[bytes]:
    """Run a shell script through command_stream and collect its chunks."""
    argv = ["sh", "-c", script]
    return list(command_stream(argv, env=ENV, timeout=30, name="job", min_bytes=min_bytes))


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie awaiting a reaper counts as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_dead(pid: int) -> bool:
    """Poll until ``pid`` is gone (SIGKILL delivery is asynchronous); False if it never goes."""
    for _ in range(500):
        if not alive(pid):
            return True
        time.sleep(0.01)
    return False


def test_yields_stdout() -> None:
    assert b"".join(sh("printf hello; printf ' world'")) == b"hello world"


def test_nonzero_exit_raises_with_stderr_tail() -> None:
    with pytest.raises(CommandFailed, match=r"^job exited 3: first \| second$") as info:
        sh("printf out; echo first >&2; echo >&2; echo second >&2; exit 3")
    assert info.value.returncode == 3
    assert info.value.exit_code == 3


def test_big_output_then_failure_is_an_error_after_all_bytes() -> None:
    chunks: list[bytes] = []
    script = (
        "head -c 5000000 /dev/zero; yes noise | head -n 200000 >&2; echo disk on fire >&2; exit 1"
    )
    with pytest.raises(CommandFailed, match=r"job exited 1: .*noise \| disk on fire$"):
        for chunk in command_stream(["sh", "-c", script], env=ENV, timeout=30, name="job"):
            chunks.append(chunk)
    assert sum(map(len, chunks)) == 5_000_000


def test_signal_death_is_named() -> None:
    with pytest.raises(CommandFailed, match="job was killed by signal SIGTERM"):
        sh("kill -TERM $$")


def test_too_small_output_is_refused() -> None:
    with pytest.raises(SourceError, match="job produced 2 bytes: implausibly small output"):
        sh("printf ab", min_bytes=5)


def test_timeout_kills_the_whole_process_group() -> None:
    chunks: list[bytes] = []
    script = "sleep 60 & echo $!; echo waiting >&2; wait"
    stream = command_stream(["sh", "-c", script], env=ENV, timeout=0.5, name="job")
    with pytest.raises(SourceError, match=r"^job timed out after 0.5 s: waiting$"):
        for chunk in stream:
            chunks.append(chunk)
    assert wait_dead(int(b"".join(chunks)))


def test_early_close_kills_the_whole_process_group() -> None:
    script = 'sleep 60 & printf "%010d" $!; wait'
    stream = command_stream(["sh", "-c", script], env=ENV, timeout=60, name="job", read_size=10)
    pid = int(next(stream))
    assert alive(pid)
    stream.close()
    assert wait_dead(pid)


def test_consumer_interrupt_kills_the_child() -> None:
    script = 'sleep 60 & printf "%010d" $!; wait'
    stream = command_stream(["sh", "-c", script], env=ENV, timeout=60, name="job", read_size=10)
    pids: list[int] = []
    with pytest.raises(KeyboardInterrupt), closing(stream):
        for chunk in stream:
            pids.append(int(chunk))
            raise KeyboardInterrupt
    assert wait_dead(pids[0])


def test_secrets_are_scrubbed_from_messages() -> None:
    env = child_env({"PGPASSWORD": "Canary-7f3a"})
    argv = ["sh", "-c", 'echo "auth failed for Canary-7f3a" >&2; exit 2']
    with pytest.raises(CommandFailed) as info:
        list(command_stream(argv, env=env, timeout=30, name="job", secrets=["Canary-7f3a"]))
    assert "Canary-7f3a" not in str(info.value)
    assert "auth failed for ***" in str(info.value)


def test_missing_binary() -> None:
    with pytest.raises(SourceError, match="job: cannot run /nonexistent/tool"):
        run_checked(["/nonexistent/tool"], env=ENV, timeout=5, name="job")


def test_run_checked_returns_stdout_and_logs_stderr(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        out = run_checked(
            ["sh", "-c", "echo result; echo careful >&2"], env=ENV, timeout=5, name="job"
        )
    assert out == "result\n"
    assert "job stderr: careful" in caplog.text


def test_child_env_is_minimal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "leak")
    monkeypatch.setenv("PGDATABASE", "elsewhere")
    env = child_env({"PGHOST": "db"})
    assert env["PGHOST"] == "db" and env["LC_ALL"] == "C" and "PATH" in env
    assert "AWS_SECRET_ACCESS_KEY" not in env and "PGDATABASE" not in env
