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
#: every store in backup order (the physical base right after the logical dump)
BACKUP_ORDER: tuple[Store, ...] = (STORES[0], OPTIONAL[0], *STORES[1:])
ALL_COMPONENTS: tuple[str, ...] = tuple(s.name for s in BACKUP_ORDER)
