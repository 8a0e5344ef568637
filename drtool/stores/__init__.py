"""The stores a snapshot holds, each behind one protocol (``base``), listed in ``registry``.

One package per kind of store (``postgres``, ``redis``, ``minio``): its ``store`` module
implements :class:`drtool.stores.base.Store` over the byte-level clients in ``drtool.sources``.
``stage`` decrypts snapshot objects into scratch for any store; ``checks`` holds the drill's
cross-store application checks.
"""
