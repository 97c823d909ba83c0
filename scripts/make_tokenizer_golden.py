"""Golden values for tokenizers and chat templates, from transformers 5.23 and TRL 1.16.

Writes tests/golden/tokenizers/:
  - classes/<case>/{tokenizer.json, tokenizer_config.json, config.json}: a small tokenizer
    trained here for each tokenizer class transformers rebuilds (and for the resolution rules
    that keep tokenizer.json as it is), and classes.json: the class AutoTokenizer picked, the
    backend pipeline it built and the ids of a set of texts, with and without special tokens.
  - phi3/<dataset>.parquet and trl.json: preference rows tokenized by TRL's DPOTrainer with
    Phi-3-mini's real tokenizer files (tests/fixtures/real-tokenizers, see its SOURCES.md) under
    each real chat template, plain text and conversational, tools, chat_template_kwargs and a
    fixed strftime_now date; rows a template raises on are recorded with the message.
  - formats/: one dataset as JSON Lines (plain and gzip), a JSON array and a `datasets`
    save_to_disk directory, beside its parquet, for the byte-identity test.

Needs: pip install torch transformers==5.23.0 trl==1.16.0 datasets pyarrow (run from the repo root;
PYTHON=... scripts/make_golden.sh runs it). Not run by CI: its outputs are committed.
"""
import datetime as dt
import gzip
import json
import shutil
import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from datasets import Dataset
from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
from transformers.utils import chat_template_utils
from trl import DPOConfig, DPOTrainer

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "golden" / "tokenizers"
REAL = ROOT / "tests" / "fixtures" / "real-tokenizers"
TEMPLATE_DATE = dt.datetime(2026, 3, 15)

TRAIN_TEXT = [
    "The quick brown fox jumps over the lazy dog. Hello world, hello there!",
    "You are a helpful assistant. What is the capital of France? Paris is the capital.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024 3.14 and more numbers 12345.",
    "Question: What color is the sky?\nAnswer: The sky is blue.\n\nThanks!",
    "  indented text\twith tabs and    many spaces  ",
    "Über naïve café résumé — déjà vu. 日本語 テキスト 🍎🍌",
] * 20

TEXTS = [
    "Hello world",
    " leading space",
    "trailing space ",
    "<|user|>\nYou are terse.<|end|>\n<|assistant|>\nOk.<|end|>",
    "two  spaces\tand tab\nnew line",
    "digits 12345 and 3.14",
    "Ünïcödé 🍎 and ☃ snow",
    "<s>a bos inside</s> and after",
    "a<|endoftext|>b <|im_start|>user\nhi<|im_end|>",
    "",
]

SP_SPECIALS = ["<unk>", "<s>", "</s>"]
BL_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TOKENS = ["<|user|>", "<|assistant|>", "<|end|>"]


def added(i, content, special=True, rstrip=False, normalized=False):
    return {"id": i, "content": content, "single_word": False, "lstrip": False, "rstrip": rstrip, "normalized": normalized, "special": special}


def sentencepiece_bpe():
    """A SentencePiece-style BPE (byte fallback, ▁ for spaces) like Llama's and Gemma's files."""
    tok = Tokenizer(BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.train_from_iterator(TRAIN_TEXT, BpeTrainer(vocab_size=420, special_tokens=SP_SPECIALS, show_progress=False))
    j = json.loads(tok.to_str())
    trained = [t for t, _ in sorted(j["model"]["vocab"].items(), key=lambda x: x[1]) if t not in SP_SPECIALS]
    order = SP_SPECIALS + [f"<0x{i:02X}>" for i in range(256)] + trained
    j["model"]["vocab"] = {t: i for i, t in enumerate(order)}
    n = len(order)
    j["added_tokens"] = [added(0, "<unk>"), added(1, "<s>"), added(2, "</s>", special=False, rstrip=True)] + [
        added(n + k, t) for k, t in enumerate(CHAT_TOKENS)
    ]
    j["decoder"] = json.loads(decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]).__getstate__())
    j["post_processor"] = json.loads(
        processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]).__getstate__()
    )
    return j


