"""Signed rotation records: what a recipient rotation changed, so old manifests stay checkable.

``drtool keys rotate`` rewrites the age header of stored objects; their size and sha256 change
while the manifests and WAL index chunks that name them stay as signed (rewriting those would
break the hash chain, the backup host's rollback check and append-only WAL index). Instead the
rotation leaves signed records under ``rotations/<rotation-id>/`` (ADR 0023):

```
plan.json                  recipients before and after, who started it and when
<seq>.intent.json          the objects of batch <seq> and the size/sha256 each WILL have
<seq>.done.json            the same entries, written once the batch is rewritten
finished.json              the end, with the date the last old object version expires
```

Readers apply the ``done`` entries: an object named with ``(size, sha256)`` equal to an entry's
``from`` is expected with the entry's ``to`` values instead (entries of later rotations chain).
Intent records are never applied; they only let a re-run recognise an object rewritten just
before a kill (its bytes are exactly the signed ``to``). Every record is signed like a manifest
and ignored unless it verifies against a trusted key: an unsigned record could otherwise make
any bytes "expected".
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from drtool import keys
from drtool.errors import ConfigError, IntegrityError, NotFound
from drtool.repository import signing_keys
from drtool.repository.manifest import ComponentEntry, Manifest, ObjectEntry, canonical
from drtool.storage.base import Storage

log = logging.getLogger(__name__)

ROTATIONS = "rotations/"
FORMAT = "drtool-rotation/1"
_MAX_CHAIN = 64  # rotations applied to one object at most (a loop guard)


def plan_key(rotation_id: str) -> str:
    """The plan record of a rotation."""
    return f"{ROTATIONS}{rotation_id}/plan.json"


def batch_key(rotation_id: str, seq: int, state: str) -> str:
    """An ``intent`` or ``done`` record of batch ``seq``."""
    return f"{ROTATIONS}{rotation_id}/{seq:06d}.{state}.json"


def finished_key(rotation_id: str) -> str:
    """The record that closes a rotation."""
    return f"{ROTATIONS}{rotation_id}/finished.json"


@dataclass(frozen=True)
class Change:
    """One object's stored form before and after its header was rewritten."""

    key: str
    from_size: int
    from_sha256: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Plan:
    """What a rotation sets out to do."""

    rotation_id: str
    repo_id: str
    started: str
    host: str
    recipients_before: tuple[str, ...]
    recipients_after: tuple[str, ...]


def sign_record(body: dict[str, Any], signing_key: Ed25519PrivateKey) -> bytes:
    """The stored form of a record: body plus Ed25519 signature over its canonical JSON.

    ``time`` (when it was signed) lets readers refuse a record a retired signing key made
    after its retirement (signing_keys.py).
    """
    body = {"format": FORMAT, "time": datetime.now(UTC).isoformat(timespec="microseconds"), **body}
    stored = {"body": body, "signature": keys.sign(signing_key, canonical(body))}
    return json.dumps(stored, indent=1, sort_keys=True, ensure_ascii=False).encode()


def open_record(
    stored: bytes,
    verify_keys: list[str],
    repo_id: str,
    *,
    name: str,
    periods: dict[str, signing_keys.Period] | None = None,
) -> dict[str, Any]:
    """The body of a record signed by one of ``verify_keys`` for this repository."""
    try:
        doc = json.loads(stored)
        body, signature = doc["body"], doc["signature"]
    except (ValueError, KeyError, TypeError):
        raise IntegrityError(f"{name}: not a rotation record (unreadable JSON)") from None
    last = "no verify key configured"
    for verify_key in verify_keys:
        try:
            keys.verify_signature(
                keys.parse_verify_key(verify_key), canonical(body), signature, name=name
            )
            break
        except (IntegrityError, ConfigError) as exc:
            last = str(exc)
    else:
        raise IntegrityError(f"{name}: signature does not verify ({last})")
    if not isinstance(body, dict) or body.get("format") != FORMAT:
        raise IntegrityError(f"{name}: rotation record format unknown")
    if body.get("repo_id") != repo_id:
        raise IntegrityError(f"{name}: belongs to another repository")
    if not signing_keys.signer_within_period(body, signature, periods, body.get("time")):
        raise IntegrityError(f"{name}: signed by a retired signing key after its retirement")
    return body


def changes_of(body: dict[str, Any], *, name: str) -> list[Change]:
    """The entries of a batch record."""
    try:
        return [Change(**e) for e in body["entries"]]
    except (KeyError, TypeError) as exc:
        raise IntegrityError(f"{name}: rotation record is malformed ({exc})") from None


def batch_body(
    plan: Plan, seq: int, state: str, changes: Iterable[Change], retained_until: str | None = None
) -> dict[str, Any]:
    """The body of batch ``seq``'s ``intent`` or ``done`` record.

    ``retained_until``: the latest Object Lock date of the versions the batch replaced (they
    keep the old headers until then), so a resumed run still reports it.
    """
    return {
        "kind": state,
        "repo_id": plan.repo_id,
        "rotation_id": plan.rotation_id,
        "seq": seq,
        "entries": [asdict(c) for c in changes],
        "retained_until": retained_until,
    }


