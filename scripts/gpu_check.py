"""The PyTorch side of scripts/gpu-check.sh, run with the GPU machine's own torch/transformers.

  logps MODEL PREPARED CACHE --dtype f32|bf16 --tol T
      transformers' log-probs of every prepared pair on the GPU vs `pipeline cache-ref`'s
      ref_logps.parquet; fails (exit 1) if the max |Δ| exceeds T.
  forward MODEL PREPARED --dtype bf16 --batch B
      transformers' forward (sdpa attention) over the same pairs, TRL-shaped: chosen and
      rejected as separate right-padded rows; prints tokens/s and peak GPU memory as JSON.
  dpo-step MODEL PREPARED --batch B --steps N
      a plain PyTorch bf16 DPO step (autocast forward+backward, AdamW on f32 weights) on the
      first B pairs; prints median seconds per step and peak GPU memory as JSON.
"""
import argparse
import json
import statistics
import sys
import time

import pyarrow.parquet as pq
import torch
from transformers import AutoModelForCausalLM

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16}


def pairs(prepared):
    rows = pq.read_table(f"{prepared}/pairs.parquet").to_pylist()
    return [(r["row_id"], r["prompt_ids"], r["chosen_ids"][: r["chosen_scored_tokens"]], r["rejected_ids"][: r["rejected_scored_tokens"]])
            for r in rows]


def batch_logps(model, seqs, dev):
    """Sum of completion-token log-probs for (prompt, completion) sequences, right-padded."""
    longest = max(len(p) + len(c) for p, c in seqs)
    ids = torch.zeros((len(seqs), longest), dtype=torch.long, device=dev)
    mask = torch.zeros_like(ids)
    for i, (p, c) in enumerate(seqs):
        ids[i, : len(p) + len(c)] = torch.tensor(p + c, device=dev)
        mask[i, : len(p) + len(c)] = 1
    logits = model(input_ids=ids, attention_mask=mask).logits.float()
    lp = torch.log_softmax(logits[:, :-1], -1).gather(2, ids[:, 1:, None])[..., 0]
    out = []
    for i, (p, c) in enumerate(seqs):
        out.append(lp[i, len(p) - 1 : len(p) + len(c) - 1].sum())
    return torch.stack(out), int(mask.sum()), ids.numel()


DEV = "cuda"  # --device cpu: the CPU rehearsal of scripts/gpu-check.sh


def load(model_dir, dtype, attn="sdpa"):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPES[dtype], attn_implementation=attn).to(DEV)


def sync():
    if DEV.startswith("cuda"):
        torch.cuda.synchronize()


def reset_peak():
    if DEV.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def peak_gb():
    return torch.cuda.max_memory_allocated() / 2**30 if DEV.startswith("cuda") else None


def cmd_logps(a):
    model = load(a.model, a.dtype, "eager").eval()
    ours = {r["row_id"]: r for r in pq.read_table(f"{a.cache}/ref_logps.parquet").to_pylist()}
    worst = 0.0
    with torch.inference_mode():
        for rid, p, c, r in pairs(a.prepared):
            lp, _, _ = batch_logps(model, [(p, c), (p, r)], DEV)
            worst = max(worst, abs(lp[0].item() - ours[rid]["ref_chosen_logps"]), abs(lp[1].item() - ours[rid]["ref_rejected_logps"]))
    ok = worst <= a.tol
    print(json.dumps({"check": f"cache-ref {a.dtype} vs transformers", "max_abs_diff": worst, "tolerance": a.tol, "ok": ok}))
    sys.exit(0 if ok else 1)


def cmd_forward(a):
    model = load(a.model, a.dtype).eval()
    ps = pairs(a.prepared)
    reset_peak()
    with torch.inference_mode():
        batch_logps(model, [(ps[0][1], ps[0][2])], DEV)  # warm-up
        sync()
        t, tokens, slots = time.perf_counter(), 0, 0
        for i in range(0, len(ps), a.batch):
            seqs = [(p, x) for _, p, c, r in ps[i : i + a.batch] for x in (c, r)]
            _, n, s = batch_logps(model, seqs, DEV)
            tokens, slots = tokens + n, slots + s
        sync()
        dt = time.perf_counter() - t
    print(json.dumps({"what": f"transformers {a.dtype} forward (sdpa)", "pairs": len(ps), "tokens_per_s": tokens / dt, "padding": 1 - tokens / slots,
                      "seconds": dt, "peak_gpu_gb": peak_gb()}))


def cmd_dpo_step(a):
    model = load(a.model, "f32").train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    ps = pairs(a.prepared)[: a.batch]
    seqs = [(p, x) for _, p, c, r in ps for x in (c, r)]
    ref = torch.zeros(len(seqs), device=DEV)
    times = []
    reset_peak()
    for _ in range(a.steps + 1):
        sync()
        t = time.perf_counter()
        with torch.autocast(DEV.split(":")[0], dtype=torch.bfloat16, enabled=a.dtype == "bf16"):
            lp, _, _ = batch_logps(model, seqs, DEV)
        d = (lp - ref).view(-1, 2)
        loss = -torch.nn.functional.logsigmoid(0.1 * (d[:, 0] - d[:, 1])).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - t)
    print(json.dumps({"what": f"PyTorch {a.dtype} {'autocast ' if a.dtype == 'bf16' else ''}DPO step (fwd+bwd+AdamW)", "pairs": len(ps), "seconds_per_step": statistics.median(times[1:]),
                      "peak_gpu_gb": peak_gb()}))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu (rehearsal)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("logps")
    s.add_argument("model"), s.add_argument("prepared"), s.add_argument("cache")
    s.add_argument("--dtype", default="f32", choices=DTYPES), s.add_argument("--tol", type=float, default=1e-3)
    s = sub.add_parser("forward")
    s.add_argument("model"), s.add_argument("prepared")
    s.add_argument("--dtype", default="bf16", choices=DTYPES), s.add_argument("--batch", type=int, default=8)
    s = sub.add_parser("dpo-step")
    s.add_argument("model"), s.add_argument("prepared")
    s.add_argument("--batch", type=int, default=4), s.add_argument("--steps", type=int, default=5)
    s.add_argument("--dtype", default="bf16", choices=DTYPES, help="bf16: autocast (f32 in the CPU rehearsal: CPU bf16 autocast is emulated, slow)")
    a = ap.parse_args()
    global DEV
    DEV = a.device
    if DEV.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("gpu_check.py: torch sees no CUDA device")
    {"logps": cmd_logps, "forward": cmd_forward, "dpo-step": cmd_dpo_step}[a.cmd](a)


if __name__ == "__main__":
    main()
