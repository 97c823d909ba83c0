#!/usr/bin/env bash
# Regenerates tests/golden/ from HF transformers + TRL for the generated tiny models.
# Needs: pip install torch transformers==5.23.0 trl==1.16.0 datasets pyarrow blake3
# (PYTHON=/path/to/python to pick an environment). Not run by CI: its outputs are committed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
cargo build -q
tmp=$(mktemp -d)
for arch in llama qwen2; do
  target/debug/pipeline init-model --arch "$arch" --size tiny --seed 0 --out "$tmp/$arch"
  target/debug/pipeline init-model --arch "$arch" --size tiny --seed 0 --reward --out "$tmp/rm_$arch"
done
"$PY" scripts/make_golden.py "$tmp"
"$PY" scripts/make_sample_golden.py "$tmp"  # last: it writes generation_config.json into the models
target/debug/pipeline synth-prefs --out "$tmp/trajectory.parquet" --rows 64 --seed 0
"$PY" scripts/make_trajectory_golden.py "$tmp/llama" "$tmp/trajectory.parquet"
target/debug/pipeline synth-prefs --out "$tmp/conv.parquet" --rows 64 --seed 0 --conversational
"$PY" scripts/make_kto_golden.py "$tmp/llama" "$tmp/trajectory.parquet" "$tmp/conv.parquet"  # KTOTrainer
rm -rf "$tmp"
"$PY" scripts/make_loss_golden.py                          # every TRL loss on fixed log-probs
"$PY" scripts/make_family_golden.py target/debug/pipeline  # every model family (+ PEFT adapters)
"$PY" scripts/make_attention_golden.py                     # fused attention vs torch SDPA
"$PY" scripts/make_optim_golden.py                         # AdamW, schedules
# Tokenizer classes and real templates (tests/fixtures/real-tokenizers).
"$PY" scripts/make_tokenizer_golden.py
