"""Streaming transforms of byte iterables: zstd, age v1, the inner header, meters.

No I/O happens here: every stage takes and returns iterables of bytes with bounded memory.
``seal``/``unseal`` in :mod:`drtool.pipeline.seal` are the composition stored objects use.
"""
