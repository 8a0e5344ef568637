"""``drtool keys rotate``: add and remove age recipients by rewriting only each object's header.

Every stored object is age(file key) ; re-wrapping the file key for the new recipients gives a
new header while the payload (nonce and STREAM chunks) stays byte-identical, so a 1 GB dump
costs its header plus one 5 MiB part of upload on S3 (the rest is copied server-side).
The design (records, resume, Object Lock) is ADR 0023; the records are
:mod:`drtool.repository.rotation`.

Per batch of objects: read each one whole (its stored sha256 must be the signed one, and the
new object's sha256 is computed on the way), write a signed *intent* record naming the new
sizes and hashes, rewrite the objects, write the signed *done* record the readers apply. The
repository header's recipients are updated last. A kill anywhere leaves each object whole
(old header or new, both decrypt with the identities of the old set that stay, the new set
decrypts the rewritten ones), and a re-run recognises what was done.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from drtool import keys
from drtool.capture import chain as capture_chain
from drtool.config import Config
from drtool.errors import ConfigError, IntegrityError, UsageError, WrongKey
from drtool.faults import crash_point
from drtool.pipeline.age import Rewrapped, parse_recipient, recipient_fingerprint, rewrap
from drtool.repository import catalog, layout, rotation, signing_keys
from drtool.repository.access import Repo, identities_of, open_repo, storage_for
from drtool.repository.locks import repository_lock
from drtool.storage.base import ObjectInfo, Storage
from drtool.wal.index import WAL, load_index

log = logging.getLogger(__name__)

BATCH_ENV = "DRTOOL_ROTATE_BATCH"  # objects per batch; the fault tests make batches small
BATCH = 32  # objects per intent/done record pair
_HEAD_BYTES = 1 << 20  # read this much of an object before parsing its age header


@dataclass(frozen=True)
class Target:
    """An object to rotate: where it is and the size/sha256 it must have now."""

    key: str
    size: int
    sha256: str


@dataclass
class RotateResult:
    """What a rotation did."""

    rotation_id: str
    recipients_before: list[str]
    recipients_after: list[str]
    rewritten: int = 0
    recognised: int = 0  # rewritten by a killed run, recorded now
    already: int = 0  # done by an earlier run of this rotation
    unreferenced: int = 0  # sealed objects no manifest or WAL index names (prune's garbage)
    skipped_invalid: list[str] = field(default_factory=list)  # snapshots not authentic
    old_versions_until: str | None = None  # Object Lock: when the last old version may go
    versioned: bool = False
    resumed: bool = False


def rotate(cfg: Config, add: list[str], remove: list[str]) -> RotateResult:
    """Rotate the repository's recipients (see the module docstring)."""
    for value in [*add, *remove]:
        parse_recipient(value.strip())  # ConfigError names the (public) value
    identities = identities_of(cfg)
    if not identities:
        raise ConfigError(
            "keys.identity_file: not set; key rotation re-wraps each object's file key and "
            "needs an identity that decrypts the current headers (run it on the operator side)"
        )
    if not cfg.keys.signing_key_file:
        raise ConfigError(
            "keys.signing_key_file: not set; key rotation signs records of the new object "
            "hashes (ADR 0023) and needs the signing key whose verify key is pinned"
        )
    signing_key = keys.load_signing_key(cfg.keys.signing_key_file)
    repo = open_repo(cfg)
    own = keys.verify_key_text(signing_key.public_key())
    current = repo.info.signing_keys[-1]["key"] if repo.info.signing_keys else own
    if own not in repo.verify_keys or own != current:
        raise ConfigError(
            "keys.signing_key_file: not the repository's current, trusted signing key (pinned "
            "keys.verify_key, or handed over to); records signed with it would be ignored"
        )
    with repository_lock(repo.storage, "rotate") as held:
        return _rotate_locked(repo, identities, signing_key, add, remove, held.ensure_held)


def _batch_size() -> int:
    raw = os.environ.get(BATCH_ENV, str(BATCH))
    if not raw.isdigit() or int(raw) < 1:
        raise ConfigError(f"{BATCH_ENV}: expected a whole number above 0 (got {raw!r})")
    return int(raw)


