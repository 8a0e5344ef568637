"""Data sources: producers and consumers of byte streams; they know nothing of storage."""
