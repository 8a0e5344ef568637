"""PostgreSQL as a store: ``store`` (the protocol), ``restore`` (beside the live DB, switched)."""