def _target_recipients(before: list[str], add: list[str], remove: list[str]) -> list[str]:
    gone = {r.strip() for r in remove}
    unknown = sorted(gone - set(before))
    if unknown:
        raise UsageError(
            f"--remove-recipient {recipient_fingerprint(unknown[0])}: not a recipient of this "
            "repository (see drtool-repo.json)"
        )
    after = [r for r in before if r not in gone]
    after += [a.strip() for a in add if a.strip() not in after and a.strip() not in gone]
    if not after:
        raise UsageError("rotation would leave no recipient: nobody could decrypt new objects")
    return after


def _rotate_locked(
    repo: Repo,
    identities: list[str],
    signing_key: Ed25519PrivateKey,
    add: list[str],
    remove: list[str],
    ensure_held: Callable[[], None],
) -> RotateResult:
    storage, repo_id = repo.storage, repo.info.repo_id
    states = rotation.read_rotations(storage, repo.verify_keys, repo_id)
    unfinished = [s for s in states if s.finished is None]
    header = list(repo.info.recipients)
    state = unfinished[-1] if unfinished else None
    if state is not None and list(state.plan.recipients_after) == header:
        # killed after the header update: only the closing record is missing
        result = RotateResult(
            state.plan.rotation_id,
            list(state.plan.recipients_before),
            header,
            resumed=True,
            old_versions_until=state.retained_until,
            versioned=storage.versioned(),
        )
        _finish(storage, signing_key, state.plan, result)
        return result
    after = _target_recipients(header, add, remove) if add or remove or state is None else []
    if state is not None:
        if after and after != list(state.plan.recipients_after):
            raise UsageError(
                f"rotation {state.plan.rotation_id} was interrupted with other recipients; "
                "re-run it with the same --add-recipient/--remove-recipient (or none) first"
            )
        plan = state.plan
    else:
        if after == header:
            raise UsageError("nothing to change: the repository already has these recipients")
        _probe(repo, identities, after)
        plan = rotation.Plan(
            rotation_id=f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{secrets.token_hex(2)}",
            repo_id=repo_id,
            started=datetime.now(UTC).isoformat(timespec="seconds"),
            host=socket.gethostname(),
            recipients_before=tuple(header),
            recipients_after=tuple(after),
        )
        storage.put_bytes(
            rotation.plan_key(plan.rotation_id),
            rotation.sign_record(rotation.plan_body(plan), signing_key),
        )
        state = rotation.RotationState(plan)
    result = RotateResult(
        plan.rotation_id,
        list(plan.recipients_before),
        list(plan.recipients_after),
        resumed=bool(unfinished),
        versioned=storage.versioned(),
    )
    targets, listed = _targets(repo, result)
    todo = []
    for target in targets:
        done = state.done.get(target.key)
        if done is not None and (done.size, done.sha256) == (target.size, target.sha256):
            result.already += 1
        else:
            todo.append(target)
    seq = state.last_seq
    latest = datetime.fromisoformat(state.retained_until) if state.retained_until else None
    size = _batch_size()
    for start in range(0, len(todo), size):
        ensure_held()  # a lost lock (heartbeat failed): stop before rewriting more
        seq += 1
        batch = [(t, listed[t.key]) for t in todo[start : start + size]]
        until = _rotate_batch(storage, identities, signing_key, plan, state, seq, batch, result)
        log.info(
            "rotation %s: %d of %d objects done", plan.rotation_id, start + len(batch), len(todo)
        )
        if until is not None and (latest is None or until > latest):
            latest = until
    if latest is not None:
        result.old_versions_until = latest.isoformat(timespec="seconds")
    crash_point("rotate-before-header")
    info = replace(repo.info, recipients=tuple(plan.recipients_after))
    storage.put_bytes(layout.REPO_FILE, info.to_json())
    _finish(storage, signing_key, plan, result)
    return result


def _probe(repo: Repo, identities: list[str], after: list[str]) -> None:
    """Before anything is written: the identity opens the smallest object (WrongKey if not).

    Without this a wrong identity would leave a started rotation that only it can resume.
    """
    objects = [o for o in repo.storage.list(layout.SNAPSHOTS) if o.key.endswith(".age")]
    if not objects:
        return
    sample = min(objects, key=lambda o: (o.size, o.key))
    head = b"".join(repo.storage.get(sample.key))[:_HEAD_BYTES]
    rewrap(head, identities, after, name=sample.key)


