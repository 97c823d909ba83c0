#!/usr/bin/env bash
# The GPU check: one command on a GPU machine with no Rust and no network, given the CUDA binary
# (dist/pipeline-cuda.zst from scripts/build-cuda.sh, or unpacked) and this project tree.
#
#   bash scripts/gpu-check.sh dist/pipeline-cuda.zst [WORKDIR]
#
# Uses the machine's own Python with torch + transformers (and the CUDA 13 runtime libraries
# its pip packages ship). Checks, each printed as it finishes:
#  (a) cache-ref on the GPU vs transformers on the same GPU: f32 within 1e-3, bf16 within 0.5
#      (summed log-probs of ~20-token completions in bf16; transformers' own bf16 vs f32 differs by as much);
#  (b) 20 train steps on the GPU vs the same steps on the CPU, f32: loss and grad_norm within 1e-3 relative;
#  (b2) the same 20 steps with --shard-params (ZeRO-3's path at one rank) within 1e-4 of (b);
#  (d) this round's paths on the GPU vs the CPU's fused kernels: Qwen3 and Gemma 2 (q/k norms,
#      soft-capping, sliding windows), a MoE model, 2k-token pairs through the tiled attention,
#      MPO + WPO + LD-DPO losses and gradient checkpointing: 5 train steps each, loss and
#      grad_norm within 1e-3 relative of the CPU's;
#  (c) at Qwen2.5-0.5B's shape: cache-ref tokens/s vs transformers' bf16 forward (sdpa), train
#      s/step (--dtype bf16) vs a PyTorch bf16 DPO step, and the peak GPU memory of each.
#
# Rehearsal without a GPU (device time is scarce; this catches a broken flag or file name first):
#   GPU_CHECK_DEVICE=cpu bash scripts/gpu-check.sh target/release/pipeline
# runs every step on the CPU with the CPU binary and CPU torch, with (c) shrunk to 4 pairs and
# 2 steps of batch 2, torch's DPO step in f32 ((b) then compares CPU with CPU): ~11 min on 2 cores.
set -euo pipefail
BIN=${1:?usage: gpu-check.sh PIPELINE_CUDA_BINARY[.zst] [WORKDIR]}
WORK=${2:-$(mktemp -d)}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
DEV=${GPU_CHECK_DEVICE:-cuda}   # cpu: the rehearsal above
# (c): pairs, train steps and pairs per step at the 0.5B shape
if [ "$DEV" = cpu ]; then ROWS=4 STEPS=2 BATCH=2 TORCH=f32; else ROWS=256 STEPS=6 BATCH=4 TORCH=bf16; fi
fail() { echo "gpu-check: FAILED: $*" >&2; exit 1; }
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)   # absolute: the steps below run inside it
[ -f "$BIN" ] || fail "no binary $BIN"
BIN=$(cd "$(dirname "$BIN")" && pwd)/$(basename "$BIN")
case "$BIN" in
  *.zst) command -v zstd >/dev/null || "$PY" -c "import zstandard" 2>/dev/null || fail "no zstd to unpack $BIN"
         if command -v zstd >/dev/null; then zstd -dqf "$BIN" -o "$WORK/pipeline"; else
           "$PY" -c "import sys,zstandard;zstandard.ZstdDecompressor().copy_stream(open(sys.argv[1],'rb'),open(sys.argv[2],'wb'))" "$BIN" "$WORK/pipeline"; fi
         BIN="$WORK/pipeline";;
esac
chmod +x "$BIN"
"$PY" -c "import torch, transformers, pyarrow; assert '$DEV' == 'cpu' or torch.cuda.is_available()" 2>/dev/null \
  || fail "$PY has no torch+transformers+pyarrow with a CUDA device"
