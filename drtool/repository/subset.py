"""Which objects today's ``verify --read-data-subset`` reads: a rotating, bounded slice.

Reading every object every day costs egress and hours; reading only new ones never notices a
blob that rots later. So each run reads a slice, and consecutive runs walk the whole
repository. Stateless: the slice follows from the object keys and the day number only, so two
hosts (or a rerun) pick the same objects and nothing has to be remembered between runs.

The objects are laid on a ring in a stable order (sha256 of the key), each taking a width: 1
for an ``N%`` budget, its stored size for a ``SIZE`` budget. Day ``d`` reads the objects
whose start on the ring falls in ``[d*W, d*W + W)`` modulo the ring's length ``T`` (``W``: the
budget). Consecutive days' windows are contiguous, so an unchanged set of objects is read
entirely within ``ceil(T / W)`` days (the period: 100/N days for ``N%``). An ``N%`` run reads
exactly ``ceil(N% of the objects)`` objects; a ``SIZE`` run reads at most SIZE plus the rest of
the last object that starts inside its window. New objects take their place in the order and
are reached within one period of the set that includes them.
See docs/decisions/0016-verify-subset.md.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass

from drtool.errors import ConfigError
from drtool.repository.manifest import ObjectEntry

_UNITS = {"": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4}
_UNITS.update({"ki": 1024, "mi": 1024**2, "gi": 1024**3, "ti": 1024**4})
_BUDGET = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(%|[kmgt]i?)?b?\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class Budget:
    """What one run may read: a share of the objects (``percent``) or a number of bytes."""

    percent: float = 0.0
    size: int = 0

    def __str__(self) -> str:
        return f"{self.percent:g}%" if self.percent else f"{self.size} bytes"


def parse_budget(text: str, *, where: str = "--read-data-subset") -> Budget:
    """``N%`` (0 < N <= 100) or a size (``500M``, ``2GiB``, bytes); a bad value is a ConfigError."""
    match = _BUDGET.match(text or "")
    if match is not None:
        number, unit = float(match.group(1)), (match.group(2) or "").lower()
        if unit == "%" and 0 < number <= 100:
            return Budget(percent=number)
        if unit != "%" and number >= 1:
            return Budget(size=int(number * _UNITS[unit]))
    raise ConfigError(
        f"{where}: expected a share like 5% (more than 0, at most 100) or a size like 2G "
        f"(got {text!r})"
    )


@dataclass(frozen=True)
class Slice:
    """Today's objects, and where they sit in the rotation."""

    objects: list[ObjectEntry]
    total_objects: int
    total_bytes: int
    day: int
    period_days: int  # runs on consecutive days read every object within this many

    @property
    def bytes(self) -> int:
        """Stored bytes of today's objects."""
        return sum(o.size for o in self.objects)


def ring_position(key: str) -> bytes:
    """The stable order of objects on the ring."""
    return hashlib.sha256(key.encode()).digest()


def todays_slice(objects: list[ObjectEntry], budget: Budget, day: int) -> Slice:
    """The objects day ``day`` (days since 1970-01-01, UTC) reads, each key once."""
    unique = sorted({o.key: o for o in objects}.values(), key=lambda o: ring_position(o.key))
    total_bytes = sum(o.size for o in unique)
    if budget.percent:
        widths = [1] * len(unique)
        width = math.ceil(len(unique) * budget.percent / 100)
    else:
        widths = [max(1, o.size) for o in unique]
        width = budget.size
    ring = sum(widths)
    if ring == 0:
        return Slice([], 0, 0, day, 1)
    if width >= ring:
        return Slice(unique, len(unique), total_bytes, day, 1)
    start = (day * width) % ring
    chosen = []
    position = 0
    for obj, w in zip(unique, widths, strict=True):
        if (position - start) % ring < width:
            chosen.append(obj)
        position += w
    return Slice(chosen, len(unique), total_bytes, day, math.ceil(ring / width))