def byte_level_bpe(bos_post=False):
    """A byte-level BPE like GPT-2's, Qwen2's and Cohere's files."""
    tok = Tokenizer(BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(vocab_size=500, special_tokens=BL_SPECIALS, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TRAIN_TEXT, trainer)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    if bos_post:
        tok.post_processor = processors.TemplateProcessing(single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)])
    return json.loads(tok.to_str())


def class_cases():
    """case -> (tokenizer.json, tokenizer_config.json, config.json)."""
    sp, bl = sentencepiece_bpe(), byte_level_bpe()
    sp_cfg = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False}
    bl_cfg = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None, "unk_token": None}
    llama = {"model_type": "llama"}
    return {
        "llama_legacy_false": (sp, {**sp_cfg, "tokenizer_class": "LlamaTokenizer", "legacy": False}, llama),
        "llama_legacy_true": (sp, {**sp_cfg, "tokenizer_class": "LlamaTokenizer", "legacy": True}, llama),
        "llama_no_prefix_space": (sp, {**sp_cfg, "tokenizer_class": "LlamaTokenizerFast", "legacy": False, "add_prefix_space": False}, llama),
        "code_llama": (sp, {**sp_cfg, "tokenizer_class": "CodeLlamaTokenizer"}, llama),
        "gemma": (sp, {"tokenizer_class": "GemmaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>"}, {"model_type": "gemma2"}),
        "qwen2": (bl, {**bl_cfg, "tokenizer_class": "Qwen2Tokenizer"}, {"model_type": "qwen2"}),
        "qwen2_declared_fast": (bl, {**bl_cfg, "tokenizer_class": "PreTrainedTokenizerFast"}, {"model_type": "qwen2"}),
        "qwen3_declared_fast": (bl, {**bl_cfg, "tokenizer_class": "PreTrainedTokenizerFast"}, {"model_type": "qwen3"}),
        "qwen3_5": (bl, {**bl_cfg, "tokenizer_class": "Qwen3_5Tokenizer"}, {"model_type": "qwen3_5"}),
        "gpt2": (bl, {"tokenizer_class": "GPT2Tokenizer", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}, {"model_type": "gpt2"}),
        "gpt2_prefix_space": (bl, {"tokenizer_class": "GPT2Tokenizer", "add_prefix_space": True, "eos_token": "<|endoftext|>"}, {"model_type": "gpt2"}),
        "gpt_neox": (byte_level_bpe(bos_post=True), {"tokenizer_class": "GPTNeoXTokenizer", "add_bos_token": True, "eos_token": "<|endoftext|>"}, {"model_type": "gpt_neox"}),
        "cohere": (bl, {"tokenizer_class": "CohereTokenizer", "bos_token": "<|endoftext|>", "eos_token": "<|im_end|>"}, {"model_type": "cohere"}),
        # Resolution rules that keep tokenizer.json as it is:
        "llama_class_byte_level_file": (bl, {**bl_cfg, "tokenizer_class": "LlamaTokenizer"}, llama),
        "llama_class_phi3_model": (sp, {**sp_cfg, "tokenizer_class": "LlamaTokenizer", "legacy": False}, {"model_type": "phi3"}),
        "llama_class_mistral_model": (sp, {**sp_cfg, "tokenizer_class": "LlamaTokenizer", "legacy": False}, {"model_type": "mistral"}),
        "fast_class_no_config": (sp, {**sp_cfg, "tokenizer_class": "PreTrainedTokenizerFast"}, None),
    }


def write_case(d, tok_json, tok_cfg, config):
    d.mkdir(parents=True, exist_ok=True)
    (d / "tokenizer.json").write_text(json.dumps(tok_json, ensure_ascii=False) + "\n")
    (d / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=1) + "\n")
    if config is not None:
        (d / "config.json").write_text(json.dumps(config, indent=1) + "\n")


def classes():
    out = {}
    base = OUT / "classes"
    shutil.rmtree(base, ignore_errors=True)
    for name, (tok_json, tok_cfg, config) in class_cases().items():
        d = base / name
        write_case(d, tok_json, tok_cfg, config)
        tok = AutoTokenizer.from_pretrained(d)
        backend = json.loads(tok.backend_tokenizer.to_str())
        out[name] = {
            "class": type(tok).__name__,
            "pipeline": {k: backend[k] for k in ("normalizer", "pre_tokenizer", "post_processor", "decoder", "added_tokens")},
            "model_options": {k: v for k, v in backend["model"].items() if k not in ("vocab", "merges")},
            "special_tokens": tok.special_tokens_map,
            "ids": [{"text": t, "with_special": tok(t)["input_ids"], "without_special": tok(t, add_special_tokens=False)["input_ids"]} for t in TEXTS],
        }
        print(f"{name}: {type(tok).__name__}")
    (OUT / "classes.json").write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")


