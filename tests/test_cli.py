"""The command-line shell: help, exit codes, one-line errors, and `drtool keys`."""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from support.cli import DRTOOL, run_drtool

from drtool.cli.context import COMMANDS as REGISTERED
from drtool.errors import EXIT_CODES

# the commands of issues 1-3; later issues add more, and `--help` must list them all
KNOWN = ["backup", "demo", "init", "keys", "list", "prune", "show", "stack", "unlock", "verify"]
COMMANDS = list(REGISTERED)  # loaded lazily: the registry, in --help order
SUBCOMMANDS = [
    ["stack", "up"],
    ["stack", "seed"],
    ["stack", "status"],
    ["stack", "down"],
    ["keys", "generate"],
    ["keys", "signing-key"],
]


def test_help_lists_the_commands_and_the_exit_codes() -> None:
    result = run_drtool("--help")
    assert result.returncode == 0
    listed = re.findall(r"^  (\w[\w-]*)  ", result.stdout.split("Commands:")[1], re.MULTILINE)
    assert listed == COMMANDS
    assert set(KNOWN) <= set(listed)
    table = result.stdout.split("Exit codes:")[1]
    for code, meaning in EXIT_CODES.items():
        assert re.search(rf"^\s+{code}\s+{re.escape(meaning[:30])}", table, re.MULTILINE), code


def test_each_registered_help_line_is_the_commands_own() -> None:
    """``--help`` lists commands from the registry without importing them: keep the lines true."""
    import click

    from drtool.cli.context import root

    ctx = click.Context(root)
    for name, (_, short) in REGISTERED.items():
        command = root.get_command(ctx, name)
        assert command is not None, name
        assert command.get_short_help_str(limit=200) == short, name


#: what ``drtool --help`` does not need: the stores' clients, the services, the configuration
#: loader (a dozen dataclasses), the crypto, the compressor and the progress bars
NOT_FOR_HELP = (
    "boto3",
    "botocore",
    "psycopg",
    "redis",
    "drtool.services",
    "drtool.config",
    "cryptography",
    "zstandard",
    "rich",
)


def test_root_help_imports_no_command_module() -> None:
    """Start-up counts in every scheduled job: ``--help`` imports no command and no config."""
    probe = (
        "import sys\n"
        "from drtool.cli import main\n"
        "try:\n"
        "    main(['--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        f"heavy = [m for m in {NOT_FOR_HELP!r} if m in sys.modules]\n"
        "print('HEAVY', heavy, file=sys.stderr)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        check=False,
    )
    assert "HEAVY []" in result.stderr, result.stderr


def test_the_readme_exit_code_table_is_the_classes_table() -> None:
    """README, ``--help`` and the exception classes say the same (the classes are the source)."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("### Exit codes", 1)[1].split("\n\n", 2)[1]
    rows = re.findall(r"^\| (\d+) \| (.+) \|$", section, re.MULTILINE)
    assert {int(code): meaning for code, meaning in rows} == EXIT_CODES


def test_every_error_class_anywhere_has_a_code_in_the_table() -> None:
    import importlib
    import pkgutil

    import drtool
    from drtool.errors import DrtoolError

    for module in pkgutil.walk_packages(drtool.__path__, "drtool."):
        importlib.import_module(module.name)
    pending: list[type[DrtoolError]] = [DrtoolError]
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        assert EXIT_CODES.get(cls.exit_code) == cls.meaning, cls


@pytest.mark.parametrize(
    ("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"]
)
def test_an_interruption_exits_128_plus_the_signal(
    tmp_path: Path, signum: signal.Signals, code: int
) -> None:
    """ADR 0008: SIGTERM (docker stop) exits 143, Ctrl-C 130; both one line, no traceback."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DRTOOL_")}
    proc = subprocess.Popen(  # waits at the passphrase prompt (no terminal: it reads stdin)
        [str(DRTOOL), "keys", "generate", "--passphrase", str(tmp_path / "id")],
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        assert proc.stderr is not None
        prompt = ""
        while not prompt.endswith("passphrase: "):
            char = proc.stderr.read(1)
            assert char, prompt
            prompt += char
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == code, err
    assert err.strip().splitlines()[-1].startswith("error: ")
    assert "Traceback" not in err
    assert not (tmp_path / "id").exists()


@pytest.mark.slow
@pytest.mark.parametrize("command", [[c] for c in COMMANDS] + SUBCOMMANDS, ids=" ".join)
def test_every_command_has_help(command: list[str]) -> None:
    result = run_drtool(*command, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"Usage: drtool {' '.join(command)} ")
    assert result.stderr == ""


def test_unknown_command_is_a_usage_error() -> None:
    result = run_drtool("bakcup")
    assert result.returncode == 2
    assert "No such command 'bakcup'" in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_option_is_a_usage_error() -> None:
    result = run_drtool("stack", "status", "--nmae", "x")
    assert result.returncode == 2
    assert "No such option '--nmae'. Did you mean '--name'?" in result.stderr


def test_an_error_is_one_line_without_traceback(tmp_path: Path) -> None:
    result = run_drtool("--config", str(tmp_path / "missing.toml"), "list")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: config: file not found (got {tmp_path / 'missing.toml'})"
    ]
    assert result.stdout == ""


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    result = run_drtool("--debug", "--config", str(tmp_path / "missing.toml"), "list")
    assert result.returncode == 2
    assert "Traceback (most recent call last)" in result.stderr
    assert "drtool.errors.ConfigError" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: config: file not found")


