"""``drtool restore``: ``run`` orders the stores' plan, stage and restore (``drtool.stores``)."""
