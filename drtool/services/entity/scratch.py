"""The snapshot's database, staged for extracting one entity: tables and rows, nothing else.

Extraction reads the closure with a few scans; it needs neither indexes, constraints nor
triggers, nor the rows of the tables another entity owns. Restoring the dump's table of
contents without those (``pg_restore --use-list``) skips index builds and constraint checks,
most of a full restore's time. The dump itself was authenticated byte for byte against the
signed manifest when it was staged; foreign keys and unique values are checked against
production's live schema, which is where the rows go.
"""

from __future__ import annotations

import re
from collections.abc import Collection

#: Table-of-contents entry types that extraction does not need.
SKIPPED = (
    "INDEX",
    "INDEX ATTACH",
    "CONSTRAINT",
    "FK CONSTRAINT",
    "CHECK CONSTRAINT",
    "TRIGGER",
    "EVENT TRIGGER",
    "STATISTICS",
    "POLICY",
    "ROW SECURITY",
    "PUBLICATION",
    "PUBLICATION TABLE",
    "PUBLICATION TABLES IN SCHEMA",
    "SUBSCRIPTION",
    "ACL",
    "DEFAULT ACL",
    "MATERIALIZED VIEW DATA",
)
_ENTRY = re.compile(r"^\d+; \d+ \d+ (.*)$")


def extraction_list(toc: str, skip_data: Collection[str]) -> str:
    """The ``pg_restore -l`` listing without SKIPPED entries or the data of ``skip_data``."""
    kept = []
    for line in toc.splitlines():
        match = _ENTRY.match(line)
        if match:
            rest = match.group(1)
            if any(rest.startswith(kind + " ") for kind in SKIPPED):
                continue
            if rest.startswith("TABLE DATA "):
                fields = rest.split(" ")
                if len(fields) >= 4 and fields[3] in skip_data:
                    continue
        kept.append(line)
    return "\n".join(kept) + "\n"
