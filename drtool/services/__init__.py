"""Use cases behind the CLI: backup, restore, drill, prune, schedule, the local stack, the demo."""
