#!/usr/bin/env bash
# Submits data-parallel `pipeline train` as one Slurm job of N tasks (one rank each), started by
# srun over MPI (a `pipeline` built with `--features mpi` against the cluster's MPI, which srun
# must be able to start: `srun --mpi=list` shows the plugins; pmix is the usual one). Run on a
# login node; PREPARED, REF_CACHE and OUT must be on a filesystem every node sees. Rank 0 writes
# OUT; the global batch is --batch-size × --grad-accum × N. Resubmitting with --resume continues
# from the newest checkpoint, on any N that keeps the global batch.
# Usage: slurm-train.sh N PREPARED REF_CACHE OUT [more train flags]
# Site options with SBATCH_* variables, e.g.
#   SBATCH_PARTITION=cpu SBATCH_TIMELIMIT=24:00:00 slurm-train.sh 8 prepared ref_cache train --batch-size 4 --shard-optimizer
set -euo pipefail
[ $# -ge 4 ] || { echo "usage: $0 N PREPARED REF_CACHE OUT [train flags]" >&2; exit 2; }
n=$1 prepared=$2 ref_cache=$3 out=$4
shift 4
mkdir -p "$out.logs"
pipeline=${PIPELINE:-pipeline}
threads=${THREADS_PER_RANK:-$(( $(nproc) ))}
jid=$(sbatch --parsable --job-name=dpo-train --ntasks="$n" --cpus-per-task="$threads" --output="$out.logs/train-%j.out" \
  --wrap="srun --mpi=${SRUN_MPI:-pmix} --kill-on-bad-exit=1 $(printf '%q ' "$pipeline" --threads "$threads" train \
    --prepared "$prepared" --ref-cache "$ref_cache" --out "$out" "$@")")
echo "submitted data-parallel training on $n ranks as job $jid (log: $out.logs/train-$jid.out)"
