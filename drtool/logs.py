"""Logging set-up: readable lines on a terminal, JSON lines otherwise (Loki reads them).

Every record passes a redaction filter that replaces the values of known secrets, so a secret
that slips into a message still never reaches the output.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterable
from datetime import UTC, datetime

REDACTED = "***"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and any ``extra`` fields."""

    _standard = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message"}

    def format(self, record: logging.LogRecord) -> str:
        """Render ``record`` as a JSON line."""
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in self._standard and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


class RedactFilter(logging.Filter):
    """Replaces every occurrence of a known secret in a record's rendered text."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        self.secrets = sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True)

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite the record's message and extra fields with secrets replaced."""
        if not self.secrets:
            return True
        record.msg, record.args = self.redact(record.getMessage()), None
        for key, value in list(record.__dict__.items()):
            if key in ("msg", "args", "exc_info", "name", "levelname"):
                continue
            if isinstance(value, str):
                record.__dict__[key] = self.redact(value)
            elif not isinstance(value, int | float | type(None)):
                # an extra field holding an object (a dict, a list, an endpoint...) is logged
                # as its text; replace it by the redacted text when that shows a secret
                text = str(value)
                if self.redact(text) != text:
                    record.__dict__[key] = self.redact(text)
        return True

    def redact(self, text: str) -> str:
        """``text`` with every known secret replaced by ``***``."""
        for secret in self.secrets:
            text = text.replace(secret, REDACTED)
        return text


def setup_logging(
    *, debug: bool, json_lines: bool | None = None, secrets: Iterable[str] = ()
) -> None:
    """Configure the root logger on stderr; JSON unless stderr is a terminal."""
    if json_lines is None:
        json_lines = not sys.stderr.isatty()
    handler = logging.StreamHandler(sys.stderr)
    if json_lines:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)-7s %(message)s", "%H:%M:%S")
        )
    handler.addFilter(RedactFilter(secrets))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer", "docker"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
