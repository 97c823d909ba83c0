//! Tokenizers as transformers 5 builds them from a model directory's files.
//!
//! transformers runs `tokenizer.json` as it is only for `TokenizersBackend`
//! (`PreTrainedTokenizerFast`) and unknown classes. A named class (`LlamaTokenizer`,
//! `GemmaTokenizer`, `Qwen2Tokenizer`, ...) takes only the vocabulary, merges and
//! post-processor from the file and rebuilds the normalizer, pre-tokenizer, model options and
//! decoder from its own code and `tokenizer_config.json` (`legacy`, `add_prefix_space`). Which
//! class applies depends on `tokenizer_class` *and* config.json's `model_type` (as
//! `AutoTokenizer.from_pretrained` resolves it), so Phi-3's files under `model_type: llama` are
//! rebuilt by `LlamaTokenizer` while under `model_type: phi3` they run as they are.
//! Two facts from transformers 5.23's loader that decide ids: with a tokenizer.json present,
//! tokenizer_config.json's `add_bos_token`/`add_eos_token` are dropped (the file's
//! post-processor is kept), and the added tokens come from `added_tokens_decoder` (else the
//! file's `added_tokens`), added in id order after the rebuild.
//! This module owns all of it; `tests/golden/tokenizers/` holds what transformers built.
use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tokenizers::{AddedToken, Tokenizer};

/// The tokenizer classes whose transformers 5 `__init__` rebuilds the pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    Llama,
    CodeLlama,
    Gemma,
    Qwen2,
    Qwen3_5,
    Gpt2,
    GptNeoX,
    Cohere,
}

impl Class {
    pub fn name(self) -> &'static str {
        match self {
            Class::Llama => "LlamaTokenizer",
            Class::CodeLlama => "CodeLlamaTokenizer",
            Class::Gemma => "GemmaTokenizer",
            Class::Qwen2 => "Qwen2Tokenizer",
            Class::Qwen3_5 => "Qwen3_5Tokenizer",
            Class::Gpt2 => "GPT2Tokenizer",
            Class::GptNeoX => "GPTNeoXTokenizer",
            Class::Cohere => "CohereTokenizer",
        }
    }

    fn from_name(name: &str) -> Option<Self> {
        let all = [Class::Llama, Class::CodeLlama, Class::Gemma, Class::Qwen2, Class::Qwen3_5, Class::Gpt2, Class::GptNeoX, Class::Cohere];
        all.into_iter().find(|c| c.name() == name.strip_suffix("Fast").unwrap_or(name))
    }

    /// The class's default named special tokens (`__init__`'s defaults), overridden by
    /// tokenizer_config.json.
    fn default_specials(self) -> &'static [(&'static str, &'static str)] {
        const ENDOFTEXT: &str = "<|endoftext|>";
        match self {
            Class::Llama | Class::CodeLlama => &[("unk_token", "<unk>"), ("bos_token", "<s>"), ("eos_token", "</s>")],
            Class::Gemma => {
                &[("unk_token", "<unk>"), ("bos_token", "<bos>"), ("eos_token", "<eos>"), ("pad_token", "<pad>"), ("mask_token", "<mask>")]
            }
            Class::Qwen2 | Class::Qwen3_5 => &[("unk_token", ENDOFTEXT), ("eos_token", ENDOFTEXT), ("pad_token", ENDOFTEXT)],
            Class::Gpt2 => &[("unk_token", ENDOFTEXT), ("bos_token", ENDOFTEXT), ("eos_token", ENDOFTEXT)],
            Class::GptNeoX => &[("unk_token", ENDOFTEXT), ("bos_token", ENDOFTEXT), ("eos_token", ENDOFTEXT), ("pad_token", "<|padding|>")],
            Class::Cohere => &[
                ("unk_token", "<UNK>"),
                ("bos_token", "<BOS_TOKEN>"),
                ("eos_token", "<|END_OF_TURN_TOKEN|>"),
                ("pad_token", "<PAD>"),
                ("cls_token", "<CLS>"),
                ("sep_token", "<SEP>"),
                ("mask_token", "<MASK_TOKEN>"),
            ],
        }
    }
}