def _finish(
    storage: Storage, signing_key: Ed25519PrivateKey, plan: rotation.Plan, result: RotateResult
) -> None:
    body = {
        "kind": "finished",
        "repo_id": plan.repo_id,
        "rotation_id": plan.rotation_id,
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "old_versions_until": result.old_versions_until,
    }
    storage.put_bytes(
        rotation.finished_key(plan.rotation_id), rotation.sign_record(body, signing_key)
    )


def _targets(repo: Repo, result: RotateResult) -> tuple[list[Target], dict[str, ObjectInfo]]:
    """Every object an authentic manifest, the WAL index or the capture chain names, as it
    must be now."""
    storage = repo.storage
    listed: dict[str, ObjectInfo] = {}
    for prefix in (layout.SNAPSHOTS, layout.BLOBS, WAL, capture_chain.CAPTURE):
        listed.update((o.key, o) for o in storage.list(prefix))
    wanted: dict[str, Target] = {}
    for record in catalog.list_snapshots(storage, repo.verify_keys, repo.info.repo_id):
        if record.manifest is None:
            result.skipped_invalid.append(record.snapshot_id)
            continue
        for o in record.manifest.objects():
            if o.key in listed:
                wanted.setdefault(o.key, Target(o.key, o.size, o.sha256))
    for entry in load_index(storage, repo.verify_keys, repo.info.repo_id).entries.values():
        if entry.key in listed:
            wanted.setdefault(entry.key, Target(entry.key, entry.size, entry.sha256))
    # the attachment capture's journals and the blobs only its chain names (ADR 0025)
    chain = capture_chain.load_chain(storage, repo.verify_keys, repo.info.repo_id)
    for _, chained in chain.records:
        for stored in (chained.journal, *chained.blobs):
            if stored.key in listed:
                wanted.setdefault(stored.key, Target(stored.key, stored.size, stored.sha256))
    result.unreferenced = sum(1 for k in listed if k.endswith(".age") and k not in wanted)
    return sorted(wanted.values(), key=lambda t: t.key), listed


@dataclass
class _Inspected:
    target: Target
    info: ObjectInfo
    stored_sha256: str
    rewrapped: Rewrapped | None
    new_sha256: str | None
    problem: Exception | None = None

    @property
    def new_size(self) -> int:
        assert self.rewrapped is not None
        return self.info.size - self.rewrapped.old_size + len(self.rewrapped.header)


def _inspect(
    storage: Storage, target: Target, info: ObjectInfo, identities: list[str], after: list[str]
) -> _Inspected:
    """Read the object whole: its sha256 now, and what it will be with the new header."""
    old, new = hashlib.sha256(), hashlib.sha256()
    head = bytearray()
    rewrapped: Rewrapped | None = None
    problem: Exception | None = None
    wanted_head = min(info.size, _HEAD_BYTES)

    def pieces() -> Iterator[bytes]:
        yield from storage.get(target.key)

    for piece in pieces():
        old.update(piece)
        if rewrapped is not None:
            new.update(piece)
            continue
        if problem is not None:
            continue
        head += piece
        if len(head) >= wanted_head:
            try:
                rewrapped = rewrap(bytes(head), identities, after, name=target.key)
            except (WrongKey, IntegrityError) as exc:
                problem = exc
                continue
            new.update(rewrapped.header)
            new.update(head[rewrapped.old_size :])
            head = bytearray()
    if rewrapped is None and problem is None:  # an empty object: nothing to parse
        problem = IntegrityError(f"{target.key}: not an age file")
    return _Inspected(
        target,
        info,
        old.hexdigest(),
        rewrapped,
        new.hexdigest() if rewrapped is not None else None,
        problem,
    )


