"""Golden values for bitsandbytes 4-bit bases (QLoRA), from transformers 5.23 + bitsandbytes 0.50
(CPU backend) + PEFT 0.21 + TRL 1.16.

Usage: make_bnb_golden.py PIPELINE_BINARY (run from anywhere; needs torch, transformers,
bitsandbytes, peft, trl, datasets, pyarrow, blake3). Writes, for the tiny llama and qwen2
(`pipeline init-model --size tiny --seed 0`):
  tests/fixtures/bnb4/<family>-<variant>/: the model as transformers saves it after loading it
    with BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=nf4|fp4,
    bnb_4bit_use_double_quant=..., bnb_4bit_compute_dtype=float32): packed uint8 weights,
    absmax, quant_map, quant_state JSON, nested absmax and map;
  tests/fixtures/bnb4/qlora_adapter/: a PEFT LoRA adapter (r 4, α 8, all linear layers, PEFT's
    default init: B = 0) for the 4-bit llama (nf4, double quantization);
  tests/golden/bnb4.json: per fixture the blake3 of every weight bitsandbytes dequantizes
    (float32, little-endian), the first values, and per-token log-probs of the 4-bit model; the
    16-step DPO trajectory TRL's DPOTrainer runs with that adapter over the 4-bit base (its
    reference: the base with the adapter off, which a B = 0 adapter equals); the blake3 of the
    generated models and data, so the Rust tests tell stale golden values from wrong results.
"""
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import blake3
import bitsandbytes as bnb
import bitsandbytes.functional as F
from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
import pyarrow.parquet as pq
import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
from trl import DPOConfig, DPOTrainer

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures" / "bnb4"
OUT = ROOT / "tests" / "golden" / "bnb4.json"
VARIANTS = {"llama": [("nf4", True), ("nf4", False), ("fp4", True), ("fp4", False)], "qwen2": [("nf4", True)]}
SETTINGS = {"lr": 1e-3, "batch_size": 4, "max_steps": 16, "max_length": 64, "beta": 0.1}
KEYS = ["loss", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"]


def h(path):
    return blake3.blake3(Path(path).read_bytes()).hexdigest()


def exact(model):
    """bitsandbytes' generic CPU path (dequantize, float32 matmul): on AVX512-BF16 CPUs its
    inference kernel otherwise repacks the weights and multiplies in bfloat16."""
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
    return model


def quantized(model_dir, qt, dq):
    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=qt, bnb_4bit_use_double_quant=dq, bnb_4bit_compute_dtype=torch.float32)
    return exact(AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=cfg, dtype=torch.float32, device_map="cpu",
                                                      attn_implementation="eager"))


def sequences(vocab):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (7, 23, 40)]


def token_logps(model, ids):
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
    return [float(lp[i - 1, ids[i]]) for i in range(1, len(ids))]


def dequantized(model):
    out = {}
    for name, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        if w is not None and hasattr(w, "quant_state") and w.quant_state is not None:
            d = F.dequantize_4bit(w.data, w.quant_state).float().contiguous()
            out[f"{name}.weight"] = {"blake3": blake3.blake3(d.numpy().tobytes()).hexdigest(), "first": d.flatten()[:4].tolist()}
    return out


def dequantize_4bit(A, quant_state=None, absmax=None, out=None, blocksize=None, quant_type="fp4"):
    """bitsandbytes' reference dequantization (its default/CUDA semantics: blocks over the
    flattened weight, as its quantization makes them). Its CPU C kernel in 0.50 blocks each row
    separately, which differs when a row's length is not a multiple of the block size (the tiny
    models' down_proj, 176 columns; no published model has such a shape)."""
    qs = quant_state
    am = F.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset if qs.nested else qs.absmax
    A = A.view(torch.uint8) if A.dtype != torch.uint8 else A
    return _dequantize_4bit_compute(A.reshape(-1), am.float(), qs.code.to(A.device), qs.blocksize, qs.shape, qs.dtype)


F.dequantize_4bit = dequantize_4bit