def test_a_command_without_a_repository_says_what_is_missing(tmp_path: Path) -> None:
    config = tmp_path / "drtool.toml"
    config.write_text("[postgres]\nport = 5433\n")
    result = run_drtool("--config", str(config), "list")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: repository.url: not set")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_keys_generate_works_with_the_stock_age_tool(tmp_path: Path) -> None:
    key = tmp_path / "ops.key"
    result = run_drtool("keys", "generate", str(key))
    assert result.returncode == 0, result.stderr
    recipient = result.stdout.strip()
    assert re.fullmatch(r"age1[02-9ac-hj-np-z]{58}", recipient)
    assert mode(key) == 0o600
    # the stock age CLI encrypts to the printed recipient and decrypts with the file
    secret = b"the chat history\n"
    encrypted = subprocess.run(
        ["age", "-r", recipient], input=secret, capture_output=True, check=True
    ).stdout
    decrypted = subprocess.run(
        ["age", "-d", "-i", str(key)], input=encrypted, capture_output=True, check=True
    ).stdout
    assert decrypted == secret
    # and age-keygen agrees on the public key
    public = subprocess.run(
        ["age-keygen", "-y", str(key)], capture_output=True, text=True, check=True
    ).stdout
    assert public.strip() == recipient


def test_keys_are_never_overwritten(tmp_path: Path) -> None:
    for command in ("generate", "signing-key"):
        key = tmp_path / f"{command}.key"
        assert run_drtool("keys", command, str(key)).returncode == 0
        before = key.read_bytes()
        again = run_drtool("keys", command, str(key))
        assert again.returncode == 2
        assert again.stderr.strip().splitlines() == [
            f"error: {key}: already exists; refusing to overwrite a key file"
        ]
        assert again.stdout == ""
        assert key.read_bytes() == before


def test_keys_signing_key_prints_the_verify_key(tmp_path: Path) -> None:
    key = tmp_path / "signing.key"
    result = run_drtool("keys", "signing-key", str(key))
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(r"drtool-verify-1:[A-Za-z0-9+/]{43}\n", result.stdout)
    assert mode(key) == 0o600
    assert key.read_text().startswith("drtool-sign-1:")
    # a second key is a different key
    other = run_drtool("keys", "signing-key", str(tmp_path / "other.key"))
    assert other.stdout != result.stdout


def test_keys_generate_into_a_missing_directory_is_a_usage_error(tmp_path: Path) -> None:
    path = tmp_path / "no" / "such" / "dir" / "ops.key"
    result = run_drtool("keys", "generate", str(path))
    assert "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"error: {path}: ")
    assert "internal error" not in line
    assert result.returncode == 2
