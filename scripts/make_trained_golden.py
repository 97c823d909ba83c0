"""A small trained model and its log-probs against an exact reference (tests/model.rs).

Random models at the usual 0.02 init have nearly flat logits; trained ones put most of the
probability on few tokens, and there a biased log-sum-exp shows as an error with one sign on
every sequence. So this script trains one: a 2-layer Llama (hidden 128, rope theta 1e5,
RMSNorm eps 1e-5, tied embeddings) on the project's synthetic text with the 8,000-token
tokenizer of `pipeline init-model --size small`, 400 AdamW steps on the CPU, saved in bfloat16 as
real checkpoints ship, into tests/fixtures/trained-llama/ (~2.8 MB). Then, for held-out texts,
each sequence's per-token log-probs three ways:

  - exact: transformers with every op in float64 (sdpa attention, the weights widened from
    bfloat16 exactly) and the log-softmax in float64: what the test holds our float32 values to;
  - f32_log_softmax: transformers in float32 with `torch.log_softmax` in float32 (what the
    other golden files use);
  - f32_logsumexp: float32 logits, `gather − logsumexp` (TRL's `selective_log_softmax`).

Finding (printed at the end): PyTorch's float32 CPU `log_softmax` runs high against exact
arithmetic, with one sign, growing with the vocabulary and the logits' spread (+1e-6 nats a token
here, +3e-6 at 49,152 entries and a logit std of 5); ours is unbiased. That is why our log-probs
came out "lower than transformers' on every sequence" of a real model.

Run from the repo root: python scripts/make_trained_golden.py target/debug/pipeline
Needs: pip install torch transformers==5.23.0 polars blake3
"""
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import blake3
import numpy as np
import polars as pl
import torch
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "tests" / "fixtures" / "trained-llama"
OUT = ROOT / "tests" / "golden" / "hf_logps_trained_llama.json"
STEPS, SEQ, BATCH = 400, 256, 8


def per_token(logp_rows, ids):
    return [float(logp_rows[j - 1, ids[j]]) for j in range(1, len(ids))]


def train(pipeline, tmp):
    subprocess.run([pipeline, "init-model", "--arch", "llama", "--size", "small", "--seed", "0", "--out", str(tmp / "src")], check=True)
    subprocess.run([pipeline, "synth-prefs", "--out", str(tmp / "text.parquet"), "--rows", "3000", "--eval-rows", "64", "--long"], check=True)
    tok = Tokenizer.from_file(str(tmp / "src" / "tokenizer.json"))
    df = pl.read_parquet(tmp / "text.parquet")
    flat = torch.tensor([i for p, c in zip(df["prompt"], df["chosen"]) for i in tok.encode(p + c).ids])
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=64, rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True,
                      max_position_embeddings=2048, bos_token_id=tok.token_to_id("<s>"), eos_token_id=tok.token_to_id("</s>"))
    model = LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for step in range(STEPS):
        for g in opt.param_groups:
            g["lr"] = 3e-3 * 0.5 * (1 + math.cos(math.pi * step / STEPS))
        starts = torch.randint(0, len(flat) - SEQ - 1, (BATCH,))
        x = torch.stack([flat[s:s + SEQ] for s in starts])
        loss = model(x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    print(f"trained {STEPS} steps: loss {loss.item():.3f}")
    model.to(torch.bfloat16).save_pretrained(MODEL)
    for f in ["tokenizer.json", "tokenizer_config.json"]:
        (MODEL / f).write_bytes((tmp / "src" / f).read_bytes())
    return tok, pl.read_parquet(tmp / "text.eval.parquet")


def main(pipeline):
    with tempfile.TemporaryDirectory() as tmp:
        tok, evals = train(pipeline, Path(tmp))
    exact_model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float64, attn_implementation="sdpa").eval()
    f32_model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32, attn_implementation="sdpa").eval()
    seqs = []
    with torch.no_grad():
        for p, c in list(zip(evals["prompt"], evals["chosen"]))[:32]:
            ids = tok.encode(p + c).ids
            x = torch.tensor([ids])
            z = f32_model(x).logits[0].float()
            seqs.append({
                "ids": ids,
                "exact": per_token(torch.log_softmax(exact_model(x).logits[0], -1), ids),
                "f32_log_softmax": per_token(torch.log_softmax(z, -1), ids),
                "f32_logsumexp": per_token(z - torch.logsumexp(z, -1, keepdim=True), ids),
            })
    for way in ("f32_log_softmax", "f32_logsumexp"):
        err = [np.array(s[way]) - np.array(s["exact"]) for s in seqs]
        pos = sum(e.sum() > 0 for e in err)
        flat = np.concatenate(err)
        print(f"{way} - exact: {flat.mean():+.2e} nats/token (rms {np.sqrt((flat ** 2).mean()):.1e}), higher on {pos}/{len(err)} sequences")
    for s in seqs:
        del s["f32_logsumexp"]  # printed above; the test reads `exact` and `f32_log_softmax`
    ident = {"weights_blake3": blake3.blake3((MODEL / "model.safetensors").read_bytes()).hexdigest()}
    OUT.write_text(json.dumps({**ident, "sequences": seqs}) + "\n")
    print(f"wrote {MODEL} and {OUT}")


if __name__ == "__main__":
    main(sys.argv[1])
