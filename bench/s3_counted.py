"""Run a drtool command with every S3 HTTP request it sends counted, by bucket and operation.

Usage: python bench/s3_counted.py COUNTS.json drtool-args...

The counts come from botocore's ``before-send`` event, which fires once per HTTP attempt
(retries and multipart parts included), registered on every client the process creates —
the same hook the capture tests use (tests/test_capture.py::count_s3_calls), here for a whole
process, so a benchmark can measure the real ``drtool`` command. ``COUNTS.json`` holds
``{"<bucket> <Operation>": n}`` and is rewritten every second and at exit.
"""

from __future__ import annotations

import atexit
import json
import os
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import botocore.session

_counts: Counter[str] = Counter()
_lock = threading.Lock()


def _seen(request: Any, event_name: str, **_: Any) -> None:
    """Count one request (never return a value: that would replace the response)."""
    operation = event_name.rsplit(".", 1)[-1]
    bucket = urlsplit(request.url).path.lstrip("/").split("/", 1)[0]
    with _lock:
        _counts[f"{bucket} {operation}"] += 1


def _hooked(original: Any) -> Any:
    def create_client(self: Any, *args: Any, **kwargs: Any) -> Any:
        client = original(self, *args, **kwargs)
        client.meta.events.register("before-send.s3", _seen)
        return client

    return create_client


def _dump(path: Path) -> None:
    with _lock:
        data = json.dumps(dict(_counts), sort_keys=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(data)
    os.replace(tmp, path)


def _every_second(path: Path) -> None:
    while True:
        threading.Event().wait(1.0)
        _dump(path)


def main() -> None:
    out = Path(sys.argv[1])
    botocore.session.Session.create_client = _hooked(  # type: ignore[method-assign]
        botocore.session.Session.create_client
    )
    atexit.register(_dump, out)
    threading.Thread(target=_every_second, args=(out,), daemon=True).start()
    from drtool.cli import main as drtool_main

    sys.argv = ["drtool", *sys.argv[2:]]
    drtool_main()


if __name__ == "__main__":
    main()
