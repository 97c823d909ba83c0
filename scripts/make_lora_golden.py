"""LoRA golden values: a PEFT 0.21 adapter on the tiny llama, then 16 DPO steps continuing it,
from HF TRL 1.16 + PEFT and from a plain PyTorch autograd loop on the PEFT model.

Run via scripts/make_golden.sh (it builds the model and data with `pipeline`). Writes:
  tests/golden/lora_adapter/: the starting adapter (r 4, α 8, q_proj/v_proj/down_proj, lora_B
    nonzero, as after SFT), in PEFT's own files;
  tests/golden/trl_lora_trajectory_llama.json: per-step metrics of both runs, the final adapter
    tensors of the autograd run, and per-token log-probs of the starting adapter's model.
TRL trains a pretrained adapter against a frozen copy of it (its "ref" adapter), i.e. the base
with the adapter merged; the Rust test builds that reference with `pipeline merge-lora`.
Settings as scripts/make_trajectory_golden.py (β 0.1, lr 1e-3 linear, batch 4, no clipping).
"""
import json
import shutil
import sys
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_trajectory_golden import KEYS, SETTINGS, SequentialDPOTrainer, autograd_loop, h  # noqa: E402

GOLDEN = Path(__file__).resolve().parent.parent / "tests" / "golden"
ADAPTER = GOLDEN / "lora_adapter"


def base(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")


def make_adapter(model_dir):
    torch.manual_seed(1)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0, task_type="CAUSAL_LM",
                     init_lora_weights=False)
    model = get_peft_model(base(model_dir), cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.mul_(0.1)  # a modest, nonzero update, like an SFT'd adapter
    if ADAPTER.exists():
        shutil.rmtree(ADAPTER)
    model.save_pretrained(ADAPTER)
    for extra in ("README.md",):
        (ADAPTER / extra).unlink(missing_ok=True)


def token_logps(model, tok):
    out = []
    with torch.no_grad():
        for text in ["Question: What color is the sky?\nAnswer: The sky is blue.", "What is 7 plus 2?"]:
            ids = tok(text)["input_ids"]
            lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
            out.append({"ids": ids, "token_logps": [float(lp[i - 1, ids[i]]) for i in range(1, len(ids))]})
    return out


def main(model_dir, data):
    model_dir, data = Path(model_dir), Path(data)
    make_adapter(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = pq.read_table(data).to_pylist()
    start = PeftModel.from_pretrained(base(model_dir), ADAPTER).eval()
    logps = token_logps(start, tok)
    with tempfile.TemporaryDirectory() as tmp:
        args = DPOConfig(
            output_dir=tmp, beta=SETTINGS["beta"], learning_rate=SETTINGS["lr"], lr_scheduler_type="linear", warmup_steps=0,
            per_device_train_batch_size=SETTINGS["batch_size"], max_steps=SETTINGS["max_steps"], max_length=SETTINGS["max_length"],
            max_grad_norm=1e9, weight_decay=0.0, adam_epsilon=1e-8, optim="adamw_torch", logging_steps=1, report_to=[], use_cpu=True,
            save_strategy="no", dataset_num_proc=None, seed=0,
        )
        peft_model = PeftModel.from_pretrained(base(model_dir), ADAPTER, is_trainable=True)
        trainer = SequentialDPOTrainer(model=peft_model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
        trainer.train()
        trl_steps = [{k: float(log[k]) for k in KEYS} | {"step": int(log["step"])} for log in trainer.state.log_history if "grad_norm" in log]
        tokenized = [{k: ex[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for ex in trainer.train_dataset]
    torch.manual_seed(0)
    model = PeftModel.from_pretrained(base(model_dir), ADAPTER, is_trainable=True)
    ref = PeftModel.from_pretrained(base(model_dir), ADAPTER).merge_and_unload().eval()
    autograd = autograd_loop(model, ref, tokenized)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        final = {k: v.flatten().tolist() for k, v in load_file(Path(tmp) / "adapter_model.safetensors").items()}
    result = {"weights_blake3": h(model_dir / "model.safetensors"), "data_blake3": h(data), "settings": SETTINGS,
              "steps": trl_steps, "autograd_steps": autograd, "final_adapter": final, "start_logps": logps}
    (GOLDEN / "trl_lora_trajectory_llama.json").write_text(json.dumps(result) + "\n")
    print(f"LoRA golden written: step 1 grad_norm TRL {trl_steps[0]['grad_norm']:.6f}, autograd {autograd[0]['grad_norm']:.6f}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
