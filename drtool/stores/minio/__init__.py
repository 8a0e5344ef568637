"""MinIO (S3) as a store: ``store`` (the protocol), ``backup`` (incremental), ``restore``."""