# The CUDA 13 runtime libraries of the pip wheels torch came with (libcublas, libcudart, libcurand).
LIBS=$("$PY" - <<'PY'
import glob, os, site
paths = site.getsitepackages() + [site.getusersitepackages()]
print(":".join(sorted({os.path.dirname(p) for d in paths for p in glob.glob(f"{d}/nvidia/**/lib/lib*.so*", recursive=True)})))
PY
)
export LD_LIBRARY_PATH="$LIBS:${LD_LIBRARY_PATH:-}"
ldd "$BIN" | grep -q "not found" && { ldd "$BIN" | grep "not found"; fail "the binary misses libraries above"; }
P() { "$BIN" "$@"; }
cd "$WORK"
[ "$DEV" = cpu ] && echo "gpu-check: CPU rehearsal" || nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
G() { "$PY" "$ROOT/scripts/gpu_check.py" --device "$DEV" "$@"; }

echo "== (a) cache-ref on the GPU vs transformers (tiny Llama, 48 pairs)"
P init-model --arch llama --size tiny --out tiny
P synth-prefs --out in.parquet --rows 48
P prepare --input in.parquet --model tiny --out prep
P --device $DEV cache-ref --prepared prep --model tiny --out cache-f32
P --device $DEV cache-ref --prepared prep --model tiny --out cache-bf16 --dtype bf16
G logps tiny prep cache-f32 --dtype f32 --tol 1e-3 || fail "(a) f32 log-probs"
G logps tiny prep cache-bf16 --dtype bf16 --tol 0.5 || fail "(a) bf16 log-probs"

echo "== (b) 20 train steps, GPU vs CPU (f32)"
for dev in $DEV cpu; do
  P --device $dev train --prepared prep --ref-cache cache-f32 --out train-$dev --max-steps 20 --batch-size 4 --lr 1e-4 \
    --shuffle false --eval-every 0 --save-every 0
done
"$PY" - <<PY || fail "(b) GPU and CPU training differ"
import json, sys
rows = {d: [json.loads(l) for l in open(f"train-{d}/metrics.jsonl") if '"loss"' in l] for d in ("$DEV", "cpu")}
assert len(rows["$DEV"]) == len(rows["cpu"]) == 20, {d: len(r) for d, r in rows.items()}
worst = max(abs(a[k] - b[k]) / max(abs(b[k]), 1e-6) for a, b in zip(rows["$DEV"], rows["cpu"]) for k in ("loss", "grad_norm"))
print(json.dumps({"check": "20 steps GPU vs CPU", "max_rel_diff": worst, "tolerance": 1e-3, "ok": worst <= 1e-3}))
sys.exit(0 if worst <= 1e-3 else 1)
PY

echo "== (b2) --shard-params on one GPU (the ZeRO-3 gathers and reduce-scatters at W = 1) vs plain"
P --device $DEV train --prepared prep --ref-cache cache-f32 --out train-z3 --max-steps 20 --batch-size 4 --lr 1e-4 \
  --shuffle false --eval-every 0 --save-every 10 --shard-params
"$PY" - <<PY || fail "(b2) --shard-params differs on the GPU"
import json, sys
a = [json.loads(l) for l in open("train-z3/metrics.jsonl") if '"loss"' in l]
b = [json.loads(l) for l in open("train-$DEV/metrics.jsonl") if '"loss"' in l]
worst = max(abs(x[k] - y[k]) / max(abs(y[k]), 1e-6) for x, y in zip(a, b) for k in ("loss", "grad_norm"))
print(json.dumps({"check": "--shard-params vs plain on the GPU", "max_rel_diff": worst, "tolerance": 1e-4, "ok": worst <= 1e-4 and len(a) == 20}))
sys.exit(0 if worst <= 1e-4 and len(a) == 20 else 1)
PY

