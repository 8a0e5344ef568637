"""The repository: format, signed manifests, the catalog of snapshots, locks and retention."""
