"""Signed plaintext JSON records: a body and an Ed25519 signature over its canonical form.

The WAL index chunks (drtool/wal/index.py), prune's WAL removal records
(drtool/wal/pruned.py) and the attachment capture chain (drtool/capture/chain.py) are stored
this way: readable and provable without an identity, forged or altered only with the backup
host's signing key.
"""

from __future__ import annotations

import json
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from drtool import keys
from drtool.errors import ConfigError, IntegrityError
from drtool.repository.manifest import canonical


def sign_body(body: dict[str, Any], signing_key: Ed25519PrivateKey) -> bytes:
    """The stored form: ``{"body": ..., "signature": ...}`` over the body's canonical JSON."""
    stored = {"body": body, "signature": keys.sign(signing_key, canonical(body))}
    return json.dumps(stored, indent=1, sort_keys=True, ensure_ascii=False).encode()


def open_body(stored: bytes, verify_keys: list[str], *, name: str, what: str) -> dict[str, Any]:
    """The body of a stored record whose signature verifies against any of ``verify_keys``.

    ``what`` names the kind of record in the errors (``a WAL index chunk``).
    """
    try:
        doc = json.loads(stored)
        body, signature = doc["body"], doc["signature"]
    except (ValueError, KeyError, TypeError):
        raise IntegrityError(f"{name}: not {what} (unreadable JSON)") from None
    if not isinstance(body, dict):
        raise IntegrityError(f"{name}: not {what} (no body)")
    if not verify_keys:
        raise IntegrityError(f"{name}: no verify key configured to check its signature")
    last = ""
    for verify_key in verify_keys:
        try:
            keys.verify_signature(
                keys.parse_verify_key(verify_key), canonical(body), signature, name=name
            )
            return body
        except (IntegrityError, ConfigError) as exc:
            last = str(exc)
    raise IntegrityError(f"{name}: signature does not verify ({last})")
