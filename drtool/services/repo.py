"""Repository command handlers: init, list, show, verify, unlock (prune: ``services.prune``)."""

from __future__ import annotations

import hashlib
import json
import logging
import socket
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from drtool import keys
from drtool.config import Config
from drtool.errors import ConfigError, IntegrityError, NotFound, StorageError, UsageError
from drtool.pipeline.header import InnerHeader
from drtool.pipeline.seal import unseal
from drtool.repository import catalog, chain, layout, object_lock, subset, verifications
from drtool.repository.access import (
    Repo,
    identities_of,
    open_repo,
    read_object,
    snapshot_header,
    storage_for,
)
from drtool.repository.locks import LockInfo, unlock
from drtool.repository.manifest import Manifest, ObjectEntry

log = logging.getLogger(__name__)


def init_repo(cfg: Config) -> layout.RepoInfo:
    """Create a repository for the configured recipients and signing key."""
    recipients = keys.load_recipients(cfg.keys.recipients)
    if not cfg.keys.signing_key_file:
        raise ConfigError(
            "keys.signing_key_file: not set (got nothing); create one with "
            "`drtool keys signing-key PATH`"
        )
    verify_key = keys.verify_key_text(keys.load_signing_key(cfg.keys.signing_key_file).public_key())
    return layout.init_repository(storage_for(cfg), recipients, verify_key)


def list_records(cfg: Config, last: int | None = None) -> list[catalog.SnapshotRecord]:
    """Every snapshot with its status (VALID, INVALID or DAMAGED and why), oldest first.

    A broken link of the hash chain is logged (``verify`` fails on it). With ``last``, only
    the newest ``last`` snapshots, read through the catalog index at a cost that does not grow
    with the history (ADR 0020); the chain is then not walked.
    """
    repo = open_repo(cfg)
    if last is not None:
        if last < 1:
            raise UsageError(f"list: --last must be at least 1 (got {last})")
        return catalog.recent_snapshots(repo.storage, repo.verify_keys, repo.info.repo_id, last)
    records = catalog.list_snapshots(repo.storage, repo.verify_keys, repo.info.repo_id)
    for snapshot_id, problems in chain.link_problems(
        records, chain.tombstones(repo.storage)
    ).items():
        for problem in problems:
            log.warning("snapshot %s: %s (see drtool verify)", snapshot_id, problem)
    return records


def record_summary(record: catalog.SnapshotRecord) -> dict[str, Any]:
    """A JSON-ready row for ``list``."""
    m = record.manifest
    return {
        "id": record.snapshot_id,
        "status": record.status,
        "problem": record.reason,
        "verified": record.verification_text(),
        "verification": asdict(record.verification) if record.verification else None,
        "time": record.time.isoformat(),
        "components": [c.name for c in m.components] if m else [],
        "plain_bytes": m.plain_bytes if m else None,
        "stored_bytes": m.stored_bytes if m else None,
        "host": m.host if m else None,
    }


@dataclass
class ShowResult:
    """A snapshot, and its fingerprints when an identity was available."""

    record: catalog.SnapshotRecord
    fingerprints: dict[str, Any] = field(default_factory=dict)


def show_snapshot(cfg: Config, ref: str) -> ShowResult:
    """One snapshot's manifest and, with an identity configured, its fingerprints."""
    repo = open_repo(cfg)
    records = catalog.list_snapshots(repo.storage, repo.verify_keys, repo.info.repo_id)
    record = _find(records, ref)
    result = ShowResult(record)
    identities = identities_of(cfg)
    if record.manifest is None or not identities:
        return result
    for comp in record.manifest.components:
        for obj in comp.objects:
            if obj.kind == "fingerprints":
                header = snapshot_header(record.manifest, comp.name, obj.kind)
                data = read_object(repo, obj, header, identities)
                result.fingerprints[comp.name] = json.loads(data)
    return result


def _find(records: list[catalog.SnapshotRecord], ref: str) -> catalog.SnapshotRecord:
    if ref == "latest":
        return catalog.resolve(records, "latest")
    for record in records:
        if record.snapshot_id == ref:
            return record
    raise NotFound(f"snapshot {ref}: not found (see `drtool list`)")


@dataclass
class VerifyOutcome:
    """What verify found for one snapshot."""

    snapshot_id: str
    problems: list[str]
    objects: int
    read_data: bool
    damaged: list[str] = field(default_factory=list)  # object keys found damaged
    recorded: str | None = None  # the key of the signed verification record, if written


