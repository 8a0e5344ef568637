"""``drtool schedule``: the job loop (``scheduler``), the jobs it runs (``jobs``), its metrics."""
