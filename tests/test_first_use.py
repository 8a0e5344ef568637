"""What a new user meets first (issue 18, item 13): init, a missing key, a missing bucket, a
table in a cron log. Real storage (a directory, a SeaweedFS bucket) and the real CLI.
"""

from __future__ import annotations

import stat
import subprocess
from datetime import timedelta
from pathlib import Path

import tomli_w
from support.cli import run_drtool
from support.repo_kit import T0, blob_id, file_kit, s3_kit

from drtool.endpoints import S3Endpoint
from drtool.repository import layout


def one_error(code: int, run: subprocess.CompletedProcess[str]) -> str:
    """The single ``error:`` line of a failed run with exit ``code``."""
    assert run.returncode == code, (run.returncode, run.stdout, run.stderr)
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0].removeprefix("error: ")


def test_init_creates_a_missing_directory_0700(tmp_path: Path) -> None:
    kit = file_kit(tmp_path)
    fresh = tmp_path / "disk" / "drtool-repo"  # neither exists
    config = tmp_path / "fresh.toml"
    config.write_text(tomli_w.dumps({**kit.sections, "repository": {"url": fresh.as_uri()}}))
    run = run_drtool("init", config=config, home=tmp_path / "home")
    assert run.returncode == 0, run.stderr
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o700
    assert (fresh / layout.REPO_FILE).is_file()


def test_a_missing_identity_file_exits_12(tmp_path: Path) -> None:
    """README: 12 is 'wrong or missing key'; a missing identity file exited 2."""
    kit = file_kit(tmp_path)
    missing = tmp_path / "keys" / "gone.key"
    config = kit.write_config("no-identity", identity_file=str(missing))
    for args in (["restore", "--yes"], ["verify", "--read-data"]):
        message = one_error(12, run_drtool(*args, config=config, home=tmp_path / "home"))
        assert message == f"{missing}: key file not found"


def test_a_missing_bucket_says_the_bucket_is_missing(
    tmp_path: Path, s3_server: S3Endpoint, s3_bucket: str
) -> None:
    """It said "no drtool repository ... run drtool init", which cannot work without a bucket."""
    kit = s3_kit(tmp_path, s3_server, s3_bucket)
    doc = {
        **kit.sections,
        "repository": {**kit.sections["repository"], "url": "s3://no-such-bkt/x"},
    }
    config = tmp_path / "nobucket.toml"
    config.write_text(tomli_w.dumps(doc))
    for args in (["list"], ["init"]):
        message = one_error(10, run_drtool(*args, config=config, home=tmp_path / "home"))
        assert "bucket no-such-bkt does not exist" in message and "drtool init" not in message


def test_a_missing_directory_says_the_directory_is_missing(tmp_path: Path) -> None:
    kit = file_kit(tmp_path)
    gone = tmp_path / "unmounted"
    config = tmp_path / "gone.toml"
    config.write_text(tomli_w.dumps({**kit.sections, "repository": {"url": gone.as_uri()}}))
    message = one_error(10, run_drtool("list", config=config, home=tmp_path / "home"))
    assert message == f"{gone.as_uri()}: directory does not exist"


def test_list_into_a_pipe_prints_whole_snapshot_ids(tmp_path: Path) -> None:
    """Off a terminal rich assumed 80 columns and cut ids to '2026112…' (cron logs, scripts)."""
    kit = file_kit(tmp_path)
    snaps = [kit.snapshot(T0 + timedelta(hours=h), blobs=(blob_id(),)) for h in range(2)]
    kit.storage.delete(snaps[1].dump_key)  # INVALID: its long problem text widens the table
    run = run_drtool("list", config=kit.config_file, home=tmp_path / "home")  # stdout: a pipe
    assert run.returncode == 0, run.stderr
    for snap in snaps:
        assert snap.snapshot_id in run.stdout
    assert f"missing object {snaps[1].dump_key}" in run.stdout
