"""Where a stack runs: endpoints, and the local runtime (servers as processes on loopback)."""
