"""Sampling speed side by side: `pipeline sample` (batched decoding with its key-value cache) vs
transformers' `generate` on the same model, prompts, samples per prompt and threads.

    python scripts/bench_sample_vs_torch.py MODEL_DIR PROMPTS.parquet [--pipeline target/release/pipeline]
        [--threads 2] [--num-samples 4] [--max-new-tokens 32] [--batch 32] [--bf16]

Both sample at temperature 1 with no top-k/top-p (transformers' default top_k=50 is turned off),
f32 (with --bf16 both in bf16: ours `--dtype bf16`, transformers dtype=torch.bfloat16), from the same token ids (plain prompts tokenized as `pipeline sample` does). transformers
runs `--batch` prompts per `generate` call (left-padded, num_return_sequences = samples per
prompt, sdpa attention, its default dynamic cache); ours decodes every prompt's samples at once
within --batch-tokens. Each side's tokens/s counts the tokens it generated (up to and including
an end-of-sequence token), divided by the wall time of generation including prefill (model
loading excluded on both sides). Prints one table.
"""
import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

import polars as pl
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def ours(args, tmp):
    out = Path(tmp) / "samples"
    cmd = [args.pipeline, "--threads", str(args.threads), "sample", "--model", args.model, "--prompts", args.prompts, "--out", str(out),
           "--num-samples", str(args.num_samples), "--max-new-tokens", str(args.max_new_tokens), "--temperature", "1", "--force"] + (["--dtype", "bf16"] if args.bf16 else [])
    t = time.time()
    subprocess.run(cmd, check=True, capture_output=True)
    wall = time.time() - t
    m = json.loads((out / "manifest.json").read_text())
    return {"tokens": m["counts"]["tokens"], "tokens_per_s": m["stats"]["tokens_per_s"], "process_wall_s": wall}


def theirs(args):
    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(args.model)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16 if args.bf16 else torch.float32, attn_implementation="sdpa").eval()
    prompts = pl.read_parquet(args.prompts)["prompt"].to_list()
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos]) | {tok.eos_token_id}
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    tokens, t = 0, time.time()
    for i in range(0, len(prompts), args.batch):
        enc = tok(prompts[i:i + args.batch], return_tensors="pt", padding=True)
        with torch.no_grad():
            g = model.generate(**enc, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=args.max_new_tokens,
                               num_return_sequences=args.num_samples, pad_token_id=pad)
        for row in g[:, enc["input_ids"].shape[1]:].tolist():
            n = 0
            for x in row:
                n += 1
                if x in eos:
                    break
            tokens += n
    wall = time.time() - t
    return {"tokens": tokens, "tokens_per_s": tokens / wall}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("prompts")
    p.add_argument("--pipeline", default="target/release/pipeline")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--num-samples", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--bf16", action="store_true", help="both sides in bf16")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        a = ours(args, tmp)
    b = theirs(args)
    print(f"model {args.model}, {args.prompts}, {args.num_samples} samples/prompt, max {args.max_new_tokens} new tokens, {args.threads} threads, "
          f"{'bf16' if args.bf16 else 'f32'}")
    print(f"{'':<28}{'tokens':>10}{'tokens/s':>12}")
    print(f"{'pipeline sample':<28}{a['tokens']:>10}{a['tokens_per_s']:>12.1f}")
    print(f"{'transformers generate':<28}{b['tokens']:>10}{b['tokens_per_s']:>12.1f}")
    print(f"ratio (ours / transformers): {a['tokens_per_s'] / b['tokens_per_s']:.2f}x")


if __name__ == "__main__":
    main()
