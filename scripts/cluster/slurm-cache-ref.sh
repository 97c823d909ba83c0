#!/usr/bin/env bash
# Submits the reference pass as a Slurm job array of N shards and a merge job that starts when
# every shard has succeeded. Run on a login node; PREPARED, MODEL and SHARDS_DIR must be on a
# filesystem every node sees.
# Usage: slurm-cache-ref.sh N PREPARED MODEL SHARDS_DIR OUT [more cache-ref flags]
# Add your site's options (partition, account, GPUs) with SBATCH_* environment variables, e.g.
#   SBATCH_PARTITION=gpu SBATCH_GRES=gpu:1 slurm-cache-ref.sh 8 prepared Qwen2.5-0.5B shards ref_cache --dtype bf16
set -euo pipefail
[ $# -ge 5 ] || { echo "usage: $0 N PREPARED MODEL SHARDS_DIR OUT [cache-ref flags]" >&2; exit 2; }
n=$1 prepared=$2 model=$3 shards_dir=$4 out=$5
shift 5
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$shards_dir/logs"
jid=$(sbatch --parsable --job-name=cache-ref --array="0-$((n - 1))" --output="$shards_dir/logs/shard-%a.out" \
  --wrap="$(printf '%q ' "$here/cache-ref-shard.sh" "$prepared" "$model" "$shards_dir" "$@")")
mid=$(sbatch --parsable --job-name=merge-ref --dependency="afterok:$jid" --output="$shards_dir/logs/merge.out" \
  --wrap="$(printf '%q ' "$here/merge-ref.sh" "$shards_dir" "$out")")
echo "submitted shards as job array $jid (0-$((n - 1))) and the merge as job $mid"
