#!/usr/bin/env bash
# Joins the shards cache-ref-shard.sh wrote into one reference cache that `pipeline train` reads.
# Usage: merge-ref.sh SHARDS_DIR OUT [--force]
# Refuses (naming them) shards that are missing, unfinished, overlapping or from other inputs.
set -euo pipefail
PIPELINE=${PIPELINE:-pipeline}
[ $# -ge 2 ] || { echo "usage: $0 SHARDS_DIR OUT [--force]" >&2; exit 2; }
shards_dir=$1 out=$2
shift 2
exec "$PIPELINE" merge-ref --out "$out" "$@" "$shards_dir"/shard-*
