"""A fault-injecting HTTP proxy in front of an S3 server, for the storage fault tests (U1-U7).

It listens on 127.0.0.1 and forwards every request's raw bytes unchanged (the ``Host`` header
and the SigV4 signature stay valid) to the upstream S3 port, one upstream connection per
request. A test scripts it with :class:`Rule` s: the first ``times`` requests matching a method
and a regular expression on the request target (path and query) get the rule's fault instead:

- ``status``/``code``: answer with that HTTP status and an S3 XML ``<Error>`` body (503
  SlowDown, 500 InternalError, 429, 403 RequestTimeTooSkewed...); with ``forward=True`` the
  request reaches the server first and only its answer is replaced (a lost reply, or a
  CompleteMultipartUpload that returns 200 with an ``<Error>`` body).
- ``reset_request_after``: read that many bytes of the request body, then reset the connection.
- ``reset_response_after``: forward, send that many bytes of the answer, then reset.
- ``request_body``: forward a changed request body (``Content-Length`` adjusted).
- ``response_body``/``response_headers``: change the server's answer.
- ``date_offset``: rewrite the answer's ``Date`` header by that much (clock skew).
- ``delay``: wait that many seconds before forwarding.
- ``after_forward``: call this with the request target once the server has answered, before
  the client sees the answer (e.g. overwrite the object just stored with fewer bytes).

Every request is recorded in :attr:`FaultProxy.seen` as ``(method, target)``.
"""

from __future__ import annotations

import re
import socket
import socketserver
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime, parsedate_to_datetime
from typing import Protocol
from urllib.parse import urlsplit

Headers = list[tuple[str, str]]

#: The request target of an UploadPart (a PUT with these query parameters).
UPLOAD_PART = r"[?&]partNumber=\d+"
#: The request target of a CompleteMultipartUpload (a POST with an uploadId).
COMPLETE = r"\?uploadId="


@dataclass
class Rule:
    """One scripted fault for the first ``times`` matching requests (``None``: all of them)."""

    method: str
    path: str
    times: int | None = 1
    status: int | None = None
    code: str = "InternalError"
    forward: bool = False
    reset_request_after: int | None = None
    reset_response_after: int | None = None
    request_body: Callable[[bytes], bytes] | None = None
    response_body: Callable[[bytes], bytes] | None = None
    response_headers: Callable[[Headers], Headers] | None = None
    date_offset: timedelta | None = None
    delay: float = 0.0
    after_forward: Callable[[str], None] | None = None
    hits: int = field(default=0, init=False)

    def matches(self, method: str, target: str) -> bool:
        """Whether this rule applies to the request (and still has hits left)."""
        if self.times is not None and self.hits >= self.times:
            return False
        return method == self.method and re.search(self.path, target) is not None


@dataclass
class _Message:
    """A parsed HTTP head and its raw bytes, plus the body as read."""

    start: str
    headers: Headers
    body: bytes
    raw_head: bytes

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)


class _Reader(Protocol):
    """A buffered binary stream: a socket's file or a request handler's ``rfile``."""

    def readline(self, size: int = -1, /) -> bytes: ...

    def read(self, size: int = -1, /) -> bytes: ...


def _status(start_line: str) -> int:
    """The status code of an HTTP response's start line."""
    return int(start_line.split(" ")[1])


def _read_head(reader: _Reader) -> tuple[str, Headers, bytes] | None:
    """The start line and headers (None at a clean EOF)."""
    raw = b""
    while True:
        line = reader.readline(65537)
        if not line:
            if raw:
                raise ConnectionError("connection closed inside a message head")
            return None
        raw += line
        if line in (b"\r\n", b"\n"):
            break
    lines = raw.decode("latin-1").split("\r\n")
    headers = [
        (k.strip(), v.strip()) for k, _, v in (h.partition(":") for h in lines[1:] if h.strip())
    ]
    return lines[0], headers, raw


def _read_chunked(reader: _Reader) -> bytes:
    """A chunked body, decoded."""
    out = b""
    while True:
        size = int(reader.readline().split(b";")[0].strip() or b"0", 16)
        if size == 0:
            while reader.readline() not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return out
        out += reader.read(size)
        reader.readline()


