#!/bin/bash
# Entry point of drtool-test/s3:latest. Understands MinIO's `server DIR [--address :PORT]
# [--console-address ADDR]` (the console is ignored) and starts `weed mini` with its S3 API on
# 0.0.0.0:9000 (or PORT), data in DIR. The credentials come from MINIO_ROOT_USER and
# MINIO_ROOT_PASSWORD (or MINIO_ROOT_USER_FILE / MINIO_ROOT_PASSWORD_FILE), defaulting to
# minioadmin/minioadmin as MinIO does: SeaweedFS turns auth off without credentials, so it
# always gets some. Any other command runs as given.
set -euo pipefail

log() { echo "entrypoint: $*" >&2; }

if [ "$#" -eq 0 ]; then
  set -- server /data
fi
if [ "$1" != server ]; then
  exec "$@"
fi
shift

dir=/data
port=9000
while [ "$#" -gt 0 ]; do
  case "$1" in
    --address) port=${2##*:}; shift 2 ;;
    --address=*) port=${1##*:}; shift ;;
    --console-address) shift 2 ;;
    --console-address=*) shift ;;
    -*) log "ignoring MinIO option $1"; shift ;;
    *) dir=$1; shift ;;
  esac
done

[ -z "${MINIO_ROOT_USER_FILE:-}" ] || MINIO_ROOT_USER=$(<"$MINIO_ROOT_USER_FILE")
[ -z "${MINIO_ROOT_PASSWORD_FILE:-}" ] || MINIO_ROOT_PASSWORD=$(<"$MINIO_ROOT_PASSWORD_FILE")
export AWS_ACCESS_KEY_ID=${MINIO_ROOT_USER:-minioadmin}
export AWS_SECRET_ACCESS_KEY=${MINIO_ROOT_PASSWORD:-minioadmin}
unset MINIO_ROOT_USER MINIO_ROOT_PASSWORD

mkdir -p "$dir"
# `mc ready local` (chat_stack's healthcheck) probes this port.
echo "$port" >/run/drtool-s3-port
exec weed mini -dir="$dir" -ip=127.0.0.1 -ip.bind=0.0.0.0 \
  -master.port=9333 -volume.port=8080 -filer.port=8888 -s3.port="$port" -admin.port=23646 \
  -webdav=false -s3.port.iceberg=0 -s3.port.lance=0 -master.telemetry=false
