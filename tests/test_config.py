"""The configuration: flag > DRTOOL_* env > TOML file > default, and one-line errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from support.cli import run_drtool

from drtool.config import Config, load_config
from drtool.errors import ConfigError

CANARY = "s3cr3t-canary"

# (section, field, TOML literal, env text, flag value, default, file value, env value, flag)
FIELDS = [
    pytest.param(
        "postgres", "host", '"db.file"', "db.env", "db.flag", "127.0.0.1",
        "db.file", "db.env", "db.flag", id="str",
    ),
    pytest.param(
        "postgres", "port", "6001", "6002", "6003", 5432, 6001, 6002, 6003, id="int"
    ),
    pytest.param("redis", "tls", "true", "false", "1", False, True, False, True, id="bool"),
    pytest.param(
        "minio", "buckets", '["from-file"]', "env-a, env-b", ["flag-a"], ("attachments",),
        ("from-file",), ("env-a", "env-b"), ("flag-a",), id="list",
    ),
]  # fmt: skip


def value(cfg: Config, section: str, name: str) -> Any:
    return getattr(getattr(cfg, section), name)


@pytest.mark.parametrize(
    (
        "section",
        "name",
        "toml",
        "env_text",
        "flag",
        "default",
        "from_file",
        "from_env",
        "from_flag",
    ),
    FIELDS,
)
def test_flag_beats_env_beats_file_beats_default(
    tmp_path: Path,
    section: str,
    name: str,
    toml: str,
    env_text: str,
    flag: Any,
    default: Any,
    from_file: Any,
    from_env: Any,
    from_flag: Any,
) -> None:
    path = tmp_path / "drtool.toml"
    path.write_text(f"[{section}]\n{name} = {toml}\n")
    env = {f"DRTOOL_{section.upper()}_{name.upper()}": env_text}
    flags = {section: {name: flag}}

    assert value(load_config(None, {}), section, name) == default
    assert value(load_config(path, {}), section, name) == from_file
    assert value(load_config(path, env), section, name) == from_env
    assert value(load_config(path, env, flags), section, name) == from_flag
    assert value(load_config(None, {}, flags), section, name) == from_flag
    # a flag that was not given (None) does not hide the lower layers
    assert value(load_config(path, env, {section: {name: None}}), section, name) == from_env


def test_drtool_config_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "picked.toml"
    path.write_text('[repository]\nurl = "file:///srv/picked"\n')
    cfg = load_config(None, {"DRTOOL_CONFIG": str(path)})
    assert cfg.repository.url == "file:///srv/picked"
    assert cfg.source == str(path)
    # an explicit path wins over DRTOOL_CONFIG
    other = tmp_path / "other.toml"
    other.write_text('[repository]\nurl = "file:///srv/other"\n')
    assert load_config(other, {"DRTOOL_CONFIG": str(path)}).repository.url == "file:///srv/other"


def test_restore_targets_parse(tmp_path: Path) -> None:
    secret = tmp_path / "staging_pg"
    secret.write_text(CANARY + "\n")
    path = tmp_path / "drtool.toml"
    path.write_text(
        "[targets.staging.postgres]\n"
        'host = "staging-db"\nport = 5433\n'
        f'password_file = "{secret}"\n'
        "[targets.staging.minio]\n"
        'buckets = ["attachments", "avatars"]\n'
        "[targets.scratch.redis]\n"
        "port = 6380\n"
    )
    cfg = load_config(path, {})
    assert sorted(cfg.targets) == ["scratch", "staging"]
    staging = cfg.targets["staging"]
    assert (staging.postgres.host, staging.postgres.port) == ("staging-db", 5433)
    assert staging.postgres.password == CANARY
    assert staging.minio.buckets == ("attachments", "avatars")
    assert staging.redis.port == 6379  # a section left out keeps its defaults
    assert cfg.targets["scratch"].redis.port == 6380
    endpoints = staging.endpoints()
    assert endpoints.postgres.host == "staging-db"
    assert endpoints.buckets == ("attachments", "avatars")
    # the production stack is untouched by the targets
    assert cfg.postgres.host == "127.0.0.1"


def test_password_from_env_and_from_env_file(tmp_path: Path) -> None:
    secret = tmp_path / "pg_password"
    secret.write_text("from-the-file\n")
    by_file = load_config(None, {"DRTOOL_POSTGRES_PASSWORD_FILE": str(secret)})
    assert by_file.postgres.password == "from-the-file"
    assert by_file.stack().postgres.password == "from-the-file"
    by_value = load_config(None, {"DRTOOL_POSTGRES_PASSWORD": "from-the-env"})
    assert by_value.postgres.password == "from-the-env"
    both = load_config(
        None,
        {"DRTOOL_POSTGRES_PASSWORD": "from-the-env", "DRTOOL_POSTGRES_PASSWORD_FILE": str(secret)},
    )
    assert both.postgres.password == "from-the-env"


def test_env_secret_file_beats_the_toml_secret_file(tmp_path: Path) -> None:
    in_toml, in_env = tmp_path / "a", tmp_path / "b"
    in_toml.write_text("toml-file")
    in_env.write_text("env-file")
    path = tmp_path / "drtool.toml"
    path.write_text(f'[redis]\npassword_file = "{in_toml}"\n')
    assert load_config(path, {}).redis.password == "toml-file"
    assert load_config(path, {"DRTOOL_REDIS_PASSWORD_FILE": str(in_env)}).redis.password == (
        "env-file"
    )


def test_repr_never_shows_a_secret(tmp_path: Path) -> None:
    secret = tmp_path / "target_pg"
    secret.write_text(CANARY + "-target")
    path = tmp_path / "drtool.toml"
    path.write_text(f'[targets.t.postgres]\npassword_file = "{secret}"\n')
    env = {
        f"DRTOOL_{name}": f"{CANARY}-{name}"
        for name in (
            "REPOSITORY_ACCESS_KEY",
            "REPOSITORY_SECRET_KEY",
            "KEYS_IDENTITY_PASSPHRASE",
            "POSTGRES_PASSWORD",
            "REDIS_PASSWORD",
            "MINIO_ACCESS_KEY",
            "MINIO_SECRET_KEY",
        )
    }
    cfg = load_config(path, env)
    assert cfg.minio.secret_key == f"{CANARY}-MINIO_SECRET_KEY"
    for text in (repr(cfg), str(cfg), repr(cfg.stack()), repr(cfg.targets["t"].endpoints())):
        assert CANARY not in text


BAD_CONFIGS = [
    pytest.param(
        '[databse]\nhost = "x"\n',
        "error: databse: unknown section (known: repository, keys, backup, postgres, redis, "
        "minio, wal, canary, capture, restore, targets, repositories)",
        id="unknown-section",
    ),
    pytest.param(
        '[postgres]\nhots = "x"\n',
        "error: postgres.hots: unknown setting (known: bin_dir, dbname, host, "
        "max_standby_lag_s, password_file, port, user)",
        id="unknown-key",
    ),
    pytest.param(
        '[postgres]\nport = "abc"\n',
        "error: postgres.port: expected a whole number (got 'abc')",
        id="wrong-type",
    ),
    pytest.param(
        "[redis]\ntls = 1\n", "error: redis.tls: expected true or false (got 1)", id="not-a-bool"
    ),
    pytest.param(
        f'[postgres]\npassword = "{CANARY}"\n',
        "error: postgres.password: secrets are not allowed in the config file; use password_file"
        " or DRTOOL_POSTGRES_PASSWORD (got a literal value)",
        id="literal-secret",
    ),
    pytest.param(
        f'[targets.staging.redis]\npassword = "{CANARY}"\n',
        "error: targets.staging.redis.password: secrets are not allowed in the config file; "
        "use password_file (got a literal value)",
        id="literal-secret-in-target",
    ),
    pytest.param(
        "[targets.staging.mysql]\n",
        "error: targets.staging.mysql: unknown section (known: postgres, redis, minio)",
        id="unknown-target-section",
    ),
    pytest.param(
        "[targets.staging]\npostgres = 5\n",
        "error: targets.staging.postgres: expected a [targets.staging.postgres] table (got 5)",
        id="target-section-not-a-table",
    ),
    pytest.param(
        '[postgres]\npassword_file = "/nonexistent/pg_password"\n',
        "error: postgres.password_file: cannot read the secret file (No such file or directory:"
        " /nonexistent/pg_password)",
        id="missing-secret-file",
    ),
]


@pytest.mark.parametrize(("toml", "expected"), BAD_CONFIGS)
def test_bad_config_exits_2_with_one_line(tmp_path: Path, toml: str, expected: str) -> None:
    path = tmp_path / "drtool.toml"
    path.write_text(toml)
    result = run_drtool("--config", str(path), "list")
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == expected
    assert "Traceback" not in result.stderr
    assert CANARY not in result.stdout + result.stderr


def test_toml_syntax_error_names_the_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "drtool.toml"
    path.write_text('[postgres]\nhost = "unterminated\n')
    result = run_drtool("--config", str(path), "list")
    assert result.returncode == 2
    [line] = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert line.startswith("error: config: not valid TOML: ")
    assert "line 2" in line
    assert line.endswith(f"(in {path})")


def test_missing_config_file_and_bad_env_value_exit_2(tmp_path: Path) -> None:
    missing = run_drtool("--config", str(tmp_path / "nope.toml"), "list")
    assert missing.returncode == 2
    assert missing.stderr.splitlines()[-1] == (
        f"error: config: file not found (got {tmp_path / 'nope.toml'})"
    )
    # DRTOOL_CONFIG is read by the command line too
    by_env = run_drtool("list", extra_env={"DRTOOL_CONFIG": str(tmp_path / "env.toml")})
    assert by_env.stderr.splitlines()[-1] == (
        f"error: config: file not found (got {tmp_path / 'env.toml'})"
    )
    bad_env = run_drtool("list", extra_env={"DRTOOL_POSTGRES_PORT": "abc"})
    assert bad_env.returncode == 2
    assert bad_env.stderr.splitlines()[-1] == (
        "error: DRTOOL_POSTGRES_PORT: expected a whole number (got 'abc')"
    )


@pytest.mark.parametrize(
    ("toml", "problem"),
    [
        ('[minio]\nbuckets = "attachments"\n', "minio.buckets: expected a list of strings"),
        ("[backup]\ncompression_level = true\n", "backup.compression_level: expected a whole"),
        ("postgres = 5\n", "postgres: expected a [postgres] table (got 5)"),
        # a number as a string was accepted (int("5432")): TOML says what type a value has
        ('[postgres]\nport = "5432"\n', "postgres.port: expected a whole number (got '5432')"),
        ("[repository]\npart_size_mb = 8.5\n", "repository.part_size_mb: expected a whole"),
        ('[redis]\ntls = "false"\n', "redis.tls: expected true or false (got 'false')"),
        ("[keys]\nrecipients = [1, 2]\n", "keys.recipients: expected a list of strings"),
    ],
)
def test_load_config_raises_config_error(tmp_path: Path, toml: str, problem: str) -> None:
    path = tmp_path / "drtool.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    assert problem in str(info.value)
    assert info.value.exit_code == 2


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("DRTOOL_POSTGRES_HOTS", "DRTOOL_POSTGRES_HOTS: unknown setting of [postgres] (known: "),
        ("DRTOOL_REDIS_PASWORD", "DRTOOL_REDIS_PASWORD: unknown setting of [redis]"),
        ("DRTOOL_KEYS_IDENTITY", "DRTOOL_KEYS_IDENTITY: unknown setting of [keys]"),
        ("DRTOOL_POSTGRES_PORT_FILE", "DRTOOL_POSTGRES_PORT_FILE: unknown setting"),
    ],
)
def test_a_misspelt_env_variable_fails_like_an_unknown_key(name: str, problem: str) -> None:
    """``DRTOOL_<SECTION>_<TYPO>`` was silently ignored; it fails like ``hots`` in the file."""
    result = run_drtool("list", env={name: "x"})
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"error: {problem}")
    assert "DRTOOL_POSTGRES_HOST" in line or "postgres" not in name.lower()


def test_env_variables_that_are_not_settings_are_left_alone(tmp_path: Path) -> None:
    env = {
        "DRTOOL_BACKUP_CONFIG": "./drtool/backup.toml",  # the compose file's variable
        "DRTOOL_IMAGE": "drtool:x",
        "DRTOOL_POSTGRES_PASSWORD_FILE": str(tmp_path / "pw"),
        "DRTOOL_KEYS_SIGNING_KEY_FILE": "/run/secrets/k",
    }
    (tmp_path / "pw").write_text("pw\n")
    cfg = load_config(None, env)
    assert cfg.postgres.password == "pw" and cfg.keys.signing_key_file == "/run/secrets/k"