@torch.library.register_kernel("bitsandbytes::dequantize_4bit", "cpu")
def _(A, absmax, blocksize, quant_type, shape, dtype):
    """The same for the op bitsandbytes' forward (gemm_4bit) dispatches to."""
    A = A.view(torch.uint8) if A.dtype != torch.uint8 else A
    return _dequantize_4bit_compute(A.reshape(-1), absmax.float(), F.get_4bit_type(quant_type, device=A.device), blocksize, shape, dtype)


class SequentialDPOTrainer(DPOTrainer):
    """Rows in dataset order, as `pipeline train --shuffle false`. TRL 1.16 casts a 4-bit
    model's adapter to bfloat16 (the QLoRA paper's advice); they go back to float32 here, so
    the trajectory is float32 training as ours (master weights and AdamW state in f32)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        for p in self.model.parameters():
            if p.requires_grad:
                p.data = p.data.float()

    def _get_train_sampler(self, *args, **kwargs):
        return torch.utils.data.SequentialSampler(self.train_dataset)


def trajectory(fixture, adapter, data):
    tok = AutoTokenizer.from_pretrained(fixture)
    rows = pq.read_table(data).to_pylist()
    model = exact(AutoModelForCausalLM.from_pretrained(fixture, dtype=torch.float32, device_map="cpu", attn_implementation="eager"))
    model = PeftModel.from_pretrained(model, adapter, is_trainable=True)
    with tempfile.TemporaryDirectory() as tmp:
        args = DPOConfig(
            output_dir=tmp, beta=SETTINGS["beta"], learning_rate=SETTINGS["lr"], lr_scheduler_type="linear", warmup_steps=0,
            per_device_train_batch_size=SETTINGS["batch_size"], max_steps=SETTINGS["max_steps"], max_length=SETTINGS["max_length"],
            max_grad_norm=1e9, weight_decay=0.0, adam_epsilon=1e-8, optim="adamw_torch", logging_steps=1, report_to=[], use_cpu=True,
            save_strategy="no", dataset_num_proc=None, seed=0, bf16=False,
        )
        trainer = SequentialDPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
        trainer.train()
        return [{k: float(log[k]) for k in KEYS} | {"step": int(log["step"])} for log in trainer.state.log_history if "grad_norm" in log]


def main(binary):
    FIX.mkdir(parents=True, exist_ok=True)
    result = {"settings": SETTINGS, "fixtures": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for family, variants in VARIANTS.items():
            src = tmp / family
            subprocess.run([binary, "init-model", "--arch", family, "--size", "tiny", "--seed", "0", "--out", str(src)], check=True)
            result[f"{family}_weights_blake3"] = h(src / "model.safetensors")
            seqs = sequences(json.loads((src / "config.json").read_text())["vocab_size"])
            for qt, dq in variants:
                name = f"{family}-{qt}{'-dq' if dq else ''}"
                out = FIX / name
                shutil.rmtree(out, ignore_errors=True)
                model = quantized(src, qt, dq).eval()
                model.save_pretrained(out)
                AutoTokenizer.from_pretrained(src).save_pretrained(out)
                for extra in ("generation_config.json",):
                    (out / extra).unlink(missing_ok=True)
                result["fixtures"][name] = {
                    "dequantized": dequantized(model),
                    "logps": [{"ids": s, "token_logps": token_logps(model, s)} for s in seqs],
                }
                print(f"{name}: {len(result['fixtures'][name]['dequantized'])} 4-bit weights")
        fixture = FIX / "llama-nf4-dq"
        adapter = FIX / "qlora_adapter"
        shutil.rmtree(adapter, ignore_errors=True)
        torch.manual_seed(1)
        base = AutoModelForCausalLM.from_pretrained(fixture, dtype=torch.float32, device_map="cpu")
        peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM"))
        peft.save_pretrained(adapter)
        (adapter / "README.md").unlink(missing_ok=True)
        data = tmp / "trajectory.parquet"
        subprocess.run([binary, "synth-prefs", "--out", str(data), "--rows", "64", "--seed", "0"], check=True)
        result["data_blake3"] = h(data)
        result["steps"] = trajectory(fixture, adapter, data)
    OUT.write_text(json.dumps(result) + "\n")
    print(f"written {OUT}: step 1 loss {result['steps'][0]['loss']:.6f}, step 16 loss {result['steps'][-1]['loss']:.6f}")


if __name__ == "__main__":
    main(sys.argv[1])
