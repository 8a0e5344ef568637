"""``drtool restore-entity``: one room or one user back from a snapshot, merged, reversible.

``closure`` extracts the entity's rows from the staged snapshot and compares them with
production; ``objects`` and ``redis_keys`` do the same for its attachment objects and its
derived Redis keys; ``journal`` writes every change down before it is made; ``run`` orders
them and undoes a journal. See docs/decisions/0019-entity-restore.md.
"""