# ---- TRL on Phi-3's real tokenizer under each real template ----

def m(role, content, **extra):
    return {"role": role, "content": content, **extra}


WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city.",
                "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name"}}, "required": ["city"]}}}
TIME_TOOL = {"type": "function", "function": {"name": "get_time", "description": "Local time in a city.",
             "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name"}}, "required": ["city"]}}}


def conversational_rows(system=True):
    sys_turn = [m("system", "You are terse.")] if system else []
    return [
        {"prompt": sys_turn + [m("user", "What color is the sky?")], "chosen": [m("assistant", "Blue.")], "rejected": [m("assistant", "Green, obviously!")]},
        {"prompt": [m("user", "Hi"), m("assistant", "Hello! How can I help?"), m("user", "  Say 'héllo' with an emoji 🍎  ")],
         "chosen": [m("assistant", "héllo 🍎")], "rejected": [m("assistant", " hello ")]},
        {"prompt": sys_turn + [m("user", "Repeat the tag <|user|> and </s> literally.")],
         "chosen": [m("assistant", "<|user|> and </s>")], "rejected": [m("assistant", "No.")]},
        {"prompt": [m("user", "1+1?")], "chosen": [m("assistant", "2")], "rejected": [m("assistant", "11\n\n")]},
    ]


def plain_rows():
    return [
        {"prompt": "Question: What color is the sky?\nAnswer:", "chosen": " Blue.", "rejected": " Green!"},
        {"prompt": "  Leading spaces and a trailing one ", "chosen": "yes", "rejected": " no "},
        {"prompt": "<|user|>\nSpecial tokens in text<|end|>\n<|assistant|>\n", "chosen": "Fine.<|end|>", "rejected": "Bad.</s>"},
        {"prompt": "Ünïcödé and emoji 🍎☃:", "chosen": " 日本語", "rejected": " ☃☃"},
    ]


def tool_rows(as_string):
    tools = [WEATHER_TOOL, TIME_TOOL]
    call = [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]
    rows = [
        {"prompt": [m("user", "Weather in Paris?")], "chosen": [m("assistant", "Let me check.")], "rejected": [m("assistant", "No idea.")]},
        {"prompt": [m("user", "Weather in Paris?"), m("assistant", "", tool_calls=call), m("tool", '{"temp": 21}', name="get_weather")],
         "chosen": [m("assistant", "It is 21 degrees.")], "rejected": [m("assistant", "It is cold.")]},
    ]
    for r in rows:
        r["tools"] = json.dumps(tools) if as_string else tools
    return rows


def qwen3_kwargs_rows():
    return [
        {"prompt": [m("user", "2+2?"), m("assistant", "4", reasoning_content="Two plus two is four."), m("user", "And 3+3?")],
         "chosen": [m("assistant", "6")], "rejected": [m("assistant", "7")], "chat_template_kwargs": {"enable_thinking": False}},
        {"prompt": [m("user", "Name a fruit.")], "chosen": [m("assistant", "Apple.")], "rejected": [m("assistant", "Rock.")],
         "chat_template_kwargs": {"enable_thinking": True}},
    ]


