"""The stores drtool knows, in backup order: adding a kind of store is one line here.

Order matters: PostgreSQL first, then Redis, then MinIO, so every attachment the database
references exists before the bucket is listed (and drills check in that order).

Each store is named by ``"module:Class"`` and imported on first use, like the commands in
:mod:`drtool.cli.context`: a backup of PostgreSQL alone then does not pay for boto3, redis and
the MinIO code before its first byte (issue 14.2; every scheduled job pays its start-up).
:data:`COMPONENTS` is the names alone, so options and help texts import no store.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import overload

from drtool.stores.base import Store


class Stores(Sequence[Store]):
    """Stores by name, each imported and instantiated when first used.

    An entry is ``"module:Class"`` (imported lazily) or a store object (a test's fourth
    store). Iterating loads every store; :meth:`named` loads one.
    """

    def __init__(self, entries: Mapping[str, str | Store]) -> None:
        self._entries = dict(entries)
        self._loaded: dict[str, Store] = {}

    def names(self) -> tuple[str, ...]:
        """The stores' names, in order, without importing any of them."""
        return tuple(self._entries)

    def named(self, name: str) -> Store:
        """The store called ``name``, importing its module (only its) on first use."""
        if name not in self._loaded:
            entry = self._entries[name]  # KeyError: not one of these stores
            if isinstance(entry, str):
                module, _, attr = entry.partition(":")
                store: Store = getattr(importlib.import_module(module), attr)()
            else:
                store = entry
            if store.name != name:
                raise ValueError(f"registry: {entry} is named {store.name!r}, not {name!r}")
            self._loaded[name] = store
        return self._loaded[name]

    def plus(self, *stores: Store) -> Stores:
        """These stores and ``stores`` after them (how a test adds a kind of store)."""
        return Stores({**self._entries, **{s.name: s for s in stores}})

    def __len__(self) -> int:
        return len(self._entries)

    @overload
    def __getitem__(self, index: int) -> Store: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[Store]: ...

    def __getitem__(self, index: int | slice) -> Store | Sequence[Store]:
        if isinstance(index, slice):
            return tuple(self.named(n) for n in self.names()[index])
        return self.named(self.names()[index])

    def __iter__(self) -> Iterator[Store]:
        return (self.named(n) for n in self.names())


STORES = Stores(
    {
        "postgres": "drtool.stores.postgres.store:PostgresStore",
        "redis": "drtool.stores.redis.store:RedisStore",
        "minio": "drtool.stores.minio.store:MinioStore",
    }
)
COMPONENTS: tuple[str, ...] = STORES.names()

#: backed up only when named (`--component postgres-base`): never in the default set, so
#: `latest` and drills keep meaning "every default store"
OPTIONAL = Stores({"postgres-base": "drtool.stores.postgres_base:PostgresBaseStore"})


def all_components() -> tuple[str, ...]:
    """Every store's name, default and optional, in backup order: an optional store right
    after the default store it depends on (the physical base after the logical dump of
    PostgreSQL). Imports no store.

    Computed on each call from ``STORES``, so a store added there is backed up too.
    """
    names = STORES.names()
    after = next((n + 1 for n, name in enumerate(names) if name == "postgres"), len(names))
    return (*names[:after], *OPTIONAL.names(), *names[after:])


def backup_order(components: Iterable[str] | None = None) -> tuple[Store, ...]:
    """The stores called ``components`` (default: all), in backup order; only those are
    imported."""
    wanted = set(all_components() if components is None else components)
    return tuple(store(name) for name in all_components() if name in wanted)


def store(name: str) -> Store:
    """The store called ``name`` (default or optional), importing only its module."""
    return (STORES if name in STORES.names() else OPTIONAL).named(name)