def _encode(start: str, headers: Headers, body: bytes, *, keep_length: bool = False) -> bytes:
    """A message with ``Content-Length`` set to the body (unless ``keep_length``: HEAD)."""
    if not keep_length:
        headers = [
            (k, v) for k, v in headers if k.lower() not in ("content-length", "transfer-encoding")
        ] + [("Content-Length", str(len(body)))]
    head = start + "\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
    return head.encode("latin-1") + body


def error_xml(code: str, message: str = "injected by the fault proxy") -> bytes:
    """An S3 error document."""
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message>"
        "<RequestId>fault-proxy</RequestId></Error>"
    ).encode()


def _reset(sock: socket.socket) -> None:
    """Close with a TCP RST (SO_LINGER 0), like a middlebox dropping the connection."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    finally:
        sock.close()


class _Handler(socketserver.StreamRequestHandler):
    server: _Server

    def handle(self) -> None:
        while True:
            head = _read_head(self.rfile)
            if head is None:
                return
            start, headers, raw = head
            method, target = start.split(" ")[:2]
            proxy = self.server.proxy
            rule = proxy._take(method, target)
            if _header(headers, "Expect", "").lower() == "100-continue":
                self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                self.wfile.flush()
            if rule is not None and rule.reset_request_after is not None:
                length = int(_header(headers, "Content-Length", "0"))
                self.rfile.read(min(length, rule.reset_request_after))
                _reset(self.connection)
                return
            if _header(headers, "Transfer-Encoding", "").lower() == "chunked":
                body = _read_chunked(self.rfile)
                headers = [(k, v) for k, v in headers if k.lower() != "transfer-encoding"]
                forward_raw = _encode(start, headers, body)
            else:
                body = self.rfile.read(int(_header(headers, "Content-Length", "0")))
                forward_raw = raw + body
            proxy._count(method, target, len(body))
            if rule is not None and rule.request_body is not None:
                forward_raw = _encode(start, headers, rule.request_body(body))
            if rule is not None and rule.delay:
                time.sleep(rule.delay)
            if rule is not None and rule.status is not None and not rule.forward:
                self._send(_fault_answer(rule, method))
                continue
            answer = proxy._forward(forward_raw, method)
            if answer is None:
                _reset(self.connection)
                return
            if rule is not None:
                if rule.after_forward is not None:
                    rule.after_forward(target)
                answer = _alter(rule, method, answer)
                if rule.reset_response_after is not None:
                    data = _encode(answer.start, answer.headers, answer.body, keep_length=True)
                    self.wfile.write(data[: rule.reset_response_after])
                    self.wfile.flush()
                    _reset(self.connection)
                    return
            proxy._count_received(len(answer.body))
            self._send(_encode(answer.start, answer.headers, answer.body, keep_length=True))

    def _send(self, data: bytes) -> None:
        self.wfile.write(data)
        self.wfile.flush()


def _header(headers: Headers, name: str, default: str) -> str:
    return next((v for k, v in headers if k.lower() == name.lower()), default)


def _fault_answer(rule: Rule, method: str) -> bytes:
    assert rule.status is not None
    now = datetime.now(UTC) + (rule.date_offset or timedelta())
    headers = [
        ("Content-Type", "application/xml"),
        ("Date", format_datetime(now, usegmt=True)),
        ("x-amz-request-id", "fault-proxy"),
    ]
    body = b"" if method == "HEAD" else error_xml(rule.code)
    start = f"HTTP/1.1 {rule.status} {_REASONS.get(rule.status, 'Error')}"
    if rule.response_headers is not None:
        headers = rule.response_headers(headers)
    return _encode(start, headers, body)


def _alter(rule: Rule, method: str, answer: _Message) -> _Message:
    """Apply the rule's changes to a forwarded answer."""
    headers, body, start = answer.headers, answer.body, answer.start
    if rule.status is not None:  # forward=True: the server acted, its answer is replaced
        start = f"HTTP/1.1 {rule.status} {_REASONS.get(rule.status, 'Error')}"
        body = error_xml(rule.code)
        headers = [(k, v) for k, v in headers if k.lower() in ("date", "x-amz-request-id")]
        headers += [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))]
    if rule.response_body is not None:
        body = rule.response_body(body)
        headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
        headers.append(("Content-Length", str(len(body))))
    if rule.date_offset is not None:
        headers = [
            (k, _shift(v, rule.date_offset) if k.lower() == "date" else v) for k, v in headers
        ]
    if rule.response_headers is not None:
        headers = rule.response_headers(headers)
    return _Message(start, headers, body, b"")


