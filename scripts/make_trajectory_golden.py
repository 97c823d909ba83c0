"""16-step training trajectories for every loss, for tests/train.rs to match.

Run via scripts/make_golden.sh (it builds the tiny model and the data with `pipeline`).
Settings: tiny llama (init-model seed 0), 64 synthetic rows (synth-prefs seed 0), max_length 64,
lr 1e-3 linear to 0, batch 4, no shuffling (sequential sampler), no clipping: TRL's
max_grad_norm is huge so clip_grad_norm_ still computes and logs grad_norm but never scales
(ours: --max-grad-norm 0). Writes tests/golden/trl_trajectories_llama.json with the inputs'
blake3 so the Rust test can tell stale golden values from a wrong result.

Each run (RUNS: every TRL 1.16 loss type, two weighted combinations, each f-divergence, WPO,
LD-DPO at two α, and the reference-free SimPO, CPO and ORPO) has up to two trajectories:
  - `autograd_steps`: a plain PyTorch loop that calls TRL's own loss code on exact log-probs:
    DPOTrainer._compute_loss with a model whose "fused lm-head" output is computed unfused from
    the logits (so autograd is exact), or CPOTrainer/ORPOTrainer.get_batch_loss_metrics on the
    model itself; torch.optim.AdamW and the same linear schedule. The tight check.
  - `trl_steps` (DPOTrainer losses only): TRL's DPOTrainer itself. Its fused lm-head gradients
    come out 0.15-0.3% below exact autograd's, so it is the looser check. (The CPO and ORPO
    trainers tokenize on their own, with other special tokens than DPOTrainer's; their loss
    code on our token ids is what autograd_steps runs.)
"""
import json
import sys
import tempfile
import types
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import blake3
import pyarrow.parquet as pq
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer
from trl.experimental.cpo.cpo_trainer import CPOTrainer
from trl.experimental.orpo.orpo_trainer import ORPOTrainer
from trl.trainer.utils import FusedCausalLMOutput

from make_loss_golden import Acc  # the accelerator stand-in TRL's loss code calls

OUT = Path(__file__).resolve().parent.parent / "tests" / "golden" / "trl_trajectories_llama.json"
SETTINGS = {"lr": 1e-3, "batch_size": 4, "max_steps": 16, "max_length": 64}
DPO_DEFAULTS = dict(beta=0.1, label_smoothing=0.0, ld_alpha=None, f_divergence_type="reverse_kl",
                    f_alpha_divergence_coef=0.5, use_weighting=False, discopop_tau=0.05, loss_weights=None)


def run(name, flags, **trl):
    return {"name": name, "flags": flags, "trl": trl}


def loss(t, **kw):
    return run(t, ["--loss", t] + [x for k, v in kw.items() for x in (f"--{k.replace('_', '-')}", str(v))],
               loss_type=[t], **kw)


RUNS = [loss(t) for t in ["sigmoid", "hinge", "ipo", "nca_pair", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
                          "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"]]
RUNS += [
    loss("exo_pair", label_smoothing=1e-3),
    loss("robust", label_smoothing=0.1),
    run("mpo", ["--loss", "sigmoid,bco_pair,sft", "--loss-weights", "0.8,0.2,1.0"],
        loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0]),
    run("ipo+sft", ["--loss", "ipo,sft", "--loss-weights", "1.0,0.5", "--beta", "0.3"],
        loss_type=["ipo", "sft"], loss_weights=[1.0, 0.5], beta=0.3),
    run("forward_kl", ["--f-divergence", "forward_kl"], loss_type=["sigmoid"], f_divergence_type="forward_kl"),
    run("js_divergence", ["--f-divergence", "js_divergence"], loss_type=["sigmoid"], f_divergence_type="js_divergence"),
    run("alpha_divergence", ["--f-divergence", "alpha_divergence", "--f-alpha", "0.3"], loss_type=["sigmoid"],
        f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3),
    run("wpo", ["--use-weighting"], loss_type=["sigmoid"], use_weighting=True),
    run("ld_0.3", ["--ld-alpha", "0.3"], loss_type=["sigmoid"], ld_alpha=0.3),
    run("ld_0.7", ["--ld-alpha", "0.7"], loss_type=["sigmoid"], ld_alpha=0.7),
    # Reference-free (CPOConfig / ORPOConfig defaults: β 0.1, cpo_alpha 1, simpo_gamma 0.5).
    run("simpo", ["--loss", "simpo", "--beta", "2.0", "--cpo-alpha", "0"], trainer="cpo", loss_type="simpo", beta=2.0, cpo_alpha=0.0),
    run("cpo", ["--loss", "cpo"], trainer="cpo", loss_type="sigmoid"),
    run("orpo", ["--loss", "orpo"], trainer="orpo"),
]


