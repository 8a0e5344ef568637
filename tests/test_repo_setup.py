"""The shared set-up (drtool/services/repo_setup.py) of the demo, the benchmarks and the tests:
keys split between the backup host and the operator, both configs, an initialised repository.
"""

from __future__ import annotations

import stat
import tomllib
from pathlib import Path

from drtool.config import load_config
from drtool.repository import access, layout
from drtool.services import repo as repo_svc
from drtool.services.repo_setup import set_up_repository


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_set_up_repository_splits_the_keys_and_initialises_the_repository(
    tmp_path: Path,
) -> None:
    (tmp_path / "repository").mkdir()
    repository = {"url": (tmp_path / "repository").as_uri()}
    setup = set_up_repository(
        tmp_path,
        repository,
        state_dir=tmp_path / "state",
        operator_extra={"backup": {"scratch_dir": str(tmp_path)}},
    )

    assert mode(tmp_path / "keys") == 0o700
    assert mode(setup.keys.identity_file) == 0o600
    assert mode(setup.keys.signing_key_file) == 0o600

    backup = tomllib.loads(setup.backup_config.read_text())
    assert backup == setup.backup_doc
    assert backup["keys"] == {
        "recipients": [setup.keys.recipient],
        "signing_key_file": str(setup.keys.signing_key_file),
        "verify_key": setup.keys.verify_key,
    }  # never the identity on the backup host
    assert backup["backup"] == {"state_dir": str(tmp_path / "state")}
    operator = tomllib.loads(setup.operator_config.read_text())
    assert operator == setup.operator_doc
    assert operator["keys"] == {
        "identity_file": str(setup.keys.identity_file),
        "verify_key": setup.keys.verify_key,
    }  # never the signing key on the operator's side
    assert operator["backup"] == {"scratch_dir": str(tmp_path)}

    info = layout.read_repo_info(access.storage_for(load_config(setup.backup_config, {})))
    assert info.recipients == (setup.keys.recipient,)
    assert info.verify_keys == (setup.keys.verify_key,)
    assert repo_svc.list_records(load_config(setup.operator_config, {})) == []
