"""KTO and APO-zero-unpaired as TRL 1.16's KTOTrainer computes them -> tests/golden/trl_kto.json
and the unpaired inputs it ran on (tests/golden/kto/*.parquet, committed beside it).

1. `loss_cases`: `KTOTrainer._compute_loss` on a stand-in model that returns fixed per-token
   log-probs (and the statistics TRL logs): the loss, its gradient with respect to the policy's
   per-token log-probs, and the logged metrics, for kto and apo_zero_unpaired, balanced and
   all-desirable batches, with and without weights.
2. `runs`: KTOTrainer itself on the tiny llama (init-model seed 0), 8 unclipped steps, batch 4,
   lr 1e-3 linear to 0, max_length 64, precompute_ref_log_probs (the reference is the initial
   policy, as our cache), f32: balanced standard data, unbalanced data with weights and gradient
   accumulation, conversational data, apo_zero_unpaired. Each run records TRL's tokenized rows,
   KL completions and precomputed reference log-probs (what prepare and cache-ref must give).
3. `unpaired_from_pairs`: KTOTrainer's tokenization of the paired synth-prefs file, which it
   unpairs itself (what `prepare --unpair` must give).

Run via scripts/make_golden.sh, or:
  pipeline init-model --arch llama --size tiny --seed 0 --out M
  pipeline synth-prefs --out pairs.parquet --rows 64 --seed 0
  pipeline synth-prefs --out conv.parquet --rows 64 --seed 0 --conversational
  python scripts/make_kto_golden.py M pairs.parquet conv.parquet
Needs torch, transformers==5.23.0, trl==1.16.0, datasets, blake3. Not run by CI: outputs committed.
"""
import json
import sys
import tempfile
import types
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import blake3
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import KTOConfig, KTOTrainer
from trl.data_utils import unpair_preference_dataset
from trl.trainer.utils import FusedCausalLMOutput

from make_loss_golden import Acc  # the accelerator stand-in TRL's loss code calls

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "golden" / "trl_kto.json"
DATA = ROOT / "tests" / "golden" / "kto"
SETTINGS = {"lr": 1e-3, "batch_size": 4, "max_steps": 8, "max_length": 64}


def h(path):
    return blake3.blake3(Path(path).read_bytes()).hexdigest()


def loss_cases():
    torch.manual_seed(11)
    B, T = 6, 9
    prompt_lens = [2, 3, 1, 4, 2, 3]
    comp_lens = [3, 5, 2, 4, 6, 1]
    kl_comp_lens = [1, 3, 5, 2, 4, 6]  # row i scored with row i−1's completion

    def masks(lens):
        cm = torch.zeros(B, T, dtype=torch.long)
        am = torch.zeros(B, T, dtype=torch.long)
        for r in range(B):
            cm[r, prompt_lens[r] : prompt_lens[r] + lens[r]] = 1
            am[r, : prompt_lens[r] + lens[r]] = 1
        return cm, am

    cm, am = masks(comp_lens)
    kcm, kam = masks(kl_comp_lens)
    shift, kshift = cm[:, 1:].bool(), kcm[:, 1:].bool()
    pol = (-torch.rand(B, T - 1) * 2.0).masked_fill(~shift, 0.0)
    kl_pol = (-torch.rand(B, T - 1) * 2.0).masked_fill(~kshift, 0.0)
    ent = torch.rand(B, T - 1).masked_fill(~shift, 0.0)
    ml = torch.randn(B, T - 1).masked_fill(~shift, 0.0)
    ref = pol.sum(-1) + torch.randn(B) * 0.5
    # KL reference log-probs below the policy's on average (a positive KL), and above (clamped).
    ref_kl_hi = kl_pol.sum(-1) - torch.rand(B) * 3.0
    ref_kl_lo = kl_pol.sum(-1) + torch.rand(B) * 3.0

    class FakeModel(torch.nn.Module):
        def forward(self, input_ids, attention_mask, labels, fused_lm_head, use_cache=False):
            if input_ids is self.kl_ids:
                return FusedCausalLMOutput(log_probs=kl_pol.clone())
            self.leaf = pol.clone().requires_grad_(True)
            return FusedCausalLMOutput(log_probs=self.leaf, entropy=ent, mean_logits=ml)

    def run(loss_type, label, ref_kl, desirable_weight=1.0, undesirable_weight=1.0, beta=0.1):
        model = FakeModel()
        kl_ids = torch.zeros(B, T, dtype=torch.long)
        model.kl_ids = kl_ids
        trainer = SimpleNamespace(
            model=model, accelerator=Acc(), calculate_KL=loss_type != "apo_zero_unpaired", precompute_ref_logps=True,
            loss_type=loss_type, beta=beta, desirable_weight=desirable_weight, undesirable_weight=undesirable_weight,
            aux_loss_enabled=False, _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
            _total_train_tokens=0, _tp_size=1)
        trainer._compute_kl_logps = types.MethodType(KTOTrainer._compute_kl_logps, trainer)
        batch = dict(input_ids=torch.zeros(B, T, dtype=torch.long), attention_mask=am, completion_mask=cm,
                     KL_input_ids=kl_ids, KL_attention_mask=kam, KL_completion_mask=kcm,
                     label=torch.tensor(label), ref_logps=ref, ref_KL_logps=ref_kl)
        loss = KTOTrainer._compute_loss(trainer, model, batch, return_outputs=False)
        loss.backward()
        metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
        return dict(loss_type=loss_type, label=label, kl_above=ref_kl is ref_kl_hi, beta=beta,
                    desirable_weight=desirable_weight, undesirable_weight=undesirable_weight, loss=loss.item(),
                    grad_wrt_policy_token_logps=model.leaf.grad.tolist(), metrics=metrics)

    mixed = [True, False, False, True, True, False]
    cases = [
        run("kto", mixed, ref_kl_hi), run("kto", mixed, ref_kl_lo), run("kto", mixed, ref_kl_hi, 1.0, 2.5),
        run("kto", mixed, ref_kl_hi, 0.7, 1.3, beta=0.5), run("kto", [True] * B, ref_kl_hi),
        run("kto", [False] * B, ref_kl_hi, 1.0, 1.5), run("apo_zero_unpaired", mixed, ref_kl_hi),
        run("apo_zero_unpaired", mixed, ref_kl_hi, 1.2, 0.8, beta=0.3),
    ]
    inputs = dict(prompt_lens=prompt_lens, completion_lens=comp_lens, kl_completion_lens=kl_comp_lens,
                  completion_mask=cm.tolist(), policy_per_token_logps=pol.tolist(), kl_completion_mask=kcm.tolist(),
                  kl_policy_per_token_logps=kl_pol.tolist(), entropy=ent.tolist(), mean_logits=ml.tolist(),
                  ref_logps=ref.tolist(), ref_kl_logps_above=ref_kl_hi.tolist(), ref_kl_logps_below=ref_kl_lo.tolist())
    return dict(inputs=inputs, cases=cases)


