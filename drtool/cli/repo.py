"""Repository commands: init, list, show, verify, prune, unlock."""

from __future__ import annotations

from dataclasses import asdict

import click

from drtool.cli.context import CliState, emit_json, repository_option
from drtool.cli.render import human_bytes, print_table
from drtool.errors import IntegrityError, UsageError
from drtool.repository import layout
from drtool.repository.retention import Policy
from drtool.repository.subset import Budget, parse_budget
from drtool.services import prune as prune_svc
from drtool.services import repo as svc

json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")


@click.command()
@click.pass_obj
def init(state: CliState) -> None:
    """Create a repository at repository.url for the configured recipients and signing key.

    Refuses a location that already holds a repository.
    """
    info = svc.init_repo(state.config())
    click.echo(f"initialised repository {info.repo_id} (format {info.format_version})")


@click.command(name="list")
@click.option(
    "--last",
    type=int,
    metavar="N",
    help="Only the newest N snapshots (read through the catalog index: fast at any history).",
)
@json_option
@repository_option
@click.pass_obj
def list_(state: CliState, last: int | None, as_json: bool, repository: str | None) -> None:
    """List snapshots, oldest first, with their status and their last verification.

    \b
    Listing reads signed manifests and verification records, not the data: it checks that
    every object exists with its recorded size. Whether the bytes are intact is known only
    from `drtool verify` (signed records): "verified <when> (read-data|hashes)",
    "never verified" or "DAMAGED: <object>". INVALID and DAMAGED snapshots are never
    restored by `latest` or counted by prune.
    """
    records = svc.list_records(state.config(repository=repository), last)
    rows = [svc.record_summary(r) for r in records]
    if as_json:
        emit_json(rows)
        return
    print_table(
        "snapshots",
        ["id", "status", "components", "plain", "stored", "verified", "problem"],
        [
            [
                r["id"],
                r["status"],
                ",".join(r["components"]),
                human_bytes(r["plain_bytes"]) if r["plain_bytes"] is not None else "",
                human_bytes(r["stored_bytes"]) if r["stored_bytes"] is not None else "",
                r["verified"] if r["status"] != "INVALID" else "",
                r["problem"] or "",
            ]
            for r in rows
        ],
    )


@click.command()
@click.argument("snapshot", default="latest")
@json_option
@repository_option
@click.pass_obj
def show(state: CliState, snapshot: str, as_json: bool, repository: str | None) -> None:
    """Show one snapshot (an id or `latest`): objects, sizes and, with an identity, fingerprints."""
    result = svc.show_snapshot(state.config(repository=repository), snapshot)
    summary = svc.record_summary(result.record)
    m = result.record.manifest
    if as_json:
        emit_json(
            {
                **summary,
                "manifest": m.to_dict() if m else None,
                "fingerprints": result.fingerprints,
            }
        )
        return
    click.echo(f"snapshot {summary['id']}: {summary['status']} {summary['problem'] or ''}")
    click.echo(f"data: {summary['verified']}")
    if m is None:
        return
    click.echo(
        f"host {m.host}, started {m.started}, finished {m.finished}, previous {m.previous_id}"
    )
    print_table(
        "components",
        ["component", "objects", "plain", "stored", "seconds", "source version"],
        [
            [
                c.name,
                len(c.objects),
                human_bytes(c.plain_bytes),
                human_bytes(sum(o.size for o in c.objects)),
                f"{c.duration_s:.1f}",
                c.source_version,
            ]
            for c in m.components
        ],
    )
    for component, prints in result.fingerprints.items():
        figures = prints.get("fingerprints", {})
        tables = figures.get("tables", {})
        if tables:
            print_table(
                f"{component} fingerprints",
                ["table", "rows", "digest"],
                [[t, v["rows"], v["digest"]] for t, v in sorted(tables.items())],
            )
        elif figures:
            click.echo(f"{component} fingerprints: {figures}")
    if not result.fingerprints:
        click.echo("(fingerprints are encrypted; configure keys.identity_file to see them)")


