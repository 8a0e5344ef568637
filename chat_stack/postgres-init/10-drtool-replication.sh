# Sourced by the postgres image's entrypoint on the FIRST start only (an empty data volume),
# as the postgres user, before the server listens. It lets drtool's `wal` service stream WAL:
# pg_receivewal connects with a physical replication connection, which only `replication`
# lines of pg_hba.conf admit (the image has none for other hosts). Logical replication
# connections (the snapshot LSN of ADR 0018) match the ordinary `host all all` line.
# Existing clusters: add the same line by hand and `SELECT pg_reload_conf();`
# (docs/OPERATIONS.md, "The wal service").
#
# The role is the stack's superuser ($POSTGRES_USER), which already has REPLICATION and may
# run pg_switch_wal(); a dedicated backup role needs both granted (docs/OPERATIONS.md).
# `samenet`: the Docker networks this container is attached to (cotalk-data), not the world.
echo "host replication ${DRTOOL_REPLICATION_ROLE:-$POSTGRES_USER} samenet scram-sha-256" \
  >>"$PGDATA/pg_hba.conf"
