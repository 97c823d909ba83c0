"""Golden values from HF transformers 5.23 / TRL 1.16 for the project's generated tiny models.

Run via scripts/make_golden.sh, which builds the models with `pipeline init-model`. Writes, under
tests/golden/:
  - <case>.parquet: tokenization inputs, and trl_<case>_<arch>.json: what TRL's DPOTrainer makes
    of them (prompt_ids / chosen_ids / rejected_ids per kept row, in order) and the completion
    tokens its DataCollatorForPreference scores after max_length truncation;
  - hf_logps_<arch>.json: per-token log-probs (float32, eval mode) of a few sequences.
Each JSON records the blake3 of the tokenizer.json and model.safetensors it came from, so the
Rust tests can tell a stale golden file from a wrong result.
"""
import json
import sys
import tempfile
from pathlib import Path

import blake3
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer
from trl.trainer.dpo_trainer import DataCollatorForPreference

OUT = Path(__file__).resolve().parent.parent / "tests" / "golden"


def h(path):
    return blake3.blake3(Path(path).read_bytes()).hexdigest()


def msgs(*pairs):
    return [{"role": r, "content": c} for r, c in pairs]


def cases(eos):
    """Tokenization cases: name -> (rows, max_length)."""
    long_answer = " ".join(["the sky is blue and the grass is green"] * 12)
    return {
        "standard": ([
            {"prompt": "Question: What is 2 plus 3?\nAnswer:", "chosen": " 2 plus 3 is 5.", "rejected": " idk, maybe 7"},
            # A prompt ending in a space: its last token can merge into the completion.
            {"prompt": "Question: What color is the sky?\nAnswer: ", "chosen": "The sky is blue.", "rejected": "lol it's green"},
            # EOS already present on chosen: not appended twice.
            {"prompt": "Question: What sound does a cat make?\nAnswer:", "chosen": " A cat says meow." + eos, "rejected": " uh... probably woof"},
            # Unicode and newlines.
            {"prompt": "Frage: Wie heißt das?\n", "chosen": "Das ist ein Apfel 🍎.", "rejected": "Keine Ahnung\n\nvielleicht"},
            # Truncation: the completion runs past max_length.
            {"prompt": "Question: Describe the world.\nAnswer:", "chosen": " " + long_answer, "rejected": " short"},
            # Prompt alone reaches max_length: TRL drops the row.
            {"prompt": "Question: " + long_answer + long_answer + "\nAnswer:", "chosen": " yes", "rejected": " no"},
        ], 64),
        "implicit": ([
            {"chosen": "Question: What is 1 plus 1?\nAnswer: 1 plus 1 is 2.", "rejected": "Question: What is 1 plus 1?\nAnswer: idk 3"},
            {"chosen": "Q: sky?\nA: blue", "rejected": "Q: sky?\nA: green"},
        ], 1024),
        "conversational": ([
            {"prompt": msgs(("system", "You are a helpful assistant."), ("user", "What color is the sky?")),
             "chosen": msgs(("assistant", "The sky is blue.")), "rejected": msgs(("assistant", "lol it's green"))},
            {"prompt": msgs(("user", "What is 4 plus 4?")),
             "chosen": msgs(("assistant", "4 plus 4 is 8.")), "rejected": msgs(("assistant", "no clue, i'd say 9"))},
            {"prompt": msgs(("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello!"), ("user", "What sound does a dog make?")),
             "chosen": msgs(("assistant", "A dog says woof.")), "rejected": msgs(("assistant", "whatever, just moo"))},
        ], 1024),
        "conversational_implicit": ([
            {"chosen": msgs(("user", "What color is snow?"), ("assistant", "The snow is white.")),
             "rejected": msgs(("user", "What color is snow?"), ("assistant", "idk, maybe black"))},
        ], 1024),
    }