def config(tmp, **kw):
    return KTOConfig(
        output_dir=tmp, learning_rate=SETTINGS["lr"], lr_scheduler_type="linear", warmup_steps=0,
        per_device_train_batch_size=SETTINGS["batch_size"], max_steps=SETTINGS["max_steps"],
        max_length=SETTINGS["max_length"], max_grad_norm=1e9, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999,
        adam_epsilon=1e-8, optim="adamw_torch", logging_steps=1, report_to=[], use_cpu=True, save_strategy="no",
        seed=0, bf16=False, gradient_checkpointing=False, precompute_ref_log_probs=True, **kw)


def tokenized(ds):
    keys = [k for k in ("prompt_ids", "completion_ids", "label", "KL_completion_ids", "ref_logps", "ref_KL_logps")
            if k in ds.column_names]
    return {k: list(ds[k]) for k in keys}


def trl_run(model_dir, tok, data, **kw):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = KTOTrainer(model=model, args=config(tmp, **kw), train_dataset=Dataset.from_parquet(str(data)),
                             processing_class=tok)
        trainer.train()
        steps = [{k: float(v) for k, v in log.items() if isinstance(v, (int, float))} | {"step": int(log["step"])}
                 for log in trainer.state.log_history if "grad_norm" in log]
        rows = tokenized(trainer.train_dataset)
    assert len(steps) == SETTINGS["max_steps"], steps
    return steps, rows


def unpaired(pairs, out, drop_undesirable=False):
    """TRL's unpair_preference_dataset on a pairs file, shuffled (seed 0) so batches mix labels."""
    ds = unpair_preference_dataset(Dataset.from_parquet(str(pairs))).shuffle(seed=0).flatten_indices()
    if drop_undesirable:
        keep = [i for i, l in enumerate(ds["label"]) if l or i % 3 == 0]
        ds = ds.select(keep).flatten_indices()
    ds.to_parquet(str(out))
    return out


def main(model_dir, pairs, conv_pairs):
    model_dir = Path(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    DATA.mkdir(parents=True, exist_ok=True)
    standard = unpaired(pairs, DATA / "standard.parquet")
    imbalanced = unpaired(pairs, DATA / "imbalanced.parquet", drop_undesirable=True)
    conversational = unpaired(conv_pairs, DATA / "conversational.parquet")
    runs = []
    for name, data, flags, kw in [
        ("kto", standard, [], {}),
        ("kto_imbalanced_weighted_ga2", imbalanced, ["--undesirable-weight", "2.5", "--grad-accum", "2"],
         dict(undesirable_weight=2.5, gradient_accumulation_steps=2)),
        ("kto_conversational", conversational, [], {}),
        ("apo_zero_unpaired", standard, ["--loss", "apo_zero_unpaired"], dict(loss_type="apo_zero_unpaired")),
    ]:
        steps, rows = trl_run(model_dir, tok, data, **kw)
        runs.append(dict(name=name, data=data.name, data_blake3=h(data), flags=flags, trl_steps=steps, trl_rows=rows))
        print(f"{name}: step 8 loss {steps[-1]['loss']:.6f} kl {steps[-1].get('kl')}", flush=True)
    # KTOTrainer given pairs unpairs them itself; only its tokenization is recorded.
    with tempfile.TemporaryDirectory() as tmp:
        t = KTOTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                       args=config(tmp),
                       train_dataset=Dataset.from_parquet(str(pairs)), processing_class=tok)
        from_pairs = tokenized(t.train_dataset)
    result = {"tokenizer_blake3": h(model_dir / "tokenizer.json"), "weights_blake3": h(model_dir / "model.safetensors"),
              "pairs_blake3": h(pairs), "conversational_pairs_blake3": h(conv_pairs), "settings": SETTINGS,
              "loss_cases": loss_cases(), "runs": runs, "unpaired_from_pairs": from_pairs}
    OUT.write_text(json.dumps(result) + "\n")
    print(f"{len(runs)} KTO runs written to {OUT}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3])
