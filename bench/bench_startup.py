"""Start-up cost: ``drtool --help`` and a backup's time to its first byte.

Usage: python bench/bench_startup.py [--rounds 5] [--baseline OTHER_DRTOOL]

Every scheduled job and every scripted call pays Python's start and drtool's imports before
it does any work. Measured here, each as the median and min of ``--rounds`` runs:

- ``python -c pass``: the interpreter alone (the floor);
- ``drtool --help`` and ``drtool list --help``: the command line without work;
- ``backup: first byte``: from the process start of ``drtool backup --component postgres``
  until ``pg_dump`` is running (its first byte follows within milliseconds), polled every
  2 ms in /proc, for a ``file://`` and an ``s3://`` repository (SeaweedFS on loopback);
- ``CPU s until then``: the CPU the drtool process had used at that moment (/proc, 10 ms
  ticks): on a shared machine the wall time waits for a core, the CPU time does not;
- ``backup: whole``: the same backup's wall time, for scale.

The imports the backup command pulls are listed with their cumulative ``-X importtime``, and
the CPU until ``pg_dump`` runs is split into the backup's steps (this checkout's drtool, run
in this interpreter with hooks that read the process's CPU time at each step; ADR 0032).
The machine may be shared: the load average is printed with the table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from repo_setup import DRTOOL  # noqa: E402

from chat_stack.seed import SeedSizes, seed  # noqa: E402
from drtool.runtime.local import LocalStack  # noqa: E402
from drtool.runtime.s3server import SeaweedServer  # noqa: E402
from drtool.s3session import s3_client  # noqa: E402
from drtool.services.repo_setup import set_up_repository  # noqa: E402
from drtool.services.stack import stack_config  # noqa: E402


def _children_named(pid: int, name: str) -> bool:
    """Whether a descendant of ``pid`` runs ``name`` (walks /proc once)."""
    parents: dict[int, int] = {}
    names: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)
                comm = fields[0].split("(", 1)[1]
                ppid = int(fields[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        parents[int(entry)], names[int(entry)] = ppid, comm
    for child, comm in names.items():
        if comm != name:
            continue
        up = parents.get(child, 0)
        while up > 1:
            if up == pid:
                return True
            up = parents.get(up, 0)
    return False


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds ``pid`` has used so far (its own, not its children's)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def time_to_first_byte(argv: list[str], env: dict[str, str]) -> tuple[float, float, float]:
    """Seconds until ``pg_dump`` runs under the process, the CPU seconds the process had used
    by then (what the wall time is on an idle machine, within the 10 ms tick), and the seconds
    until the process ends."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = cpu = float("nan")
    while proc.poll() is None:
        if _children_named(proc.pid, "pg_dump"):
            first = time.perf_counter() - start
            cpu = _cpu_seconds(proc.pid)
            break
        time.sleep(0.002)
    _, err = proc.communicate()
    whole = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed: {err.decode()[-500:]}")
    return first, cpu, whole


def wall(argv: list[str], env: dict[str, str]) -> float:
    """Wall seconds of one run (output discarded)."""
    start = time.perf_counter()
    subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def imports(module: str) -> list[tuple[str, float]]:
    """The heaviest top-level packages ``module`` imports (cumulative ms, ``-X importtime``)."""
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", f"import {module}"],
        capture_output=True,
        text=True,
        check=True,
    ).stderr
    best: dict[str, float] = {}
    for line in out.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        _, cumulative, name = (part.strip() for part in line.split(":", 1)[1].split("|"))
        if cumulative.isdigit():
            top = name.split(".")[0]
            best[top] = max(best.get(top, 0.0), int(cumulative) / 1000)
    return sorted(best.items(), key=lambda kv: -kv[1])[:8]


# Runs `drtool ARGS` in this interpreter and prints the process's CPU seconds at each step of
# a backup up to the start of pg_dump (getrusage: not the wall time a shared machine inflates).
STEPS_PROBE = """
import os, resource, subprocess, sys
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
marks = [("interpreter", cpu())]
popen = subprocess.Popen.__init__
def spawn(self, args, *a, **k):
    if os.path.basename(str(args[0])) == "pg_dump" and marks[-1][0] != "pg_dump":
        marks.append(("pg_dump", cpu()))
        print("STEPS " + " ".join(f"{n}={c:.4f}" for n, c in marks), file=sys.stderr)
    popen(self, args, *a, **k)
subprocess.Popen.__init__ = spawn
import drtool.cli
marks.append(("cli", cpu()))
import drtool.cli.backup as command
marks.append(("cli.backup", cpu()))
from drtool.stores import registry
run_backup, named = command.run_backup, registry.Stores.named
def run(*a, **k):
    marks.append(("run_backup", cpu()))
    return run_backup(*a, **k)
def store(self, *a, **k):
    marks.append(("repository", cpu()))
    found = named(self, *a, **k)
    marks.append(("store", cpu()))
    return found
command.run_backup, registry.Stores.named = run, store
drtool.cli.main(sys.argv[1:])
"""

#: what each step of STEPS_PROBE covers
STEPS = {
    "interpreter": "interpreter start",
    "cli": "import drtool.cli (click, the root group)",
    "cli.backup": "import drtool.cli.backup (the backup service, repository, crypto)",
    "run_backup": "the command's options and config",
    "repository": "open the repository, lock, chain link, rollback check",
    "store": "import the first store (PostgreSQL: psycopg)",
    "pg_dump": "connect, export the snapshot, start pg_dump",
}