/// transformers 5.23's `TOKENIZER_MAPPING_NAMES` for the model types of causal LMs: the class
/// registered for a model type (classes absent here are not registered).
fn registered_class(model_type: &str) -> Option<&'static str> {
    const AS_IS: &[&str] = &[
        "aria", "flex_olmo", "glm", "glm4", "glm4_moe", "glm4_moe_lite", "gpt_bigcode", "granite", "granitemoe", "granitemoehybrid",
        "granitemoeshared", "kimi_linear", "mimo_v2_flash", "ministral", "ministral3", "mistral", "mistral3", "mixtral", "olmo2", "olmo3",
        "olmo_hybrid", "persimmon", "stablelm", "phi3", "internlm3", "jamba", "modernbert-decoder", "chatlm", "phimoe", "minicpm3", "nemotron",
        "internlm2", "iquestcoder", "hyperclovax", "arctic", "minimax_m2", "ernie4_5_moe", "ernie4_5",
    ];
    let table: &[(&str, &[&str])] = &[
        ("TokenizersBackend", AS_IS),
        ("Qwen2Tokenizer", &["qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "qwen3_next", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"]),
        ("Qwen3_5Tokenizer", &["qwen3_5", "qwen3_5_moe", "qwen3_5_moe_text", "qwen3_5_text"]),
        ("GPT2Tokenizer", &["codegen", "dbrx", "gpt2", "gpt_neo", "gptj", "jais2", "opt", "phi", "starcoder2"]),
        ("GemmaTokenizer", &["gemma", "gemma2", "gemma3", "gemma3_text", "gemma3n", "gemma3n_text", "recurrent_gemma", "t5gemma"]),
        ("GPTNeoXTokenizer", &["gpt_neox", "mpt", "olmo", "olmoe", "falcon_mamba", "mamba", "mamba2", "rwkv"]),
        ("CohereTokenizer", &["cohere", "cohere2"]),
        ("CodeLlamaTokenizer", &["code_llama"]),
    ];
    table.iter().find(|(_, types)| types.contains(&model_type)).map(|(class, _)| *class)
}

/// transformers 5.23's `MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS` (the causal-LM ones): for
/// these the registered class wins over the one tokenizer_config.json names.
const HUB_CLASS_IGNORED: &[&str] = &[
    "arctic", "chatlm", "ernie4_5", "ernie4_5_moe", "hyperclovax", "internlm2", "internlm3", "iquestcoder", "jamba", "minicpm3", "minimax_m2",
    "modernbert-decoder", "nemotron", "phi3", "phimoe", "qwen2", "qwen3_5", "qwen3_5_moe", "qwen3_5_moe_text",
];

/// Which class `AutoTokenizer.from_pretrained` picks (transformers 5.23, without the optional
/// `mistral_common` package), as a rebuilding class or None (tokenizer.json as it is), with
/// why, for the manifest.
pub fn resolve_class(
    tokenizer_config_class: Option<&str>,
    config_class: Option<&str>,
    model_type: Option<&str>,
    byte_level: bool,
) -> (Option<Class>, String) {
    let strip = |s: &str| s.strip_suffix("Fast").unwrap_or(s).to_string();
    let hub = tokenizer_config_class.or(config_class).map(strip);
    let mt = model_type.unwrap_or("");
    let registered = registered_class(mt);
    let ignored = HUB_CLASS_IGNORED.contains(&mt);
    if hub.as_deref() == Some("LlamaTokenizer") && !ignored && byte_level {
        return (None, "tokenizer.json as is (LlamaTokenizer named, but the file is byte-level)".into());
    }
    if let (Some(h), Some(r)) = (&hub, registered) {
        if !mt.is_empty() && r != h {
            if r != "TokenizersBackend" {
                let pick = if ignored { r.to_string() } else { h.clone() };
                if let Some(c) = Class::from_name(&pick) {
                    return (Some(c), format!("{} (model_type `{mt}`)", c.name()));
                }
            }
            return (None, format!("tokenizer.json as is (tokenizer class `{h}` for model_type `{mt}`)"));
        }
    }
    let named = tokenizer_config_class.or(config_class).map(strip).or(registered.map(String::from));
    match named.as_deref().and_then(Class::from_name) {
        Some(c) => (Some(c), c.name().to_string()),
        None => (None, format!("tokenizer.json as is (tokenizer class `{}`)", named.as_deref().unwrap_or("none"))),
    }
}

/// The files of a model directory that decide how text becomes ids, each read once.
pub struct TokenizerFiles {
    pub tok_path: PathBuf,
    pub tok_json: Value,
    pub cfg_path: PathBuf,
    pub cfg: Value,
    /// config.json's `model_type` and `tokenizer_class` (they pick the class too).
    pub model_type: Option<String>,
    pub config_class: Option<String>,
}

fn json_file(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", path.display()))
}

