"""``drtool stack``: the included co-talk stack as local processes, no Docker needed."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from drtool.cli.context import CliState, emit_json
from drtool.cli.render import print_table
from drtool.services import stack as svc

name_option = click.option(
    "--name",
    default="main",
    show_default=True,
    help="Stack name; several named stacks can run side by side (e.g. a source and a target).",
)


@click.group()
def stack() -> None:
    """Run the included co-talk data stack (PostgreSQL, Redis, S3) as local processes.

    \b
    Servers listen on free 127.0.0.1 ports with generated credentials; state lives
    in <home>/stacks/<name>/. `up` writes a ready-to-use drtool config there:
      drtool stack up --name source
      drtool stack seed --name source --messages 20000
      drtool --config ~/.local/share/drtool/stacks/source/drtool.toml backup
      drtool stack down --name source
    """


@stack.command()
@name_option
@click.option(
    "--pg-major",
    type=click.IntRange(min=9),
    default=None,
    help="PostgreSQL major to run (e.g. 16); an error when it is not installed. "
    "Default: the newest Debian package's.",
)
@click.option(
    "--pg-bin-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="PostgreSQL bin dir (initdb, postgres, pg_dump) to run instead.",
)
@click.pass_obj
def up(state: CliState, name: str, pg_major: int | None, pg_bin_dir: Path | None) -> None:
    """Start PostgreSQL, Redis and SeaweedFS (the MinIO stand-in) and write a config."""
    started = svc.stack_up(state.home, name, pg_major=pg_major, pg_bin_dir=pg_bin_dir)
    ep = started.stack.endpoints
    print_table(
        f"stack {name!r} is up",
        ["store", "endpoint"],
        [
            [
                "postgres",
                f"{ep.postgres.host}:{ep.postgres.port}/{ep.postgres.dbname} "
                f"(PostgreSQL {started.stack.postgres.major})",
            ],
            ["redis", f"{ep.redis.host}:{ep.redis.port}"],
            ["minio (s3)", f"{ep.minio.endpoint_url} buckets: {', '.join(ep.buckets)}"],
        ],
    )
    click.echo(f"config: {started.config_path}")


@stack.command()
@name_option
@click.option("--users", default=200, show_default=True, type=int, help="Users to create.")
@click.option("--rooms", default=40, show_default=True, type=int, help="Chat rooms.")
@click.option("--messages", default=20_000, show_default=True, type=int, help="Messages.")
@click.option("--attachments", default=200, show_default=True, type=int, help="Attachment files.")
@click.option("--seed", "seed_value", default=1, show_default=True, type=int, help="Random seed.")
@click.option("--force", is_flag=True, help="Wipe existing chat data first.")
@click.pass_obj
def seed(
    state: CliState,
    name: str,
    users: int,
    rooms: int,
    messages: int,
    attachments: int,
    seed_value: int,
    force: bool,
) -> None:
    """Fill the stack with deterministic chat data (same seed, same data)."""
    result = svc.stack_seed(
        state.home,
        name,
        users=users,
        rooms=rooms,
        messages=messages,
        attachments=attachments,
        seed=seed_value,
        progress=sys.stderr.isatty(),
        force=force,
    )
    rate = result.counts.get("messages", 0) / result.seconds if result.seconds else 0
    click.echo(
        f"seeded stack {name!r} in {result.seconds:.1f} s ({rate:,.0f} messages/s): "
        + ", ".join(f"{k} {v}" for k, v in result.counts.items())
        + f"; {result.redis_keys} Redis keys; {result.objects} objects"
    )


@stack.command()
@name_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def status(state: CliState, name: str, as_json: bool) -> None:
    """Show the servers and what each store holds."""
    report = svc.stack_status(state.home, name)
    if as_json:
        emit_json(report)
        return
    print_table(
        f"stack {name!r}",
        ["server", "running", "pid", "port"],
        [
            [k, "yes" if v["running"] else "NO", v["pid"], v["port"]]
            for k, v in report["servers"].items()
        ],
    )
    print_table("contents", ["store", "what", "count"], report["counts"])


@stack.command()
@name_option
@click.pass_obj
def down(state: CliState, name: str) -> None:
    """Stop the stack's servers and delete its data."""
    svc.stack_down(state.home, name)
    click.echo(f"stack {name!r} is down")
