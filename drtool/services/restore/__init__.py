"""``drtool restore``: ``run`` orchestrates; ``stage`` decrypts into scratch; one module per target.

``postgres``, ``redis`` (keys copied online), ``redis_offline`` (server restarted with the RDB)
and ``minio`` each plan, stage and restore one component and verify it by its fingerprints.
"""