@click.command()
@click.argument("snapshot", required=False)
@click.option("--all", "all_", is_flag=True, help="Verify every snapshot.")
@click.option(
    "--unverified",
    is_flag=True,
    help="Verify every snapshot never verified yet (objects already found intact are skipped).",
)
@click.option(
    "--read-data",
    is_flag=True,
    help="Also decrypt every object and check inner headers (needs keys.identity_file).",
)
@click.option(
    "--read-data-subset",
    "subset_budget",
    metavar="N%|SIZE",
    help="Read only today's slice of all objects (rotating: every object within 100/N days, "
    "or total/SIZE days); decrypted with keys.identity_file, else hash-checked key-less.",
)
@json_option
@repository_option
@click.pass_obj
def verify(
    state: CliState,
    snapshot: str | None,
    repository: str | None,
    all_: bool,
    unverified: bool,
    read_data: bool,
    subset_budget: str | None,
    as_json: bool,
) -> None:
    """Verify a snapshot (default: latest) or --all.

    \b
    Without a key: signature, every object present, stored size and sha256.
    With --read-data: every object authenticated and decrypted too.
    A damaged object shared by several snapshots fails every one of them.
    With keys.signing_key_file configured, the result is kept as a signed
    verification record (shown by `drtool list`, used by prune).
    With --read-data-subset: today's slice of every object the snapshots
    name; a damaged one is named with every snapshot referencing it, and
    recorded (signing key configured) so the next backup uploads it again.
    Exits 5 when anything fails.
    """
    if subset_budget is not None:
        if snapshot or all_ or unverified or read_data:
            raise UsageError(
                "--read-data-subset: reads across all snapshots; "
                "give no SNAPSHOT, --all, --unverified or --read-data with it"
            )
        _verify_subset(state, parse_budget(subset_budget), as_json, repository)
        return
    ref = None if all_ else svc.UNVERIFIED if unverified else (snapshot or "latest")
    outcomes = svc.verify(state.config(repository=repository), ref, read_data=read_data)
    if as_json:
        emit_json([asdict(o) for o in outcomes])
    else:
        print_table(
            "verify" + (" (data read)" if read_data else " (stored bytes)"),
            ["snapshot", "objects", "result"],
            [
                [o.snapshot_id, o.objects, "ok" if not o.problems else "; ".join(o.problems)]
                for o in outcomes
            ],
        )
    bad = [o for o in outcomes if o.problems]
    if bad:
        distinct = list(dict.fromkeys(p for o in bad for p in o.problems))  # each object once
        raise IntegrityError(
            f"verify: {len(bad)} of {len(outcomes)} snapshots failed: {'; '.join(distinct)}"
        )


def _verify_subset(state: CliState, budget: Budget, as_json: bool, repository: str | None) -> None:
    """Run and render one subset verification; exit 5 when an object is damaged."""
    out = svc.verify_subset(state.config(repository=repository), budget)
    if as_json:
        emit_json(asdict(out))
    else:
        read_data = out.mode == "read-data"
        how = "decrypted and authenticated" if read_data else "stored sha256, key-less"
        click.echo(
            f"verify subset ({out.mode}: {how}): read {out.objects_read} of "
            f"{out.total_objects} objects ({human_bytes(out.bytes_read)} of "
            f"{human_bytes(out.total_bytes)}), budget {out.budget}, day {out.day}: every "
            f"object within {out.period_days} days"
        )
        for key, problem in out.damaged.items():
            click.echo(f"DAMAGED {key}: {problem}")
            click.echo(f"  referenced by: {', '.join(out.referenced_by[key])}")
    if out.damaged:
        raise IntegrityError(
            f"verify: {len(out.damaged)} damaged: "
            + "; ".join(f"{k} (snapshots {', '.join(out.referenced_by[k])})" for k in out.damaged)
        )


