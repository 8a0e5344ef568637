"""A repository in an S3 bucket (AWS, MinIO, SeaweedFS, Backblaze B2): ``s3://bucket/prefix``.

Clients come from :mod:`drtool.s3session`. botocore's own retries are off; every request goes
through :func:`drtool.storage.retry.retry_call`, so one policy covers 5xx, 429, SlowDown, resets
and timeouts, including part uploads (a retried part re-sends the same bytes) and interrupted reads
(resumed with a Range request pinned to the ETag or version). Errors become one-line
``StorageError``/``NotFound`` messages built from the endpoint, bucket, key, HTTP status and
error code only, never from botocore's text.
"""

from __future__ import annotations

import builtins
import hashlib
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from functools import partial
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit

from botocore.config import Config
from botocore.exceptions import (
    ClientError,
    ConnectionError,
    ConnectTimeoutError,
    EndpointConnectionError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
    PartialCredentialsError,
    ReadTimeoutError,
    SSLError,
)

from drtool import s3session
from drtool.errors import ConfigError, DrtoolError, IntegrityError, NotFound, StorageError
from drtool.faults import crash_point
from drtool.storage.base import (
    Capabilities,
    MiB,
    ObjectInfo,
    Storage,
    StorageOptions,
    check_key,
)
from drtool.storage.retry import Backoff, retry_call

log = logging.getLogger(__name__)
T = TypeVar("T")

MIN_PART = 5 * MiB
MAX_PART = 5 * 1024 * MiB
MAX_PARTS = 10_000
COPY_PART = 1024 * MiB  # one UploadPartCopy range of a header rewrite
READ_SIZE = MiB
_GROW_EVERY = 1000  # parts; the part size doubles after each such run beyond the flat stretch
_MAX_SKEW = timedelta(minutes=15)
_RETRY_STATUS = {429, 500, 502, 503, 504}
_RETRY_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestTimeout",
    "InternalError",
    "ServiceUnavailable",
    "RequestLimitExceeded",
    "TooManyRequests",
}
# botocore's ConnectionError (EndpointConnectionError, ConnectTimeoutError, SSLError...) is not
# an HTTPClientError (ConnectionClosedError, ReadTimeoutError, ResponseStreamingError...).
_NETWORK_ERRORS = (ConnectionError, HTTPClientError, IncompleteReadError)
_DENIED_CODES = {"AccessDenied", "AllAccessDisabled", "403"}
_CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken"}
_MISSING_CODES = {"NoSuchKey", "NoSuchVersion", "NotFound", "404"}


def _code_status(e: ClientError) -> tuple[str, int]:
    """The error code (sanitised: it comes from the server) and HTTP status."""
    code = str(e.response.get("Error", {}).get("Code", ""))
    status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return (code if re.fullmatch(r"[A-Za-z0-9.]{1,64}", code) else "error"), status


def _retryable(e: Exception) -> bool:
    """Transient: throttling, 5xx, resets, timeouts, truncated bodies; never TLS failures."""
    if isinstance(e, ClientError):
        code, status = _code_status(e)
        return status in _RETRY_STATUS or code in _RETRY_CODES
    return isinstance(e, _NETWORK_ERRORS) and not isinstance(e, SSLError)


def _multipart_etag(parts: builtins.list[dict[str, Any]]) -> str | None:
    """The ETag S3 gives a completed multipart upload, if the part ETags are plain MD5s."""
    try:
        digests = b"".join(bytes.fromhex(p["ETag"].strip('"')) for p in parts)
    except ValueError:
        return None
    return f"{hashlib.md5(digests, usedforsecurity=False).hexdigest()}-{len(parts)}"


def part_size_for(base: int, expected_size: int | None, number: int) -> int:
    """Size of part ``number`` (1-based) so that any object fits in 10,000 parts.

    With a size hint the parts are big enough for the hint in 5,000 parts; either way the size
    doubles after every 1,000 parts beyond a flat stretch (5,000 with a hint, else 1,000).
    """
    size, flat = base, _GROW_EVERY
    if expected_size is not None:
        flat = MAX_PARTS // 2
        size = max(base, math.ceil(expected_size / flat / MiB) * MiB)
    doublings = 0 if number <= flat else (number - flat - 1) // _GROW_EVERY + 1
    return int(min(MAX_PART, size * 2**doublings))


