"""The stores drtool knows, in backup order: adding a kind of store is one line here.

Order matters: PostgreSQL first, then Redis, then MinIO, so every attachment the database
references exists before the bucket is listed (and drills check in that order).
"""

from __future__ import annotations

from drtool.stores.base import Store
from drtool.stores.minio.store import MinioStore
from drtool.stores.postgres.store import PostgresStore
from drtool.stores.redis.store import RedisStore

STORES: tuple[Store, ...] = (PostgresStore(), RedisStore(), MinioStore())
COMPONENTS: tuple[str, ...] = tuple(s.name for s in STORES)