impl TokenizerFiles {
    pub fn read(model_dir: &Path) -> Result<Self> {
        let tok_path = model_dir.join("tokenizer.json");
        if !tok_path.exists() {
            if model_dir.join("tokenizer.model").exists() {
                bail!(
                    "{}: only a SentencePiece tokenizer.model, no tokenizer.json. Write one with transformers (it converts the model \
                     as it loads it): python -c \"from transformers import AutoTokenizer; AutoTokenizer.from_pretrained('{0}').save_pretrained('{0}')\"",
                    model_dir.display()
                );
            }
            bail!("{}: no tokenizer.json", model_dir.display());
        }
        let tok_json = json_file(&tok_path)?;
        let cfg_path = model_dir.join("tokenizer_config.json");
        let cfg = if cfg_path.exists() { json_file(&cfg_path)? } else { json!({}) };
        let config_path = model_dir.join("config.json");
        let config = if config_path.exists() { json_file(&config_path)? } else { json!({}) };
        let s = |v: &Value| v.as_str().map(String::from);
        Ok(Self { tok_path, tok_json, cfg_path, cfg, model_type: s(&config["model_type"]), config_class: s(&config["tokenizer_class"]) })
    }

    /// Whether tokenizer.json declares a ByteLevel piece (transformers' own test: the text).
    fn byte_level(&self) -> bool {
        self.tok_json.to_string().contains("\"ByteLevel\"")
    }
}

/// A tokenizer as transformers builds it, and its named special tokens (bos, eos, ...).
pub struct Built {
    pub tokenizer: Tokenizer,
    /// `LlamaTokenizer`, `tokenizer.json as is (...)`, ...: recorded in the prepared manifest.
    pub construction: String,
    pub special_tokens: BTreeMap<String, String>,
}

/// A token of tokenizer_config.json: a string or an AddedToken dict.
pub fn token_string(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(String::from),
        _ => None,
    }
}

const SPECIAL_ATTRIBUTES: [&str; 7] = ["bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"];

fn added_token(v: &Value) -> Option<AddedToken> {
    let flag = |k: &str, default: bool| v.get(k).and_then(Value::as_bool).unwrap_or(default);
    let special = flag("special", false);
    Some(AddedToken {
        content: v.get("content")?.as_str()?.to_string(),
        single_word: flag("single_word", false),
        lstrip: flag("lstrip", false),
        rstrip: flag("rstrip", false),
        normalized: flag("normalized", !special),
        special,
    })
}

/// Metaspace / ByteLevel / ... components as tokenizers serializes them.
fn byte_level(add_prefix_space: bool, trim_offsets: bool, use_regex: bool) -> Value {
    json!({"type": "ByteLevel", "add_prefix_space": add_prefix_space, "trim_offsets": trim_offsets, "use_regex": use_regex})
}

fn replace(pattern: &str, content: &str) -> Value {
    json!({"type": "Replace", "pattern": {"String": pattern}, "content": content})
}

