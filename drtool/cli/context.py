"""The root command group and what every command shares: config, logging, output mode."""

from __future__ import annotations

import importlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from drtool.errors import EXIT_CODES
from drtool.logs import setup_logging

if TYPE_CHECKING:
    # loaded by the command that reads the configuration: `drtool --help` does not
    from drtool.config import Config

EXIT_TABLE = "\n".join(f"{code:>5}  {text}" for code, text in EXIT_CODES.items())


@dataclass
class CliState:
    """What the root group parsed, handed to every command through click's context."""

    config_path: str | None
    debug: bool
    home: Path

    def config(
        self, flags: dict[str, dict[str, Any]] | None = None, *, repository: str | None = None
    ) -> Config:
        """Load the configuration once for this command and set up logging with its secrets.

        ``repository`` (``--repository NAME``) makes the command work on that repository.
        """
        from drtool.config import load_config

        cfg = load_config(self.config_path, os.environ, flags)
        setup_logging(debug=self.debug, secrets=secrets_of(cfg))
        return cfg.with_repository(repository)


#: ``--repository NAME``: the commands that read snapshots can read any configured repository.
repository_option = click.option(
    "--repository",
    "repository",
    metavar="NAME",
    default=None,
    help="Work on [repositories.NAME] (a copy, `drtool copy`) instead of [repository].",
)


def secrets_of(cfg: Config) -> list[str]:
    """Every secret value in ``cfg`` (for log redaction)."""
    values = [
        *(r.access_key for r in (cfg.repository, *cfg.repositories.values())),
        *(r.secret_key for r in (cfg.repository, *cfg.repositories.values())),
        cfg.keys.identity_passphrase,
        cfg.postgres.password,
        cfg.redis.password,
        cfg.minio.access_key,
        cfg.minio.secret_key,
    ]
    return [v for v in values if v]


class LazyGroup(click.Group):
    """A group whose commands are imported only when used (click's documented pattern).

    ``drtool list`` then loads the repository code, not boto3, psycopg and every service:
    start-up time counts in every scheduled job and every scripted call. ``drtool --help``
    lists the commands from their registered one-line help, so it imports none of them
    (tests/test_cli.py keeps each line equal to the command's own).
    """

    def __init__(self, *args: Any, lazy: dict[str, tuple[str, str]], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = lazy

    def list_commands(self, ctx: click.Context) -> list[str]:
        """Every command name, in the order of ``lazy``."""
        return list(self.lazy)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        """Import the command's module on first use."""
        if cmd_name not in self.lazy:
            return None
        module, _, attr = self.lazy[cmd_name][0].partition(":")
        command = getattr(importlib.import_module(module), attr)
        assert isinstance(command, click.Command)
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The command list from the registry's help lines, without importing a command."""
        with formatter.section("Commands"):
            formatter.write_dl([(name, short) for name, (_, short) in self.lazy.items()])


# name -> ("module:attribute", the one-line help `drtool --help` shows)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": (
        "drtool.cli.demo:demo",
        "Run the main job end to end on embedded defaults, no configuration needed.",
    ),
    "stack": (
        "drtool.cli.stack:stack",
        "Run the included co-talk data stack (PostgreSQL, Redis, S3) as local processes.",
    ),
    "keys": (
        "drtool.cli.keys:keys",
        "Create key files (mode 0600; never overwritten).",
    ),
    "init": (
        "drtool.cli.repo:init",
        "Create a repository at repository.url for the configured recipients and signing key.",
    ),
    "backup": (
        "drtool.cli.backup:backup",
        "Take one snapshot of the stack: PostgreSQL, then Redis, then MinIO.",
    ),
    "list": (
        "drtool.cli.repo:list_",
        "List snapshots, oldest first, with their status and their last verification.",
    ),
    "show": (
        "drtool.cli.repo:show",
        "Show one snapshot (an id or `latest`): objects, sizes and, with an identity, "
        "fingerprints.",
    ),
    "verify": (
        "drtool.cli.repo:verify",
        "Verify a snapshot (default: latest) or --all.",
    ),
    "restore": (
        "drtool.cli.restore:restore",
        "Restore a snapshot (an id or `latest`) into the stack or a named target.",
    ),
    "restore-entity": (
        "drtool.cli.entity:restore_entity",
        "Restore one room or one user from a snapshot into production, merged.",
    ),
    "drill": (
        "drtool.cli.drill:drill",
        "Restore a snapshot into a throw-away stack and prove the messages are intact.",
    ),
    "prune": (
        "drtool.cli.repo:prune",
        "Forget snapshots outside a GFS policy, then delete data nothing references.",
    ),
    "copy": (
        "drtool.cli.copy:copy",
        "Copy snapshots (default: every valid one the destination lacks) to another repository.",
    ),
    "wal": (
        "drtool.cli.wal:wal",
        "Continuous PostgreSQL protection: WAL streamed into the repository.",
    ),
    "canary": (
        "drtool.cli.canary:canary",
        "Canaries: a timed write to each store, so a restore measures what it lost.",
    ),
    "capture": (
        "drtool.cli.capture:capture",
        "Continuous attachment capture: new attachment objects sealed into the repository.",
    ),
    "unlock": (
        "drtool.cli.repo:unlock",
        "Remove the locks of dead holders, from any host.",
    ),
    "schedule": (
        "drtool.cli.schedule:schedule",
        "Run backups, prune, verify and drills on their schedules (the backup-cron container).",
    ),
    "doctor": (
        "drtool.cli.doctor:doctor",
        "Check the deployment: sources, tools, repository, Object Lock, clock, keys.",
    ),
}


@click.group(
    cls=LazyGroup,
    lazy=COMMANDS,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog=f"\b\nExit codes:\n{EXIT_TABLE}",
)
@click.option(
    "--config",
    "config_path",
    envvar="DRTOOL_CONFIG",
    metavar="PATH",
    help="TOML config file (env DRTOOL_CONFIG). Settings: flag > DRTOOL_* env > file > default.",
)
@click.option(
    "--home",
    envvar="DRTOOL_HOME",
    type=click.Path(path_type=Path),
    default=None,
    help="Local state dir for stacks, the demo repository and keys (env DRTOOL_HOME; "
    "default /var/lib/drtool as root, else ~/.local/share/drtool).",
)
@click.option("--debug", is_flag=True, help="Verbose logs and a traceback on errors.")
@click.version_option(package_name="drtool")
@click.pass_context
def root(ctx: click.Context, config_path: str | None, home: Path | None, debug: bool) -> None:
    """drtool: backup, restore and disaster-recovery drills for the co-talk chat stack.

    \b
    Backups of PostgreSQL, Redis and MinIO, encrypted (age) and signed,
    stored off the NAS on S3-compatible storage or a local directory;
    restores that verify before they touch anything; weekly drills that
    prove the messages are intact.

    \b
    Start here:
      drtool demo                 the whole loop on a local throw-away stack
      drtool stack up             run the included co-talk stack as local processes
    """
    from drtool.config import default_home

    setup_logging(debug=debug)
    ctx.obj = CliState(config_path=config_path, debug=debug, home=home or default_home())


def emit_json(data: Any) -> None:
    """Print ``data`` as JSON on stdout (for ``--json``)."""
    json.dump(data, sys.stdout, indent=2, default=str, ensure_ascii=False)
    sys.stdout.write("\n")
