#!/bin/bash
# Entry point of drtool-test/postgres:15: the subset of the official postgres image's
# behaviour that drtool relies on. On first start (empty $PGDATA) it runs initdb as the
# postgres user with the superuser $POSTGRES_USER and password $POSTGRES_PASSWORD (or the
# contents of $POSTGRES_PASSWORD_FILE), allows scram-sha-256 logins from any address,
# creates $POSTGRES_DB and runs /docker-entrypoint-initdb.d/*.sh|*.sql; then it execs
# `postgres` listening on 0.0.0.0:5432.
set -euo pipefail

log() { echo "entrypoint: $*" >&2; }

# `docker run IMAGE -c fsync=off` means `postgres -c fsync=off`.
if [ "$#" -eq 0 ] || [ "${1:0:1}" = "-" ]; then
  set -- postgres "$@"
fi

# Anything other than the server: just run it.
if [ "$1" != postgres ]; then
  exec "$@"
fi

# Root: fix ownership (volumes and tmpfs mounts come up root-owned), then drop privileges.
if [ "$(id -u)" = 0 ]; then
  mkdir -p "$PGDATA" /var/run/postgresql
  chown postgres:postgres "$PGDATA" /var/run/postgresql
  chmod 0700 "$PGDATA"
  exec setpriv --reuid=postgres --regid=postgres --init-groups "$0" "$@"
fi

if [ -n "${POSTGRES_PASSWORD_FILE:-}" ]; then
  if [ -n "${POSTGRES_PASSWORD:-}" ]; then
    log "set POSTGRES_PASSWORD or POSTGRES_PASSWORD_FILE, not both"
    exit 1
  fi
  POSTGRES_PASSWORD=$(<"$POSTGRES_PASSWORD_FILE")
fi
POSTGRES_USER=${POSTGRES_USER:-postgres}
POSTGRES_DB=${POSTGRES_DB:-$POSTGRES_USER}
auth=${POSTGRES_HOST_AUTH_METHOD:-scram-sha-256}

if [ ! -s "$PGDATA/PG_VERSION" ]; then
  if [ -z "${POSTGRES_PASSWORD:-}" ] && [ "$auth" != trust ]; then
    log "the database is uninitialized and no superuser password is set:"
    log "set POSTGRES_PASSWORD (or POSTGRES_PASSWORD_FILE), or POSTGRES_HOST_AUTH_METHOD=trust"
    exit 1
  fi
  pwfile=$(mktemp)
  printf '%s\n' "${POSTGRES_PASSWORD:-}" >"$pwfile"
  # shellcheck disable=SC2086  # POSTGRES_INITDB_ARGS is a word list, as in the official image
  initdb --username="$POSTGRES_USER" --pwfile="$pwfile" --auth-local=trust \
    --auth-host="$auth" --encoding=UTF8 --locale=C.UTF-8 ${POSTGRES_INITDB_ARGS:-} >/dev/null
  rm -f "$pwfile"
  {
    echo "host all all all $auth"
  } >>"$PGDATA/pg_hba.conf"
  echo "listen_addresses = '*'" >>"$PGDATA/postgresql.conf"

  # A temporary server on the socket only (clients see the port open only when all is done),
  # with the options given to the real one, as the official image does.
  opts=$(printf '%q ' "${@:2}" -c "listen_addresses=" -k /var/run/postgresql)
  pg_ctl -D "$PGDATA" -o "$opts" -w start >/dev/null
  psql=(psql -v ON_ERROR_STOP=1 -X -q -h /var/run/postgresql -U "$POSTGRES_USER" --no-password)
  if [ "$POSTGRES_DB" != postgres ]; then
    "${psql[@]}" -d postgres -v db="$POSTGRES_DB" <<<'CREATE DATABASE :"db";'
  fi
  for f in /docker-entrypoint-initdb.d/*; do
    [ -e "$f" ] || continue
    case "$f" in
      *.sh)
        log "running $f"
        # shellcheck source=/dev/null
        . "$f"
        ;;
      *.sql) log "running $f"; "${psql[@]}" -d "$POSTGRES_DB" -f "$f" ;;
      *.sql.gz) log "running $f"; gzip -dc "$f" | "${psql[@]}" -d "$POSTGRES_DB" ;;
      *) log "ignoring $f" ;;
    esac
  done
  pg_ctl -D "$PGDATA" -m fast -w stop >/dev/null
  log "initialized $PGDATA (superuser $POSTGRES_USER, database $POSTGRES_DB)"
fi

unset POSTGRES_PASSWORD
exec "$@"
