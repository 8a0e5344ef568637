"""``capture verify``: the chain proved key-less; with an identity, the journals read too."""

from __future__ import annotations

from dataclasses import dataclass, field

from drtool.capture import chain
from drtool.errors import IntegrityError
from drtool.repository import layout
from drtool.repository.access import Repo, read_object, stored_problem


@dataclass
class CaptureVerifyOutcome:
    """What ``capture verify`` found."""

    records: int = 0
    blobs: int = 0
    entries: int = 0  # journal entries read (``--read-data`` only)
    read_data: bool = False
    problems: list[str] = field(default_factory=list)


def verify_capture(repo: Repo, identities: list[str]) -> CaptureVerifyOutcome:
    """Signatures, sequence and ``previous_sha256`` of every record; every journal and blob
    present with its recorded size and sha256; with ``identities`` every journal decrypted
    and each entry's blob one its record names."""
    found = chain.load_chain(repo.storage, repo.verify_keys, repo.info.repo_id)
    outcome = CaptureVerifyOutcome(read_data=bool(identities), problems=list(found.problems))
    checked: set[str] = set()
    for key, record in found.records:
        outcome.records += 1
        journal = record.journal.entry(chain.JOURNAL_KIND)
        problem = stored_problem(repo, journal)
        if problem:
            outcome.problems.append(f"{key}: journal {problem}")
        for blob in record.blobs:
            if blob.key in checked:
                continue
            checked.add(blob.key)
            outcome.blobs += 1
            problem = stored_problem(repo, blob.entry("blob"))
            if problem:
                outcome.problems.append(f"{key}: blob {problem}")
        if identities and not problem_for(outcome, journal.key):
            outcome.problems += _read_journal(repo, identities, key, record, outcome, found)
    return outcome


def problem_for(outcome: CaptureVerifyOutcome, key: str) -> bool:
    """Whether a problem already names ``key`` (its content is then not read)."""
    return any(key in p for p in outcome.problems)


def _read_journal(
    repo: Repo,
    identities: list[str],
    key: str,
    record: chain.ChainRecord,
    outcome: CaptureVerifyOutcome,
    found: chain.Chain,
) -> list[str]:
    header = chain.journal_header(repo.info.repo_id, record.seq)
    try:
        data = read_object(repo, record.journal.entry(chain.JOURNAL_KIND), header, identities)
        entries = [found.current(e) for e in chain.decode_journal(data, name=record.journal.key)]
    except IntegrityError as exc:
        return [str(exc)]
    named = {(b.key, b.size, b.sha256) for b in record.blobs}
    problems = []
    for e in entries:
        outcome.entries += 1
        if (layout.blob_key(e.blob), e.blob_size, e.blob_sha256) not in named:
            problems.append(f"{key}: journal entry {e.key} names a blob the record lacks")
    return problems