@click.command()
@click.option("--keep-last", default=0, type=int, help="Keep the N newest snapshots.")
@click.option(
    "--keep-hourly", default=0, type=int, help="Keep the newest of each of the last N hours."
)
@click.option(
    "--keep-daily", default=0, type=int, help="Keep the newest of each of the last N days."
)
@click.option(
    "--keep-weekly", default=0, type=int, help="Keep the newest of each of the last N weeks."
)
@click.option(
    "--keep-monthly", default=0, type=int, help="Keep the newest of each of the last N months."
)
@click.option(
    "--count-unverified",
    is_flag=True,
    help="Count snapshots never verified toward the keep rules (default: only verified ones).",
)
@click.option(
    "--dry-run", is_flag=True, help="Print what would be kept and removed; change nothing."
)
@json_option
@repository_option
@click.pass_obj
def prune(
    state: CliState,
    repository: str | None,
    keep_last: int,
    keep_hourly: int,
    keep_daily: int,
    keep_weekly: int,
    keep_monthly: int,
    count_unverified: bool,
    dry_run: bool,
    as_json: bool,
) -> None:
    """Forget snapshots outside a GFS policy, then delete data nothing references.

    \b
    Only snapshots a signed verification record (`drtool verify`) or a passed
    drill found intact count toward the rules: a rule keeps unverified ones in
    its way and goes on until it has N verified ones (--count-unverified: count
    every valid snapshot). Whatever the policy, the newest snapshot proven by a
    read-data verification or a drill, and the newest verified snapshot of each
    store, stay. Manifests go first, then their data; unreferenced objects and
    stale uploads are swept only after a 24 h grace period. Refuses a policy
    that keeps nothing.
    """
    policy = Policy(keep_last, keep_hourly, keep_daily, keep_weekly, keep_monthly)
    plan = prune_svc.prune(
        state.config(repository=repository),
        policy,
        dry_run=dry_run,
        count_unverified=count_unverified,
    )
    if as_json:
        emit_json(asdict(plan))
        return
    print_table(
        "prune plan" + (" (dry run)" if dry_run else ""),
        ["snapshot", "action", "why"],
        [[sid, "keep", ", ".join(why)] for sid, why in sorted(plan.keep.items())]
        + [[sid, "forget", "outside the policy"] for sid in plan.forget]
        + [
            [sid, "keep", "INVALID: never pruned; investigate (drtool list)"]
            for sid in plan.invalid
        ],
    )
    if not count_unverified and not plan.verified:
        click.echo(
            "no snapshot is verified, so no rule is satisfied and nothing is forgotten; "
            "run `drtool verify --all` with the signing key (or prune --count-unverified)"
        )
    verb = "would delete" if dry_run else "deleted"
    survived = set(plan.survived)
    deleted = sum(1 for key in plan.garbage if key not in survived)
    forgotten = sum(1 for sid in plan.forget if layout.manifest_key(sid) not in survived)
    click.echo(
        f"{verb} {forgotten} snapshots, {deleted} objects, {plan.stale_uploads} stale uploads"
    )
    if plan.wal.note:
        click.echo(f"WAL: {plan.wal.note}")
    if plan.survived:
        click.echo(
            f"warning: {len(plan.survived)} objects are still stored after their delete "
            f"(e.g. {plan.survived[0]}); no space was freed for them",
            err=True,
        )
    if plan.deferred:
        until = max(plan.deferred.values())
        snapshots = sum(1 for k in plan.deferred if "/" not in k)
        click.echo(
            f"deferred {snapshots} snapshots and {len(plan.deferred) - snapshots} objects that "
            f"Object Lock retains (the latest until {until}); a prune after that removes them"
        )
    if plan.versioned and (plan.forget or deleted):
        click.echo(
            "versioned bucket: deleted objects stay as noncurrent versions until the bucket's "
            "NoncurrentVersionExpiration rule removes them (space is freed then; see "
            "docs/OPERATIONS.md §2)"
        )


@click.command()
@click.option("--all", "everything", is_flag=True, help="Remove every lock, live ones too.")
@click.option(
    "--id",
    "lock_id",
    metavar="LOCK-ID",
    help="Remove this one lock (as named in the locked error).",
)
@repository_option
@click.pass_obj
def unlock(state: CliState, everything: bool, lock_id: str | None, repository: str | None) -> None:
    """Remove the locks of dead holders, from any host.

    \b
    A holder is dead when its process is gone or its pid was reused (same host,
    boot and container), or its heartbeat stopped (anywhere). A live holder's
    lock stays: --id removes one lock by its id, --all removes every lock.
    """
    removed = svc.unlock_repo(
        state.config(repository=repository), everything=everything, lock_id=lock_id
    )
    for lock, why in removed:
        click.echo(f"removed lock of {lock.describe()}: {why}")
    if not removed:
        click.echo("no stale locks")
