"""Checks a LoRA adapter `pipeline train` wrote against PEFT itself (not run by CI: needs torch).

Usage: python scripts/check_peft_adapter.py BASE_MODEL ADAPTER_DIR MERGED_DIR
  - PeftModel.from_pretrained(base, ADAPTER_DIR) loads it with no missing or unexpected keys;
  - PEFT's model and MERGED_DIR (`pipeline merge-lora` of the same adapter) give the same
    per-token log-probs within 1e-4, so our merge is PEFT's merge_and_unload;
  - PEFT's own merge_and_unload equals MERGED_DIR's weights within 1e-6.
"""
import sys

import torch
from peft import PeftModel
from peft.utils import set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer


def main(base_dir, adapter_dir, merged_dir):
    load = lambda d: AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").eval()
    model = PeftModel.from_pretrained(load(base_dir), adapter_dir).eval()
    # Load the same file again through PEFT's state-dict loader to see missing/unexpected keys.
    result = set_peft_model_state_dict(model, load_file(f"{adapter_dir}/adapter_model.safetensors"))
    missing = [k for k in result.missing_keys if "lora_" in k]
    assert not missing and not result.unexpected_keys, (missing, result.unexpected_keys)
    merged = load(merged_dir)
    tok = AutoTokenizer.from_pretrained(base_dir)
    worst = 0.0
    with torch.no_grad():
        for text in ["Question: What color is the sky?\nAnswer: The sky is blue.", "What is 7 plus 2?", "Q: grass?\nA: green"]:
            ids = torch.tensor([tok(text)["input_ids"]])
            a = torch.log_softmax(model(ids).logits[0], -1)
            b = torch.log_softmax(merged(ids).logits[0], -1)
            worst = max(worst, (a - b).abs().max().item())
        peft_merged = model.merge_and_unload().state_dict()
        ours = merged.state_dict()
        wdiff = max((peft_merged[k] - ours[k]).abs().max().item() for k in ours)
    print(f"PEFT loaded {adapter_dir}: no missing or unexpected keys; log-probs vs merged: max |diff| {worst:.2e}; "
          f"PEFT merge_and_unload vs ours: max |diff| {wdiff:.2e}")
    assert worst < 1e-4 and wdiff < 1e-6


if __name__ == "__main__":
    main(*sys.argv[1:4])