def trl_tokenize(model_dir, rows, max_length):
    tok = AutoTokenizer.from_pretrained(model_dir)
    with tempfile.TemporaryDirectory() as tmp:
        args = DPOConfig(output_dir=tmp, max_length=max_length, report_to=[], per_device_train_batch_size=1,
                         dataset_num_proc=None, use_cpu=True)
        trainer = DPOTrainer(model=str(model_dir), args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
        ds = trainer.train_dataset
        collator = DataCollatorForPreference(pad_token_id=tok.pad_token_id or tok.eos_token_id, max_length=max_length)
        out = []
        for ex in ds:
            batch = collator([{k: ex[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}])
            cm = batch["completion_mask"]
            out.append({"prompt_ids": ex["prompt_ids"], "chosen_ids": ex["chosen_ids"], "rejected_ids": ex["rejected_ids"],
                        "chosen_scored": int(cm[0].sum()), "rejected_scored": int(cm[1].sum())})
        return out


def logps(model_dir):
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    texts = ["Question: What color is the sky?\nAnswer: The sky is blue.", "What is 7 plus 2?", "a", "Ünïcödé 🍎 and tabs\t!"]
    seqs = []
    with torch.no_grad():
        for t in texts:
            ids = tok(t)["input_ids"]
            logits = model(torch.tensor([ids])).logits[0].float()
            lp = torch.log_softmax(logits, -1)
            # log p(ids[t] | ids[:t]) for t >= 1
            per_token = [float(lp[i - 1, ids[i]]) for i in range(1, len(ids))]
            seqs.append({"ids": ids, "token_logps": per_token})
    return seqs


def logps_bf16(model_dir):
    """Per-token log-probs with the weights and compute in bfloat16 (eager attention, which
    upcasts the attention softmax to float32), on sequences long enough for that to matter."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, attn_implementation="eager").eval()
    gen = torch.Generator().manual_seed(0)
    seqs = []
    with torch.no_grad():
        for n in (64, 384):
            ids = torch.randint(3, model.config.vocab_size, (n,), generator=gen).tolist()
            lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
            seqs.append({"ids": ids, "token_logps": [float(lp[i - 1, ids[i]]) for i in range(1, n)]})
    return seqs


def rope_llama3():
    """inv_freq of Llama 3.1's rope scaling, from transformers' own function."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    cfg = LlamaConfig(hidden_size=512, num_attention_heads=4, head_dim=128, max_position_embeddings=131072, rope_parameters=rope)
    inv_freq, scale = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    return {"config": cfg.to_dict(), "inv_freq": inv_freq.tolist(), "attention_scaling": scale}


def mistral_sliding_window(llama_dir, out_dir):
    """The tiny llama's weights as a Mistral with a 4-token sliding window (eager attention)."""
    import shutil
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(llama_dir / f, out_dir / f)
    cfg = json.loads((llama_dir / "config.json").read_text())
    cfg.update({"model_type": "mistral", "architectures": ["MistralForCausalLM"], "sliding_window": 4})
    for k in ("attention_bias", "mlp_bias"):
        cfg.pop(k, None)
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    return cfg


def main(models_dir):
    models_dir = Path(models_dir)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "rope_llama3.json").write_text(json.dumps(rope_llama3(), indent=1) + "\n")
    for arch in ("llama", "qwen2"):
        mdir = models_dir / arch
        ident = {"tokenizer_blake3": h(mdir / "tokenizer.json"), "weights_blake3": h(mdir / "model.safetensors")}
        eos = AutoTokenizer.from_pretrained(mdir).eos_token
        for name, (rows, max_length) in cases(eos).items():
            # Inputs are per arch only because the EOS text differs.
            table = pa.Table.from_pylist(rows)
            pq.write_table(table, OUT / f"{name}_{arch}.parquet")
            result = {**ident, "max_length": max_length, "rows_in": len(rows), "rows": trl_tokenize(mdir, rows, max_length)}
            (OUT / f"trl_{name}_{arch}.json").write_text(json.dumps(result, indent=1) + "\n")
        (OUT / f"hf_logps_{arch}.json").write_text(json.dumps({**ident, "sequences": logps(mdir)}, indent=1) + "\n")
        (OUT / f"hf_logps_bf16_{arch}.json").write_text(json.dumps({**ident, "sequences": logps_bf16(mdir)}) + "\n")
        print(f"golden values for {arch} written to {OUT}")
        if arch == "llama":
            with tempfile.TemporaryDirectory() as tmp:
                cfg = mistral_sliding_window(mdir, Path(tmp))
                (OUT / "hf_logps_mistral_window4.json").write_text(
                    json.dumps({**ident, "config": cfg, "sequences": logps(Path(tmp))}, indent=1) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
