"""Continuous PostgreSQL protection: WAL streamed by ``pg_receivewal``, sealed into ``wal/``.

See docs/decisions/0015-wal-streaming.md and the ``wal/`` part of docs/FORMAT.md.
"""
