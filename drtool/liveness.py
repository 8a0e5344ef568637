"""Is the process that left this record still running?

Repository locks, the scheduler's runner file and drills' containers all name the process that
made them, so that whoever finds them later can tell a live owner from a dead one. A host name
and a pid are not enough: drtool runs as PID 1 in the ``backup-cron`` container, which keeps its
host name across ``docker kill`` + ``docker start``, so "host backup-cron, pid 1" names the dead
run and the new one alike. An :class:`Owner` therefore also records

- the kernel's boot id (``/proc/sys/kernel/random/boot_id``): a reboot gives a new one;
- the container id (from the mount of ``/etc/hostname`` in a Docker container, else ``""``):
  two containers may share a host name and a boot id, never a pid namespace;
- the process's start time (field 22 of ``/proc/PID/stat``, clock ticks since boot): a pid
  reused by another process, PID 1 of a restarted container included, starts at another time.

Only a reader in the same pid namespace (same host, boot and container) can look at the
process; anyone else gets ``None`` (unknown) from :func:`process_verdict` and must rely on a
heartbeat the owner refreshes (the repository lock's), or keep the record.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path

_CONTAINER_ID = re.compile(r"(?:docker[-/]|containers/)([0-9a-f]{64})")


@dataclass(frozen=True)
class Owner:
    """Who made a record: enough to find the process again, or to know it is gone."""

    host: str
    boot_id: str
    container: str
    pid: int
    started: int | None  # clock ticks since boot (/proc/PID/stat field 22); None: unknown

    def describe(self) -> str:
        """``host/pid`` plus the container, for messages."""
        where = f" in container {self.container[:12]}" if self.container else ""
        return f"{self.host}/{self.pid}{where}"


def boot_id() -> str:
    """This kernel's boot id; ``""`` when it cannot be read (not Linux)."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def container_id() -> str:
    """The id of the Docker container this process runs in; ``""`` outside one (or unknown).

    Docker bind-mounts ``/var/lib/docker/containers/<id>/hostname`` on ``/etc/hostname``; the
    mount table names it. (On the host, the same table lists *other* containers' mounts, so
    only the one mounted on /etc/hostname counts; cgroup v1 paths are the fallback.)
    """
    if not Path("/.dockerenv").exists():
        return ""
    try:
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            fields = line.split()
            if len(fields) > 4 and fields[4] == "/etc/hostname":
                found = _CONTAINER_ID.search(fields[3])
                if found:
                    return found.group(1)
    except OSError:
        pass
    try:
        found = _CONTAINER_ID.search(Path("/proc/self/cgroup").read_text())
    except OSError:
        return ""
    return found.group(1) if found else ""


def _stat_fields(pid: int) -> list[str]:
    """``/proc/<pid>/stat`` from field 3 (state) on; [] when the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return []
    # the command name (field 2) is in parentheses and may contain spaces or ')'
    return stat[stat.rfind(")") + 2 :].split()


def process_start(pid: int) -> int | None:
    """Field 22 of ``/proc/<pid>/stat`` (start time, clock ticks since boot); None if gone."""
    fields = _stat_fields(pid)
    try:
        return int(fields[19])  # field 3 is fields[0]
    except (IndexError, ValueError):
        return None


def current(pid: int | None = None) -> Owner:
    """This process (or ``pid`` of this namespace) as an :class:`Owner`."""
    pid = os.getpid() if pid is None else pid
    return Owner(socket.gethostname(), boot_id(), container_id(), pid, process_start(pid))


def same_namespace(owner: Owner, here: Owner) -> bool:
    """Whether a process of ``here`` can look up ``owner``'s pid (same host, boot, container)."""
    return (
        bool(owner.boot_id)
        and owner.boot_id == here.boot_id
        and owner.host == here.host
        and owner.container == here.container
    )


def pid_exists(pid: int) -> bool:
    """Whether a process with ``pid`` exists in this pid namespace."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def process_verdict(owner: Owner, here: Owner | None = None) -> tuple[bool | None, str]:
    """(alive, why) for ``owner``'s process; alive is None when it cannot be checked from here."""
    here = here or current()
    if not same_namespace(owner, here):
        return None, f"{owner.describe()} is not on this host, boot or container"
    if not pid_exists(owner.pid):
        return False, f"process {owner.pid} is gone"
    if _stat_fields(owner.pid)[:1] == ["Z"]:
        return False, f"process {owner.pid} is gone (a zombie waiting to be reaped)"
    if owner.started is not None:
        started = process_start(owner.pid)
        if started is not None and started != owner.started:
            return False, f"pid {owner.pid} now belongs to a process started later (pid reused)"
    return True, f"process {owner.pid} runs"
