#!/usr/bin/env bash
# One shard of the reference pass, under whichever scheduler started it:
#   Slurm job array:            SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT (sbatch --array=0-<N-1>)
#   Kubernetes Indexed Job:     JOB_COMPLETION_INDEX, with SHARDS set to the Job's completions
#   anything else, or by hand:  SHARD and SHARDS
# Usage: cache-ref-shard.sh PREPARED MODEL SHARDS_DIR [more cache-ref flags, e.g. --dtype bf16]
# Writes SHARDS_DIR/shard-K-of-N. Rerunning a killed shard resumes it; a finished one is a no-op.
# Then: merge-ref.sh SHARDS_DIR OUT (or `pipeline merge-ref --out OUT SHARDS_DIR/shard-*`).
set -euo pipefail
PIPELINE=${PIPELINE:-pipeline}
[ $# -ge 3 ] || { echo "usage: $0 PREPARED MODEL SHARDS_DIR [cache-ref flags]" >&2; exit 2; }
prepared=$1 model=$2 shards_dir=$3
shift 3
if [ -n "${SLURM_ARRAY_TASK_ID:-}" ]; then
  k=$((SLURM_ARRAY_TASK_ID - ${SLURM_ARRAY_TASK_MIN:-0}))
  n=${SLURM_ARRAY_TASK_COUNT:?Slurm did not set SLURM_ARRAY_TASK_COUNT}
elif [ -n "${JOB_COMPLETION_INDEX:-}" ]; then
  k=$JOB_COMPLETION_INDEX
  n=${SHARDS:?set SHARDS to the Indexed Job\'s completions}
else
  k=${SHARD:?set SHARD and SHARDS, or run under a Slurm array or a Kubernetes Indexed Job}
  n=${SHARDS:?set SHARDS}
fi
mkdir -p "$shards_dir"
exec "$PIPELINE" cache-ref --prepared "$prepared" --model "$model" --out "$shards_dir/shard-$k-of-$n" --shard "$k/$n" "$@"