def verify(
    cfg: Config, ref: str | None, *, read_data: bool, now: datetime | None = None
) -> list[VerifyOutcome]:
    """Check snapshots: signature, every object present with its size and stored sha256.

    ``read_data`` also decrypts every object and checks inner headers and plaintext (needs an
    identity). ``ref`` None means every snapshot; ``unverified`` every valid snapshot without a
    verification record, skipping objects a record already found intact. Each object is read
    once per run, and its result counts for every snapshot that names it: a damaged shared
    blob makes every one of them damaged. With a signing key configured, each checked snapshot
    gets a signed verification record (what ``list`` and ``prune`` go by).
    """
    repo = open_repo(cfg)
    identities = identities_of(cfg) if read_data else []
    if read_data and not identities:
        raise ConfigError("keys.identity_file: --read-data needs an identity (got none)")
    # every manifest read and hashed: the chain walk judges the stored bytes (ADR 0020)
    records = catalog.list_snapshots(
        repo.storage, repo.verify_keys, repo.info.repo_id, use_index=False
    )
    if not records:
        raise NotFound("verify: the repository has no snapshots")
    mode = verifications.READ_DATA if read_data else verifications.HASHES
    results: dict[str, str | None] = {}  # object key -> its problem, read once per run
    if ref == UNVERIFIED:
        chosen = [r for r in records if r.valid and r.verification is None]
        results = _known_intact(records, mode)
    else:
        chosen = records if ref is None else [_find_any(records, ref)]
    signer = _record_signer(cfg)
    when = now or datetime.now(UTC)
    outcomes = []
    for record in chosen:
        problems = [record.problem] if record.problem else []
        m = record.manifest
        outcome = VerifyOutcome(record.snapshot_id, problems, 0, read_data)
        outcomes.append(outcome)
        if m is None or problems:
            continue
        for comp in m.components:
            for obj in comp.objects:
                if obj.key not in results:  # objects counts reads: a shared blob once
                    results[obj.key] = _verify_object(repo, m, comp.name, obj, identities)
                    outcome.objects += 1
                problem = results[obj.key]
                if problem:
                    outcome.damaged.append(obj.key)
                    problems.append(problem)
        problems += [
            f"{key}: locked for less than the snapshot's own retention (Object Lock)"
            for key in object_lock.short_locked(repo.storage, m) or []
        ]
        if signer is not None:
            checked = verifications.Verification(
                repo.info.repo_id,
                record.snapshot_id,
                verifications.now_text(when),
                mode,
                len(m.objects()),
                tuple(outcome.damaged),
                socket.gethostname(),
            )
            outcome.recorded = verifications.write_record(repo.storage, signer, checked, when)
    if signer is None:
        log.info("verification not recorded: no keys.signing_key_file configured to sign it")
    elif any(o.recorded for o in outcomes):
        _write_summary(repo, signer, when)
    _add_chain_problems(repo, records, outcomes)
    return outcomes


def _write_summary(repo: Repo, signer: Ed25519PrivateKey, when: datetime) -> None:
    """The signed summary of every snapshot's newest record (``list`` reads it instead of one
    record per snapshot); a failure costs only speed, so it is a warning."""
    try:
        verifications.write_summary(repo.storage, signer, repo.verify_keys, repo.info.repo_id, when)
    except (StorageError, NotFound) as exc:
        log.warning("verification summary not written (%s); list reads the records", exc)


@dataclass
class SubsetOutcome:
    """What one ``verify --read-data-subset`` run read and found."""

    mode: str  # verifications.READ_DATA (decrypted) or HASHES (stored sha256, key-less)
    budget: str
    day: int
    period_days: int
    objects_read: int
    bytes_read: int
    total_objects: int
    total_bytes: int
    #: object key -> its problem, and the snapshots naming it (all of them DAMAGED now)
    damaged: dict[str, str] = field(default_factory=dict)
    referenced_by: dict[str, list[str]] = field(default_factory=dict)
    recorded: list[str] = field(default_factory=list)  # keys of the records written