def _rotate_batch(
    storage: Storage,
    identities: list[str],
    signing_key: Ed25519PrivateKey,
    plan: rotation.Plan,
    state: rotation.RotationState,
    seq: int,
    batch: list[tuple[Target, ObjectInfo]],
    result: RotateResult,
) -> datetime | None:
    """One batch: inspect, intent record, rewrite, done record. Returns the latest old lock."""
    after = list(plan.recipients_after)
    recognised: list[rotation.Change] = []
    planned: list[tuple[_Inspected, rotation.Change]] = []
    for target, info in batch:
        found = _inspect(storage, target, info, identities, after)
        if found.stored_sha256 != target.sha256 or info.size != target.size:
            intent = next(
                (
                    c
                    for c in state.intents.get(target.key, [])
                    if (c.size, c.sha256) == (info.size, found.stored_sha256)
                    and (c.from_size, c.from_sha256) == (target.size, target.sha256)
                ),
                None,
            )
            if intent is None:
                raise IntegrityError(
                    f"{target.key}: stored bytes differ from the signed size/sha256; not "
                    "rotated (run drtool verify --all and repair first; nothing else changed "
                    "in this batch)"
                )
            recognised.append(intent)
            continue
        if found.problem is not None or found.new_sha256 is None:
            raise found.problem or IntegrityError(f"{target.key}: cannot re-wrap")
        change = rotation.Change(
            target.key, target.size, target.sha256, found.new_size, found.new_sha256
        )
        planned.append((found, change))
    if planned:
        storage.put_bytes(
            rotation.batch_key(plan.rotation_id, seq, "intent"),
            rotation.sign_record(
                rotation.batch_body(plan, seq, "intent", [c for _, c in planned]), signing_key
            ),
        )
        crash_point("rotate-after-intent")
    latest: datetime | None = None
    for number, (found, change) in enumerate(planned):
        assert found.rewrapped is not None
        retain = storage.retention(change.key)
        if retain is not None and (latest is None or retain > latest):
            latest = retain
        storage.rewrite_head(
            change.key,
            found.rewrapped.header,
            found.rewrapped.old_size,
            source=found.info,
            retain_until=retain,
            expect_sha256=change.sha256,
        )
        if number == 0:
            crash_point("rotate-after-object")
    changes = [*recognised, *(c for _, c in planned)]
    if changes:
        until = latest.isoformat(timespec="seconds") if latest else None
        body = rotation.batch_body(plan, seq, "done", changes, retained_until=until)
        storage.put_bytes(
            rotation.batch_key(plan.rotation_id, seq, "done"),
            rotation.sign_record(body, signing_key),
        )
        crash_point("rotate-after-done")
    result.rewritten += len(planned)
    result.recognised += len(recognised)
    return latest


@dataclass(frozen=True)
class SigningRotation:
    """A finished signing-key rotation."""

    old_verify_key: str
    new_verify_key: str
    at: str


def rotate_signing_key(cfg: Config, new_path: str) -> SigningRotation:
    """Replace the backup host's signing key by a new one written to ``new_path``.

    The header gets a ``signing_keys`` entry both keys sign (signing_keys.py): readers that
    pinned the old verify key trust the new one and vice versa; manifests of the old key stay
    valid up to now, its later ones do not. Needs the current key (keys.signing_key_file).
    """
    if not cfg.keys.signing_key_file:
        raise ConfigError(
            "keys.signing_key_file: not set; the current signing key must sign its successor "
            "(run this on the backup host)"
        )
    old = keys.load_signing_key(cfg.keys.signing_key_file)
    old_text = keys.verify_key_text(old.public_key())
    storage = storage_for(cfg)
    info = layout.read_repo_info(storage)
    current = info.signing_keys[-1]["key"] if info.signing_keys else None
    if (current or old_text) != old_text or old_text not in info.verify_keys:
        raise ConfigError(
            "keys.signing_key_file: not the repository's current signing key; only the current "
            "key can hand over to a new one"
        )
    with repository_lock(storage, "signing-key"):
        new_text = keys.write_signing_key(new_path)
        new = keys.load_signing_key(new_path)
        # to the microsecond: a manifest finished earlier in the same second stays inside the
        # old key's period, a record signed a moment later falls outside it
        at = datetime.now(UTC).isoformat(timespec="microseconds")
        entries = signing_keys.endorse(info.repo_id, list(info.signing_keys), old, new, at)
        updated = replace(
            info, signing_keys=tuple(entries), verify_keys=(*info.verify_keys, new_text)
        )
        storage.put_bytes(layout.REPO_FILE, updated.to_json())
    return SigningRotation(old_text, new_text, at)
