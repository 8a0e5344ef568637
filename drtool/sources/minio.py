"""The MinIO (S3-compatible) attachment store as a source and a restore target.

Listing pages through the whole bucket and raises on any error: a partial listing is never
taken for the bucket. Objects are read and written as streams with their content type and
user metadata.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from boto3.exceptions import S3UploadFailedError
from botocore.exceptions import BotoCoreError, ClientError

from drtool.endpoints import S3Endpoint
from drtool.errors import ConfigError, DrtoolError, NotFound, SourceError
from drtool.s3session import s3_client

READ_SIZE = 1 << 20
SINGLE_PUT = 8 << 20  # the transfer manager's multipart threshold: below it, one PutObject
SHOWN = 20  # buckets named in the warning; the count covers all
ALL_BUCKETS = "*"
"""``buckets = ["*"]``: every bucket the credential can see."""


@dataclass(frozen=True)
class SourceObject:
    """One object as listed: key, size and ETag identify its bytes for incremental backups.

    ``last_modified`` (ISO 8601, the listing's precision) changes also when only the content
    type or metadata change (a copy onto itself with ``MetadataDirective=REPLACE`` keeps the
    ETag); the listing does not carry those two themselves.
    """

    key: str
    size: int
    etag: str
    last_modified: str = ""


@dataclass(frozen=True)
class ObjectMeta:
    """What must survive a round trip besides the bytes."""

    content_type: str = "binary/octet-stream"
    metadata: dict[str, str] = field(default_factory=dict)


class MinioStore:
    """A client of one S3-compatible endpoint."""

    def __init__(self, endpoint: S3Endpoint, *, max_pool: int = 8) -> None:
        self.endpoint = endpoint
        self._s3: Any = s3_client(endpoint, timeout=5.0, attempts=5, pool_size=max_pool)

    def _error(self, action: str, bucket: str, exc: Exception, key: str = "") -> DrtoolError:
        """A one-line error naming endpoint, bucket and key; no server text, no credentials."""
        where = f"minio {self.endpoint.endpoint_url} {bucket}/{key}".rstrip("/")
        if isinstance(exc, ClientError):
            code = exc.response.get("Error", {}).get("Code", "")
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "")
            if code in ("NoSuchBucket",):
                return NotFound(f"{where}: bucket does not exist")
            if code in ("NoSuchKey", "404"):
                return NotFound(f"{where}: object does not exist")
            if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403"):
                return SourceError(f"{where}: {action} denied ({code}); check the credentials")
            return SourceError(f"{where}: {action} failed ({code or status})")
        return SourceError(
            f"{where}: {action} failed: cannot reach the server ({type(exc).__name__})"
        )

    def list_objects(self, bucket: str, prefix: str = "") -> Iterator[SourceObject]:
        """Every object in ``bucket`` (under ``prefix``; all pages), in key order."""
        try:
            paginator = self._s3.get_paginator("list_objects_v2")
            pages = paginator.paginate(Bucket=bucket, Prefix=prefix)
            for page in pages:
                for item in page.get("Contents", []):
                    modified = item.get("LastModified")
                    yield SourceObject(
                        item["Key"],
                        int(item["Size"]),
                        item["ETag"].strip('"'),
                        modified.isoformat() if modified is not None else "",
                    )
        except (ClientError, BotoCoreError) as exc:
            raise self._error("listing", bucket, exc) from None

    def read(self, bucket: str, key: str) -> tuple[ObjectMeta, Iterator[bytes]]:
        """The object's metadata and a stream of its bytes."""
        try:
            response = self._s3.get_object(Bucket=bucket, Key=key)
        except (ClientError, BotoCoreError) as exc:
            raise self._error("read", bucket, exc, key) from None
        meta = ObjectMeta(response.get("ContentType") or "", dict(response.get("Metadata", {})))
        return meta, self._body(response["Body"], bucket, key)

    def _body(self, body: Any, bucket: str, key: str) -> Iterator[bytes]:
        try:
            while chunk := body.read(READ_SIZE):
                yield chunk
        except (ClientError, BotoCoreError) as exc:
            raise self._error("read", bucket, exc, key) from None
        finally:
            body.close()

    def upload(self, bucket: str, key: str, path: Path, meta: ObjectMeta) -> None:
        """Put the file at ``path`` as an object with its content type and metadata.

        Up to ``SINGLE_PUT`` bytes one PutObject from memory (the transfer manager's futures
        and threads cost more CPU than a small object's transfer); larger files go through
        the transfer manager's multipart upload, reading the file in parts.
        """
        if path.stat().st_size <= SINGLE_PUT:
            self.put_bytes(bucket, key, path.read_bytes(), meta)
            return
        try:
            self._s3.upload_file(
                str(path),
                bucket,
                key,
                ExtraArgs={"ContentType": meta.content_type, "Metadata": meta.metadata},
            )
        except (ClientError, BotoCoreError, S3UploadFailedError) as exc:
            raise self._error("write", bucket, exc, key) from None

    def digest(self, bucket: str, key: str) -> tuple[int, str] | None:
        """Size and sha256 of an object as read back (streamed); None when it does not exist."""
        if self.head(bucket, key) is None:
            return None
        _, stream = self.read(bucket, key)
        sha256, size = hashlib.sha256(), 0
        for chunk in stream:
            sha256.update(chunk)
            size += len(chunk)
        return size, sha256.hexdigest()

    def put_bytes(self, bucket: str, key: str, data: bytes, meta: ObjectMeta) -> None:
        """Put a small object from memory (one PutObject)."""
        try:
            self._s3.put_object(
                Bucket=bucket,
                Key=key,
                Body=data,
                ContentType=meta.content_type,
                Metadata=meta.metadata,
            )
        except (ClientError, BotoCoreError) as exc:
            raise self._error("write", bucket, exc, key) from None

    def delete(self, bucket: str, key: str) -> None:
        """Remove one object (a restore in mirror mode removes what the snapshot lacks)."""
        try:
            self._s3.delete_object(Bucket=bucket, Key=key)
        except (ClientError, BotoCoreError) as exc:
            raise self._error("delete", bucket, exc, key) from None

    def _head_object(self, bucket: str, key: str) -> dict[str, Any] | None:
        """One HeadObject: the response, or None when the object does not exist."""
        try:
            r = self._s3.head_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise self._error("head", bucket, exc, key) from None
        except BotoCoreError as exc:
            raise self._error("head", bucket, exc, key) from None
        return dict(r)

    def head(self, bucket: str, key: str) -> tuple[int, ObjectMeta] | None:
        """Size and metadata of an object, or None when it does not exist."""
        r = self._head_object(bucket, key)
        if r is None:
            return None
        return int(r["ContentLength"]), ObjectMeta(
            r.get("ContentType") or "", r.get("Metadata", {})
        )

    def stat(self, bucket: str, key: str) -> tuple[SourceObject, ObjectMeta] | None:
        """HEAD: the object as a listing would show it, with its metadata; None when gone."""
        r = self._head_object(bucket, key)
        if r is None:
            return None
        modified = r.get("LastModified")
        listed = SourceObject(
            key,
            int(r["ContentLength"]),
            str(r.get("ETag", "")).strip('"'),
            modified.isoformat() if modified is not None else "",
        )
        return listed, ObjectMeta(r.get("ContentType") or "", dict(r.get("Metadata", {})))

    def ensure_bucket(self, bucket: str) -> None:
        """Create ``bucket`` when it does not exist."""
        try:
            self._s3.head_bucket(Bucket=bucket)
            return
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket", "NotFound"):
                raise self._error("head bucket", bucket, exc) from None
        except BotoCoreError as exc:
            raise self._error("head bucket", bucket, exc) from None
        try:
            self._s3.create_bucket(Bucket=bucket)
        except (ClientError, BotoCoreError) as exc:
            raise self._error("create bucket", bucket, exc) from None

    def list_buckets(self) -> tuple[str, ...] | None:
        """Every bucket the credential can see, sorted; None when ListBuckets is denied."""
        try:
            response = self._s3.list_buckets()
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403"):
                return None  # a credential that fails here fails (and is named) at the bucket
            raise self._error("list buckets", "", exc) from None
        except BotoCoreError as exc:
            raise self._error("list buckets", "", exc) from None
        return tuple(sorted(b["Name"] for b in response.get("Buckets", [])))

    def bucket_exists(self, bucket: str) -> bool:
        """Whether ``bucket`` exists."""
        try:
            self._s3.head_bucket(Bucket=bucket)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchBucket", "NotFound"):
                return False
            raise self._error("head bucket", bucket, exc) from None
        except BotoCoreError as exc:
            raise self._error("head bucket", bucket, exc) from None
        return True


@dataclass(frozen=True)
class BucketCoverage:
    """Which buckets a backup protects, and the visible ones it leaves out.

    ``visible`` is None when the credential may not list buckets (ListBuckets denied): then
    nobody can tell what is left out, and the warning says so.
    """

    protected: tuple[str, ...]
    unprotected: tuple[str, ...]
    visible: tuple[str, ...] | None

    def warning(self) -> str | None:
        """One line for the log and doctor, or None when every visible bucket is protected."""
        if self.visible is None:
            return (
                "the MinIO credential may not list buckets (ListBuckets): cannot tell whether "
                "a bucket is left out of the backup"
            )
        if not self.unprotected:
            return None
        shown = ", ".join(self.unprotected[:SHOWN])
        if len(self.unprotected) > SHOWN:
            shown += f" and {len(self.unprotected) - SHOWN} more"
        return (
            f"{len(self.unprotected)} MinIO bucket(s) not protected (not in minio.buckets): "
            f'{shown}; add them, or set buckets = ["*"] for all'
        )


def repository_bucket(repo_url: str, repo_endpoint: str, minio_endpoint: str) -> str | None:
    """The repository's own bucket when it lives on the MinIO being backed up, else None."""
    if not repo_url.startswith("s3://") or repo_endpoint.rstrip("/") != minio_endpoint.rstrip("/"):
        return None
    return repo_url[len("s3://") :].split("/", 1)[0] or None


def bucket_coverage(
    store: MinioStore, configured: tuple[str, ...], *, repository: str | None = None
) -> BucketCoverage:
    """Expand ``["*"]`` to every visible bucket; name the visible buckets left out otherwise.

    ``repository``: the backup repository's bucket on the same server, never a source.
    """
    if ALL_BUCKETS in configured and len(configured) > 1:
        raise ConfigError('minio.buckets: "*" means every bucket and stands alone')
    listed = store.list_buckets()
    visible = None if listed is None else tuple(b for b in listed if b != repository)
    if configured == (ALL_BUCKETS,):
        if visible is None:
            raise SourceError(
                'minio.buckets = ["*"]: the credential may not list buckets (ListBuckets); '
                "grant s3:ListAllMyBuckets or name the buckets"
            )
        return BucketCoverage(visible, (), visible)
    left_out = () if visible is None else tuple(b for b in visible if b not in configured)
    return BucketCoverage(configured, left_out, visible)