def phi3_model(root, model_type, template):
    """A model directory with Phi-3-mini's tokenizer files, a tiny random model for TRL to load,
    and `template` (a file under real-tokenizers/templates, or None for Phi-3's own)."""
    d = root / f"{model_type}-{template or 'own'}"
    if d.exists():
        return d
    cfg = LlamaConfig(vocab_size=32064, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(d)
    c = json.loads((d / "config.json").read_text())
    c["model_type"] = model_type
    (d / "config.json").write_text(json.dumps(c))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(REAL / "phi-3-mini-4k-instruct" / f, d / f)
    if template:
        shutil.copy(REAL / "templates" / template, d / "chat_template.jinja")
    return d


class FixedDatetime(dt.datetime):
    @classmethod
    def now(cls, tz=None):
        return TEMPLATE_DATE


def trl_rows(model_dir, table):
    tok = AutoTokenizer.from_pretrained(model_dir)
    with tempfile.TemporaryDirectory() as tmp:
        args = DPOConfig(output_dir=tmp, report_to=[], per_device_train_batch_size=1, dataset_num_proc=None, use_cpu=True)
        ds = Dataset(table)
        trainer = DPOTrainer(model=str(model_dir), args=args, train_dataset=ds, processing_class=tok)
        return [{k: ex[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for ex in trainer.train_dataset], type(tok).__name__


def raises(model_dir, row):
    """The template's error message for a row, or None."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    try:
        tok.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False)
        return None
    except Exception as e:  # jinja2.TemplateError
        return str(e)


def phi3():
    chat_template_utils.datetime = FixedDatetime
    chat_template_utils._compile_jinja_template.cache_clear()
    base = OUT / "phi3"
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    templates = {
        "qwen2.5": "Qwen-Qwen2.5-7B-Instruct.jinja",
        "llama3.1": "meta-llama-Llama-3.1-8B-Instruct.jinja",
        "llama3.2": "meta-llama-Llama-3.2-3B-Instruct.jinja",
        "gemma2": "google-gemma-2-2b-it.jinja",
        "qwen3": "Qwen-Qwen3.jinja",
    }
    datasets = {"plain": ("llama", None, plain_rows()), "plain_as_is": ("phi3", None, plain_rows()), "phi3_own": ("llama", None, conversational_rows()),
                "phi3_own_as_is": ("phi3", None, conversational_rows())}
    for name, t in templates.items():
        datasets[f"conv_{name}"] = ("llama", t, conversational_rows())
    for name in ("qwen2.5", "llama3.1", "qwen3"):
        datasets[f"tools_{name}"] = ("llama", templates[name], tool_rows(as_string=False))
        datasets[f"tools_json_{name}"] = ("llama", templates[name], tool_rows(as_string=True))
    datasets["kwargs_qwen3"] = ("llama", templates["qwen3"], qwen3_kwargs_rows())
    out = {"template_date": TEMPLATE_DATE.strftime("%Y-%m-%d"), "datasets": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (model_type, template, rows) in datasets.items():
            mdir = phi3_model(Path(tmp), model_type, template)
            table = pa.Table.from_pylist(rows)
            pq.write_table(table, base / f"{name}.parquet")
            errors = {i: e for i, r in enumerate(rows) if isinstance(r["prompt"], list) and (e := raises(mdir, r))}
            keep = [i for i in range(len(rows)) if i not in errors]
            kept, cls = trl_rows(mdir, table.take(keep))
            out["datasets"][name] = {"model_type": model_type, "template": template, "class": cls, "rows_in": len(rows),
                                     "kept_source_rows": keep, "rows": kept, "template_errors": {str(i): e for i, e in errors.items()}}
            print(f"{name}: {cls}, {len(kept)} rows, {len(errors)} template errors")
    (base / "trl.json").write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")


def formats():
    """One dataset (conversational, tools as JSON strings, per-row template kwargs) in every
    format `prepare` reads."""
    base = OUT / "formats"
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    rows = [dict(r, chat_template_kwargs={"enable_thinking": False}) for r in tool_rows(as_string=True)] + [
        dict(r, tools=None, chat_template_kwargs={"enable_thinking": True}) for r in conversational_rows()]
    pq.write_table(pa.Table.from_pylist(rows), base / "rows.parquet")
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    (base / "rows.jsonl").write_text(lines)
    with gzip.GzipFile(base / "rows.jsonl.gz", "wb", mtime=0) as f:
        f.write(lines.encode())
    (base / "rows.json").write_text(json.dumps(rows, ensure_ascii=False, indent=1) + "\n")
    Dataset.from_list(rows).save_to_disk(str(base / "rows_dataset"))
    for cache in (base / "rows_dataset").glob("cache-*"):
        cache.unlink()


def main():
    if not REAL.exists():
        sys.exit(f"{REAL} is missing: the real tokenizer files live in tests/fixtures/real-tokenizers")
    OUT.mkdir(parents=True, exist_ok=True)
    classes()
    phi3()
    formats()


if __name__ == "__main__":
    main()
