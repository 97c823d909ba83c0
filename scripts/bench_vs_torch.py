"""Our pipeline against HF transformers / TRL on CPU: the same model, the same pairs, the same threads.

Not run by CI. Make a model with Qwen2.5-0.5B's shape and some data, then run it:

    pipeline init-model --arch qwen2 --size qwen2.5-0.5b --out m05
    pipeline synth-prefs --out in.parquet --rows 40 --conversational     # add --long for realistic lengths
    pipeline prepare --input in.parquet --model m05 --out prep05
    python scripts/bench_vs_torch.py m05 prep05 --threads 2 [--pipeline target/release/pipeline]

Every pair in PREPARED is used (prepare exactly the pairs you want to measure). Each measurement
runs in its own process, one after another, so each has its own peak RSS (wait4 in a launcher):
  1. ours: `pipeline cache-ref` over every pair: pairs/s, tokens/s, padding, from its manifest
     (the forward loop only, model load excluded), and the process's wall time;
  2. transformers: f32, sdpa, eval + inference_mode; TRL-shaped batches of --fwd-batch pairs, each
     2·B right-padded rows (prompt+chosen, prompt+rejected) with an attention mask; the summed
     log-probs of the scored completion tokens (log_softmax in f32), checked against step 1's cache;
  3. ours: `pipeline train --max-steps S+1 --batch-size B --shuffle false`, median step_seconds after
     the first step;
  4. TRL DPOTrainer: f32 (bf16 off: TRL defaults it on; gradient checkpointing as --gradient-checkpointing says), batch B,
     train pairs in row order, our token ids as they are (no truncation), and our cached reference
     log-probs as its precomputed `ref_chosen_logps`/`ref_rejected_logps` columns, so no reference
     model runs; lr 1e-5, linear decay over S+1 steps as ours; median optimizer-step time after the
     first (TrainerCallback on_step_begin/on_step_end, batch collation excluded).
With --qlora every step runs over the base quantized on load to 4 bits (NF4, double quantization,
f32 compute: ours `--load-in-4bit --bnb-4bit-use-double-quant`, theirs transformers'
BitsAndBytesConfig with bitsandbytes' CPU backend) and trains a LoRA adapter (r 16, α 32, every
linear layer; PEFT's LoraConfig for TRL, which then casts the adapter to bf16 as it does for every
4-bit model).
With --bf16 both sides compute in bf16: ours `--dtype bf16` (cache-ref: bf16 weights and
activations; train: bf16 matmuls over f32 master weights), transformers' forward with
dtype=bfloat16, TRL with bf16=True over an f32 model (its default: autocast).
With --gradient-checkpointing both (or on), steps 3 and 4 run with it off and on (ours:
`--gradient-checkpointing`; TRL: its default `gradient_checkpointing=True`). A measurement that
runs out of memory is reported as such instead of stopping the run.
Tokens/s are the tokens each side computes (ours packed: every prompt once; TRL-shaped: twice), so
pairs/s and s/step are the like-for-like ratios. Ratios > 1 mean ours is better.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq


def fail(msg):
    sys.exit(f"bench_vs_torch: {msg}")


def load_pairs(prepared, split=None):
    """Pairs in row_id order, completions cut to their scored tokens (what max_length kept)."""
    path = Path(prepared) / "pairs.parquet"
    if not path.exists():
        fail(f"{path} not found: PREPARED must be the output of `pipeline prepare`")
    rows = sorted(pq.read_table(path).to_pylist(), key=lambda r: r["row_id"])
    return [{"row_id": r["row_id"], "prompt_ids": r["prompt_ids"], "chosen_ids": r["chosen_ids"][: r["chosen_scored_tokens"]],
             "rejected_ids": r["rejected_ids"][: r["rejected_scored_tokens"]]} for r in rows if split is None or r["split"] == split]


# Linux carries a process's RSS high-water mark across fork and exec, so a child forked from this
# (large) Python process would report at least our own RSS. A tiny launcher forks the command
# instead and reports that grandchild's own peak from wait4.
LAUNCHER = """import os, sys
pid = os.fork()
if pid == 0:
    try:
        os.execvp(sys.argv[2], sys.argv[2:])
    finally:
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
open(sys.argv[1], "w").write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


class OutOfMemory(Exception):
    pass


