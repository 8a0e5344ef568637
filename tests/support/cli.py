"""The one way tests run the real ``drtool`` command: as a child process, the way an operator
or the backup container runs it, with our environment minus every ``DRTOOL_*`` setting (a
developer's own settings must not change what a test sees).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# the drtool of the interpreter running the tests (the worktree's venv), never a fixed path
DRTOOL = Path(sys.executable).with_name("drtool")
TIMEOUT_S = 600.0


def drtool_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Our environment without ``DRTOOL_*``, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DRTOOL_")}
    env.update(extra or {})
    return env


def drtool_argv(*args: str, config: Path | None = None, home: Path | None = None) -> list[str]:
    """``drtool [--config C] [--home H] args...``."""
    return [
        str(DRTOOL),
        *(["--config", str(config)] if config is not None else []),
        *(["--home", str(home)] if home is not None else []),
        *args,
    ]


def run_drtool(
    *args: str,
    config: Path | None = None,
    home: Path | None = None,
    env: Mapping[str, str] | None = None,
    extra_env: Mapping[str, str] | None = None,
    input: str | None = None,
    cwd: Path | None = None,
    timeout: float = TIMEOUT_S,
) -> subprocess.CompletedProcess[str]:
    """Run ``drtool`` to the end; its exit code and output.

    ``env`` replaces the whole environment (default: :func:`drtool_env`); ``extra_env`` is
    added on top. Stdin is not a terminal (``input`` or nothing).
    """
    done = subprocess.run(
        drtool_argv(*args, config=config, home=home),
        input=input,
        stdin=subprocess.DEVNULL if input is None else None,
        capture_output=True,
        text=True,
        env={**(env if env is not None else drtool_env()), **(extra_env or {})},
        cwd=cwd,
        timeout=timeout,
        check=False,
    )
    return done


def start_drtool(
    *args: str,
    config: Path | None = None,
    home: Path | None = None,
    env: Mapping[str, str] | None = None,
    extra_env: Mapping[str, str] | None = None,
    **popen: Any,
) -> subprocess.Popen[str]:
    """Start ``drtool`` in the background (text pipes for stdout and stderr unless ``popen``
    says otherwise); the caller waits, signals or kills it."""
    options: dict[str, Any] = {
        "stdin": subprocess.DEVNULL,
        "stdout": subprocess.PIPE,
        "stderr": subprocess.PIPE,
        "text": True,
        **popen,
    }
    return subprocess.Popen(
        drtool_argv(*args, config=config, home=home),
        env={**(env if env is not None else drtool_env()), **(extra_env or {})},
        **options,
    )


def error_lines(stderr: str) -> list[str]:
    """The ``error: ...`` lines drtool printed (there must be exactly one on failure)."""
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


def one_error(done: subprocess.CompletedProcess[str], code: int) -> str:
    """Assert exit ``code`` and exactly one one-line error message; return it."""
    assert done.returncode == code, (done.returncode, done.stderr[-2000:])
    lines = error_lines(done.stderr)
    assert len(lines) == 1, done.stderr[-2000:]
    return lines[0]