def h(path):
    return blake3.blake3(Path(path).read_bytes()).hexdigest()


class SequentialDPOTrainer(DPOTrainer):
    """Rows in dataset order, as `pipeline train --shuffle false`."""

    def _get_train_sampler(self, *args, **kwargs):
        return torch.utils.data.SequentialSampler(self.train_dataset)


class ExactHead(torch.nn.Module):
    """A causal LM answering TRL 1.16's `fused_lm_head=True` call, computed unfused from the
    logits: per-token log-probs of the labelled positions (0 elsewhere) with exact autograd, and
    the statistics TRL logs (entropy, mean logit, top-1, log Σp²), detached."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm
        self.is_gradient_checkpointing = False

    def forward(self, input_ids, attention_mask, labels, **kw):
        logits = self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1].float()
        targets, mask = input_ids[:, 1:], labels[:, 1:] != -100
        logp = torch.log_softmax(logits, -1)
        tok = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1) * mask
        with torch.no_grad():
            entropy = -(logp.exp() * logp).sum(-1) * mask
            mean_logits = logits.mean(-1) * mask
            is_top1 = (logits.argmax(-1) == targets) & mask
            lssp = torch.logsumexp(2 * logp, -1) * mask
        return FusedCausalLMOutput(log_probs=tok, entropy=entropy, mean_logits=mean_logits, is_top1=is_top1, log_sum_sq_probs=lssp)


def dpo_batch(batch, max_len):
    """TRL's DPO collator's layout: chosen rows then rejected rows, right-padded, keep_start."""
    seqs, prompt_lens = [], []
    for key in ("chosen_ids", "rejected_ids"):
        for r in batch:
            ids = (r["prompt_ids"] + r[key])[:max_len]
            seqs.append(ids)
            prompt_lens.append(min(len(r["prompt_ids"]), len(ids)))
    T = max(len(s) for s in seqs)
    input_ids = torch.zeros(len(seqs), T, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    completion_mask = torch.zeros_like(input_ids)
    for i, (s, p) in enumerate(zip(seqs, prompt_lens)):
        input_ids[i, : len(s)] = torch.tensor(s)
        attention_mask[i, : len(s)] = 1
        completion_mask[i, p : len(s)] = 1
    return dict(input_ids=input_ids, attention_mask=attention_mask, completion_mask=completion_mask)


def pair_batch(batch, max_len):
    """CPO/ORPO's batch: chosen and rejected rows, labels −100 on the prompt and padding."""
    out = {}
    for key, name in (("chosen_ids", "chosen"), ("rejected_ids", "rejected")):
        seqs = [(r["prompt_ids"] + r[key])[:max_len] for r in batch]
        T = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), T, dtype=torch.long)
        am = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for i, (s, r) in enumerate(zip(seqs, batch)):
            p = min(len(r["prompt_ids"]), len(s))
            ids[i, : len(s)] = torch.tensor(s)
            am[i, : len(s)] = 1
            labels[i, p : len(s)] = torch.tensor(s[p:])
        out |= {f"{name}_input_ids": ids, f"{name}_attention_mask": am, f"{name}_labels": labels}
    return out


