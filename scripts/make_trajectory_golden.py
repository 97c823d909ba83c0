"""A 16-step DPO trajectory from HF TRL 1.16's DPOTrainer, for tests/train.rs to match.

Run via scripts/make_golden.sh (it builds the tiny models and the data with `pipeline`).
Settings: tiny llama (init-model seed 0), 64 synthetic rows (synth-prefs seed 0), max_length 64,
β 0.1, lr 1e-3 linear to 0, batch 4, no shuffling (sequential sampler), no clipping: TRL's
max_grad_norm is huge so clip_grad_norm_ still computes and logs grad_norm but never scales
(ours: --max-grad-norm 0). Writes tests/golden/trl_trajectory_llama.json with the inputs'
blake3 so the Rust test can tell stale golden values from a wrong result.

Two trajectories: `steps` from TRL's DPOTrainer, and `autograd_steps` from a plain PyTorch loop
(the same tokenized rows, −log σ(βΔ) by autograd, torch.optim.AdamW, the same linear schedule).
TRL 1.16 calls the model with `fused_lm_head=True`; its gradients come out 0.15–0.3% below plain
autograd's while the log-probs agree to 1e-5, so the tight check is against `autograd_steps`.
"""
import json
import sys
import tempfile
from pathlib import Path

import blake3
import pyarrow.parquet as pq
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer

OUT = Path(__file__).resolve().parent.parent / "tests" / "golden" / "trl_trajectory_llama.json"
SETTINGS = {"beta": 0.1, "lr": 1e-3, "batch_size": 4, "max_steps": 16, "max_length": 64}
KEYS = ["loss", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected"]


def h(path):
    return blake3.blake3(Path(path).read_bytes()).hexdigest()


class SequentialDPOTrainer(DPOTrainer):
    """Rows in dataset order, as `pipeline train --shuffle false`."""

    def _get_train_sampler(self, *args, **kwargs):
        return torch.utils.data.SequentialSampler(self.train_dataset)


def autograd_steps(model_dir, rows):
    """The same run as a plain PyTorch loop: sequential batches, exact autograd, no clipping."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    return autograd_loop(model, ref, rows)


def autograd_loop(model, ref, rows):
    """DPO by plain autograd on `model`'s trainable parameters against the frozen `ref`."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=SETTINGS["lr"], betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    total = SETTINGS["max_steps"]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, (total - s) / total))
    beta, bs, max_len = SETTINGS["beta"], SETTINGS["batch_size"], SETTINGS["max_length"]

    def seq_logp(m, prompt, completion):
        ids = (prompt + completion)[:max_len]
        lp = torch.log_softmax(m(torch.tensor([ids])).logits[0].float(), -1)
        return sum(lp[i - 1, ids[i]] for i in range(len(prompt), len(ids)))

    out = []
    for step in range(total):
        batch = [rows[(step * bs + i) % len(rows)] for i in range(bs)]
        model.train()
        pc = torch.stack([seq_logp(model, r["prompt_ids"], r["chosen_ids"]) for r in batch])
        pr = torch.stack([seq_logp(model, r["prompt_ids"], r["rejected_ids"]) for r in batch])
        with torch.no_grad():
            rc = torch.stack([seq_logp(ref, r["prompt_ids"], r["chosen_ids"]) for r in batch])
            rr = torch.stack([seq_logp(ref, r["prompt_ids"], r["rejected_ids"]) for r in batch])
        cr, rj = beta * (pc - rc), beta * (pr - rr)
        loss = -torch.nn.functional.logsigmoid(cr - rj).mean()
        opt.zero_grad()
        loss.backward()
        grad_norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in params)).item()
        opt.step()
        sched.step()
        out.append({"step": step + 1, "loss": loss.item(), "grad_norm": grad_norm, "rewards/chosen": cr.mean().item(),
                    "rewards/rejected": rj.mean().item(), "rewards/margins": (cr - rj).mean().item(),
                    "rewards/accuracies": (cr > rj).float().mean().item(), "logps/chosen": pc.mean().item(), "logps/rejected": pr.mean().item()})
    return out


def main(model_dir, data):
    model_dir, data = Path(model_dir), Path(data)
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    rows = pq.read_table(data).to_pylist()
    with tempfile.TemporaryDirectory() as tmp:
        args = DPOConfig(
            output_dir=tmp, beta=SETTINGS["beta"], learning_rate=SETTINGS["lr"], lr_scheduler_type="linear", warmup_steps=0,
            per_device_train_batch_size=SETTINGS["batch_size"], gradient_accumulation_steps=1, max_steps=SETTINGS["max_steps"],
            max_length=SETTINGS["max_length"], max_grad_norm=1e9, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999,
            adam_epsilon=1e-8, optim="adamw_torch", logging_steps=1, report_to=[], use_cpu=True, save_strategy="no",
            dataset_num_proc=None, seed=0,
        )
        trainer = SequentialDPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
        trainer.train()
        steps = [{k: float(log[k]) for k in KEYS} | {"step": int(log["step"])} for log in trainer.state.log_history if "grad_norm" in log]
        tokenized = [{k: ex[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for ex in trainer.train_dataset]
    assert len(steps) == SETTINGS["max_steps"], steps
    result = {"tokenizer_blake3": h(model_dir / "tokenizer.json"), "weights_blake3": h(model_dir / "model.safetensors"),
              "data_blake3": h(data), "settings": SETTINGS, "steps": steps, "autograd_steps": autograd_steps(model_dir, tokenized)}
    OUT.write_text(json.dumps(result, indent=1) + "\n")
    print(f"trajectory written to {OUT}: step 1 grad_norm {steps[0]['grad_norm']:.6f}, step 16 loss {steps[-1]['loss']:.6f}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
