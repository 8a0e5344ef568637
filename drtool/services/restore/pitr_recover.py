"""Turning a staged base tar and staged WAL into a running, promoted cluster in a new directory.

Stock PostgreSQL recovery, as docs/FORMAT.md describes for a drtool-less restore: the tar is
extracted (GNU ``tar``, as the ``postgres`` user when drtool runs as root) into a new data
directory (0700); ``postgresql.auto.conf`` gets a marked block with ``restore_command = 'cp
<staged WAL>/%f %p'``, the target (``recovery_target_time`` inclusive, or
``recovery_target_lsn`` exclusive: the state the WAL had reached at that position),
``recovery_target_action = 'promote'`` and what keeps the copy away from production (no
archiving, loopback only, a free port, logs to our file); ``recovery.signal`` is created; the
same-major ``pg_ctl`` starts it. drtool waits for promotion (``recovery.signal`` gone and
the postmaster ``ready``), then removes the recovery part of the block (the staged WAL is
deleted after), keeping only the port and loopback settings so a later ``pg_ctl start`` works
as it did.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from drtool.errors import SourceError

BEGIN = "# --- drtool restore to a moment (temporary: removed after promotion) ---"
END = "# --- end of drtool restore to a moment ---"
KEPT = "# --- drtool restore to a moment: the restored copy's own settings ---"
NOT_REACHED = "recovery ended before configured recovery target was reached"
SYSTEM_USER = "postgres"
#: what a promoted copy is asked (a directory's over TCP, a volume's inside its container)
REACHED_SQL = "SELECT pg_last_xact_replay_timestamp(), pg_last_wal_replay_lsn()::text"


def run_as_kwargs() -> dict[str, object]:
    """As root, children run as ``postgres`` (initdb, postgres and pg_ctl refuse root)."""
    if os.geteuid() != 0:
        return {}
    return {"user": SYSTEM_USER, "group": SYSTEM_USER, "extra_groups": []}


def chown_tree(path: Path) -> None:
    """Hand ``path`` (and everything in it) to ``postgres`` when running as root."""
    if os.geteuid() != 0:
        return
    shutil.chown(path, SYSTEM_USER, SYSTEM_USER)
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            shutil.chown(os.path.join(root, name), SYSTEM_USER, SYSTEM_USER)


def _run(argv: list[str], *, what: str, timeout: float, cwd: Path) -> str:
    done = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=cwd,
        **run_as_kwargs(),  # type: ignore[call-overload]
    )
    if done.returncode != 0:
        tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
        raise SourceError(f"{what} exited {done.returncode}: {tail}")
    return str(done.stdout)


def extract(tar_path: Path, data_dir: Path, *, timeout: float) -> None:
    """Create ``data_dir`` (0700, owned by postgres) and extract the base tar into it."""
    data_dir.mkdir(mode=0o700)
    chown_tree(data_dir)
    _run(
        ["tar", "-x", "-f", str(tar_path), "-C", str(data_dir), "--no-same-owner"],
        what=f"tar (extracting the base backup into {data_dir})",
        timeout=timeout,
        cwd=data_dir.parent,
    )
    data_dir.chmod(0o700)


def _quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


@dataclass(frozen=True)
class RecoverySettings:
    """What goes into the temporary block."""

    wal_dir: Path
    port: int
    target_time: str | None = None
    target_lsn: str | None = None
    restore_command: str | None = None  # default: cp from ``wal_dir``

    def pairs(self) -> list[tuple[str, str]]:
        """The settings, unquoted (``None`` target: recover to the end of the staged WAL)."""
        cp = self.restore_command or f"cp {shlex.quote(str(self.wal_dir))}/%f %p"  # a shell runs it
        out = [
            ("restore_command", cp),
            ("recovery_target_action", "promote"),
            ("recovery_target_timeline", "latest"),
            ("logging_collector", "off"),
            ("log_destination", "stderr"),
            ("log_timezone", "UTC"),
        ]
        if self.target_time is not None:
            out += [("recovery_target_time", self.target_time)]
            out += [("recovery_target_inclusive", "on")]
        elif self.target_lsn is not None:
            out += [("recovery_target_lsn", self.target_lsn)]
            out += [("recovery_target_inclusive", "off")]
        return out

    def lines(self) -> list[str]:
        """The block's settings, as ``postgresql.auto.conf`` lines."""
        return [f"{key} = {_quote(value)}" for key, value in self.pairs()]


def kept_lines(port: int) -> list[str]:
    """Settings the restored copy keeps: its own port, loopback, no archiving into production."""
    return [
        f"port = {port}",
        "listen_addresses = '127.0.0.1'",
        "unix_socket_directories = ''",
        "archive_mode = off",
        "primary_conninfo = ''",
    ]


# a base taken on a standby carries the standby's connection to its primary (with its
# password, when one was given): blanking it later in the file would leave the secret in the
# copy, so the lines go
_REPLICATION_LINE = re.compile(r"^\s*(primary_conninfo|primary_slot_name)\s*=", re.IGNORECASE)


def _without_replication(text: str) -> str:
    kept = [line for line in text.splitlines() if not _REPLICATION_LINE.match(line)]
    return "\n".join(kept) + "\n"


def _auto_conf(data_dir: Path) -> Path:
    return data_dir / "postgresql.auto.conf"


def _without_block(text: str) -> str:
    out, skipping = [], False
    for line in text.splitlines():
        if line == BEGIN:
            skipping = True
        elif line == END:
            skipping = False
        elif not skipping:
            out.append(line)
    return "\n".join(out) + "\n"


