"""Our KTO step against TRL 1.16's KTOTrainer on CPU: the same model, unpaired rows and threads.

Not run by CI. Make a model and unpaired data (here TRL's own unpairing of synthetic pairs), then:

    pipeline init-model --arch qwen2 --size qwen2.5-0.5b --out m05
    pipeline synth-prefs --out pairs.parquet --rows 16 --conversational
    python scripts/bench_kto_vs_trl.py m05 pairs.parquet --threads 2 [--bf16]

Each side runs in its own process, one after the other, so each has its own peak RSS:
  1. ours: `prepare --unpair`, `cache-ref --kl-batch-size B` (the reference over every completion
     and KL completion, timed), `train --loss kto --batch-size B --shuffle false` for S+1 steps:
     median step_seconds after the first;
  2. TRL: KTOTrainer on the same pairs (it unpairs them itself, and tokenizes as ours: the test
     suite checks the ids are equal), precompute_ref_log_probs=True (the reference pass before
     training, timed), batch B, f32 (bf16=False; --bf16: bf16=True, as TRL's default, and ours
     --dtype bf16), gradient checkpointing off both sides, sequential rows; the median
     optimizer-step time after the first (TrainerCallback on_step_begin/on_step_end).
Both sides compute the KL completions: TRL a second no-grad forward per step, ours in the same
packed forward as the completions (sharing each prompt). Ratios > 1 mean ours is faster.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_vs_torch import run  # noqa: E402  (a process with its own peak RSS)


def child_trl(a):
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import KTOConfig, KTOTrainer
    torch.set_num_threads(a.threads)
    times = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *args, **kwargs):
            self.t = time.perf_counter()

        def on_step_end(self, *args, **kwargs):
            times.append(time.perf_counter() - self.t)

    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32, attn_implementation="sdpa")
    with tempfile.TemporaryDirectory() as tmp:
        args = KTOConfig(output_dir=tmp, per_device_train_batch_size=a.batch, max_steps=a.steps + 1, learning_rate=1e-5,
                         lr_scheduler_type="linear", warmup_steps=0, max_length=1024, precompute_ref_log_probs=True,
                         bf16=a.bf16, gradient_checkpointing=False, use_cpu=True, report_to=[], save_strategy="no",
                         logging_steps=1, dataloader_num_workers=0, seed=0)
        t = time.perf_counter()
        trainer = KTOTrainer(model=model, args=args, train_dataset=Dataset.from_parquet(a.pairs),
                             processing_class=AutoTokenizer.from_pretrained(a.model), callbacks=[Clock()])
        init_s = time.perf_counter() - t  # tokenizing, and (precompute_ref_log_probs) the reference pass
        t = time.perf_counter()
        trainer.get_train_dataloader()
        ref_s = init_s + time.perf_counter() - t
        trainer.train()
    logs = [l for l in trainer.state.log_history if "loss" in l and "kl" in l]
    return {"step_seconds": times, "ref_seconds": ref_s, "loss": [l["loss"] for l in logs]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model"), ap.add_argument("pairs")
    ap.add_argument("--pipeline", default=str(Path(__file__).resolve().parent.parent / "target/release/pipeline"))
    ap.add_argument("--batch", type=int, default=4, help="rows per step (= KL block), both sides (default 4)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps; one more runs first as warm-up (default 3)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bf16", action="store_true", help="ours --dtype bf16, TRL bf16=True")
    ap.add_argument("--child", choices=["trl"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child_trl(a)))
        return
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), RAYON_NUM_THREADS=str(a.threads))
    P, B, S = a.pipeline, str(a.batch), str(a.steps + 1)
    dt = ["--dtype", "bf16"] if a.bf16 else []
    with tempfile.TemporaryDirectory() as w:
        run([P, "prepare", "--input", a.pairs, "--model", a.model, "--out", f"{w}/prep", "--unpair"], "prepare", env)
        _, ref_wall, ref_rss = run([P, "cache-ref", "--prepared", f"{w}/prep", "--model", a.model, "--out", f"{w}/cache",
                                    "--kl-batch-size", B, "--threads", str(a.threads), *dt], "cache-ref", env)
        m = json.load(open(f"{w}/cache/manifest.json"))
        ref_s = m["counts"]["pairs"] / m["stats"]["pairs_per_s"]  # the forward loop alone
        _, _, train_rss = run([P, "train", "--prepared", f"{w}/prep", "--ref-cache", f"{w}/cache", "--out", f"{w}/t", "--loss", "kto",
                               "--batch-size", B, "--max-steps", S, "--shuffle", "false", "--eval-every", "0", "--save-every", "0",
                               "--lr", "1e-5", "--threads", str(a.threads), *dt], "train", env)
        rows = [json.loads(l) for l in open(f"{w}/t/metrics.jsonl") if '"step_seconds"' in l]
        ours = statistics.median(r["step_seconds"] for r in rows[1:])
    out, _, trl_rss = run([sys.executable, __file__, a.model, a.pairs, "--child", "trl", "--batch", B, "--steps", str(a.steps),
                           "--threads", str(a.threads)] + (["--bf16"] if a.bf16 else []), "TRL KTOTrainer", env)
    trl = json.loads(out.strip().splitlines()[-1])
    theirs = statistics.median(trl["step_seconds"][1:])
    print(f"KTO step, batch {B} ({'bf16' if a.bf16 else 'f32'}, {a.threads} threads): ours {ours:.2f} s, TRL {theirs:.2f} s -> {theirs / ours:.2f}x;"
          f" peak RSS {train_rss:.2f} vs {trl_rss:.2f} GB")
    print(f"reference pass over every completion and KL completion: ours {ref_s:.2f} s (process {ref_wall:.1f} s, {ref_rss:.2f} GB),"
          f" TRL's precompute (with its tokenizing) {trl['ref_seconds']:.2f} s -> {trl['ref_seconds'] / ref_s:.2f}x")


if __name__ == "__main__":
    main()