def _shift(value: str, offset: timedelta) -> str:
    return format_datetime(parsedate_to_datetime(value) + offset, usegmt=True)


_REASONS = {
    200: "OK",
    403: "Forbidden",
    429: "Too Many Requests",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    proxy: FaultProxy


class FaultProxy:
    """The proxy; ``endpoint_url`` goes into drtool's ``repository.endpoint_url``."""

    def __init__(self, upstream_url: str) -> None:
        parts = urlsplit(upstream_url)
        assert parts.hostname and parts.port, upstream_url
        self.upstream = (parts.hostname, parts.port)
        self.rules: list[Rule] = []
        self.seen: list[tuple[str, str]] = []
        #: request body bytes per request ``(method, target, bytes)``, and answer body bytes
        self.bodies: list[tuple[str, str, int]] = []
        self.received_bytes = 0
        self._lock = threading.Lock()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.proxy = self
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint_url(self) -> str:
        """``http://127.0.0.1:<port>``."""
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def add(self, *rules: Rule) -> None:
        """Script more faults (checked in order; the first match applies)."""
        with self._lock:
            self.rules.extend(rules)

    def clear(self) -> None:
        """Back to a transparent proxy."""
        with self._lock:
            self.rules.clear()

    @property
    def sent_bytes(self) -> int:
        """Request body bytes forwarded (uploads), every request counted."""
        with self._lock:
            return sum(n for _, _, n in self.bodies)

    def _count(self, method: str, target: str, size: int) -> None:
        with self._lock:
            self.bodies.append((method, target, size))

    def _count_received(self, size: int) -> None:
        with self._lock:
            self.received_bytes += size

    def _take(self, method: str, target: str) -> Rule | None:
        with self._lock:
            self.seen.append((method, target))
            for rule in self.rules:
                if rule.matches(method, target):
                    rule.hits += 1
                    return rule
        return None

    def _forward(self, raw: bytes, method: str) -> _Message | None:
        """Send the raw request upstream; the answer (1xx skipped), or None if it failed."""
        try:
            with socket.create_connection(self.upstream, timeout=60) as up:
                up.sendall(raw)
                reader = up.makefile("rb")
                head = _read_head(reader)
                while head is not None and 100 <= _status(head[0]) < 200:
                    head = _read_head(reader)  # skip 1xx answers
                if head is None:
                    return None
                start, headers, raw_head = head
                status = _status(start)
                if method == "HEAD" or status in (204, 304):
                    body = b""
                elif _header(headers, "Transfer-Encoding", "").lower() == "chunked":
                    body = _read_chunked(reader)
                    headers = [(k, v) for k, v in headers if k.lower() != "transfer-encoding"]
                    headers.append(("Content-Length", str(len(body))))
                elif (length := _header(headers, "Content-Length", "")) != "":
                    body = reader.read(int(length))
                else:
                    body = reader.read()
                    headers.append(("Content-Length", str(len(body))))
                return _Message(start, headers, body, raw_head)
        except OSError:
            return None

    def start(self) -> FaultProxy:
        """Serve in a background thread."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the listening socket."""
        self._server.shutdown()
        self._server.server_close()


@contextmanager
def fault_proxy(upstream_url: str) -> Iterator[FaultProxy]:
    """A running :class:`FaultProxy` in front of ``upstream_url``."""
    proxy = FaultProxy(upstream_url).start()
    try:
        yield proxy
    finally:
        proxy.stop()