def write_settings(data_dir: Path, settings: RecoverySettings) -> None:
    """(Re)write the temporary block, add the kept settings once, create ``recovery.signal``.

    A base of a cluster whose configuration lives outside its data directory (Debian's
    /etc/postgresql) has no postgresql.conf or pg_hba.conf: minimal ones are written.
    """
    conf = data_dir / "postgresql.conf"
    if not conf.exists():
        conf.write_text("# written by drtool: the base backup held no postgresql.conf\n")
    hba = data_dir / "pg_hba.conf"
    if not hba.exists():
        hba.write_text(
            "# written by drtool: the base backup held no pg_hba.conf\n"
            "local all all peer\nhost all all 127.0.0.1/32 scram-sha-256\n"
        )
    conf_text = conf.read_text()
    if _without_replication(conf_text) != conf_text.rstrip("\n") + "\n":
        conf.write_text(_without_replication(conf_text))
    auto = _auto_conf(data_dir)
    text = _without_replication(_without_block(auto.read_text() if auto.exists() else ""))
    if KEPT not in text:
        text += "\n".join([KEPT, *kept_lines(settings.port)]) + "\n"
    text += "\n".join([BEGIN, *settings.lines(), END]) + "\n"
    auto.write_text(text)
    # a base taken on a streaming standby carries its standby.signal: with it the copy would
    # stay a standby waiting for WAL for ever instead of promoting at the target
    (data_dir / "standby.signal").unlink(missing_ok=True)
    (data_dir / "recovery.signal").touch()
    chown_tree(data_dir)  # only the files written here are not yet postgres's: cheap enough


def remove_recovery_block(data_dir: Path) -> None:
    """After promotion: the staged WAL goes away, so must the settings naming it."""
    auto = _auto_conf(data_dir)
    auto.write_text(_without_block(auto.read_text()))


@dataclass
class Outcome:
    """How one start of the recovering server ended."""

    promoted: bool
    not_reached: bool = False  # the staged WAL ended before the target
    log_tail: str = ""


def promoted_by(signal_present: bool, pid_file: str | None) -> bool:
    """Recovery ended and the server accepts connections as a primary.

    Not ``pg_controldata``: the base backup's pg_control says "in production" before replay
    starts. PostgreSQL removes ``recovery.signal`` when it leaves archive recovery, and the
    postmaster writes ``ready`` (not ``standby``) into line 8 of postmaster.pid once it
    accepts connections after that. One rule for a directory and a volume (pitr_volume reads
    the same two files inside its container).
    """
    if signal_present or pid_file is None:
        return False
    lines = pid_file.split("\n")
    return len(lines) > 7 and lines[7].strip() == "ready"


def _promoted(data_dir: Path) -> bool:
    try:
        pid_file: str | None = (data_dir / "postmaster.pid").read_text()
    except OSError:
        pid_file = None
    return promoted_by((data_dir / "recovery.signal").exists(), pid_file)


def _postmaster_alive(data_dir: Path) -> bool:
    try:
        pid = int((data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _tail(log: Path, lines: int = 5) -> str:
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return ""
    return " | ".join(text.strip().splitlines()[-lines:])


def start_and_wait(bin_dir: Path, data_dir: Path, log: Path, *, timeout: float) -> Outcome:
    """Start with ``pg_ctl`` and wait until promoted or stopped (bounded by ``timeout``)."""
    offset = log.stat().st_size if log.exists() else 0
    subprocess.run(
        [str(bin_dir / "pg_ctl"), "-D", str(data_dir), "-l", str(log), "-W", "start"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=data_dir.parent,
        **run_as_kwargs(),  # type: ignore[call-overload]
    )
    deadline = time.monotonic() + timeout
    seen_alive = False
    while time.monotonic() < deadline:
        alive = _postmaster_alive(data_dir)
        seen_alive = seen_alive or alive
        if alive and _promoted(data_dir):
            return Outcome(True)
        if not alive and (seen_alive or time.monotonic() > deadline - timeout + 10):
            with log.open("rb") as f:
                f.seek(offset)
                fresh = f.read().decode("utf-8", "replace")
            return Outcome(False, NOT_REACHED in fresh, _tail(log))
        time.sleep(0.3)
    stop(bin_dir, data_dir)
    raise SourceError(
        f"restore to a moment: recovery did not finish within {timeout:.0f} s; stopped "
        f"({data_dir} kept; its log: {log}): {_tail(log)}"
    )


def stop(bin_dir: Path, data_dir: Path) -> None:
    """``pg_ctl stop -m fast`` (quietly: used on the way out of a failure too)."""
    subprocess.run(
        [str(bin_dir / "pg_ctl"), "-D", str(data_dir), "-m", "fast", "-w", "stop"],
        capture_output=True,
        timeout=120,
        check=False,
        cwd=data_dir.parent,
        **run_as_kwargs(),  # type: ignore[call-overload]
    )


_LAST_TX = re.compile(r"last completed transaction was at log time (\S+ \S+)")


def last_transaction_from_log(log: Path) -> str | None:
    """PostgreSQL's own end-of-recovery line (log_timezone is UTC during recovery)."""
    try:
        return last_transaction_in(log.read_text(errors="replace"))
    except OSError:
        return None


def last_transaction_in(text: str) -> str | None:
    """The moment of PostgreSQL's last "last completed transaction was at log time" line."""
    found = _LAST_TX.findall(text)
    return found[-1] if found else None
