"""Restore drills: scratch stacks, checks on the restored data, reports."""
