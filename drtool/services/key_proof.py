"""Every key proven: a drill decrypts a sample object of its snapshot with each identity given.

Escrow only helps if the escrow key really opens the backups: an identity file swapped on
the shelf, a recipient typed wrong into the backup host's config or a rotation that dropped a
key show up only when someone tries. A drill therefore takes one identity file per recipient
(``identities = [...]`` in the definition, ``--identity`` on the command line), decrypts the
smallest object of the snapshot with each one alone (every chunk authenticated), and reports
the header recipients nobody proved. The proven recipients go into the drill's clear summary
in the repository, where ``drtool doctor`` finds how long ago each was last proven.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from drtool import keys
from drtool.errors import ConfigError, DrtoolError, IntegrityError, WrongKey
from drtool.pipeline.age import decrypt, recipient_fingerprint, recipient_of
from drtool.repository import catalog, drill_log
from drtool.repository.access import Repo
from drtool.storage.base import Storage
from drtool.stores.checks import MAX_EXAMPLES, CheckResult

CHECK_NAME = "every recipient proven"


@dataclass
class KeyProof:
    """Which recipients a drill proved, which identities failed, which recipients nobody tried."""

    sample: str = ""
    proven: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    not_proven: list[str] = field(default_factory=list)

    def check(self, *, required: bool) -> CheckResult:
        """The drill's check: fails on a failed identity, and on unproven ones when required."""
        shown = [recipient_fingerprint(r) for r in self.not_proven]
        passed = not self.failed and (not required or not self.not_proven)
        parts = [f"{len(self.proven)} proven on {self.sample}"]
        if self.failed:
            parts.append("failed: " + "; ".join(self.failed))
        if shown:
            parts.append("not proven: " + ", ".join(shown))
        return CheckResult(
            CHECK_NAME,
            passed,
            "; ".join(parts),
            {"proven": self.proven, "not_proven": self.not_proven},
            examples=self.failed[:MAX_EXAMPLES],
        )


def prove_keys(
    repo: Repo,
    record: catalog.SnapshotRecord,
    identity_files: list[Path],
    configured: list[str],
) -> KeyProof:
    """Decrypt the snapshot's smallest object with each identity on its own."""
    assert record.manifest is not None
    sample = min(record.manifest.objects(), key=lambda o: (o.size, o.key))
    raw = repo.storage.get_bytes(sample.key)
    problem = sample.mismatch(len(raw), hashlib.sha256(raw).hexdigest())
    if problem:
        raise IntegrityError(problem)
    proof = KeyProof(sample=sample.key)
    candidates: list[tuple[str, str]] = [("keys.identity_file", i) for i in configured]
    for path in identity_files:
        try:
            candidates += [(str(path), i) for i in keys.load_identities(path, None)]
        except DrtoolError as exc:
            proof.failed.append(f"{path}: {exc.message}")
    for source, identity in candidates:
        recipient = recipient_of(identity)
        try:
            for _ in decrypt([raw], [identity], name=sample.key):
                pass
        except WrongKey:
            proof.failed.append(
                f"{source} ({recipient_fingerprint(recipient)}) cannot decrypt {sample.key}"
            )
            continue
        except (IntegrityError, ConfigError) as exc:
            proof.failed.append(f"{source}: {exc.message}")
            continue
        if recipient not in proof.proven:
            proof.proven.append(recipient)
    proof.not_proven = [r for r in repo.info.recipients if r not in proof.proven]
    return proof


def last_proven(storage: Storage) -> dict[str, datetime]:
    """Recipient -> when a drill last proved it (from the drills' clear summaries)."""
    found: dict[str, datetime] = {}
    for summary in drill_log.read_summaries(storage):
        try:
            when = datetime.fromisoformat(str(summary.get("finished") or summary["started"]))
        except (KeyError, ValueError):
            continue
        for recipient in summary.get("keys_proven") or ():
            if isinstance(recipient, str) and (recipient not in found or when > found[recipient]):
                found[recipient] = when
    return found