def verify_subset(
    cfg: Config, budget: subset.Budget, *, now: datetime | None = None
) -> SubsetOutcome:
    """Read today's slice of every object the snapshots name (docs/decisions/0016).

    Decrypts and authenticates with the configured identity (``read-data``), else checks the
    stored sha256 key-less (``hashes``). Each damaged object is named with every snapshot that
    references it; with a signing key, each of those snapshots gets a signed subset record
    naming the damage, so ``list``, ``restore latest``, prune and the next backup (which then
    uploads that object again instead of reusing the blob) know it. Finding nothing damaged
    records nothing: a subset run does not make a snapshot "verified".
    """
    repo = open_repo(cfg)
    identities = identities_of(cfg)
    mode = verifications.READ_DATA if identities else verifications.HASHES
    records = catalog.list_snapshots(repo.storage, repo.verify_keys, repo.info.repo_id)
    readable = [r for r in records if r.manifest is not None and r.problem is None]
    if not readable:
        raise NotFound("verify: the repository has no snapshots")
    where: dict[str, tuple[Manifest, str, ObjectEntry]] = {}  # key -> the first naming it
    naming: dict[str, list[str]] = {}
    for record in readable:
        assert record.manifest is not None
        for comp in record.manifest.components:
            for obj in comp.objects:
                where.setdefault(obj.key, (record.manifest, comp.name, obj))
                naming.setdefault(obj.key, []).append(record.snapshot_id)
    when = now or datetime.now(UTC)
    day = int(when.timestamp() // 86400)
    today = subset.todays_slice([entry for _, _, entry in where.values()], budget, day)
    outcome = SubsetOutcome(
        mode,
        str(budget),
        day,
        today.period_days,
        len(today.objects),
        today.bytes,
        today.total_objects,
        today.total_bytes,
    )
    for obj in today.objects:
        m, component, entry = where[obj.key]
        problem = _verify_object(repo, m, component, entry, identities)
        if problem:
            outcome.damaged[obj.key] = problem
            outcome.referenced_by[obj.key] = naming[obj.key]
            log.error(
                "%s damaged (%s); snapshots referencing it: %s",
                obj.key,
                problem,
                ", ".join(naming[obj.key]),
            )
    signer = _record_signer(cfg)
    if outcome.damaged and signer is None:
        log.info("damage not recorded: no keys.signing_key_file configured to sign it")
    if outcome.damaged and signer is not None:
        for record in readable:
            assert record.manifest is not None
            keys_of = {o.key for o in record.manifest.objects()}
            bad = tuple(sorted(k for k in keys_of if k in outcome.damaged))
            if not bad:
                continue
            checked = verifications.Verification(
                repo.info.repo_id,
                record.snapshot_id,
                verifications.now_text(when),
                mode,
                sum(1 for o in today.objects if o.key in keys_of),
                bad,
                socket.gethostname(),
                subset=True,
            )
            outcome.recorded.append(verifications.write_record(repo.storage, signer, checked, when))
        if outcome.recorded:
            _write_summary(repo, signer, when)
    return outcome


def _add_chain_problems(
    repo: Repo, records: list[catalog.SnapshotRecord], outcomes: list[VerifyOutcome]
) -> None:
    """Walk the whole hash chain, whatever was chosen: a deleted or replaced manifest fails.

    A broken link is reported on the snapshot that names the missing or replaced one; when
    that snapshot was not among those checked, it is added to the outcomes.
    """
    broken = chain.link_problems(records, chain.tombstones(repo.storage))
    by_id = {o.snapshot_id: o for o in outcomes}
    for snapshot_id in sorted(broken):
        outcome = by_id.get(snapshot_id)
        if outcome is None:
            outcome = VerifyOutcome(
                snapshot_id, [], 0, outcomes[0].read_data if outcomes else False
            )
            outcomes.append(outcome)
        outcome.problems.extend(broken[snapshot_id])
    outcomes.sort(key=lambda o: o.snapshot_id)


UNVERIFIED = "unverified"


def _known_intact(records: list[catalog.SnapshotRecord], mode: str) -> dict[str, str | None]:
    """Objects whose last record (of any snapshot) found them intact, at least as deeply.

    ``verify --unverified`` skips them: each object is read once in its life, not once per
    snapshot naming it (an incremental MinIO snapshot names every blob of the bucket).
    """
    manifests = {r.snapshot_id: r.manifest for r in records if r.manifest is not None}
    checked = {r.snapshot_id: r.verification for r in records if r.verification is not None}
    deep_enough = {verifications.READ_DATA, mode}
    return {
        key: None
        for key, rec in verifications.object_states(manifests, checked).items()
        if rec.ok and rec.mode in deep_enough
    }


def _record_signer(cfg: Config) -> Ed25519PrivateKey | None:
    """The key verification records are signed with: the configured signing key, if any."""
    if not cfg.keys.signing_key_file:
        return None
    return keys.load_signing_key(cfg.keys.signing_key_file)


def _find_any(records: list[catalog.SnapshotRecord], ref: str) -> catalog.SnapshotRecord:
    """Like ``_find``, but ``latest`` may be a snapshot known damaged: verify looks again."""
    if ref == "latest":
        usable = [r for r in records if r.manifest is not None and r.problem is None]
        if usable:
            return usable[-1]
    return _find(records, ref)


def _verify_object(
    repo: Repo, m: Manifest, component: str, obj: ObjectEntry, identities: list[str]
) -> str | None:
    """Stream one object: stored size and sha256; with identities, authenticate and decrypt."""
    digest = hashlib.sha256()
    size = 0

    def counted() -> Any:
        nonlocal size
        for chunk in repo.storage.get(obj.key):
            digest.update(chunk)
            size += len(chunk)
            yield chunk

    try:
        if identities:
            blob_id = obj.key.rsplit("/", 1)[-1].split(".")[0]
            header = (
                InnerHeader(m.repo_id, blob_id, "minio", "blob")
                if obj.kind == "blob"
                else snapshot_header(m, component, obj.kind)
            )
            for _ in unseal(
                counted(),
                identities=identities,
                expected=header,
                name=obj.key,
                recipients_hint=list(repo.info.recipients),
            ):
                pass
        else:
            for _ in counted():
                pass
    except (IntegrityError, NotFound) as exc:
        return str(exc)
    return obj.mismatch(size, digest.hexdigest())


def unlock_repo(
    cfg: Config, *, everything: bool, lock_id: str | None = None
) -> list[tuple[LockInfo, str]]:
    """Remove the locks of dead holders (or the lock ``lock_id``, or every lock), with why."""
    return unlock(storage_for(cfg), everything=everything, lock_id=lock_id)
