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
#  (c) at Qwen2.5-0.5B's shape: cache-ref tokens/s vs transformers' bf16 forward (sdpa), train
#      s/step (--dtype bf16) vs a PyTorch bf16 DPO step, and the peak GPU memory of each.
set -euo pipefail
BIN=${1:?usage: gpu-check.sh PIPELINE_CUDA_BINARY[.zst] [WORKDIR]}
WORK=${2:-$(mktemp -d)}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
fail() { echo "gpu-check: FAILED: $*" >&2; exit 1; }
mkdir -p "$WORK"
case "$BIN" in
  *.zst) command -v zstd >/dev/null || "$PY" -c "import zstandard" 2>/dev/null || fail "no zstd to unpack $BIN"
         if command -v zstd >/dev/null; then zstd -dqf "$BIN" -o "$WORK/pipeline"; else
           "$PY" -c "import sys,zstandard;zstandard.ZstdDecompressor().copy_stream(open(sys.argv[1],'rb'),open(sys.argv[2],'wb'))" "$BIN" "$WORK/pipeline"; fi
         BIN="$WORK/pipeline";;
esac
chmod +x "$BIN"
"$PY" -c "import torch, transformers; assert torch.cuda.is_available()" 2>/dev/null || fail "$PY has no torch+transformers with a CUDA device"
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
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader

echo "== (a) cache-ref on the GPU vs transformers (tiny Llama, 48 pairs)"
P init-model --arch llama --size tiny --out tiny
P synth-prefs --out in.parquet --rows 48
P prepare --input in.parquet --model tiny --out prep
P --device cuda cache-ref --prepared prep --model tiny --out cache-f32
P --device cuda cache-ref --prepared prep --model tiny --out cache-bf16 --dtype bf16
"$PY" "$ROOT/scripts/gpu_check.py" logps tiny prep cache-f32 --dtype f32 --tol 1e-3 || fail "(a) f32 log-probs"
"$PY" "$ROOT/scripts/gpu_check.py" logps tiny prep cache-bf16 --dtype bf16 --tol 0.5 || fail "(a) bf16 log-probs"

echo "== (b) 20 train steps, GPU vs CPU (f32)"
for dev in cuda cpu; do
  P --device $dev train --prepared prep --ref-cache cache-f32 --out train-$dev --max-steps 20 --batch-size 4 --lr 1e-4 \
    --shuffle false --eval-every 0 --save-every 0
done
"$PY" - <<'PY' || fail "(b) GPU and CPU training differ"
import json, sys
rows = {d: [json.loads(l) for l in open(f"train-{d}/metrics.jsonl") if '"loss"' in l] for d in ("cuda", "cpu")}
worst = max(abs(a[k] - b[k]) / max(abs(b[k]), 1e-6) for a, b in zip(rows["cuda"], rows["cpu"]) for k in ("loss", "grad_norm"))
print(json.dumps({"check": "20 steps GPU vs CPU", "max_rel_diff": worst, "tolerance": 1e-3, "ok": worst <= 1e-3}))
sys.exit(0 if worst <= 1e-3 else 1)
PY

echo "== (c) Qwen2.5-0.5B's shape, side by side (bf16)"
P init-model --arch qwen2 --size qwen2.5-0.5b --out m05
P synth-prefs --out long.parquet --rows 256 --conversational --long
P prepare --input long.parquet --model m05 --out prep05
peak() { # runs "$@" while sampling this process tree's GPU memory; prints the peak in GB
  "$@" & local pid=$! max=0
  while kill -0 $pid 2>/dev/null; do
    m=$(nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits | awk -v p=$pid -F', ' '$1==p{print $2}')
    [ -n "$m" ] && [ "$m" -gt "$max" ] && max=$m; sleep 0.2
  done
  wait $pid || fail "$*"
  echo "peak GPU memory: $(awk -v m=$max 'BEGIN{printf "%.2f", m/1024}') GB"
}
peak P --device cuda cache-ref --prepared prep05 --model m05 --out cache05 --dtype bf16 --batch-tokens 16384
"$PY" -c "import json;s=json.load(open('cache05/manifest.json'))['stats'];print(json.dumps({'what':'pipeline cache-ref bf16 (packed)','tokens_per_s':s['tokens_per_s'],'padding':s['padding_fraction']}))"
"$PY" "$ROOT/scripts/gpu_check.py" forward m05 prep05 --dtype bf16 --batch 8
peak P --device cuda train --prepared prep05 --ref-cache cache05 --out train05 --dtype bf16 --max-steps 6 --batch-size 4 \
  --shuffle false --eval-every 0 --save-every 0
"$PY" -c "
import json,statistics
r=[json.loads(l) for l in open('train05/metrics.jsonl') if '\"loss\"' in l][1:]
print(json.dumps({'what':'pipeline train --dtype bf16, batch 4','seconds_per_step':statistics.median(x['step_seconds'] for x in r)}))"
"$PY" "$ROOT/scripts/gpu_check.py" dpo-step m05 prep05 --batch 4 --steps 5
echo "gpu-check: all checks passed"