def _rechunk(chunks: Iterable[bytes], size_of: Callable[[int], int]) -> Iterator[bytearray]:
    """Re-cut arbitrary chunks into parts of ``size_of(n)`` bytes; the last may be shorter.

    Each part is a fresh buffer handed over without a copy: memory is one part in the making.
    """
    number, buf = 1, bytearray()
    for chunk in chunks:
        view = memoryview(chunk)
        while len(view):
            take = size_of(number) - len(buf)
            buf += view[:take]
            view = view[take:]
            if len(buf) == size_of(number):
                yield buf
                number, buf = number + 1, bytearray()
    if buf or number == 1:
        yield buf


def pool_size(options: StorageOptions) -> int:
    """HTTP connections the client keeps: every parallel put's parts in flight, plus two.

    ``parallel_puts`` is backup.minio_workers: with a pool smaller than the threads using it,
    urllib3 discards the surplus connections and each put opens a fresh TLS connection.
    """
    return max(10, options.parallel_puts * options.max_concurrency + 2)


def _display_endpoint(endpoint_url: str | None, region: str) -> str:
    """The endpoint without user info, query or fragment."""
    if not endpoint_url:
        return f"https://s3.{region}.amazonaws.com"
    u = urlsplit(endpoint_url)
    host = u.hostname or ""
    port = f":{u.port}" if u.port else ""
    return f"{u.scheme}://{host}{port}{u.path.rstrip('/')}"


