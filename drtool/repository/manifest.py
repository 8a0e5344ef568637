"""Signed snapshot manifests: the commit point of every snapshot.

A manifest lists, in the clear, what listing and key-less verification need: times, the
components, source versions, and the stored size and sha256 of every object the snapshot
depends on. Anything that describes users (fingerprints, file names, message content) lives in
encrypted objects. The body is canonical JSON signed with the backup host's Ed25519 key.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from drtool import keys
from drtool.errors import ConfigError, IntegrityError

MANIFEST_FORMAT = "drtool-manifest/1"


@dataclass(frozen=True)
class ObjectEntry:
    """One stored object: its key, what it holds, and its stored size and sha256."""

    key: str
    kind: str
    size: int
    sha256: str
    version_id: str | None = None

    def mismatch(self, size: int, sha256: str) -> str | None:
        """Why stored bytes of ``size``/``sha256`` are not this object, or None when they are."""
        if size != self.size:
            return f"{self.key}: stored size {size} differs from the manifest ({self.size})"
        if sha256 != self.sha256:
            return f"{self.key}: stored sha256 differs from the manifest"
        return None


@dataclass(frozen=True)
class ComponentEntry:
    """One store's part of a snapshot (postgres, redis or minio)."""

    name: str
    objects: tuple[ObjectEntry, ...]
    plain_bytes: int
    duration_s: float
    source_version: str = ""
    details: dict[str, Any] = field(default_factory=dict)
    #: when this part started and ended (ISO 8601 UTC, to the microsecond); None in
    #: manifests written before they were recorded (and then left out of the body)
    started: str | None = None
    ended: str | None = None


@dataclass(frozen=True)
class Manifest:
    """The body of a snapshot manifest (what gets signed)."""

    repo_id: str
    snapshot_id: str
    started: str
    finished: str
    host: str
    stack: str
    drtool_version: str
    components: tuple[ComponentEntry, ...]
    previous_id: str | None = None
    previous_sha256: str | None = None

    def component(self, name: str) -> ComponentEntry | None:
        """The entry of component ``name``, if the snapshot has it."""
        return next((c for c in self.components if c.name == name), None)

    def objects(self) -> list[ObjectEntry]:
        """Every object this snapshot depends on (shared blobs included)."""
        return [o for c in self.components for o in c.objects]

    @property
    def stored_bytes(self) -> int:
        """Total stored size of the objects this snapshot names."""
        return sum(o.size for o in self.objects())

    @property
    def plain_bytes(self) -> int:
        """Total plaintext size of the components."""
        return sum(c.plain_bytes for c in self.components)

    def to_dict(self) -> dict[str, Any]:
        """A plain JSON-ready dict."""
        body = asdict(self)
        for comp in body["components"]:  # an older manifest's body stays byte-identical
            for name in ("started", "ended"):
                if comp[name] is None:
                    del comp[name]
        return {"format": MANIFEST_FORMAT, **body}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        """Rebuild a manifest from ``to_dict`` output; IntegrityError on a malformed body."""
        try:
            if data.get("format") != MANIFEST_FORMAT:
                raise IntegrityError(f"manifest format {data.get('format')!r} is not known")
            body = {k: v for k, v in data.items() if k != "format"}
            comps = tuple(
                ComponentEntry(
                    **{
                        **c,
                        "objects": tuple(ObjectEntry(**o) for o in c["objects"]),
                    }
                )
                for c in body.pop("components")
            )
            return cls(**body, components=comps)
        except (KeyError, TypeError) as exc:
            raise IntegrityError(f"manifest is malformed ({exc})") from None


def canonical(data: Any) -> bytes:
    """Canonical JSON bytes (sorted keys, no spaces): what is signed and hashed."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sign_manifest(manifest: Manifest, signing_key: Ed25519PrivateKey) -> bytes:
    """The stored form of ``manifest``: its body and an Ed25519 signature over the body."""
    body = manifest.to_dict()
    signature = keys.sign(signing_key, canonical(body))
    stored = {"body": body, "signature": signature}
    return json.dumps(stored, indent=1, sort_keys=True, ensure_ascii=False).encode()


def open_manifest(stored: bytes, verify_keys: list[str], *, name: str) -> Manifest:
    """Parse a stored manifest and verify its signature against any of ``verify_keys``.

    Raises IntegrityError when it is not valid JSON, is signed by no known key, or is altered.
    """
    try:
        doc = json.loads(stored)
        body, signature = doc["body"], doc["signature"]
    except (ValueError, KeyError, TypeError):
        raise IntegrityError(f"{name}: not a drtool manifest (unreadable JSON)") from None
    if not verify_keys:
        raise IntegrityError(f"{name}: no verify key configured to check its signature")
    errors = []
    for verify_key in verify_keys:
        try:
            keys.verify_signature(
                keys.parse_verify_key(verify_key), canonical(body), signature, name=name
            )
            break
        except (IntegrityError, ConfigError) as exc:
            errors.append(str(exc))
    else:
        raise IntegrityError(f"{name}: signature does not verify ({errors[-1]})")
    return Manifest.from_dict(body)


def manifest_sha256(stored: bytes) -> str:
    """The hash that the next snapshot's manifest records as ``previous_sha256``."""
    return hashlib.sha256(stored).hexdigest()
