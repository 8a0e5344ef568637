"""Typed loading of TOML tables into frozen dataclasses: the one way drtool reads its files.

The config (:mod:`drtool.config`), the drill definitions (:mod:`drtool.drills.definition`) and
the schedule files (:mod:`drtool.services.scheduling.jobs`) declare their settings as dataclasses
with type hints; this module turns a parsed TOML table into one, so that an unknown key or a value
of the wrong type stops at load with ``field: problem (got value)`` instead of failing later,
deep inside a backup or a drill (ADR 0009). Building with ``cls(**data)`` checks neither.

Supported hints: ``str``, ``int``, ``float``, ``bool``, ``tuple[str, ...]`` (a list of strings),
``dict[str, X]`` (a table), ``Literal[...]``, ``X | None`` and nested dataclasses (a TOML table).
A field's ``metadata["check"]`` may name a function ``(where, value) -> value`` for rules a
type cannot say (a duration, a time of day); it raises :class:`ConfigError` itself.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

from drtool.errors import ConfigError

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")
Check = Callable[[str, Any], Any]
_ENV_TRUE = ("1", "true", "yes", "on")
_ENV_FALSE = ("0", "false", "no", "off")


def problem(where: str, what: str, value: object) -> ConfigError:
    """The one error shape: ``field: problem (got value)``."""
    return ConfigError(f"{where}: {what} (got {value!r})")


def join(where: str, key: str) -> str:
    """``where.key`` (just ``key`` at the top of a file)."""
    return f"{where}.{key}" if where else key


def _describe(hint: Any) -> str:
    """What a value of ``hint`` looks like, for the 'expected ...' part of a message."""
    if get_origin(hint) is Literal:
        return "one of " + ", ".join(str(a) for a in get_args(hint))
    if get_origin(hint) is tuple:
        return "a list of strings"
    if get_origin(hint) is dict:
        return "a table"
    names = {str: "a string", int: "a whole number", float: "a number", bool: "true or false"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def coerce(where: str, value: Any, hint: Any, *, from_env: bool = False) -> Any:
    """Return ``value`` as type ``hint`` or raise ``where: expected ... (got value)``.

    TOML values must already have the type (``enabled = "false"`` is not a bool); values from
    the environment are strings, so ``from_env`` parses them (``"1"``, ``"a,b"``).
    """
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in get_args(hint):  # JSON null; TOML has none
            return None
        inner = [a for a in get_args(hint) if a is not type(None)]
        return coerce(where, value, inner[0], from_env=from_env)
    if origin is Literal:
        if value not in get_args(hint):
            raise problem(where, f"expected {_describe(hint)}", value)
        return value
    if origin is tuple:
        return _strings(where, value, from_env)
    if origin is dict:  # a table of str keys (state files: per-component figures)
        if not isinstance(value, dict):
            raise problem(where, "expected a table", value)
        key_hint, value_hint = get_args(hint)
        if key_hint is not str:
            raise TypeError(f"typed_load: unsupported type {hint!r} (field {where})")
        return {str(k): coerce(join(where, str(k)), v, value_hint) for k, v in value.items()}
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        return build(hint, value, where)
    if hint is bool:
        return _bool(where, value, from_env)
    if hint in (int, float):
        return _number(where, value, hint, from_env)
    if hint is not str:  # a field type this loader does not know: a bug, caught by any test
        raise TypeError(f"typed_load: unsupported type {hint!r} (field {where})")
    if not isinstance(value, str):
        raise problem(where, "expected a string", value)
    return value


def _strings(where: str, value: Any, from_env: bool) -> tuple[str, ...]:
    """A TOML list of strings, or ``"a, b"`` from the environment."""
    if from_env and isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise problem(where, "expected a list of strings", value)
    return tuple(value)


def _bool(where: str, value: Any, from_env: bool) -> bool:
    """A TOML bool, or one of the usual words from the environment."""
    if isinstance(value, bool):
        return value
    if from_env and isinstance(value, str) and value.lower() in _ENV_TRUE + _ENV_FALSE:
        return value.lower() in _ENV_TRUE
    raise problem(where, "expected true or false", value)


def _number(where: str, value: Any, hint: type, from_env: bool) -> int | float:
    """An int (or, for float, an int or float); never a bool, a string only from the env."""
    if isinstance(value, bool) or (isinstance(value, str) and not from_env):
        raise problem(where, f"expected {_describe(hint)}", value)
    if hint is int and isinstance(value, float):
        raise problem(where, "expected a whole number", value)
    try:
        return hint(value)
    except (TypeError, ValueError):
        raise problem(where, f"expected {_describe(hint)}", value) from None


def check_keys(where: str, table: Mapping[str, Any], known: Any) -> None:
    """Refuse the first key of ``table`` not in ``known``, listing the known ones."""
    for key in table:
        if key not in known:
            raise ConfigError(
                f"{join(where, key)}: unknown setting (known: {', '.join(sorted(known))})"
            )


def field_names(cls: type) -> list[str]:
    """The settings a dataclass accepts."""
    return [f.name for f in dataclasses.fields(cls)]


def build(cls: type[T], table: Any, where: str, **given: Any) -> T:
    """An instance of dataclass ``cls`` from TOML ``table``, every value checked.

    ``given`` are values the caller already derived (they are not looked up in ``table``).
    A field without a default that is neither in ``table`` nor ``given`` is ``required``.
    """
    if not isinstance(table, dict):
        raise problem(where or "file", "expected a table", table)
    check_keys(where, table, set(field_names(cls)) - set(given))
    hints = get_type_hints(cls)
    values = dict(given)
    for f in dataclasses.fields(cls):
        if f.name in given:
            continue
        name = join(where, f.name)
        if f.name in table:
            value = coerce(name, table[f.name], hints[f.name])
            check: Check | None = f.metadata.get("check")
            values[f.name] = check(name, value) if check else value
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{name}: required (not set)")
    return cls(**values)
