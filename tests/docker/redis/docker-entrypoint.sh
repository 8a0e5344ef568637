#!/bin/bash
# Entry point of drtool-test/redis:7. `redis-server` (the default command; extra arguments
# are passed on) starts from a generated config: port 6379 on all addresses, no persistence
# (`save ""`, no AOF; override with e.g. `--save 300 10`), dir /data, and `requirepass` from
# $REDIS_PASSWORD or $REDIS_PASSWORD_FILE. Without a password it refuses to start unless
# REDIS_ALLOW_EMPTY_PASSWORD=yes. Any other command (e.g. `sh -c ...`, as chat_stack's
# compose file uses) runs as given.
set -euo pipefail

log() { echo "entrypoint: $*" >&2; }

if [ "$#" -eq 0 ] || [ "${1:0:1}" = "-" ]; then
  set -- redis-server "$@"
fi
if [ "$1" != redis-server ]; then
  exec "$@"
fi
shift

if [ -n "${REDIS_PASSWORD_FILE:-}" ]; then
  REDIS_PASSWORD=$(<"$REDIS_PASSWORD_FILE")
fi
password=${REDIS_PASSWORD:-}
if [ -z "$password" ] && [ "${REDIS_ALLOW_EMPTY_PASSWORD:-}" != yes ]; then
  log "set REDIS_PASSWORD (or REDIS_PASSWORD_FILE), or REDIS_ALLOW_EMPTY_PASSWORD=yes"
  exit 1
fi

conf_dir=/run/redis-conf
mkdir -p "$conf_dir"
conf=$conf_dir/redis.conf
(
  umask 077
  {
    echo "port 6379"
    echo "bind 0.0.0.0"
    echo "protected-mode no"
    echo "dir /data"
    echo 'save ""'
    echo "appendonly no"
    if [ -n "$password" ]; then
      # A double-quoted config string: escape backslashes and double quotes.
      escaped=${password//\\/\\\\}
      escaped=${escaped//\"/\\\"}
      printf 'requirepass "%s"\n' "$escaped"
    fi
  } >"$conf"
)
unset REDIS_PASSWORD

if [ "$(id -u)" = 0 ]; then
  chown -R redis:redis "$conf_dir"
  chown redis:redis /data
  exec setpriv --reuid=redis --regid=redis --init-groups redis-server "$conf" "$@"
fi
exec redis-server "$conf" "$@"
