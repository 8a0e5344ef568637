"""The process's one boto3 session, from which every S3 client is made.

One session loads botocore's models once, so a second client (the MinIO source beside the
repository, a restore target) costs ~7 ms instead of ~110 ms. Its response parsers read the
ISO 8601 dates of listings with ``datetime.fromisoformat`` (about 40 % of botocore's listing
cost per object is its general date parser); other dates still go to botocore's parser.
"""

from __future__ import annotations

import functools
import threading
from datetime import datetime
from typing import TYPE_CHECKING, Any

import boto3
import botocore.session
from botocore.config import Config as BotoConfig
from botocore.utils import parse_timestamp

from drtool.endpoints import S3Endpoint

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client

_lock = threading.Lock()  # sessions are not thread-safe; clients are


def _timestamp(value: str) -> datetime:
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return parse_timestamp(value)


@functools.cache
def _session() -> boto3.session.Session:
    core = botocore.session.get_session()
    core.get_component("response_parser_factory").set_parser_defaults(timestamp_parser=_timestamp)
    return boto3.session.Session(botocore_session=core)


def new_client(**kwargs: Any) -> S3Client:
    """A boto3 S3 client made with ``kwargs`` (endpoint, keys, config) from the shared session."""
    with _lock:
        return _session().client("s3", **kwargs)


def s3_client(
    endpoint: S3Endpoint, *, timeout: float = 10.0, attempts: int = 3, pool_size: int = 8
) -> Any:
    """A boto3 S3 client for ``endpoint``: SigV4, path-style addressing, standard retries."""
    return new_client(
        endpoint_url=endpoint.endpoint_url,
        aws_access_key_id=endpoint.access_key,
        aws_secret_access_key=endpoint.secret_key,
        region_name=endpoint.region,
        config=BotoConfig(
            signature_version="s3v4",
            s3={"addressing_style": "path"},
            connect_timeout=timeout,
            read_timeout=max(timeout, 60.0),
            retries={"max_attempts": attempts, "mode": "standard"},
            max_pool_connections=pool_size,
        ),
    )