def cpu_steps(config: Path, env: dict[str, str], rounds: int) -> dict[str, float]:
    """Median CPU seconds of each step of a PostgreSQL backup until ``pg_dump`` starts."""
    argv = [sys.executable, "-c", STEPS_PROBE, "--config", str(config)]
    runs: list[dict[str, float]] = []
    for _ in range(rounds):
        err = subprocess.run(
            [*argv, "backup", "--component", "postgres"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            check=True,
        ).stderr
        line = next(x for x in err.splitlines() if x.startswith("STEPS "))
        marks = dict(kv.split("=") for kv in line.split()[1:])
        runs.append({name: float(value) for name, value in marks.items()})
    steps, before = {}, 0.0
    for name in STEPS:
        steps[name] = statistics.median(r[name] for r in runs) - before
        before = statistics.median(r[name] for r in runs)
    return steps


def print_steps(configs: dict[str, Path], env: dict[str, str], rounds: int) -> None:
    """The table of :func:`cpu_steps` for each repository kind."""
    print("\nCPU ms of each step until pg_dump runs (this drtool; median of the rounds):")
    split = {scheme: cpu_steps(config, env, rounds) for scheme, config in configs.items()}
    print(f"{'step':66} " + " ".join(f"{scheme:>8}" for scheme in split))
    for name, what in STEPS.items():
        cells = " ".join(f"{steps[name] * 1000:8.0f}" for steps in split.values())
        print(f"{what:66} {cells}")
    total = " ".join(f"{sum(steps.values()) * 1000:8.0f}" for steps in split.values())
    print(f"{'CPU ms when pg_dump starts':66} {total}")


def _configs(work: Path, stack: LocalStack, repo_server: SeaweedServer) -> dict[str, Path]:
    """A backup config per repository kind: ``file://`` and ``s3://`` (SeaweedFS)."""
    configs: dict[str, Path] = {}
    setup = set_up_repository(
        work / "file",
        {"url": f"file://{work / 'file-repo'}"},
        stores=stack_config(stack),
        state_dir=work / "file-state",
        label="bench",
    )
    configs["file://"] = setup.backup_config
    keys = work / "s3-keys"
    keys.mkdir(mode=0o700)
    (keys / "ak").write_text(repo_server.endpoint.access_key)
    (keys / "sk").write_text(repo_server.endpoint.secret_key)
    s3_client(repo_server.endpoint).create_bucket(Bucket="offsite")
    setup = set_up_repository(
        work / "s3",
        {
            "url": "s3://offsite/drtool",
            "endpoint_url": repo_server.endpoint.endpoint_url,
            "access_key_file": str(keys / "ak"),
            "secret_key_file": str(keys / "sk"),
        },
        stores=stack_config(stack),
        state_dir=work / "s3-state",
        label="bench",
    )
    configs["s3://"] = setup.backup_config
    return configs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--profile", metavar="FILE", help="also write cProfile stats of one file:// backup"
    )
    parser.add_argument(
        "--baseline",
        metavar="DRTOOL",
        help="another drtool executable (an older checkout) measured in the same rounds",
    )
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="drtool-bench-startup-"))
    work.chmod(0o711)  # PostgreSQL runs as its own user and must enter it
    stack = LocalStack.up(work / "stack", "bench")
    repo_server = SeaweedServer(work / "repo-s3")
    try:
        repo_server.start()
        sizes = SeedSizes(users=50, rooms=10, messages=2000, attachments=5)
        seed(stack.endpoints, sizes, 1, progress=False)
        env = {k: v for k, v in os.environ.items() if not k.startswith("DRTOOL_")}
        env["DRTOOL_HOME"] = str(work / "home")
        # as installed (the image compiles at install time): bytecode cached, not recompiled
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        subprocess.run([str(DRTOOL), "--help"], env=env, stdout=subprocess.DEVNULL, check=True)
        configs = _configs(work, stack, repo_server)

        rows: dict[str, list[float]] = {}

        def add(name: str, measure: Callable[[], float]) -> None:
            rows.setdefault(name, []).append(measure())

        drtools = [("", str(DRTOOL))]
        if args.baseline:
            drtools.append(("baseline ", args.baseline))
        for _ in range(args.rounds):  # interleaved, so a burst of load hits every variant
            add("python -c pass (floor)", lambda: wall([sys.executable, "-c", "pass"], env))
            for tag, drtool in drtools:
                rows.setdefault(f"{tag}drtool --help", []).append(wall([drtool, "--help"], env))
                rows.setdefault(f"{tag}drtool list --help", []).append(
                    wall([drtool, "list", "--help"], env)
                )
                for scheme, config in configs.items():
                    argv = [drtool, "--config", str(config), "backup", "--component", "postgres"]
                    first, cpu, whole = time_to_first_byte(argv, env)
                    name = f"{tag}backup {scheme}"
                    rows.setdefault(f"{name}: first byte (pg_dump runs)", []).append(first)
                    rows.setdefault(f"{name}: CPU s until then", []).append(cpu)
                    rows.setdefault(f"{name}: whole", []).append(whole)

        if args.profile:
            argv = [sys.executable, "-m", "cProfile", "-o", args.profile, str(DRTOOL)]
            argv += ["--config", str(configs["file://"]), "backup", "--component", "postgres"]
            subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, check=True)

        load = os.getloadavg()
        print(f"\nload average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; {os.cpu_count()} CPUs")
        print(f"{'variant':54} {'median s':>9} {'min s':>7}")
        print("-" * 72)
        for name, values in rows.items():
            print(f"{name:54} {statistics.median(values):9.3f} {min(values):7.3f}")
        print_steps(configs, env, args.rounds)
        print("\nimports of `drtool backup` (cumulative ms, top-level packages):")
        for name, ms in imports("drtool.cli.backup"):
            print(f"  {name:20} {ms:7.1f}")
    finally:
        repo_server.stop()
        stack.down()
        subprocess.run(["rm", "-rf", str(work)], check=False)


if __name__ == "__main__":
    main()