def autograd_steps(model_dir, rows, trl):
    """The run as a plain PyTorch loop around TRL's loss code: sequential batches, exact autograd."""
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    lm.train()
    params = [p for p in lm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=SETTINGS["lr"], betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    total = SETTINGS["max_steps"]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, (total - s) / total))
    bs, max_len = SETTINGS["batch_size"], SETTINGS["max_length"]
    trainer_kind = trl.get("trainer", "dpo")
    if trainer_kind == "dpo":
        cfg = DPO_DEFAULTS | {k: v for k, v in trl.items()}
        policy = ExactHead(lm)
        ref = ExactHead(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval())
        trainer = SimpleNamespace(
            model=policy, ref_model=ref, accelerator=Acc(),
            args=SimpleNamespace(discopop_tau=cfg["discopop_tau"], gradient_checkpointing_kwargs=None),
            beta=cfg["beta"], label_smoothing=cfg["label_smoothing"], ld_alpha=cfg["ld_alpha"],
            f_divergence_type=cfg["f_divergence_type"], f_alpha_divergence_coef=cfg["f_alpha_divergence_coef"],
            use_weighting=cfg["use_weighting"], loss_types=cfg["loss_type"],
            loss_weights=cfg["loss_weights"] or [1.0] * len(cfg["loss_type"]), precompute_ref_logps=False,
            aux_loss_enabled=False, _total_train_tokens=0, _tp_size=1)
    else:
        cls = CPOTrainer if trainer_kind == "cpo" else ORPOTrainer
        attrs = dict(beta=0.1, label_smoothing=0.0, loss_type="sigmoid", cpo_alpha=1.0, simpo_gamma=0.5, alpha=0.0) \
            if cls is CPOTrainer else dict(beta=0.1)
        attrs |= {k: v for k, v in trl.items() if k != "trainer"}
        trainer = SimpleNamespace(accelerator=Acc(), is_encoder_decoder=False, aux_loss_enabled=False, pad_token_id=0,
                                  padding_value=0, **attrs)
        trainer.concatenated_inputs = cls.concatenated_inputs
        trainer.get_batch_logps = cls.get_batch_logps
        trainer.concatenated_forward = types.MethodType(cls.concatenated_forward, trainer)
        if cls is CPOTrainer:
            trainer.cpo_loss = types.MethodType(cls.cpo_loss, trainer)
        else:
            trainer.odds_ratio_loss = types.MethodType(cls.odds_ratio_loss, trainer)
    out = []
    for step in range(total):
        batch = [rows[(step * bs + i) % len(rows)] for i in range(bs)]
        if trainer_kind == "dpo":
            trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
            loss = DPOTrainer._compute_loss(trainer, policy, dpo_batch(batch, max_len), return_outputs=False)
            metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
        else:
            loss, metrics = cls.get_batch_loss_metrics(trainer, lm, pair_batch(batch, max_len))
            # CPO/ORPO's logits/* average raw logits over every padded position; not compared.
            metrics = {k: v for k, v in metrics.items() if not k.startswith("logits/")}
        opt.zero_grad()
        loss.backward()
        grad_norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in params if p.grad is not None)).item()
        opt.step()
        sched.step()
        out.append({"step": step + 1, "loss": loss.item(), "grad_norm": grad_norm} | {k: float(v) for k, v in metrics.items()})
    return out


def trl_steps(model_dir, rows, tok, trl):
    """TRL's DPOTrainer itself on the same rows."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    cfg = DPO_DEFAULTS | trl
    with tempfile.TemporaryDirectory() as tmp:
        args = DPOConfig(
            output_dir=tmp, beta=cfg["beta"], learning_rate=SETTINGS["lr"], lr_scheduler_type="linear", warmup_steps=0,
            per_device_train_batch_size=SETTINGS["batch_size"], gradient_accumulation_steps=1, max_steps=SETTINGS["max_steps"],
            max_length=SETTINGS["max_length"], max_grad_norm=1e9, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999,
            adam_epsilon=1e-8, optim="adamw_torch", logging_steps=1, report_to=[], use_cpu=True, save_strategy="no",
            dataset_num_proc=None, seed=0, loss_type=cfg["loss_type"], loss_weights=cfg["loss_weights"],
            label_smoothing=cfg["label_smoothing"], ld_alpha=cfg["ld_alpha"], f_divergence_type=cfg["f_divergence_type"],
            f_alpha_divergence_coef=cfg["f_alpha_divergence_coef"], use_weighting=cfg["use_weighting"],
            discopop_tau=cfg["discopop_tau"],
        )
        trainer = SequentialDPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
        trainer.train()
        steps = [{k: float(v) for k, v in log.items() if isinstance(v, (int, float))} | {"step": int(log["step"])}
                 for log in trainer.state.log_history if "grad_norm" in log]
        tokenized = [{k: ex[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for ex in trainer.train_dataset]
    assert len(steps) == SETTINGS["max_steps"], steps
    return steps, tokenized


def main(model_dir, data):
    model_dir, data = Path(model_dir), Path(data)
    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = pq.read_table(data).to_pylist()
    runs = []
    for r in RUNS:
        trl = r["trl"]
        entry = dict(name=r["name"], flags=r["flags"], reference_free="trainer" in trl)
        if "trainer" not in trl:
            entry["trl_steps"], tokenized = trl_steps(model_dir, rows, tok, trl)
        entry["autograd_steps"] = autograd_steps(model_dir, tokenized, trl)
        runs.append(entry)
        last = entry["autograd_steps"][-1]
        print(f"{r['name']}: step 16 loss {last['loss']:.6f} grad_norm {last['grad_norm']:.6f}", flush=True)
    result = {"tokenizer_blake3": h(model_dir / "tokenizer.json"), "weights_blake3": h(model_dir / "model.safetensors"),
              "data_blake3": h(data), "settings": SETTINGS, "runs": runs}
    OUT.write_text(json.dumps(result) + "\n")
    print(f"{len(runs)} trajectories written to {OUT}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
