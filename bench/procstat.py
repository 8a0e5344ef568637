"""What a benchmarked process costs, read from /proc: CPU seconds, peak RSS, the load average.

Shared by the benchmarks that run a long-lived drtool process beside traffic (the WAL
streamer, the attachment capture), so each measures it the same way.
"""

from __future__ import annotations

import os
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """User+sys seconds of ``pid`` and its children (/proc)."""
    total = 0.0
    for p in [pid, *children(pid)]:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / TICKS
    return total


def children(pid: int) -> list[int]:
    """The direct children of ``pid``."""
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def hwm_mib(pid: int) -> float:
    """Peak resident set size (VmHWM) of ``pid`` in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def load_average() -> str:
    """The 1/5/15-minute load averages and the CPU count, as one phrase for a report."""
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f}; {os.cpu_count()} CPUs"


def cpu_tree_s(pid: int) -> float:
    """User+sys seconds of ``pid``, of its children it has reaped (cutime/cstime) and of its
    live children: a server's whole cost (a PostgreSQL postmaster's startup process, which
    replays the WAL and exits, is counted through the reaped times)."""
    total = 0.0
    for p in [pid, *children(pid)]:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(f) for f in fields[11 : 15 if p == pid else 13]) / TICKS
    return total