def run(cmd, what, env=None):
    """Runs cmd to completion; returns (stdout, wall seconds, peak RSS in GB of that process alone);
    raises OutOfMemory when the kernel killed it (SIGKILL)."""
    cmd = [str(c) for c in cmd]
    with tempfile.TemporaryDirectory() as tmp:
        rss_file = Path(tmp) / "maxrss"
        t = time.perf_counter()
        r = subprocess.run([sys.executable, "-S", "-c", LAUNCHER, str(rss_file), *cmd], capture_output=True, text=True, env=env)
        wall = time.perf_counter() - t
        if r.returncode in (-9, 137, 247) or "MemoryError" in (r.stderr or "") or "out of memory" in (r.stderr or "").lower():
            raise OutOfMemory(what)
        if r.returncode != 0:
            why = "cannot start it" if r.returncode == 127 else f"exit {r.returncode}"
            fail(f"{what} failed ({why}): {' '.join(cmd)}\n{(r.stderr or r.stdout)[-3000:]}")
        return r.stdout, wall, int(rss_file.read_text()) / 2**20


# ---- child processes: one measurement each, printed as one JSON line ----

def load_model(a):
    """transformers' model in f32, or with --qlora its 4-bit quantization (NF4, double quant)."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32) if a.qlora else None
    dtype = torch.bfloat16 if a.bf16 and a.child == "forward" else torch.float32
    return AutoModelForCausalLM.from_pretrained(a.model, dtype=dtype, attn_implementation="sdpa", quantization_config=quant)


def child_forward(a):
    import torch
    torch.set_num_threads(a.threads)
    model = load_model(a).eval()
    pairs, logps, tokens, slots = load_pairs(a.prepared), {}, 0, 0
    t = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(pairs), a.fwd_batch):
            rows = [(p, p["prompt_ids"] + p[k]) for p in pairs[i : i + a.fwd_batch] for k in ("chosen_ids", "rejected_ids")]
            n = max(len(s) for _, s in rows)
            ids = torch.tensor([s + [0] * (n - len(s)) for _, s in rows])
            mask = torch.tensor([[1] * len(s) + [0] * (n - len(s)) for _, s in rows])
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            for j, (p, s) in enumerate(rows):
                lo, hi = len(p["prompt_ids"]), len(s)  # token k is predicted by position k-1
                lp = logits[j, lo - 1 : hi - 1].float().log_softmax(-1).gather(-1, ids[j, lo:hi, None]).sum().item()
                logps.setdefault(p["row_id"], []).append(lp)
            tokens, slots = tokens + int(mask.sum()), slots + mask.numel()
    dt = time.perf_counter() - t
    return {"pairs": len(pairs), "seconds": dt, "tokens_per_s": tokens / dt, "pairs_per_s": len(pairs) / dt,
            "padding": 1 - tokens / slots, "logps": {str(k): v for k, v in logps.items()}}


def child_trl(a):
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer
    torch.set_num_threads(a.threads)
    ref = {r["row_id"]: r for r in pq.read_table(Path(a.cache) / "ref_logps.parquet").to_pylist()}
    rows = [{"prompt_ids": p["prompt_ids"], "chosen_ids": p["chosen_ids"], "rejected_ids": p["rejected_ids"],
             "ref_chosen_logps": ref[p["row_id"]]["ref_chosen_logps"], "ref_rejected_logps": ref[p["row_id"]]["ref_rejected_logps"]}
            for p in load_pairs(a.prepared, "train")]

    class Trainer(DPOTrainer):
        """Takes our token ids and reference log-probs as they are, rows in order."""

        def _prepare_dataset(self, dataset, *args, **kwargs):  # TRL 1.16 would re-tokenize text columns
            return dataset

        def _precompute_ref_logps(self, dataset, *args, **kwargs):  # the ref columns are already there
            return dataset

        def _get_train_sampler(self, *args, **kwargs):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    times = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *args, **kwargs):
            self.t = time.perf_counter()

        def on_step_end(self, *args, **kwargs):
            times.append(time.perf_counter() - self.t)

    model = load_model(a)
    peft = None
    if a.qlora:
        from peft import LoraConfig
        peft = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    with tempfile.TemporaryDirectory() as tmp:
        args = DPOConfig(output_dir=tmp, per_device_train_batch_size=a.train_batch, gradient_accumulation_steps=1, max_steps=a.steps + 1,
                         learning_rate=1e-5, lr_scheduler_type="linear", warmup_steps=0, beta=0.1, max_grad_norm=1.0, max_length=None,
                         precompute_ref_log_probs=True, bf16=a.bf16, gradient_checkpointing=a.trl_gc, use_cpu=True, report_to=[],
                         save_strategy="no", logging_steps=1, dataset_num_proc=None, dataloader_num_workers=0, seed=0)
        trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_list(rows), peft_config=peft,
                          processing_class=AutoTokenizer.from_pretrained(a.model), callbacks=[Clock()])
        trainer.train()
    logs = [l for l in trainer.state.log_history if "loss" in l and "logps/chosen" in l]
    return {"step_seconds": times, "loss": [l["loss"] for l in logs], "logps_chosen": [l["logps/chosen"] for l in logs]}


# ---- the parent: runs everything in order, prints the table ----

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model"), ap.add_argument("prepared")
    ap.add_argument("--pipeline", default=str(Path(__file__).resolve().parent.parent / "target/release/pipeline"))
    ap.add_argument("--fwd-batch", type=int, default=8, help="pairs per transformers forward batch (default 8)")
    ap.add_argument("--train-batch", type=int, default=4, help="pairs per training step, both sides (default 4)")
    ap.add_argument("--steps", type=int, default=4, help="timed steps; one more runs first as warm-up (default 4)")
    ap.add_argument("--threads", type=int, default=2, help="threads for every measurement (default 2)")
    ap.add_argument("--layout", help="our --layout for cache-ref and train (default: the binary's)")
    ap.add_argument("--only", choices=["forward", "train"], help="measure only the forward or only the train step")
    ap.add_argument("--gradient-checkpointing", choices=["off", "on", "both"], default="off",
                    help="train steps with gradient checkpointing off, on, or each way (default off)")
    ap.add_argument("--bf16", action="store_true", help="compute in bf16, both sides (see above)")
    ap.add_argument("--qlora", action="store_true", help="4-bit base (NF4, double quant) and a LoRA adapter, both sides (see above)")
    ap.add_argument("--work", help="keep our outputs here (default: a temporary directory)")
    ap.add_argument("--child", choices=["forward", "trl"], help=argparse.SUPPRESS)
    ap.add_argument("--cache", help=argparse.SUPPRESS)
    ap.add_argument("--trl-gc", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child_forward(a) if a.child == "forward" else child_trl(a)))
        return
    for d, f in ((a.model, "config.json"), (a.model, "model.safetensors"), (a.prepared, "pairs.parquet")):
        if not (Path(d) / f).exists():
            fail(f"{Path(d) / f} not found")
    if not os.access(a.pipeline, os.X_OK):
        fail(f"no pipeline binary at {a.pipeline} (build it with `cargo build --release` or pass --pipeline)")
    n_train = len(load_pairs(a.prepared, "train"))
    if a.only != "forward" and n_train == 0:
        fail(f"{a.prepared} has no train pairs")
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "MKL_NUM_THREADS": str(a.threads), "RAYON_NUM_THREADS": str(a.threads),
           "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    tmp = tempfile.TemporaryDirectory() if a.work is None else None
    work = Path(a.work or tmp.name)
    cache, train = work / "cache", work / "train"
    ours = [a.pipeline, "--threads", str(a.threads)]
    layout = ["--layout", a.layout] if a.layout else []
    me = [sys.executable, __file__, a.model, a.prepared, "--cache", str(cache), "--threads", str(a.threads), "--steps", str(a.steps),
          "--fwd-batch", str(a.fwd_batch), "--train-batch", str(a.train_batch)] + (["--qlora"] if a.qlora else []) + (["--bf16"] if a.bf16 else [])
    bf16 = ["--dtype", "bf16"] if a.bf16 else []
    four_bit = ["--load-in-4bit", "--bnb-4bit-use-double-quant"] if a.qlora else []
    lora = [*four_bit, "--lora-r", "16", "--lora-alpha", "32", "--lora-targets", "all-linear"] if a.qlora else []
    rows = []  # (what, ours, theirs, ratio or None, format); nan: ran out of memory
    agree = []

    print(f"[1/4] ours: cache-ref ...", flush=True)
    _, c_wall, c_rss = run([*ours, "cache-ref", "--prepared", a.prepared, "--model", a.model, "--out", cache, "--force", *layout, *four_bit, *bf16],
                           "pipeline cache-ref", env)
    man = json.loads((cache / "manifest.json").read_text())
    stats, n_pairs = man["stats"], man["counts"]["pairs"]
    our_layout = stats.get("layout", a.layout or "?")

    if a.only != "train":
        print(f"[2/4] transformers forward ...", flush=True)
        out, _, f_rss = run([*me, "--child", "forward"], "transformers forward", env)
        fwd = json.loads(out.strip().splitlines()[-1])
        ref = {r["row_id"]: (r["ref_chosen_logps"], r["ref_rejected_logps"]) for r in pq.read_table(cache / "ref_logps.parquet").to_pylist()}
        if fwd["pairs"] != n_pairs or set(map(int, fwd["logps"])) != set(ref):
            fail(f"cache-ref scored {n_pairs} pairs, transformers {fwd['pairs']}: not the same pairs")
        diffs = [(abs(x - y), abs(y)) for rid, v in fwd["logps"].items() for x, y in zip(v, ref[int(rid)])]
        worst, rel = max(d for d, _ in diffs), max(d / max(y, 1e-9) for d, y in diffs)
        c_s = stats["tokens_this_run"] / stats["tokens_per_s"]
        rows += [("forward pairs/s", stats["pairs_per_s"], fwd["pairs_per_s"], stats["pairs_per_s"] / fwd["pairs_per_s"], ".2f"),
                 ("forward tokens/s (as computed)", stats["tokens_per_s"], fwd["tokens_per_s"], stats["tokens_per_s"] / fwd["tokens_per_s"], ".0f"),
                 ("forward padding", stats["padding_fraction"], fwd["padding"], None, ".1%"),
                 ("forward loop s", c_s, fwd["seconds"], fwd["seconds"] / c_s, ".3f"),
                 ("forward peak RSS GB", c_rss, f_rss, f_rss / c_rss, ".3f")]

    if a.only != "forward":
        gcs = {"off": [False], "on": [True], "both": [False, True]}[a.gradient_checkpointing]
        for gc in gcs:
            tag = " (grad. ckpt.)" if gc else ""
            print(f"[3/4] ours: train{tag} ...", flush=True)
            out_dir = work / ("train-gc" if gc else "train")
            try:
                _, _, t_rss = run([*ours, "train", "--prepared", a.prepared, "--ref-cache", cache, "--out", out_dir, "--force", "--max-steps", str(a.steps + 1),
                                   "--batch-size", str(a.train_batch), "--shuffle", "false", "--eval-every", "0", "--save-every", "0", "--lr", "1e-5",
                                   "--gradient-checkpointing", str(gc).lower(), *layout, *lora, *bf16, "--model", a.model], "pipeline train", env)
                metrics = [json.loads(l) for l in (out_dir / "metrics.jsonl").read_text().splitlines() if '"step_seconds"' in l]
                if len(metrics) != a.steps + 1:
                    fail(f"pipeline train logged {len(metrics)} steps, expected {a.steps + 1}")
                ours_s = statistics.median(m["step_seconds"] for m in metrics[1:])
            except OutOfMemory:
                metrics, ours_s, t_rss = None, float("nan"), float("nan")
            print(f"[4/4] TRL DPOTrainer{tag} ...", flush=True)
            try:
                out, _, trl_rss = run([*me, "--child", "trl"] + (["--trl-gc"] if gc else []), "TRL DPOTrainer", env)
                trl = json.loads(out.strip().splitlines()[-1])
                if len(trl["step_seconds"]) != a.steps + 1:
                    fail(f"TRL ran {len(trl['step_seconds'])} steps, expected {a.steps + 1}")
                trl_s = statistics.median(trl["step_seconds"][1:])
            except OutOfMemory:
                trl, trl_s, trl_rss = None, float("nan"), float("nan")
            if metrics and trl:
                d_loss = max(abs(m["loss"] - x) for m, x in zip(metrics, trl["loss"]))
                d_logp = max(abs(m["logps/chosen"] - x) for m, x in zip(metrics, trl["logps_chosen"]))
                agree.append(f"train{tag}, ours vs TRL over {a.steps + 1} steps: max |diff| loss {d_loss:.2e}, logps/chosen {d_logp:.2e}")
            rows += [(f"train s/step{tag} (median of {a.steps})", ours_s, trl_s, trl_s / ours_s, ".4f"),
                     (f"train peak RSS GB{tag}", t_rss, trl_rss, trl_rss / t_rss, ".3f")]

    print(f"\n{a.model} + {a.prepared}: {n_pairs} pairs ({n_train} train), {a.threads} threads, forward batch {a.fwd_batch} pairs,"
          f" train batch {a.train_batch}, CPU {'bf16' if a.bf16 else 'f32'}{', QLoRA (nf4 + double quant, LoRA r 16 all-linear)' if a.qlora else ''}, our layout {our_layout}")
    print(f"{'':44}{'ours':>12}{'HF/TRL':>12}{'ratio':>9}   (ratio > 1: ours better)")
    for what, x, y, r, f in rows:
        print(f"{what:44}{x:>12{f}}{y:>12{f}}{'' if r is None or r != r else f'{r:.2f}x':>9}")
    if a.only != "train":
        print(f"log-probs, transformers vs our cache, {2 * n_pairs} sequences: max |diff| {worst:.2e} (relative {rel:.1e})")
        print(f"our cache-ref process wall, model load included: {c_wall:.2f} s")
    for line in agree:
        print(line)
    print("(nan: that run ran out of memory)")
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
