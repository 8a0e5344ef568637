"""Tests need real servers; a missing server binary skips them on a developer's machine and
fails them in CI (``DRTOOL_REQUIRE_SERVERS=1``), so CI never passes by skipping.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

import pytest

from drtool.runtime.binaries import MissingBinary

REQUIRE_SERVERS_ENV = "DRTOOL_REQUIRE_SERVERS"


def skip_or_fail(reason: str) -> NoReturn:
    """Skip the test, or fail it when ``DRTOOL_REQUIRE_SERVERS=1``."""
    if os.environ.get(REQUIRE_SERVERS_ENV) == "1":
        pytest.fail(f"{reason} ({REQUIRE_SERVERS_ENV}=1)", pytrace=False)
    pytest.skip(reason)


@contextmanager
def servers_required() -> Iterator[None]:
    """Turn a missing server binary inside the block into :func:`skip_or_fail`."""
    try:
        yield
    except MissingBinary as exc:
        skip_or_fail(str(exc))


def free_port() -> int:
    """A loopback port nothing listens on right now (for an unreachable endpoint)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