class S3Storage(Storage):
    """Objects under ``prefix`` in ``bucket``; see the module docstring for the policies."""

    capabilities = Capabilities(object_lock=True, server_clock=True, access_control=True)

    def __init__(self, bucket: str, prefix: str, options: StorageOptions) -> None:
        if options.part_size < MIN_PART:
            raise ConfigError(
                f"storage part_size: must be at least 5 MiB (got {options.part_size})"
            )
        if options.max_concurrency < 1 or options.retries < 1:
            raise ConfigError("storage max_concurrency and retries: must be at least 1")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.options = options
        self.url = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self.endpoint = _display_endpoint(options.endpoint_url, options.region)
        self._backoff = Backoff(attempts=options.retries)
        config = Config(
            signature_version="s3v4",
            region_name=options.region,
            s3={"addressing_style": "path" if options.path_style else "virtual"},
            retries={"mode": "standard", "total_max_attempts": 1},
            connect_timeout=options.connect_timeout,
            read_timeout=options.read_timeout,
            max_pool_connections=pool_size(options),
            tcp_keepalive=True,
        )
        self._client = s3session.new_client(
            endpoint_url=options.endpoint_url,
            aws_access_key_id=options.access_key,
            aws_secret_access_key=options.secret_key,
            config=config,
        )

    # -- plumbing -------------------------------------------------------------------------

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{check_key(key)}" if self.prefix else check_key(key)

    def _where(self, full_key: str | None) -> str:
        where = f"s3 {self.endpoint} bucket {self.bucket}"
        return f"{where} key {full_key}" if full_key else where

    def _skewed(self, e: ClientError) -> bool:
        """A bare 403 (HEAD has no body) whose Date header is far from our clock."""
        headers = e.response.get("ResponseMetadata", {}).get("HTTPHeaders", {})
        try:
            server = parsedate_to_datetime(headers["date"])
        except (KeyError, TypeError, ValueError):
            return False
        return abs(server - datetime.now(UTC)) > _MAX_SKEW

    def _translate(self, e: Exception, full_key: str | None, *, final: bool = True) -> DrtoolError:
        """A one-line error naming endpoint, bucket, key and cause; no server text."""
        where = self._where(full_key)
        if isinstance(e, ClientError):
            code, status = _code_status(e)
            if code == "NoSuchBucket":
                return NotFound(f"{where}: bucket {self.bucket} does not exist")
            if code in _MISSING_CODES:
                return NotFound(f"{where}: not found")
            if code == "RequestTimeTooSkewed" or (status == 403 and self._skewed(e)):
                return StorageError(f"{where}: clock skew against the S3 server; check NTP")
            if code in _CREDENTIAL_CODES:
                return StorageError(
                    f"{where}: credentials rejected ({code}; check the access and secret key)"
                )
            if code in _DENIED_CODES:
                return StorageError(f"{where}: access denied (check the access key's permissions)")
            retried = f" after {self._backoff.attempts} attempts" if final and _retryable(e) else ""
            return StorageError(f"{where}: HTTP {status} {code}{retried}")
        if isinstance(e, NoCredentialsError | PartialCredentialsError):
            return StorageError(f"{where}: no credentials (set the access and secret key)")
        if isinstance(e, EndpointConnectionError | ConnectTimeoutError):
            return StorageError(f"{where}: cannot reach {self.endpoint} ({type(e).__name__})")
        if isinstance(e, SSLError):
            return StorageError(f"{where}: TLS error talking to {self.endpoint}")
        if isinstance(e, ReadTimeoutError):
            return StorageError(f"{where}: no answer from {self.endpoint} (read timeout)")
        return StorageError(f"{where}: {type(e).__name__} talking to {self.endpoint}")

    def _call(
        self, full_key: str | None, fn: Callable[[], T], stop: threading.Event | None = None
    ) -> T:
        """Run one request with the retry policy; translate botocore errors."""

        def on_retry(e: Exception, failures: int, delay: float) -> None:
            log.warning(
                "%s (retry %d/%d in %.1f s)",
                self._translate(e, full_key, final=False),
                failures,
                self._backoff.attempts - 1,
                delay,
            )

        try:
            return retry_call(
                fn, backoff=self._backoff, retryable=_retryable, on_retry=on_retry, stop=stop
            )
        except (ClientError, NoCredentialsError, PartialCredentialsError, *_NETWORK_ERRORS) as e:
            raise self._translate(e, full_key) from e

    def _info(self, key: str, head: dict[str, Any]) -> ObjectInfo:
        modified = head.get("LastModified")
        return ObjectInfo(
            key=key,
            size=int(head.get("ContentLength", head.get("Size", 0))),
            etag=str(head["ETag"]).strip('"') if head.get("ETag") else None,
            version_id=head.get("VersionId"),
            last_modified=modified.astimezone(UTC) if modified else None,
        )

    # -- writing --------------------------------------------------------------------------

    def put_buffer(self, size: int) -> int:
        """Below a part the whole object; else the parts in flight plus the one being filled."""
        base = self.options.part_size
        if size <= base:
            return size
        number, covered = 1, base  # parts grow beyond 1,000 of them (objects over ~8 GiB)
        while covered < size:
            number += 1
            covered += part_size_for(base, None, number)
        return (self.options.max_concurrency + 1) * part_size_for(base, None, number)

    def put(
        self,
        key: str,
        chunks: Iterable[bytes],
        *,
        retain_until: datetime | None = None,
        expected_size: int | None = None,
        confirm: bool = True,
    ) -> ObjectInfo:
        """One PutObject below a part, else a streaming multipart upload (aborted on failure).

        Then a HEAD compares the stored size and ETag with what was sent, except for a single
        PutObject with ``confirm=False`` (see :meth:`Storage.put`): a multipart upload is
        always confirmed, its answer does not carry the size.
        """
        full = self._key(key)
        extra: dict[str, Any] = {}
        if self.options.object_lock_mode and retain_until is not None:
            extra = {
                "ObjectLockMode": self.options.object_lock_mode,
                "ObjectLockRetainUntilDate": retain_until,
            }
        parts = _rechunk(chunks, partial(part_size_for, self.options.part_size, expected_size))
        ready = [next(parts)]
        resp: dict[str, Any]
        second = next(parts, None)
        single = second is None
        if second is None:
            body = _blob(ready[0])
            put = partial(self._client.put_object, Bucket=self.bucket, Key=full, Body=body)
            resp, sent, expected_etag = (
                dict(self._call(full, partial(put, **extra))),
                len(ready[0]),
                None,
            )
        else:
            ready.append(second)
            del second  # the list is the only reference: _chain drops each part once sent
            resp, sent, expected_etag = self._multipart(full, ready, parts, extra)
        version = resp.get("VersionId")
        etag = str(resp.get("ETag") or expected_etag or "").strip('"')
        if not confirm and single and etag:
            return ObjectInfo(key, sent, etag, version)
        info = self.head(key, version_id=version)
        if info.size != sent or (etag and info.etag and etag != info.etag):
            self._discard(key, version)
            raise IntegrityError(
                f"{self._where(full)}: stored object ({info.size} bytes, ETag {info.etag}) differs "
                f"from what was sent ({sent} bytes, ETag {etag or '?'})"
            )
        return info

    def _discard(self, key: str, version_id: str | None) -> None:
        """Best effort removal of an object that failed its post-upload check."""
        try:
            self.delete(key, version_id=version_id)
        except DrtoolError as e:
            log.warning("could not remove the bad upload: %s", e)

    def rewrite_head(
        self,
        key: str,
        head: bytes,
        skip: int,
        *,
        source: ObjectInfo,
        retain_until: datetime | None = None,
        expect_sha256: str | None = None,
    ) -> ObjectInfo:
        """Above one minimum part of payload: a multipart upload that re-sends only the start.

        Part 1 is ``head`` plus the first 5 MiB of the old payload (a ranged GET); the other
        parts are ``UploadPartCopy`` ranges of the old object, pinned to its version or ETag,
        so a 1 GB object costs ~5 MiB of upload (ADR 0023). ``expect_sha256`` cannot be checked
        without reading everything; the pin guarantees the copied bytes are the ones hashed.
        """
        size = source.size
        if size - skip <= MIN_PART:
            return super().rewrite_head(
                key,
                head,
                skip,
                source=source,
                retain_until=retain_until,
                expect_sha256=expect_sha256,
            )
        full = self._key(key)
        version: dict[str, Any] = {"VersionId": source.version_id} if source.version_id else {}
        pin: dict[str, Any] = {}
        copy_pin: dict[str, Any] = {}
        if not source.version_id and source.etag:  # without a version, the ETag pins it
            quoted = f'"{source.etag}"'
            pin, copy_pin = {"IfMatch": quoted}, {"CopySourceIfMatch": quoted}
        first_end = skip + MIN_PART
        fetch = partial(
            self._client.get_object,
            Bucket=self.bucket,
            Key=full,
            Range=f"bytes={skip}-{first_end - 1}",
            **version,
            **pin,
        )
        first = bytearray(head)
        for piece in self._stream(full, fetch, dict(self._call(full, fetch))):
            first += piece
        if len(first) != len(head) + MIN_PART:
            raise IntegrityError(f"{self._where(full)}: changed while its header was rewritten")
        extra: dict[str, Any] = {}
        if self.options.object_lock_mode and retain_until is not None:
            extra = {
                "ObjectLockMode": self.options.object_lock_mode,
                "ObjectLockRetainUntilDate": retain_until,
            }
        create = partial(
            self._client.create_multipart_upload, Bucket=self.bucket, Key=full, **extra
        )
        upload_id: str = self._call(full, create)["UploadId"]
        copy_source: dict[str, Any] = {"Bucket": self.bucket, "Key": full, **version}
        try:
            parts = [self._upload_part(full, upload_id, 1, first, threading.Event())]
            del first
            pos, number = first_end, 2
            while pos < size:
                end = min(size, pos + COPY_PART)
                if size - end < MIN_PART:
                    end = size  # the last part may be small, no other may
                copy = partial(
                    self._client.upload_part_copy,
                    Bucket=self.bucket,
                    Key=full,
                    UploadId=upload_id,
                    PartNumber=number,
                    CopySource=copy_source,  # type: ignore[arg-type]
                    CopySourceRange=f"bytes={pos}-{end - 1}",
                    **copy_pin,
                )
                etag = self._call(full, copy)["CopyPartResult"]["ETag"]
                parts.append({"PartNumber": number, "ETag": etag})
                pos, number = end, number + 1
            resp = self._complete(full, upload_id, parts)
        except BaseException:
            self._abort(full, upload_id)
            raise
        info = self.head(key, version_id=resp.get("VersionId"))
        expected = len(head) + size - skip
        if info.size != expected:
            self._discard(key, info.version_id)
            raise IntegrityError(
                f"{self._where(full)}: rewritten object is {info.size} bytes, expected {expected}"
            )
        return info

    def _multipart(
        self,
        full: str,
        head: builtins.list[bytearray],
        rest: Iterator[bytearray],
        extra: dict[str, Any],
    ) -> tuple[dict[str, Any], int, str | None]:
        """Upload parts with at most ``max_concurrency`` in flight; complete or abort."""
        create = partial(
            self._client.create_multipart_upload, Bucket=self.bucket, Key=full, **extra
        )
        upload_id: str = self._call(full, create)["UploadId"]
        stop = threading.Event()
        limit = self.options.max_concurrency
        done: builtins.list[dict[str, Any]] = []
        sent = 0
        try:
            with ThreadPoolExecutor(limit, thread_name_prefix="drtool-s3-part") as pool:
                pending: set[Future[dict[str, Any]]] = set()
                try:
                    for number, body in enumerate(_chain(head, rest), 1):
                        if number > MAX_PARTS:
                            raise StorageError(f"{self._where(full)}: more than {MAX_PARTS} parts")
                        while len(pending) >= limit:
                            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                            done.extend(f.result() for f in finished)
                        upload = partial(self._upload_part, full, upload_id, number, body, stop)
                        pending.add(pool.submit(upload))
                        sent += len(body)
                    done.extend(f.result() for f in pending)
                except BaseException:
                    stop.set()
                    for f in pending:
                        f.cancel()
                    raise
            done.sort(key=lambda p: int(p["PartNumber"]))
            resp = self._complete(full, upload_id, done)
        except BaseException:
            self._abort(full, upload_id)
            raise
        return resp, sent, _multipart_etag(done)

    def _upload_part(
        self, full: str, upload_id: str, number: int, body: bytearray, stop: threading.Event
    ) -> dict[str, Any]:
        """Upload one part, retried by ``_call``; ``stop`` (another part failed) ends retries."""
        send = partial(
            self._client.upload_part,
            Bucket=self.bucket,
            Key=full,
            UploadId=upload_id,
            PartNumber=number,
            Body=_blob(body),
        )
        etag = self._call(full, send, stop)["ETag"]
        if number == 1:
            crash_point("upload-part")
        return {"PartNumber": number, "ETag": etag}

    def _complete(
        self, full: str, upload_id: str, parts: builtins.list[dict[str, Any]]
    ) -> dict[str, Any]:
        """CompleteMultipartUpload; a 200 with an <Error> body arrives here as a 500 (botocore).

        A retry that finds the upload gone means an earlier attempt completed it whose answer
        was lost: return no response and let the HEAD check compare size and multipart ETag.
        """
        tried = False

        def complete() -> dict[str, Any]:
            nonlocal tried
            try:
                return dict(
                    self._client.complete_multipart_upload(
                        Bucket=self.bucket,
                        Key=full,
                        UploadId=upload_id,
                        MultipartUpload={"Parts": parts},  # type: ignore[typeddict-item]
                    )
                )
            except ClientError as e:
                if tried and _code_status(e)[0] == "NoSuchUpload":
                    return {}
                raise
            finally:
                tried = True

        return self._call(full, complete)

    def _abort(self, full: str, upload_id: str) -> None:
        """Abort an upload (already gone is fine); log, do not raise, when that fails."""
        try:
            self._abort_upload(full, upload_id)
        except DrtoolError as e:
            log.warning("could not abort the multipart upload (gc removes it later): %s", e)

    def _abort_upload(self, full: str, upload_id: str) -> None:
        abort = partial(
            self._client.abort_multipart_upload, Bucket=self.bucket, Key=full, UploadId=upload_id
        )
        self._call(full, partial(_tolerate, {"NoSuchUpload"}, abort))

    # -- reading --------------------------------------------------------------------------

    def get(self, key: str, *, version_id: str | None = None) -> Iterator[bytes]:
        """Stream in 1 MiB pieces; a broken read resumes with a Range pinned to ETag/version."""
        full = self._key(key)
        fetch = partial(self._client.get_object, Bucket=self.bucket, Key=full)
        if version_id:
            fetch = partial(fetch, VersionId=version_id)
        return self._stream(full, fetch, dict(self._call(full, fetch)))

    def _stream(
        self, full: str, fetch: Callable[..., Any], resp: dict[str, Any]
    ) -> Iterator[bytes]:
        """Yield the body, resuming a broken read with a Range request pinned to the same object.

        The pin (ETag, or the version id) makes a resume fail rather than splice bytes of an object
        that was replaced in between.
        """
        size = int(resp["ContentLength"])
        pin: dict[str, str] = {} if resp.get("VersionId") else {"IfMatch": resp.get("ETag", "*")}
        if resp.get("VersionId"):
            fetch = partial(fetch, VersionId=resp["VersionId"])
        body = resp["Body"]
        pos = failures = 0
        try:
            while pos < size:
                try:
                    for piece in body.iter_chunks(READ_SIZE):
                        pos += len(piece)
                        yield piece
                    if pos != size:
                        raise IncompleteReadError(actual_bytes=pos, expected_bytes=size)
                except _NETWORK_ERRORS as e:
                    failures += 1
                    if failures >= self._backoff.attempts or not _retryable(e):
                        raise self._translate(e, full) from e
                    log.warning(
                        "%s (resuming at byte %d)", self._translate(e, full, final=False), pos
                    )
                    time.sleep(self._backoff.delay(failures))
                    body.close()
                    resume = partial(fetch, Range=f"bytes={pos}-", **pin)
                    body = self._call(full, resume)["Body"]
        finally:
            body.close()

    def head(self, key: str, *, version_id: str | None = None) -> ObjectInfo:
        """HeadObject (of one version if given); ``NotFound`` when absent."""
        full = self._key(key)
        request = partial(self._client.head_object, Bucket=self.bucket, Key=full)
        if version_id:
            request = partial(request, VersionId=version_id)
        return self._info(key, dict(self._call(full, request)))

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """ListObjectsV2, page by page; any failed page raises."""
        base = f"{self.prefix}/" if self.prefix else ""
        request = partial(
            self._client.list_objects_v2,
            Bucket=self.bucket,
            Prefix=base + prefix,
            MaxKeys=self.options.list_page_size,
        )
        while True:
            page = self._call(None, request)
            for obj in page.get("Contents", []):
                yield self._info(obj["Key"][len(base) :], dict(obj))
            if not page.get("IsTruncated"):
                return
            token = page.get("NextContinuationToken")
            if not token:
                raise StorageError(f"{self._where(None)}: truncated listing without a token")
            request = partial(request, ContinuationToken=token)

    # -- housekeeping ---------------------------------------------------------------------

    def delete(self, key: str, *, version_id: str | None = None) -> None:
        """DeleteObject; on a versioned bucket without ``version_id`` this adds a delete marker."""
        full = self._key(key)
        request = partial(self._client.delete_object, Bucket=self.bucket, Key=full)
        if version_id:
            request = partial(request, VersionId=version_id)
        self._call(full, partial(_tolerate, {"NoSuchKey", "NoSuchVersion"}, request))

    def _uploads(self, older_than: datetime) -> Iterator[tuple[str, str]]:
        """(key, upload id) of multipart uploads under the prefix initiated before the cutoff."""
        base = f"{self.prefix}/" if self.prefix else ""
        request = partial(self._client.list_multipart_uploads, Bucket=self.bucket, Prefix=base)
        while True:
            page = self._call(None, request)
            for up in page.get("Uploads", []):
                if up["Initiated"] < older_than:
                    yield up["Key"], up["UploadId"]
            if not page.get("IsTruncated"):
                return
            request = partial(
                request,
                KeyMarker=page.get("NextKeyMarker", ""),
                UploadIdMarker=page.get("NextUploadIdMarker", ""),
            )

    def stale_uploads(self, older_than: datetime) -> builtins.list[str]:
        """Repository keys of incomplete multipart uploads started before ``older_than``."""
        start = len(self.prefix) + 1 if self.prefix else 0
        return sorted(key[start:] for key, _id in self._uploads(older_than))

    def abort_stale_uploads(self, older_than: datetime) -> int:
        """Abort those uploads (their parts are freed); return how many."""
        stale = builtins.list(self._uploads(older_than))
        for key, upload_id in stale:
            self._abort_upload(key, upload_id)
        return len(stale)

    def retention(self, key: str) -> datetime | None:
        """GetObjectRetention: the retain-until date, or None when the object has none."""
        full = self._key(key)
        request = partial(self._client.get_object_retention, Bucket=self.bucket, Key=full)
        # no retention on the object, or no Object Lock on the bucket (AWS: InvalidRequest)
        none = {
            "NoSuchObjectLockConfiguration",
            "ObjectLockConfigurationNotFoundError",
            "InvalidRequest",
        }
        found = self._call(full, partial(_tolerate, none, request))
        until = found.get("Retention", {}).get("RetainUntilDate")
        return until.astimezone(UTC) if until else None

    def versioned(self) -> bool:
        """GetBucketVersioning: Enabled or Suspended both keep versions made while enabled."""
        request = partial(self._client.get_bucket_versioning, Bucket=self.bucket)
        return self._call(None, request).get("Status") in ("Enabled", "Suspended")

    def extend_retention(self, key: str, until: datetime) -> None:
        """PutObjectRetention in the repository's mode; a no-op without a configured mode.

        Only ever called with a date later than the current one: lowering needs a bypass right
        the backup credential must not have, and COMPLIANCE forbids it outright.
        """
        if not self.options.object_lock_mode:
            return
        full = self._key(key)
        request = partial(
            self._client.put_object_retention,
            Bucket=self.bucket,
            Key=full,
            Retention={"Mode": self.options.object_lock_mode, "RetainUntilDate": until},
        )
        self._call(full, request)

    def object_lock_enabled(self) -> bool:
        """Whether the bucket has Object Lock enabled (``drtool doctor``)."""
        request = partial(self._client.get_object_lock_configuration, Bucket=self.bucket)
        missing = {"ObjectLockConfigurationNotFoundError"}
        conf = self._call(None, partial(_tolerate, missing, request))
        return conf.get("ObjectLockConfiguration", {}).get("ObjectLockEnabled") == "Enabled"

    def server_time(self) -> datetime | None:
        """The server's clock: the ``Date`` header of one small listing (``drtool doctor``)."""
        request = partial(
            self._client.list_objects_v2, Bucket=self.bucket, Prefix=self.prefix, MaxKeys=1
        )
        headers = self._call(None, request).get("ResponseMetadata", {}).get("HTTPHeaders", {})
        try:
            return parsedate_to_datetime(headers["date"]).astimezone(UTC)
        except (KeyError, TypeError, ValueError):
            return None

    def check(self) -> None:
        """One ListObjectsV2 (it has an error body, unlike HeadBucket): reachable, bucket, creds."""
        request = partial(
            self._client.list_objects_v2, Bucket=self.bucket, Prefix=self.prefix, MaxKeys=1
        )
        self._call(None, request)


def _blob(part: bytearray) -> bytes:
    """A part as a request body without copying: botocore accepts bytearray, its stubs not."""
    return cast(bytes, part)


def _tolerate(codes: set[str], request: Callable[[], Any]) -> Any:
    """Run ``request``; an error with one of ``codes`` means the goal is already reached."""
    try:
        return request()
    except ClientError as e:
        if _code_status(e)[0] in codes:
            return {}
        raise


def _chain(head: builtins.list[bytearray], rest: Iterator[bytearray]) -> Iterator[bytearray]:
    """Yield the already-read parts (dropping our references) then the rest."""
    while head:
        yield head.pop(0)
    yield from rest