def plan_body(plan: Plan) -> dict[str, Any]:
    """The body of a plan record."""
    return {"kind": "plan", **asdict(plan)}


def plan_of(body: dict[str, Any], *, name: str) -> Plan:
    """A plan from its record body."""
    try:
        fields = {k: v for k, v in body.items() if k not in ("format", "kind", "time")}
        fields["recipients_before"] = tuple(fields["recipients_before"])
        fields["recipients_after"] = tuple(fields["recipients_after"])
        return Plan(**fields)
    except (KeyError, TypeError) as exc:
        raise IntegrityError(f"{name}: rotation plan is malformed ({exc})") from None


@dataclass
class RotationState:
    """Every authentic record of one rotation, as read back."""

    plan: Plan
    done: dict[str, Change] = field(default_factory=dict)  # by object key (newest wins)
    intents: dict[str, list[Change]] = field(default_factory=dict)
    last_seq: int = 0
    finished: dict[str, Any] | None = None
    retained_until: str | None = None  # the latest of the done batches' ``retained_until``


def read_rotations(storage: Storage, verify_keys: list[str], repo_id: str) -> list[RotationState]:
    """Every rotation with an authentic plan, oldest first; records that fail are skipped (logged).

    A listing or read error raises: a missing record must not read as "nothing rotated".
    """
    by_rotation: dict[str, list[str]] = {}
    for obj in storage.list(ROTATIONS):
        parts = obj.key.split("/")
        if len(parts) == 3 and parts[2].endswith(".json"):
            by_rotation.setdefault(parts[1], []).append(parts[2])
    states = []
    periods = signing_keys.periods_of(storage, verify_keys, repo_id) if by_rotation else None
    for rotation_id in sorted(by_rotation):
        names = sorted(by_rotation[rotation_id])
        if "plan.json" in names:
            state = _read_rotation(storage, verify_keys, repo_id, rotation_id, names, periods)
            if state is not None:
                states.append(state)
    return states


def _read_rotation(
    storage: Storage,
    verify_keys: list[str],
    repo_id: str,
    rotation_id: str,
    names: list[str],
    periods: dict[str, signing_keys.Period] | None,
) -> RotationState | None:
    """One rotation's authentic records (None when its plan is not authentic)."""
    state: RotationState | None = None
    for file in ["plan.json", *(n for n in names if n != "plan.json")]:
        key = f"{ROTATIONS}{rotation_id}/{file}"
        try:
            body = open_record(
                storage.get_bytes(key), verify_keys, repo_id, name=key, periods=periods
            )
        except NotFound:
            continue
        except IntegrityError as exc:
            log.warning("rotation record ignored: %s", exc)
            if state is None:
                return None
            continue
        if state is None:
            state = RotationState(plan_of(body, name=key))
        elif body.get("kind") == "finished":
            state.finished = body
        elif body.get("kind") in ("intent", "done"):
            state.last_seq = max(state.last_seq, int(body.get("seq", 0)))
            until = body.get("retained_until")
            if body["kind"] == "done" and isinstance(until, str):
                state.retained_until = max(state.retained_until or until, until)
            for change in changes_of(body, name=key):
                if body["kind"] == "done":
                    state.done[change.key] = change
                else:
                    state.intents.setdefault(change.key, []).append(change)
    return state


@dataclass
class RotationMap:
    """(key, stored sha256) -> the change that rewrote it, from every ``done`` record."""

    changes: dict[tuple[str, str], Change] = field(default_factory=dict)

    def add(self, change: Change) -> None:
        """Take one applied change."""
        self.changes[(change.key, change.from_sha256)] = change

    def current(self, key: str, size: int, sha256: str) -> tuple[int, str]:
        """The size and sha256 an object recorded as ``(size, sha256)`` has after rotations."""
        for _ in range(_MAX_CHAIN):
            change = self.changes.get((key, sha256))
            if change is None or change.from_size != size:
                break
            size, sha256 = change.size, change.sha256
        return size, sha256

    def __bool__(self) -> bool:
        return bool(self.changes)


def load_map(storage: Storage, verify_keys: list[str], repo_id: str) -> RotationMap:
    """The applied changes of every rotation (one listing; nothing to read when none ran)."""
    rmap = RotationMap()
    for state in read_rotations(storage, verify_keys, repo_id):
        for change in state.done.values():
            rmap.add(change)
    return rmap


def apply_to_manifest(manifest: Manifest, rmap: RotationMap) -> Manifest:
    """The manifest with each object's size and sha256 as they are after the rotations.

    Only the in-memory view changes: the stored manifest (and so the hash chain) is untouched.
    """
    if not rmap:
        return manifest

    def entry(o: ObjectEntry) -> ObjectEntry:
        size, sha256 = rmap.current(o.key, o.size, o.sha256)
        return o if (size, sha256) == (o.size, o.sha256) else replace(o, size=size, sha256=sha256)

    components: list[ComponentEntry] = [
        replace(c, objects=tuple(entry(o) for o in c.objects)) for c in manifest.components
    ]
    return replace(manifest, components=tuple(components))
