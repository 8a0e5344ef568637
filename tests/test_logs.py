"""Logs on stderr: JSON lines for Loki when not on a terminal, and secrets never shown."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

CANARY = "s3cr3t-canary"

PROGRAM = textwrap.dedent(
    f"""
    import logging
    from pathlib import Path
    from drtool.logs import setup_logging

    setup_logging(debug=True, secrets=["{CANARY}"])
    log = logging.getLogger("drtool.test")
    log.debug("connecting with password %s", "{CANARY}")
    log.info("plain message", extra={{"component": "postgres", "dsn": "pw={CANARY} host=db"}})
    log.warning("objects", extra={{"endpoint": {{"password": "{CANARY}"}}, "count": 3}})
    log.error("path %s", Path("/run/secrets/{CANARY}"))
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed")
    """
)


def run_program(stderr: int | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", PROGRAM],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE if stderr is None else stderr,
        text=True,
        timeout=60,
        check=True,
    )


def test_json_lines_when_stderr_is_not_a_terminal() -> None:
    lines = run_program().stderr.splitlines()
    entries = [json.loads(line) for line in lines]  # every line is one JSON object
    assert len(entries) == 5
    for entry in entries:
        assert {"time", "level", "message"} <= entry.keys()
        assert entry["time"].endswith("+00:00")
    assert [e["level"] for e in entries] == ["debug", "info", "warning", "error", "error"]
    assert entries[1]["message"] == "plain message"
    assert entries[1]["component"] == "postgres"
    assert "ValueError: boom" in entries[4]["exception"]


def test_secrets_are_redacted_in_messages_and_extra_fields() -> None:
    output = run_program().stderr
    assert CANARY not in output
    entries = [json.loads(line) for line in output.splitlines()]
    assert entries[0]["message"] == "connecting with password ***"
    assert entries[1]["dsn"] == "pw=*** host=db"
    assert entries[2]["endpoint"] == "{'password': '***'}"
    assert entries[2]["count"] == 3
    assert entries[3]["message"] == "path /run/secrets/***"


def test_readable_lines_on_a_terminal() -> None:
    controller, terminal = os.openpty()
    try:
        run_program(stderr=terminal)
        os.close(terminal)
        chunks = []
        while True:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO: the terminal side is closed and drained
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(controller)
    text = b"".join(chunks).decode()
    assert "INFO    plain message" in text
    assert "connecting with password ***" in text
    assert CANARY not in text
    assert not text.lstrip().startswith("{")
