"""Signed verification records: what ``verify`` found, kept in the repository.

``list`` must say what is known about each snapshot's data, not only that its objects exist
with the right size: a flipped byte keeps the size. Each ``verify`` run that can sign (a
``keys.signing_key_file`` is configured) leaves one record per snapshot it checked::

    verifications/<snapshot-id>/<time-id>.json   {"body": {...}, "signature": "..."}

signed like a manifest (Ed25519 over the canonical body). After its records, ``verify`` also
writes one signed summary, ``verifications/summary/<time-id>.json``, holding the newest record
of every snapshot by record key: ``list`` then reads one object instead of one record per
verified snapshot, and reads a record itself only when it is newer than the summary. Readers
trust a record (and a summary) only when it verifies against the keys they trust for
manifests: anyone who can write the repository could otherwise mark a damaged snapshot
"verified". Unsigned or foreign records are ignored (logged).
See docs/decisions/0013-verification-records.md.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from drtool import keys
from drtool.errors import ConfigError, IntegrityError, NotFound
from drtool.repository.ids import is_id, new_id
from drtool.repository.manifest import Manifest, canonical
from drtool.storage.base import Storage

log = logging.getLogger(__name__)

PREFIX = "verifications/"
FORMAT = "drtool-verification/1"
SUMMARY_PREFIX = f"{PREFIX}summary/"
SUMMARY_FORMAT = "drtool-verification-summary/1"
READ_DATA = "read-data"
HASHES = "hashes"


@dataclass(frozen=True)
class Verification:
    """One verification of one snapshot: when, how deep, and the objects found damaged."""

    repo_id: str
    snapshot_id: str
    time: str  # ISO 8601, UTC
    mode: str  # READ_DATA (decrypted and authenticated) or HASHES (stored size and sha256)
    objects: int  # objects this snapshot names that were checked
    damaged: tuple[str, ...] = ()  # object keys that failed (each named once)
    host: str = ""
    #: a ``--read-data-subset`` run: it read only some of the snapshot's objects and speaks
    #: only about those it found damaged (it is written only when it found damage)
    subset: bool = False

    @property
    def ok(self) -> bool:
        """Every object checked was intact."""
        return not self.damaged

    def describe(self) -> str:
        """What ``list`` shows: ``verified <when> (<mode>)`` or ``DAMAGED: <object>``."""
        if self.damaged:
            more = f" (+{len(self.damaged) - 1} more)" if len(self.damaged) > 1 else ""
            return f"DAMAGED: {self.damaged[0]}{more}"
        return f"verified {self.time} ({self.mode})"


def snapshot_prefix(snapshot_id: str) -> str:
    """Where the records of one snapshot live."""
    return f"{PREFIX}{snapshot_id}/"


def record_key(snapshot_id: str, when: datetime) -> str:
    """The key of a record written at ``when`` (ids sort by time)."""
    return f"{snapshot_prefix(snapshot_id)}{new_id(when)}.json"


def write_record(
    storage: Storage, signing_key: Ed25519PrivateKey, record: Verification, when: datetime
) -> str:
    """Sign and store ``record``; return its key."""
    body = {"format": FORMAT, **asdict(record), "damaged": list(record.damaged)}
    stored = {"body": body, "signature": keys.sign(signing_key, canonical(body))}
    key = record_key(record.snapshot_id, when)
    storage.put_bytes(key, json.dumps(stored, indent=1, sort_keys=True).encode())
    return key


def open_record(stored: bytes, verify_keys: list[str], *, name: str) -> Verification:
    """Parse a stored record and check its signature; IntegrityError when it is not authentic."""
    try:
        doc = json.loads(stored)
        body, signature = doc["body"], doc["signature"]
        if body.get("format") != FORMAT:
            raise IntegrityError(f"{name}: unknown format {body.get('format')!r}")
    except (ValueError, KeyError, TypeError, AttributeError):
        raise IntegrityError(f"{name}: not a drtool verification record") from None
    for verify_key in verify_keys:
        try:
            keys.verify_signature(
                keys.parse_verify_key(verify_key), canonical(body), signature, name=name
            )
            break
        except (IntegrityError, ConfigError):
            continue
    else:
        raise IntegrityError(f"{name}: signature does not verify against a trusted key")
    try:
        fields = {k: v for k, v in body.items() if k != "format"}
        return Verification(**{**fields, "damaged": tuple(fields.get("damaged", ()))})
    except TypeError:
        raise IntegrityError(f"{name}: malformed verification record") from None


def _listing(storage: Storage) -> tuple[dict[str, list[str]], list[str]]:
    """Record keys by snapshot id (oldest first) and the summary keys (oldest first), from
    one listing of ``verifications/``."""
    found: dict[str, list[str]] = {}
    summaries: list[str] = []
    for obj in storage.list(PREFIX):
        parts = obj.key.split("/")
        if len(parts) == 3 and is_id(parts[1]) and parts[2].endswith(".json"):
            found.setdefault(parts[1], []).append(obj.key)
        elif obj.key.startswith(SUMMARY_PREFIX) and _summary_name_ok(obj.key):
            summaries.append(obj.key)
    return {sid: sorted(ks) for sid, ks in found.items()}, sorted(summaries)


def record_keys(storage: Storage) -> dict[str, list[str]]:
    """Record keys by snapshot id, oldest first (one listing)."""
    return _listing(storage)[0]


def latest_records(
    storage: Storage, verify_keys: list[str], repo_id: str, snapshot_ids: Iterable[str]
) -> dict[str, Verification]:
    """The newest authentic record of each of ``snapshot_ids`` that has one."""
    keyed = latest_keyed(storage, verify_keys, repo_id, snapshot_ids)
    return {sid: rec for sid, (_, rec) in keyed.items()}


def latest_keyed(
    storage: Storage, verify_keys: list[str], repo_id: str, snapshot_ids: Iterable[str] | None
) -> dict[str, tuple[str, Verification]]:
    """The newest authentic record (and its key) of each of ``snapshot_ids`` (None: every
    snapshot with records) that has one.

    A snapshot whose newest listed record is in the newest signed summary costs nothing more
    than the one listing and the summary's GET; any other reads its records newest first and
    stops at the first that verifies (one GET per such snapshot, eight at a time). Without a
    summary (a repository from before it, a summary that does not verify) that is one GET
    per verified snapshot: 10,000 on S3 took ~30 s (ADR 0020's limit this removes).
    """
    listed, summaries = _listing(storage)
    wanted = set(listed) if snapshot_ids is None else set(snapshot_ids)
    summary = _newest_summary(storage, verify_keys, repo_id, summaries)
    out: dict[str, tuple[str, Verification]] = {}
    todo = []
    for sid, ks in listed.items():
        if sid not in wanted:
            continue
        rec = summary.get(ks[-1])
        if rec is not None and rec.snapshot_id == sid:
            out[sid] = (ks[-1], rec)
        else:
            todo.append((sid, ks))
    with ThreadPoolExecutor(8) as pool:
        found = pool.map(lambda t: (t[0], _newest_keyed(storage, verify_keys, repo_id, *t)), todo)
        out.update((sid, kr) for sid, kr in found if kr is not None)
    return out


def newest_of(
    storage: Storage, verify_keys: list[str], repo_id: str, snapshot_id: str, ks: list[str]
) -> Verification | None:
    """The newest authentic record of ``snapshot_id`` among its record keys ``ks`` (sorted)."""
    found = _newest_keyed(storage, verify_keys, repo_id, snapshot_id, ks)
    return None if found is None else found[1]


def _newest_keyed(
    storage: Storage, verify_keys: list[str], repo_id: str, snapshot_id: str, ks: list[str]
) -> tuple[str, Verification] | None:
    for key in reversed(ks):
        try:
            rec = open_record(storage.get_bytes(key), verify_keys, name=key)
        except NotFound:
            continue
        except IntegrityError as exc:
            log.warning("verification record ignored: %s", exc.message)
            continue
        if rec.snapshot_id != snapshot_id or rec.repo_id != repo_id:
            log.warning("verification record ignored: %s names another snapshot", key)
            continue
        return key, rec
    return None


# --- the summary: every snapshot's newest record in one signed object -------------------


def _summary_name_ok(key: str) -> bool:
    name = key.removeprefix(SUMMARY_PREFIX)
    return name.endswith(".json") and is_id(name.removesuffix(".json"))


def _newest_summary(
    storage: Storage, verify_keys: list[str], repo_id: str, summaries: list[str]
) -> dict[str, Verification]:
    """Record key -> record, from the newest summary if it is authentic (else nothing)."""
    if not summaries:
        return {}
    key = summaries[-1]
    try:
        doc = json.loads(storage.get_bytes(key))
        body, signature = doc["body"], doc["signature"]
        if body.get("format") != SUMMARY_FORMAT or body.get("repo_id") != repo_id:
            raise ValueError("another format or repository")
        _verify_any(verify_keys, canonical(body), signature, key)
        out = {}
        for record_key, fields in body["records"].items():
            rec = Verification(**{**fields, "damaged": tuple(fields.get("damaged", ()))})
            if rec.repo_id == repo_id and record_key.startswith(snapshot_prefix(rec.snapshot_id)):
                out[str(record_key)] = rec
        return out
    except NotFound:
        return {}
    except (ValueError, KeyError, TypeError, AttributeError, IntegrityError) as exc:
        why = exc.message if isinstance(exc, IntegrityError) else "malformed"
        log.warning("verification summary %s not used (%s); reading the records", key, why)
        return {}


def _verify_any(verify_keys: list[str], data: bytes, signature: str, name: str) -> None:
    for verify_key in verify_keys:
        try:
            keys.verify_signature(keys.parse_verify_key(verify_key), data, signature, name=name)
            return
        except (IntegrityError, ConfigError):
            continue
    raise IntegrityError(f"{name}: signature does not verify against a trusted key")


def write_summary(
    storage: Storage,
    signing_key: Ed25519PrivateKey,
    verify_keys: list[str],
    repo_id: str,
    when: datetime,
) -> str:
    """Sign and store the newest record of every snapshot that has one; return its key.

    Written by ``verify`` after its records: it reads the previous summary and only the
    records written since (cheap), so one summary per run; ``prune`` removes the older ones.
    """
    keyed = latest_keyed(storage, verify_keys, repo_id, None)
    body = {
        "format": SUMMARY_FORMAT,
        "repo_id": repo_id,
        "time": now_text(when),
        "records": {
            key: {**asdict(rec), "damaged": list(rec.damaged)} for key, rec in keyed.values()
        },
    }
    stored = {"body": body, "signature": keys.sign(signing_key, canonical(body))}
    key = f"{SUMMARY_PREFIX}{new_id(when)}.json"
    storage.put_bytes(key, json.dumps(stored, sort_keys=True, separators=(",", ":")).encode())
    return key


def old_summaries(storage: Storage) -> list[str]:
    """Every summary but the newest (prune's garbage)."""
    return _listing(storage)[1][:-1]


def object_states(
    manifests: dict[str, Manifest], records: dict[str, Verification]
) -> dict[str, Verification]:
    """Object key -> the record that last spoke about it (the newest of any snapshot naming it).

    Blobs are shared: a record of one snapshot speaks for every snapshot naming the object.
    A subset record speaks only about the objects it names damaged: it did not read the rest.
    """
    state: dict[str, Verification] = {}
    for sid, rec in sorted(records.items(), key=lambda kv: kv[1].time):
        m = manifests.get(sid)
        if m is not None:
            for obj in m.objects():
                if not rec.subset or obj.key in rec.damaged:
                    state[obj.key] = rec
    return state


def damaged_objects(
    manifests: dict[str, Manifest], records: dict[str, Verification]
) -> dict[str, str]:
    """Object key -> the snapshot whose record found it damaged, by the newest word on it."""
    return {
        key: rec.snapshot_id
        for key, rec in object_states(manifests, records).items()
        if key in rec.damaged
    }


def now_text(when: datetime | None = None) -> str:
    """The record time format (seconds, UTC)."""
    return (when or datetime.now(UTC)).astimezone(UTC).isoformat(timespec="seconds")
