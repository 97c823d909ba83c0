"""Golden values for every model family from transformers 5.23 (eager attention, float32).

For each family it generates the tiny model with `pipeline init-model --arch FAMILY` (and its
reward model with --reward), loads it with transformers, checks that no tensor is missing,
unexpected or mis-shaped, and writes tests/golden/families/<family>.json:
  - per-token log-probs of a few sequences (long enough for sliding windows and Phi-3's long
    rope factors to matter);
  - greedy generate() continuations of prompts given as token ids;
  - reward-model scores (`*ForSequenceClassification`);
  - a PEFT LoRA adapter (r 2, `all-linear`; attention projections for the MoE families, see
    README), with random non-zero B, saved in PEFT's format to tests/golden/families/<family>_adapter/,
    and the per-token log-probs of the model with it;
  - a DPO step on two pairs against fixed reference log-probs, in plain PyTorch autograd
    (TRL's sigmoid loss, plus router_aux_loss_coef × the load-balancing loss for MoE models, as
    TRL 1.16 adds it), as the loss and, per parameter, its gradient's norm and its dot product
    with a fixed vector (cos(0.7·i)) over the flattened gradient.
Run via scripts/make_golden.sh (needs torch, transformers 5.23); its outputs are committed.
"""
import json
import math
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import blake3
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "golden" / "families"
FAMILIES = ["qwen3", "qwen3_moe", "mixtral", "gemma2", "gemma3", "phi3", "olmo2", "smollm3"]
BETA = 0.1


def sequences(vocab):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (7, 23, 40)]


def pairs(vocab):
    g = torch.Generator().manual_seed(2)
    r = lambda n: torch.randint(3, vocab, (n,), generator=g).tolist()
    return [
        {"prompt": r(6), "chosen": r(5), "rejected": r(8), "ref_chosen": -30.0, "ref_rejected": -45.0},
        {"prompt": r(11), "chosen": r(9), "rejected": r(4), "ref_chosen": -52.0, "ref_rejected": -21.0},
    ]


def token_logps(model, ids):
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    return [float(lp[i - 1, ids[i]]) for i in range(1, len(ids))]


def dpo_step(model, ps):
    """TRL's sigmoid DPO loss on the pairs (each completion scored alone, as TRL's padded rows),
    plus the MoE aux loss over the padded batch of chosen and rejected rows."""
    model.zero_grad()
    rows, masks, starts = [], [], []
    for p in ps:
        for side in ("chosen", "rejected"):
            rows.append(p["prompt"] + p[side])
            starts.append(len(p["prompt"]))
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    cfg = model.config
    moe = hasattr(cfg, "router_aux_loss_coef") and hasattr(cfg, "num_experts_per_tok")
    out = model(ids, attention_mask=mask, output_router_logits=True) if moe else model(ids, attention_mask=mask)
    lp = torch.log_softmax(out.logits.float(), -1)
    seq = []
    for b, r in enumerate(rows):
        seq.append(sum(lp[b, t - 1, r[t]] for t in range(starts[b], len(r))))
    losses = []
    for i, p in enumerate(ps):
        margin = (seq[2 * i] - p["ref_chosen"]) - (seq[2 * i + 1] - p["ref_rejected"])
        losses.append(-torch.nn.functional.logsigmoid(BETA * margin))
    loss = torch.stack(losses).mean()
    aux = None
    if moe:
        aux = out.aux_loss
        loss = loss + cfg.router_aux_loss_coef * aux
    loss.backward()
    grads = {}
    for name, prm in model.named_parameters():
        g = prm.grad.flatten().double() if prm.grad is not None else torch.zeros(prm.numel(), dtype=torch.float64)
        r = torch.cos(0.7 * torch.arange(g.numel(), dtype=torch.float64))
        grads[name] = {"norm": float(g.norm()), "dot": float((g * r).sum())}
    return {"loss": float(loss), "aux_loss": None if aux is None else float(aux), "seq_logps": [float(x) for x in seq], "grads": grads}


def family(binary, name, tmp):
    mdir, rdir = tmp / name, tmp / f"rm_{name}"
    subprocess.run([binary, "init-model", "--arch", name, "--seed", "0", "--out", str(mdir)], check=True)
    subprocess.run([binary, "init-model", "--arch", name, "--seed", "0", "--reward", "--out", str(rdir)], check=True)
    model, info = AutoModelForCausalLM.from_pretrained(mdir, dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), f"{name}: {info}"
    model.eval()
    vocab = model.config.get_text_config().vocab_size
    seqs = [{"ids": ids, "token_logps": token_logps(model, ids)} for ids in sequences(vocab)]
    gen = []
    g = torch.Generator().manual_seed(3)
    for n in (3, 5):
        prompt = torch.randint(3, vocab, (n,), generator=g).tolist()
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
        gen.append({"prompt": prompt, "completion": out[0, n:].tolist()})
    rm, info = AutoModelForSequenceClassification.from_pretrained(rdir, dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), f"reward {name}: {info}"
    rm.eval()
    with torch.no_grad():
        rewards = [{"ids": s["ids"], "score": float(rm(torch.tensor([s["ids"]])).logits[0, 0])} for s in seqs]
    lora = peft_adapter(mdir, name, seqs)
    model.train()  # dropout is 0 everywhere; train mode as TRL trains
    ps = pairs(vocab)
    step = dpo_step(model, ps)
    return {"family": name, "model_type": model.config.model_type, "weights_blake3": blake3.blake3((mdir / "model.safetensors").read_bytes()).hexdigest(), "sequences": seqs, "generate": gen, "rewards": rewards,
            "pairs": ps, "beta": BETA, "step": step, "lora": lora}


def peft_adapter(mdir, name, seqs):
    """PEFT's LoRA on the family: which modules `all-linear` targets, the adapter's tensors, and
    the log-probs with it (B random so the adapter changes them)."""
    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(mdir, dtype=torch.float32, attn_implementation="eager").eval()
    torch.manual_seed(5)
    moe = getattr(base.config, "num_experts", None) or getattr(base.config, "num_local_experts", None)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"] if moe else "all-linear"
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=targets, lora_dropout=0.0, init_lora_weights=False)).eval()
    out = OUT / f"{name}_adapter"
    shutil.rmtree(out, ignore_errors=True)
    model.save_pretrained(out)
    (out / "README.md").unlink(missing_ok=True)
    return {"targets": targets, "adapter": f"{name}_adapter", "token_logps": [token_logps(model, s["ids"]) for s in seqs]}


def main(binary):
    OUT.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        for name in FAMILIES:
            out = family(binary, name, Path(tmp))
            (OUT / f"{name}.json").write_text(json.dumps(out, indent=1) + "\n")
            print(f"{name}: loss {out['step']['loss']:.6f}, {len(out['step']['grads'])} parameters")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else str(ROOT / "target" / "debug" / "pipeline"))
