"""Redis as a store: ``store`` (the protocol), ``restore`` (keys copied), ``offline`` (RDB swap)."""
