#!/usr/bin/env bash
# Recover one MinIO bucket of a drtool snapshot with stock tools only (no drtool needed).
#
#   minio-recover.sh REPO SNAPSHOT_ID BUCKET IDENTITY --to-dir DIR
#   minio-recover.sh REPO SNAPSHOT_ID BUCKET IDENTITY --to-s3 TARGET_BUCKET [--endpoint-url URL]
#
# REPO is a copy of the repository directory (file:// as is, or `aws s3 sync s3://b/prefix REPO`),
# IDENTITY the operators' age identity file. Tools: bash, age, zstd, jq, sha256sum, base64,
# mktemp (coreutils), and for --to-s3 the AWS CLI (`aws s3api put-object`; credentials from
# the usual AWS_* variables or profile).
#
# Each object comes back with its exact key, bytes, content type and user metadata, as the
# snapshot's index (docs/FORMAT.md, "MinIO bucket index") records them; each object's sha256
# is checked against the index before it is written or uploaded.
#   --to-s3   puts every object under its exact key (a key ending in "/" or holding ".." is an
#             ordinary S3 key there).
#   --to-dir  writes DIR/<key> and DIR.metadata.jsonl (key, content_type, metadata per line);
#             a key that is unsafe as a path (".." or "." segments, a leading or trailing "/",
#             "//", a NUL-free but empty name) is refused: named on stderr, not written.
# Exit 0 when every object was recovered, 3 when some were refused or failed the sha256
# check (the others are recovered), 2 for wrong usage or a missing tool.
set -euo pipefail

die() { echo "minio-recover: $*" >&2; exit 2; }
[ $# -ge 6 ] || die "usage: $0 REPO SNAPSHOT_ID BUCKET IDENTITY --to-dir DIR | --to-s3 BUCKET [--endpoint-url URL]"
repo=$1 snapshot=$2 bucket=$3 identity=$4 mode=$5 dest=$6
shift 6
endpoint=()
if [ $# -gt 0 ]; then
  [ "$1" = "--endpoint-url" ] && [ $# -eq 2 ] || die "unexpected arguments: $*"
  endpoint=(--endpoint-url "$2")
fi
case $mode in --to-dir|--to-s3) ;; *) die "choose --to-dir DIR or --to-s3 BUCKET" ;; esac

tools=(age zstd jq sha256sum base64 mktemp)
[ "$mode" = --to-s3 ] && tools+=(aws)
for tool in "${tools[@]}"; do
  command -v "$tool" >/dev/null || die "needs $tool (not found in PATH)"
done

index_file="$repo/snapshots/$snapshot/minio/$bucket.index.zst.age"
[ -f "$index_file" ] || die "no index $index_file (snapshot or bucket name wrong?)"
[ -f "$repo/snapshots/$snapshot/manifest.json" ] || die "snapshot $snapshot has no manifest.json: it is incomplete"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
age -d -i "$identity" "$index_file" | zstd -d -q > "$work/index.jsonl"

if [ "$mode" = --to-dir ]; then
  mkdir -p "$dest"
  : > "$dest.metadata.jsonl"
fi

safe_path() {  # a key that names a file strictly inside the target directory
  local - key=$1 part
  set -f  # a segment such as "*" is a name, not a pattern
  [ -n "$key" ] || return 1
  case $key in /*|*/|*//*) return 1 ;; esac
  local IFS=/
  for part in $key; do
    case $part in ''|.|..) return 1 ;; esac
  done
}

recovered=0 refused=0 damaged=0
# one line per object, every field that may hold any character base64-encoded
while IFS=$'\t' read -r key64 blob sha256 type64 meta64; do
  key=$(printf '%s' "$key64" | base64 -d; printf x) && key=${key%x}  # keep trailing newlines
  content_type=$(printf '%s' "$type64" | base64 -d)
  metadata=$(printf '%s' "$meta64" | base64 -d)
  if [ "$mode" = --to-dir ] && ! safe_path "$key"; then
    printf 'minio-recover: refused unsafe key %q (not written)\n' "$key" >&2
    refused=$((refused + 1))
    continue
  fi
  case $blob in *[!0-9a-f]*|'') die "index names a malformed blob id for key $(printf %q "$key")" ;; esac
  age -d -i "$identity" "$repo/blobs/${blob:0:2}/$blob.zst.age" | zstd -d -q > "$work/object"
  if [ "$(sha256sum < "$work/object" | cut -d' ' -f1)" != "$sha256" ]; then
    printf 'minio-recover: %q does not match its sha256 in the index (not written)\n' "$key" >&2
    damaged=$((damaged + 1))
    continue
  fi
  if [ "$mode" = --to-dir ]; then
    mkdir -p "$dest/$(dirname -- "$key")"
    mv -- "$work/object" "$dest/$key"
    jq -cn --arg key "$key" --arg type "$content_type" --argjson meta "$metadata" \
      '{key: $key, content_type: $type, metadata: $meta}' >> "$dest.metadata.jsonl"
  else
    aws "${endpoint[@]}" s3api put-object --bucket "$dest" --key "$key" --body "$work/object" \
      --content-type "$content_type" --metadata "$metadata" > /dev/null
  fi
  recovered=$((recovered + 1))
done < <(jq -r '[(.key | @base64), .blob, .sha256, (.content_type | @base64),
                 (.metadata | tojson | @base64)] | @tsv' "$work/index.jsonl")

echo "minio-recover: $recovered recovered, $refused refused (unsafe keys), $damaged damaged" >&2
[ $((refused + damaged)) -eq 0 ] || exit 3
