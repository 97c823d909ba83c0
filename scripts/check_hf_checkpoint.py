"""Checks that HF transformers loads a `pipeline train` checkpoint unchanged and computes the
same sequence log-probs our decoder logged, and that the trained policy prefers chosen answers.

Usage: python scripts/check_hf_checkpoint.py DEMO_DIR   (after `pipeline demo --dir DEMO_DIR`)
Needs torch, transformers, polars. Prints what it compared; exits non-zero on a mismatch.
"""
import sys
from pathlib import Path

import polars as pl
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def seq_logps(model, ids, n_prompt, n_scored):
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    lp = torch.log_softmax(logits, -1)
    return sum(float(lp[t - 1, ids[t]]) for t in range(n_prompt, n_prompt + n_scored))


def main(demo):
    demo = Path(demo)
    final = demo / "train" / "final"
    model = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    AutoTokenizer.from_pretrained(final)  # the tokenizer files load too
    ref = AutoModelForCausalLM.from_pretrained(demo / "model", dtype=torch.float32).eval()
    pairs = pl.read_parquet(demo / "prepared" / "pairs.parquet").filter(pl.col("split") == "eval").head(20)
    cache = pl.read_parquet(demo / "ref_cache" / "ref_logps.parquet")
    wins, worst = 0, 0.0
    for row in pairs.join(cache, on="row_id").iter_rows(named=True):
        p = row["prompt_ids"]
        rc = seq_logps(ref, p + row["chosen_ids"], len(p), row["chosen_scored_tokens"])
        worst = max(worst, abs(rc - row["ref_chosen_logps"]))
        c = seq_logps(model, p + row["chosen_ids"], len(p), row["chosen_scored_tokens"])
        r = seq_logps(model, p + row["rejected_ids"], len(p), row["rejected_scored_tokens"])
        rr = seq_logps(ref, p + row["rejected_ids"], len(p), row["rejected_scored_tokens"])
        wins += (c - rc) > (r - rr)
    print(f"transformers loaded {final}; reference log-probs vs our cache: max |diff| = {worst:.2e}")
    print(f"trained policy (through transformers) prefers chosen on {wins}/{len(pairs)} held-out pairs")
    assert worst < 1e-3 and wins >= 0.9 * len(pairs)


if __name__ == "__main__":
    main(sys.argv[1])
