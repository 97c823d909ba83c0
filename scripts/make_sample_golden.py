"""Golden values for `pipeline sample` and `pipeline label` from HF transformers 5.23.

Run via scripts/make_golden.sh, which builds the tiny models with `pipeline init-model`
(causal LMs and `--reward` models). Writes tests/golden/hf_generate.json:
  - generate.<arch>: greedy `generate(do_sample=False)` completions (token ids, finish reason,
    and Σ log-softmax of the raw logits of the generated tokens) per prompt; plain prompts for
    Llama, chat prompts for Qwen2. A second end-of-sequence id is chosen from a completion's
    middle and written to generation_config.json, so some completions stop at EOS and others
    at max_new_tokens; the test writes the same generation_config.json.
  - reward.<arch>: AutoModelForSequenceClassification scores of prompt + completion texts.
Each section records the blake3 of the files it came from.
"""
import json
import sys
from pathlib import Path

import blake3
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

OUT = Path(__file__).resolve().parent.parent / "tests" / "golden" / "hf_generate.json"
MAX_NEW = 12
PLAIN = ["Question: What color is the sky?\nAnswer:", "Question: What is 3 plus 4?\nAnswer:", "Hello", "Question: What sound does a cow make?\nAnswer:"]
CHATS = [
    [{"role": "user", "content": "What color is the snow?"}],
    [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "What is 2 plus 2?"}],
    [{"role": "user", "content": "What sound does a duck make?"}],
]


def h(path):
    return blake3.blake3(Path(path).read_bytes()).hexdigest()


def prompt_ids(tok, p):
    if isinstance(p, str):
        return tok(p)["input_ids"]
    return tok(tok.apply_chat_template(p, add_generation_prompt=True, tokenize=False), add_special_tokens=False)["input_ids"]


def greedy(model_dir, prompts, eos):
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    out = []
    for p in prompts:
        ids = torch.tensor([prompt_ids(tok, p)])
        g = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=MAX_NEW, eos_token_id=eos,
                           pad_token_id=tok.pad_token_id, return_dict_in_generate=True, output_logits=True)
        new = g.sequences[0, ids.shape[1]:].tolist()
        logp = sum(torch.log_softmax(l[0].double(), -1)[t].item() for l, t in zip(g.logits, new))
        out.append({"prompt": p, "prompt_ids": ids[0].tolist(), "completion_ids": new,
                    "finish_reason": "eos" if new[-1] in eos else "length", "logp": logp})
    return out


def generate_case(model_dir, prompts):
    tok = AutoTokenizer.from_pretrained(model_dir)
    base_eos = [tok.eos_token_id]
    first = greedy(model_dir, prompts, base_eos)
    # An extra stop token from the middle of one completion that another never produces, so
    # that some completions stop at EOS and others run to max_new_tokens.
    seqs = [c["completion_ids"] for c in first if c["finish_reason"] == "length"]
    # (A random tiny model may repeat one token everywhere; then none is added.)
    extra = [x for s in seqs for i, x in enumerate(s) if i >= 2 and x not in s[:i] and any(x not in o for o in seqs)][:1]
    eos = base_eos + extra
    (Path(model_dir) / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}) + "\n")
    rows = greedy(model_dir, prompts, eos)
    return {"tokenizer": h(Path(model_dir) / "tokenizer.json"), "weights": h(Path(model_dir) / "model.safetensors"),
            "max_new_tokens": MAX_NEW, "eos_token_id": eos, "rows": rows}


def reward_case(model_dir, items):
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    rows = []
    for prompt, completion in items:
        if isinstance(prompt, str):
            ids = tok(prompt + completion)["input_ids"]
        else:
            ids = tok(tok.apply_chat_template(prompt + completion, tokenize=False), add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            score = model(torch.tensor([ids])).logits[0, 0].item()
        rows.append({"prompt": prompt, "completion": completion, "ids": ids, "score": score})
    return {"weights": h(Path(model_dir) / "model.safetensors"), "rows": rows}


def main():
    root = Path(sys.argv[1])
    plain_items = [(PLAIN[0], " The sky is blue."), (PLAIN[1], " idk, maybe 9"), (PLAIN[2], " world")]
    chat_items = [(c, [{"role": "assistant", "content": a}]) for c, a in zip(CHATS, ["The snow is white.", "lol it's 5", "A duck says quack."])]
    golden = {
        "generate": {"llama": generate_case(root / "llama", PLAIN), "qwen2": generate_case(root / "qwen2", CHATS)},
        "reward": {"llama": reward_case(root / "rm_llama", plain_items), "qwen2": reward_case(root / "rm_qwen2", chat_items)},
    }
    finishes = {r["finish_reason"] for c in golden["generate"].values() for r in c["rows"]}
    assert finishes == {"eos", "length"}, finishes
    OUT.write_text(json.dumps(golden, indent=1) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
