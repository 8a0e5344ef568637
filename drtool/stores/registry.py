"""The stores drtool knows, in backup order: adding a kind of store is one line here.

Order matters: PostgreSQL first, then Redis, then MinIO, so every attachment the database
references exists before the bucket is listed (and drills check in that order).
"""

from __future__ import annotations

from drtool.stores.base import Store
from drtool.stores.minio.store import MinioStore
from drtool.stores.postgres.store import PostgresStore
from drtool.stores.postgres_base import PostgresBaseStore
from drtool.stores.redis.store import RedisStore

STORES: tuple[Store, ...] = (PostgresStore(), RedisStore(), MinioStore())
COMPONENTS: tuple[str, ...] = tuple(s.name for s in STORES)

#: backed up only when named (`--component postgres-base`): never in the default set, so
#: `latest` and drills keep meaning "every default store"
OPTIONAL: tuple[Store, ...] = (PostgresBaseStore(),)


def backup_order() -> tuple[Store, ...]:
    """Every store, default and optional, in backup order: an optional store right after the
    default store it depends on (the physical base after the logical dump of PostgreSQL).

    Computed on each call from ``STORES``, so a store added there is backed up too.
    """
    stores = list(STORES)
    after = next((n + 1 for n, s in enumerate(stores) if s.name == "postgres"), len(stores))
    return (*stores[:after], *OPTIONAL, *stores[after:])


def all_components() -> tuple[str, ...]:
    """The names :func:`backup_order` backs up, in that order."""
    return tuple(s.name for s in backup_order())
