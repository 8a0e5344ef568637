"""Signing-key rotation: verify keys with validity periods, linked by cross-signed endorsements.

``drtool-repo.json`` lists ``signing_keys``: one entry per verify key the repository has had,
oldest first. Every entry after the first names the key it replaced (``replaces``) and the
moment of the change (``not_before``; the replaced key's ``not_after``), and carries two
signatures over the same statement: one by the replaced key (it hands over: a reader who
pinned the old key may trust the new one) and one by the new key (it vouches for its
predecessor up to that moment: a reader who pinned the new key may trust old manifests).

The header is writable by anyone who can write the repository, so nothing in it is trusted on
its own (ADR 0014): trust starts at the pinned key and follows only endorsements both keys
signed. A key that endorses two successors is a fork (someone holding it forged one): neither
is followed. A manifest signed by a key whose validity ended before the manifest's
``finished`` time is INVALID: a retired key that leaks cannot sign new snapshots.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from drtool import keys
from drtool.errors import ConfigError, IntegrityError
from drtool.repository import layout
from drtool.repository.manifest import canonical
from drtool.storage.base import Storage

log = logging.getLogger(__name__)

STATEMENT = "drtool-signing-key-rotation/1"


@dataclass(frozen=True)
class Period:
    """When a verify key was the repository's signing key (None: open-ended)."""

    not_before: str | None
    not_after: str | None

    def covers(self, when: str) -> bool:
        """Whether ``when`` (ISO 8601) lies within the period."""
        at = datetime.fromisoformat(when)
        if self.not_after is not None and at > datetime.fromisoformat(self.not_after):
            return False
        return self.not_before is None or at >= datetime.fromisoformat(self.not_before)


def statement(repo_id: str, key: str, replaces: str, at: str) -> bytes:
    """What both keys sign when ``key`` replaces ``replaces`` at ``at``."""
    body = {"format": STATEMENT, "repo_id": repo_id, "key": key, "replaces": replaces, "at": at}
    return canonical(body)


def endorse(
    repo_id: str, entries: list[dict[str, Any]], old: Ed25519PrivateKey,
    new: Ed25519PrivateKey, at: str,
) -> list[dict[str, Any]]:  # fmt: skip
    """The header's ``signing_keys`` after ``new`` replaces ``old`` at ``at``."""
    old_text = keys.verify_key_text(old.public_key())
    new_text = keys.verify_key_text(new.public_key())
    data = statement(repo_id, new_text, old_text, at)
    updated = [dict(e) for e in entries] or [{"key": old_text, "not_before": None}]
    if updated[-1]["key"] != old_text:
        raise ConfigError(
            "keys.signing_key_file: not the repository's current signing key (the header's "
            "newest is another); rotate with the current key"
        )
    updated[-1]["not_after"] = at
    updated.append(
        {
            "key": new_text,
            "not_before": at,
            "not_after": None,
            "replaces": old_text,
            "signature_old": keys.sign(old, data),
            "signature_new": keys.sign(new, data),
        }
    )
    return updated


def _authentic(repo_id: str, entry: dict[str, Any]) -> bool:
    try:
        data = statement(repo_id, entry["key"], entry["replaces"], entry["not_before"])
        for signer, signature in (
            (entry["replaces"], "signature_old"),
            (entry["key"], "signature_new"),
        ):
            keys.verify_signature(keys.parse_verify_key(signer), data, entry[signature])
    except (KeyError, TypeError, IntegrityError, ConfigError):
        return False
    return True


def trusted(repo_id: str, entries: list[dict[str, Any]], anchors: list[str]) -> dict[str, Period]:
    """The keys trusted from ``anchors`` (pinned) through authentic endorsements, with periods."""
    links = [e for e in entries if isinstance(e, dict) and "replaces" in e]
    successors: dict[str, list[dict[str, Any]]] = {}
    for entry in links:
        if _authentic(repo_id, entry):
            successors.setdefault(entry["replaces"], []).append(entry)
        else:
            log.warning("drtool-repo.json: a signing-key entry does not verify; ignored")
    forked = {old for old, found in successors.items() if len({e["key"] for e in found}) > 1}
    for old in forked:
        log.warning("drtool-repo.json: signing key %s... endorses two successors", old[:24])
    edges = {old: found[0] for old, found in successors.items() if old not in forked}
    replaced_by = {e["key"]: old for old, e in edges.items()}
    seen, frontier = set(anchors), list(anchors)
    while frontier:  # forward (handed over) and backward (vouched for), from the pins
        key = frontier.pop()
        for other in (edges.get(key, {}).get("key"), replaced_by.get(key)):
            if other is not None and other not in seen:
                seen.add(other)
                frontier.append(other)
    return {
        key: Period(
            edges[replaced_by[key]]["not_before"] if key in replaced_by else None,
            edges[key]["not_before"] if key in edges else None,
        )
        for key in seen
    }


def late_signature(stored: bytes, periods: dict[str, Period], *, name: str) -> str | None:
    """Why a manifest (already verified) is not valid under its key's period, or None."""
    try:
        doc = json.loads(stored)
        body, signature = doc["body"], doc["signature"]
        finished = str(body["finished"])
    except (ValueError, KeyError, TypeError):
        return f"{name}: unreadable"
    for key, period in periods.items():
        try:
            keys.verify_signature(keys.parse_verify_key(key), canonical(body), signature)
        except (IntegrityError, ConfigError):
            continue
        if period.covers(finished):
            return None
        return (
            f"{name}: signed by a retired signing key at {finished}, outside its validity "
            f"({period.not_before or 'start'} .. {period.not_after})"
        )
    return None


def periods_of(storage: Storage, verify_keys: list[str], repo_id: str) -> dict[str, Period] | None:
    """Validity periods of the trusted keys (from the header), when a rotation made them several.

    ``verify_keys[0]`` is the pinned key (catalog.trusted_verify_keys); None when one key only.
    """
    if len(verify_keys) < 2:
        return None
    info = layout.read_repo_info(storage)
    return trusted(repo_id, list(info.signing_keys), verify_keys[:1])


def signer_within_period(
    body: dict[str, Any], signature: str, periods: dict[str, Period] | None, when: Any
) -> bool:
    """Whether the key that signed ``body`` was current at ``when`` (True without periods).

    A record a retired key signs must carry a time inside that key's period: otherwise a
    leaked retired key could sign new records (rotation records, like manifests).
    """
    if not periods:
        return True
    for key, period in periods.items():
        try:
            keys.verify_signature(keys.parse_verify_key(key), canonical(body), signature)
        except (IntegrityError, ConfigError):
            continue
        if period.not_after is None and period.not_before is None:
            return True
        try:
            return isinstance(when, str) and period.covers(when)
        except ValueError:
            return False
    return True