/// The rebuilt pipeline of `class`: (model options over the file's vocabulary and merges,
/// normalizer, pre-tokenizer, decoder), as each class's `__init__` in transformers 5.23 sets them.
fn pipeline(class: Class, cfg: &Value, unk: Option<&str>) -> (Value, Value, Value, Value) {
    let add_prefix_space = cfg.get("add_prefix_space").and_then(Value::as_bool);
    let legacy = cfg.get("legacy").and_then(Value::as_bool).unwrap_or(false);
    let plain_bpe = json!({"dropout": null, "unk_token": null, "continuing_subword_prefix": "", "end_of_word_suffix": "", "fuse_unk": false, "byte_fallback": false});
    let nfc = json!({"type": "NFC"});
    let byte_level_decoder = json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true});
    let sp_decoder = |strip: bool| {
        let mut seq = vec![replace("▁", " "), json!({"type": "ByteFallback"}), json!({"type": "Fuse"})];
        if strip {
            seq.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
        }
        json!({"type": "Sequence", "decoders": seq})
    };
    let metaspace = |scheme: &str| json!({"type": "Metaspace", "replacement": "▁", "prepend_scheme": scheme, "split": false});
    match class {
        Class::Llama => {
            let aps = add_prefix_space.unwrap_or(true);
            let scheme = match (aps, legacy) {
                (false, _) => "never",
                (true, true) => "always",
                (true, false) => "first",
            };
            let model = json!({"dropout": null, "unk_token": null, "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true});
            (model, Value::Null, metaspace(scheme), sp_decoder(aps))
        }
        Class::CodeLlama => {
            let aps = add_prefix_space.unwrap_or(true);
            let model = json!({"dropout": null, "unk_token": unk, "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true});
            (model, Value::Null, metaspace(if aps { "first" } else { "never" }), sp_decoder(true))
        }
        Class::Gemma => {
            let model = json!({"dropout": null, "unk_token": unk, "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true});
            let pre = json!({"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious", "invert": false});
            (model, replace(" ", "▁"), pre, sp_decoder(false))
        }
        Class::Qwen2 | Class::Qwen3_5 => {
            let regex = if class == Class::Qwen2 { QWEN2_REGEX } else { QWEN3_5_REGEX };
            let pre = json!({"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false},
                byte_level(add_prefix_space.unwrap_or(false), true, false),
            ]});
            (plain_bpe, nfc, pre, byte_level_decoder)
        }
        Class::Gpt2 => (plain_bpe, Value::Null, byte_level(add_prefix_space.unwrap_or(false), true, true), byte_level_decoder),
        Class::GptNeoX => {
            let trim = cfg.get("trim_offsets").and_then(Value::as_bool).unwrap_or(true);
            (plain_bpe, nfc, byte_level(add_prefix_space.unwrap_or(false), trim, true), byte_level_decoder)
        }
        Class::Cohere => {
            let aps = add_prefix_space.unwrap_or(false);
            let pre = json!({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": true}, byte_level(aps, true, true)]});
            (plain_bpe, nfc, pre, byte_level_decoder)
        }
    }
}

const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN3_5_REGEX: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// `update_post_processor()`: BOS/EOS around each sequence as `add_bos`/`add_eos` say.
fn template_processing(bos: Option<(&str, u32)>, eos: Option<(&str, u32)>) -> Value {
    let seq = |id: &str, type_id: u32| json!({"Sequence": {"id": id, "type_id": type_id}});
    let special = |t: &str, type_id: u32| json!({"SpecialToken": {"id": t, "type_id": type_id}});
    let (mut single, mut pair) = (vec![], vec![]);
    let mut specials = serde_json::Map::new();
    for (part, type_id, out) in [("A", 0, &mut single), ("B", 1, &mut pair)] {
        if let Some((t, _)) = bos {
            out.push(special(t, type_id));
        }
        out.push(seq(part, type_id));
        if let Some((t, _)) = eos {
            out.push(special(t, type_id));
        }
    }
    let pair: Vec<Value> = single.iter().cloned().chain(pair).collect();
    for (t, id) in bos.into_iter().chain(eos) {
        specials.insert(t.to_string(), json!({"id": t, "ids": [id], "tokens": [t]}));
    }
    json!({"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": specials})
}

fn parse(v: &Value, path: &Path) -> Result<Tokenizer> {
    v.to_string().parse::<Tokenizer>().map_err(|e| anyhow!("{}: cannot build the tokenizer: {e}", path.display()))
}

/// Builds the tokenizer transformers 5 would build from these files.
pub fn build(files: &TokenizerFiles) -> Result<Built> {
    let cfg = &files.cfg;
    let (class, construction) = resolve_class(
        cfg.get("tokenizer_class").and_then(Value::as_str),
        files.config_class.as_deref(),
        files.model_type.as_deref(),
        files.byte_level(),
    );
    // Named special tokens: tokenizer_config.json over the class's defaults.
    let mut special_tokens: BTreeMap<String, String> =
        class.map(|c| c.default_specials()).unwrap_or(&[]).iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    // Model-specific named tokens, in the order transformers adds them.
    let mut model_specific: Vec<String> = Vec::new();
    if class == Some(Class::CodeLlama) {
        for (k, v) in
            [("prefix_token", "▁<PRE>"), ("middle_token", "▁<MID>"), ("suffix_token", "▁<SUF>"), ("eot_token", "▁<EOT>"), ("fill_token", "<FILL_ME>")]
        {
            special_tokens.insert(k.into(), v.into());
            model_specific.push(k.into());
        }
    }
    // Every `*_token` setting is a named token (model-specific ones such as `image_token` too).
    for (k, v) in cfg.as_object().into_iter().flatten().filter(|(k, _)| k.ends_with("_token")) {
        match v {
            Value::Null if SPECIAL_ATTRIBUTES.contains(&k.as_str()) => {
                special_tokens.remove(k);
            }
            v => {
                if let Some(t) = token_string(Some(v)) {
                    if !SPECIAL_ATTRIBUTES.contains(&k.as_str()) && !model_specific.contains(k) {
                        model_specific.push(k.clone());
                    }
                    special_tokens.insert(k.clone(), t);
                }
            }
        }
    }
    let file = &files.tok_json;
    // The added tokens transformers passes: tokenizer_config.json's, else the file's.
    let mut added: Vec<(u64, AddedToken)> = match cfg.get("added_tokens_decoder").and_then(Value::as_object) {
        Some(map) => map.iter().filter_map(|(id, t)| Some((id.parse().ok()?, added_token(t)?))).collect(),
        None => file["added_tokens"].as_array().into_iter().flatten().filter_map(|t| Some((t["id"].as_u64()?, added_token(t)?))).collect(),
    };
    added.sort_by_key(|(id, _)| *id);
    let extra: Vec<String> = ["additional_special_tokens", "extra_special_tokens"]
        .iter()
        .filter_map(|k| cfg.get(*k)?.as_array())
        .flatten()
        .filter_map(|t| token_string(Some(t)))
        .collect();

    let mut tokenizer = match class {
        None => parse(file, &files.tok_path)?,
        Some(c) => {
            let model = &file["model"];
            let vocab = match &model["vocab"] {
                // Unigram-style [token, score] lists become token -> index, as transformers does.
                Value::Array(list) => Value::Object(
                    list.iter().enumerate().filter_map(|(i, t)| Some((t.get(0).unwrap_or(t).as_str()?.to_string(), json!(i)))).collect(),
                ),
                v => v.clone(),
            };
            let merges = if model["type"] == "BPE" { model["merges"].clone() } else { json!([]) };
            let (mut opts, normalizer, pre_tokenizer, decoder) = pipeline(c, cfg, special_tokens.get("unk_token").map(String::as_str));
            opts["type"] = json!("BPE");
            opts["ignore_merges"] = json!(false);
            opts["vocab"] = vocab;
            opts["merges"] = merges;
            let doc = json!({
                "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
                "normalizer": normalizer, "pre_tokenizer": pre_tokenizer, "post_processor": null, "decoder": decoder, "model": opts,
            });
            parse(&doc, &files.tok_path).with_context(|| format!("rebuilding it as {}", c.name()))?
        }
    };
    // Tokens the backend does not have yet, in transformers' order: the added tokens by id,
    // then named and extra special tokens.
    let have = |t: &Tokenizer, s: &str| t.get_added_tokens_decoder().values().any(|a| a.content == s);
    let named: Vec<&String> = special_tokens.values().collect();
    let mut to_add: Vec<AddedToken> = added
        .into_iter()
        .map(|(_, mut t)| {
            // transformers marks an added token special when it is a named special token.
            t.special |= named.contains(&&t.content);
            t
        })
        // transformers re-adds a token unless the backend holds it with the same properties.
        .filter(|t| {
            let same = |a: &AddedToken| {
                (&a.content, a.single_word, a.lstrip, a.rstrip, a.normalized, a.special)
                    == (&t.content, t.single_word, t.lstrip, t.rstrip, t.normalized, t.special)
            };
            !tokenizer.get_added_tokens_decoder().values().any(same)
        })
        .collect();
    // Named tokens in transformers' order: the standard attributes, then model-specific ones.
    let named_order = SPECIAL_ATTRIBUTES.iter().map(|k| k.to_string()).chain(model_specific);
    for s in named_order.filter_map(|k| special_tokens.get(&k).cloned()).collect::<Vec<_>>().iter().chain(extra.iter()) {
        if !have(&tokenizer, s) && !to_add.iter().any(|t| &t.content == s) {
            to_add.push(AddedToken::from(s.clone(), true));
        }
    }
    tokenizer.add_tokens(to_add).map_err(|e| anyhow!("{}: cannot add the special tokens: {e}", files.tok_path.display()))?;
    // The post-processor: the file's, except where the class sets BOS/EOS itself or the file has none.
    let id = |t: &Tokenizer, k: &str| special_tokens.get(k).and_then(|s| Some((s.as_str(), t.token_to_id(s)?)));
    let post = match (class, &file["post_processor"]) {
        (Some(Class::CodeLlama), _) => Some(template_processing(id(&tokenizer, "bos_token"), None)),
        (Some(Class::GptNeoX), _) | (_, Value::Null) => Some(template_processing(None, None)),
        (Some(_), p) => Some(p.clone()),
        (None, _) => None,
    };
    if let Some(p) = post {
        let p: tokenizers::PostProcessorWrapper =
            serde_json::from_value(p).with_context(|| format!("{}: post_processor", files.tok_path.display()))?;
        tokenizer.with_post_processor(Some(p));
    }
    Ok(Built { tokenizer, construction, special_tokens })
}