echo "== (d) families, losses, long pairs and checkpointing: GPU vs CPU (f32)"
P synth-prefs --out long2k.parquet --rows 6 --tokens 2000
for arch in qwen3 gemma2 qwen3_moe; do
  P init-model --arch $arch --size tiny --out m-$arch
  P prepare --input long2k.parquet --model m-$arch --out prep-$arch --max-length 4096
  P --device cpu cache-ref --prepared prep-$arch --model m-$arch --out cache-$arch
  for dev in $DEV cpu; do
    P --device $dev train --prepared prep-$arch --ref-cache cache-$arch --out d-$arch-$dev --max-steps 5 --batch-size 2 \
      --lr 1e-4 --shuffle false --eval-every 0 --save-every 0 --loss sigmoid,bco_pair,sft --loss-weights 0.8,0.2,1.0 \
      --use-weighting false --ld-alpha 0.5 --gradient-checkpointing
  done
  P --device $DEV train --prepared prep-$arch --ref-cache cache-$arch --out w-$arch --max-steps 2 --batch-size 2 --lr 1e-4 \
    --shuffle false --eval-every 0 --save-every 0 --use-weighting || fail "(d) WPO on the GPU, $arch"
  "$PY" - <<PY || fail "(d) $arch: GPU and CPU training differ"
import json, sys
rows = {d: [json.loads(l) for l in open(f"d-$arch-{d}/metrics.jsonl") if '"loss"' in l] for d in ("$DEV", "cpu")}
worst = max(abs(a[k] - b[k]) / max(abs(b[k]), 1e-6) for a, b in zip(rows["$DEV"], rows["cpu"]) for k in ("loss", "grad_norm"))
print(json.dumps({"check": "$arch, 2k-token pairs, MPO + LD-DPO, checkpointing: GPU vs CPU", "max_rel_diff": worst, "ok": worst <= 1e-3}))
sys.exit(0 if worst <= 1e-3 and len(rows["cpu"]) == 5 else 1)
PY
done

echo "== (c) Qwen2.5-0.5B's shape, side by side (bf16)"
P init-model --arch qwen2 --size qwen2.5-0.5b --out m05
P synth-prefs --out long.parquet --rows "$ROWS" --conversational --long
P prepare --input long.parquet --model m05 --out prep05
# Runs "$@" while sampling the GPU's used memory (nvidia-smi, every 0.2 s); prints the peak above
# what was in use before it started: the same measure for ours and torch's (CUDA context and
# allocator pools included; torch's own max_memory_allocated is printed beside it). Container
# PIDs often differ from the ones nvidia-smi lists, so this does not filter by process.
peak() {
  [ "$DEV" = cpu ] && { "$@" || fail "$*"; return; }
  local used="nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits" base max=0 m
  base=$($used | head -1)
  "$@" & local pid=$!
  while kill -0 $pid 2>/dev/null; do
    m=$($used | head -1); [ "$m" -gt "$max" ] && max=$m; sleep 0.2
  done
  wait $pid || fail "$*"
  echo "  peak GPU memory: $(awk -v m=$((max - base)) 'BEGIN{printf "%.2f", m/1024}') GB (device-wide, above the $base MiB in use before)"
}
peak P --device $DEV cache-ref --prepared prep05 --model m05 --out cache05 --dtype bf16 --batch-tokens 16384
"$PY" -c "import json;s=json.load(open('cache05/manifest.json'))['stats'];print(json.dumps({'what':'pipeline cache-ref bf16 (packed)','tokens_per_s':s['tokens_per_s'],'padding':s['padding_fraction']}))"
peak G forward m05 prep05 --dtype bf16 --batch 8
peak P --device $DEV train --prepared prep05 --ref-cache cache05 --out train05 --dtype bf16 --max-steps "$STEPS" --batch-size "$BATCH" \
  --shuffle false --eval-every 0 --save-every 0
"$PY" -c "
import json,statistics
r=[json.loads(l) for l in open('train05/metrics.jsonl') if '\"loss\"' in l][1:]
print(json.dumps({'what':'pipeline train --dtype bf16, batch $BATCH','seconds_per_step':statistics.median(x['step_seconds'] for x in r)}))"
peak G dpo-step m05 prep05 --batch "$BATCH" --steps $((STEPS - 1)) --dtype $TORCH
echo "gpu-check: all checks passed"
