//! `pipeline init-model`: a randomly initialised model in Hugging Face layout, with a real
//! byte-level BPE tokenizer trained by the `tokenizers` crate on text the project generates.
//! Same arguments, byte-identical files.
use super::prefs::{synth_row, text_prompt};
use crate::model::config::ModelConfig;
use crate::model::weights::FloatDtype;
use crate::model::weights::{save_weights, tensor_shapes};
use crate::rng::Rng;
use crate::store::write_atomic;
use anyhow::{anyhow, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::BTreeMap;
use std::path::Path;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::normalizers::unicode::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, PostProcessorWrapper, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer};

/// The families `init-model` writes (config.json's `model_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Arch {
    Llama,
    Qwen2,
    Qwen3,
    #[value(name = "qwen3_moe")]
    Qwen3Moe,
    Mixtral,
    Gemma2,
    /// `gemma3_text` (Gemma3ForCausalLM).
    Gemma3,
    Phi3,
    Olmo2,
    Smollm3,
}

impl Arch {
    /// config.json's `model_type` and the architecture class of a causal LM and of a reward model.
    fn names(self) -> (&'static str, &'static str, &'static str) {
        match self {
            Arch::Llama => ("llama", "LlamaForCausalLM", "LlamaForSequenceClassification"),
            Arch::Qwen2 => ("qwen2", "Qwen2ForCausalLM", "Qwen2ForSequenceClassification"),
            Arch::Qwen3 => ("qwen3", "Qwen3ForCausalLM", "Qwen3ForSequenceClassification"),
            Arch::Qwen3Moe => ("qwen3_moe", "Qwen3MoeForCausalLM", "Qwen3MoeForSequenceClassification"),
            Arch::Mixtral => ("mixtral", "MixtralForCausalLM", "MixtralForSequenceClassification"),
            Arch::Gemma2 => ("gemma2", "Gemma2ForCausalLM", "Gemma2ForSequenceClassification"),
            Arch::Gemma3 => ("gemma3_text", "Gemma3ForCausalLM", "Gemma3TextForSequenceClassification"),
            Arch::Phi3 => ("phi3", "Phi3ForCausalLM", "Phi3ForSequenceClassification"),
            Arch::Olmo2 => ("olmo2", "Olmo2ForCausalLM", "Olmo2ForSequenceClassification"),
            Arch::Smollm3 => ("smollm3", "SmolLM3ForCausalLM", "SmolLM3ForSequenceClassification"),
        }
    }

    /// The tokenizer style: Llama's (a BOS, `</s>`) or Qwen's (no BOS, `<|im_end|>`).
    fn tokenizer_style(self) -> Arch {
        match self {
            Arch::Qwen2 | Arch::Qwen3 | Arch::Qwen3Moe | Arch::Olmo2 => Arch::Qwen2,
            _ => Arch::Llama,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Size {
    /// ~150k parameters, 512-token vocabulary: for tests and the demo.
    Tiny,
    /// ~28M parameters, 8k vocabulary: for benchmarks.
    Small,
    /// Qwen2.5-0.5B-Instruct's exact shape (494M parameters, vocabulary 151,936; --arch qwen2).
    #[value(name = "qwen2.5-0.5b")]
    Qwen25Half,
    /// Llama-3.2-1B's exact shape (1.24B parameters, vocabulary 128,256, llama3 rope; --arch llama).
    #[value(name = "llama-1b")]
    Llama1b,
    /// Qwen3-0.6B's exact shape (596M parameters, head_dim 128, vocabulary 151,936; --arch qwen3).
    #[value(name = "qwen3-0.6b")]
    Qwen3Small,
    /// A small Qwen3-MoE (16 experts, top 4, ~50M parameters) for benchmarks on this machine
    /// (--arch qwen3_moe).
    #[value(name = "moe-small")]
    MoeSmall,
    /// Llama-3-8B's exact shape (8.03B parameters: 32 layers, hidden 4096, 32 heads / 8 KV
    /// heads, intermediate 14,336, vocabulary 128,256, untied; --arch llama), to rehearse an 8B
    /// run (16 GB with --dtype bf16; written a tensor at a time).
    #[value(name = "llama-3-8b")]
    Llama3_8b,
}

/// The dimensions of a generated model.
struct Dims {
    /// Tokens the BPE tokenizer is trained to (and pseudo-words of training text to fill it).
    tokenizer_vocab: usize,
    pseudo_words: usize,
    /// config.json's vocab_size when larger than the tokenizer's (as real checkpoints pad it).
    vocab_size: Option<usize>,
    hidden: usize,
    intermediate: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    rope: serde_json::Value,
    tied: Option<bool>,
}

fn dims(size: Size, arch: Arch) -> Dims {
    let default_rope = serde_json::json!({"rope_type": "default", "rope_theta": 10000.0});
    let d = |tokenizer_vocab, pseudo_words, hidden, intermediate, layers, heads, kv_heads| Dims {
        tokenizer_vocab,
        pseudo_words,
        vocab_size: None,
        hidden,
        intermediate,
        layers,
        heads,
        kv_heads,
        rope: default_rope.clone(),
        tied: None,
    };
    // The families beyond Llama and Qwen2 get 3 layers, so layer patterns (sliding windows,
    // NoPE, dense layers among MoE ones) show.
    let tiny_layers = if matches!(arch, Arch::Llama | Arch::Qwen2) { 2 } else { 3 };
    match size {
        Size::Tiny => d(512, 2000, 64, 176, tiny_layers, 4, 2),
        Size::Small => d(8000, 400_000, 512, 1408, 8, 8, 4),
        Size::Qwen25Half => Dims {
            vocab_size: Some(151_936),
            rope: serde_json::json!({"rope_type": "default", "rope_theta": 1_000_000.0}),
            tied: Some(true),
            ..d(8000, 400_000, 896, 4864, 24, 14, 2)
        },
        Size::Llama1b => Dims {
            vocab_size: Some(128_256),
            rope: serde_json::json!({"rope_type": "llama3", "rope_theta": 500_000.0, "factor": 32.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
            tied: Some(true),
            ..d(8000, 400_000, 2048, 8192, 16, 32, 8)
        },
        Size::Qwen3Small => Dims {
            vocab_size: Some(151_936),
            rope: serde_json::json!({"rope_type": "default", "rope_theta": 1_000_000.0}),
            tied: Some(true),
            ..d(8000, 400_000, 1024, 3072, 28, 16, 8)
        },
        Size::MoeSmall => d(8000, 400_000, 512, 1408, 8, 8, 4),
        Size::Llama3_8b => Dims {
            vocab_size: Some(128_256),
            rope: serde_json::json!({"rope_type": "default", "rope_theta": 500_000.0}),
            tied: Some(false),
            ..d(8000, 400_000, 4096, 14336, 32, 32, 8)
        },
    }
}

const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

struct Specials {
    bos: Option<&'static str>,
    eos: &'static str,
    pad: &'static str,
    all: &'static [&'static str],
}

fn specials(arch: Arch) -> Specials {
    match arch.tokenizer_style() {
        // Llama-style: a BOS the post-processor adds, `</s>` as EOS.
        Arch::Llama => Specials { bos: Some("<s>"), eos: "</s>", pad: "<pad>", all: &["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"] },
        // Qwen2-style: no BOS, `<|im_end|>` as EOS.
        _ => Specials { bos: None, eos: "<|im_end|>", pad: "<|endoftext|>", all: &["<|endoftext|>", "<|im_start|>", "<|im_end|>"] },
    }
}

/// Text the tokenizer is trained on: the synthetic task, chat markup and pseudo-words so the
/// larger vocabulary fills up.
fn training_text(seed: u64, pseudo_words: usize) -> Vec<String> {
    let mut rng = Rng::new(seed ^ 0x7E47);
    let mut out: Vec<String> = (0..4000)
        .map(|_| {
            let r = synth_row(&mut rng);
            format!("{} {}\n{} {}\nuser\n{}\nassistant\n{}", text_prompt(&r), r.chosen, text_prompt(&r), r.rejected, r.question, r.chosen)
        })
        .collect();
    const SYL: &[&str] = &["ka", "to", "ri", "ne", "su", "mo", "la", "pe", "di", "vo", "an", "er", "in", "st", "th", "qu", "ou", "ch", "sh", "ly"];
    let mut line = String::new();
    for i in 0..pseudo_words {
        let n = 1 + rng.below(4);
        line.push(' ');
        for _ in 0..n {
            let syllable: &&str = rng.pick(SYL);
            line.push_str(syllable);
        }
        if i % 16 == 15 {
            out.push(std::mem::take(&mut line));
        }
    }
    out
}

pub fn train_tokenizer(arch: Arch, vocab: usize, seed: u64, pseudo_words: usize) -> Result<Tokenizer> {
    let sp = specials(arch);
    let mut trainer = TrainerWrapper::BpeTrainer(
        BpeTrainerBuilder::new()
            .show_progress(false)
            .vocab_size(vocab)
            .min_frequency(2)
            .special_tokens(sp.all.iter().map(|s| AddedToken::from(s.to_string(), true)).collect())
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .build(),
    );
    let mut tok = Tokenizer::new(BPE::default());
    match arch.tokenizer_style() {
        Arch::Llama => {
            tok.with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false)));
        }
        // Exactly the pipeline of real Qwen2 tokenizers (transformers 5's Qwen2Tokenizer rebuilds
        // it from its own code, whatever tokenizer.json says): NFC, Qwen2's split regex (digits
        // one by one), byte-level without its own regex.
        _ => {
            tok.with_normalizer(Some(NFC)).map_err(|e| anyhow!("{e}"))?;
            let split = Split::new(SplitPattern::Regex(QWEN2_REGEX.into()), SplitDelimiterBehavior::Isolated, false).map_err(|e| anyhow!("{e}"))?;
            tok.with_pre_tokenizer(Some(Sequence::new(vec![
                PreTokenizerWrapper::Split(split),
                PreTokenizerWrapper::ByteLevel(ByteLevel::default().add_prefix_space(false).use_regex(false)),
            ])));
        }
    }
    tok.with_decoder(Some(ByteLevel::default()));
    tok.train(&mut trainer, training_text(seed, pseudo_words).into_iter()).map_err(|e| anyhow!("tokenizer training: {e}"))?;
    let post: PostProcessorWrapper = match sp.bos {
        Some(bos) => {
            let id = tok.token_to_id(bos).expect("special token added by the trainer");
            TemplateProcessing::builder()
                .try_single(format!("{bos} $A"))
                .map_err(|e| anyhow!(e))?
                .try_pair(format!("{bos} $A {bos} $B"))
                .map_err(|e| anyhow!(e))?
                .special_tokens(vec![(bos.to_string(), id)])
                .build()?
                .into()
        }
        None => ByteLevel::default().trim_offsets(false).into(),
    };
    tok.with_post_processor(Some(post));
    Ok(tok)
}

pub struct InitSpec {
    pub arch: Arch,
    pub size: Size,
    pub seed: u64,
    /// Dtype the weights are stored in (config.json's `dtype` says it).
    pub dtype: FloatDtype,
}

pub fn init_model(spec: &InitSpec, out: &Path) -> Result<ModelConfig> {
    let need = match spec.size {
        Size::Qwen25Half => Some(Arch::Qwen2),
        Size::Llama1b => Some(Arch::Llama),
        Size::Qwen3Small => Some(Arch::Qwen3),
        Size::MoeSmall => Some(Arch::Qwen3Moe),
        Size::Llama3_8b => Some(Arch::Llama),
        _ => None,
    };
    if need.is_some_and(|a| a != spec.arch) {
        anyhow::bail!("--size {:?} is a {:?} shape: pass --arch {:?}", spec.size, need.unwrap(), need.unwrap());
    }
    std::fs::create_dir_all(out)?;
    let dm = dims(spec.size, spec.arch);
    let style = spec.arch.tokenizer_style();
    let tok = train_tokenizer(style, dm.tokenizer_vocab, spec.seed, dm.pseudo_words)?;
    let vocab_size = dm.vocab_size.unwrap_or(0).max(tok.get_vocab_size(true));
    let sp = specials(style);
    let id = |t: &str| tok.token_to_id(t).map(serde_json::Value::from).unwrap_or(serde_json::Value::Null);
    let (model_type, arch_name, _) = spec.arch.names();
    let config = family_config(
        spec,
        &dm,
        vocab_size,
        serde_json::json!({
            "architectures": [arch_name],
            "model_type": model_type,
            "bos_token_id": sp.bos.map(id).unwrap_or(serde_json::Value::Null),
            "eos_token_id": id(sp.eos),
            "pad_token_id": id(sp.pad),
        }),
    );
    let mut config = config;
    config["dtype"] = match spec.dtype {
        FloatDtype::F32 => "float32",
        FloatDtype::Bf16 => "bfloat16",
        FloatDtype::F16 => "float16",
    }
    .into();
    let cfg = ModelConfig::from_json(config.clone())?;
    let plain = matches!(spec.arch, Arch::Llama | Arch::Qwen2);
    if spec.dtype != FloatDtype::F32 || cfg.num_parameters() > 1_500_000_000 {
        // Large or non-f32: each tensor generated while it is written (its own seed), so
        // memory holds one tensor, never the model.
        let lazy: Vec<(String, Lazy)> = tensor_shapes(&cfg)
            .into_iter()
            .map(|(name, shape)| {
                let seed = spec.seed ^ blake3::hash(name.as_bytes()).as_bytes()[..8].iter().fold(0u64, |h, &b| (h << 8) | b as u64);
                let fill = init_fill(&name, &cfg, plain);
                (name, Lazy { shape, dtype: spec.dtype, seed, fill })
            })
            .collect();
        let meta: std::collections::HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
        let file = crate::store::PartialFile::create(&out.join("model.safetensors"))?;
        safetensors::serialize_to_file(lazy, Some(meta), file.partial()).map_err(|e| crate::store::space::write_error(file.partial(), e))?;
        file.commit()?;
        return write_model_files(&config, &tok, style, &sp, out).map(|_| cfg);
    }

    let mut rng = Rng::new(spec.seed);
    let mut tensors = BTreeMap::new();
    let mut shapes = tensor_shapes(&cfg);
    shapes.sort();
    // Llama and Qwen2 keep the first generator's values (the golden files were made from them):
    // norms of 1, zero biases, N(0, 0.02). The other families get non-trivial norms and biases
    // and larger weights, so soft-capping, norms and routing all matter in their tests.
    let std = if plain { 0.02 } else { 0.08 };
    for (name, shape) in shapes {
        let n: usize = shape.iter().product();
        let values: Vec<f32> = if name.ends_with("norm.weight") {
            let center = if cfg.norm_style == crate::model::config::NormStyle::OnePlusWeight { 0.0 } else { 1.0 };
            (0..n).map(|_| if plain { 1.0 } else { (center + rng.normal() * 0.1) as f32 }).collect()
        } else if name.ends_with(".bias") {
            (0..n).map(|_| if plain { 0.0 } else { (rng.normal() * 0.05) as f32 }).collect()
        } else {
            (0..n).map(|_| (rng.normal() * std) as f32).collect()
        };
        tensors.insert(name, Tensor::from_vec(values, shape, &Device::Cpu)?);
    }
    save_weights(&out.join("model.safetensors"), &tensors, DType::F32)?;
    write_model_files(&config, &tok, style, &sp, out)?;
    Ok(cfg)
}

/// How a generated tensor is filled (the lazy path: see `init_model`).
#[derive(Clone, Copy)]
enum Fill {
    Const(f32),
    Normal { center: f64, std: f64 },
}

fn init_fill(name: &str, cfg: &ModelConfig, plain: bool) -> Fill {
    if name.ends_with("norm.weight") {
        let center = if cfg.norm_style == crate::model::config::NormStyle::OnePlusWeight { 0.0 } else { 1.0 };
        if plain {
            Fill::Const(1.0)
        } else {
            Fill::Normal { center, std: 0.1 }
        }
    } else if name.ends_with(".bias") {
        if plain {
            Fill::Const(0.0)
        } else {
            Fill::Normal { center: 0.0, std: 0.05 }
        }
    } else {
        Fill::Normal { center: 0.0, std: if plain { 0.02 } else { 0.08 } }
    }
}

/// A tensor whose bytes are generated when the safetensors writer asks for them.
struct Lazy {
    shape: Vec<usize>,
    dtype: FloatDtype,
    seed: u64,
    fill: Fill,
}

impl safetensors::View for Lazy {
    fn dtype(&self) -> safetensors::Dtype {
        match self.dtype {
            FloatDtype::F32 => safetensors::Dtype::F32,
            FloatDtype::Bf16 => safetensors::Dtype::BF16,
            FloatDtype::F16 => safetensors::Dtype::F16,
        }
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        use rayon::prelude::*;
        // One stream per tensor, generated in chunks on every core: each chunk jumps to its
        // place in the stream (two draws per normal value), so the values do not depend on
        // the thread count.
        const CHUNK: usize = 1 << 20;
        let size = if self.dtype == FloatDtype::F32 { 4 } else { 2 };
        let mut out = vec![0u8; self.data_len()];
        out.par_chunks_mut(CHUNK * size).enumerate().for_each(|(c, bytes)| {
            let mut rng = Rng::new(self.seed);
            rng.skip(2 * (c * CHUNK) as u64);
            for b in bytes.chunks_exact_mut(size) {
                let v = match self.fill {
                    Fill::Const(c) => c,
                    Fill::Normal { center, std } => (center + rng.normal() * std) as f32,
                };
                match self.dtype {
                    FloatDtype::F32 => b.copy_from_slice(&v.to_le_bytes()),
                    FloatDtype::Bf16 => b.copy_from_slice(&half::bf16::from_f32(v).to_le_bytes()),
                    FloatDtype::F16 => b.copy_from_slice(&half::f16::from_f32(v).to_le_bytes()),
                }
            }
        });
        std::borrow::Cow::Owned(out)
    }

    fn data_len(&self) -> usize {
        self.shape.iter().product::<usize>() * if self.dtype == FloatDtype::F32 { 4 } else { 2 }
    }
}

/// config.json, the tokenizer and its config beside the weights.
fn write_model_files(config: &serde_json::Value, tok: &Tokenizer, style: Arch, sp: &Specials, out: &Path) -> Result<()> {
    write_atomic(&out.join("config.json"), (serde_json::to_string_pretty(&config)? + "\n").as_bytes())?;
    write_atomic(&out.join("tokenizer.json"), tok.to_string(false).map_err(|e| anyhow!(e))?.as_bytes())?;
    let template = match style {
        Arch::Qwen2 => CHATML.to_string(),
        _ => format!("{{{{ bos_token }}}}{CHATML}"),
    };
    let tok_cfg = serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": sp.bos,
        "eos_token": sp.eos,
        "pad_token": sp.pad,
        "unk_token": null,
        "add_bos_token": sp.bos.is_some(),
        "add_eos_token": false,
        "clean_up_tokenization_spaces": false,
        "model_max_length": 2048,
        "chat_template": template,
    });
    write_atomic(&out.join("tokenizer_config.json"), (serde_json::to_string_pretty(&tok_cfg)? + "\n").as_bytes())
}

/// A reward model: `init_model`'s decoder as `*ForSequenceClassification` with one label, its
/// LM head replaced by a random `score` head [1, hidden] (as transformers lays it out).
pub fn init_reward_model(spec: &InitSpec, out: &Path) -> Result<ModelConfig> {
    let cfg = init_model(spec, out)?;
    let mut tensors: BTreeMap<String, Tensor> = crate::model::weights::load_weights(out, &cfg, DType::F32, &Device::Cpu)?.into_iter().collect();
    tensors.remove("lm_head.weight");
    let mut rng = Rng::new(spec.seed ^ 0x5C0E);
    let score: Vec<f32> = (0..cfg.hidden_size).map(|_| rng.normal() as f32).collect();
    tensors.insert("score.weight".into(), Tensor::from_vec(score, (1, cfg.hidden_size), &Device::Cpu)?);
    save_weights(&out.join("model.safetensors"), &tensors, DType::F32)?;
    let mut config = cfg.raw.clone();
    config["architectures"] = serde_json::json!([spec.arch.names().2]);
    config["id2label"] = serde_json::json!({"0": "LABEL_0"});
    config["label2id"] = serde_json::json!({"LABEL_0": 0});
    write_atomic(&out.join("config.json"), (serde_json::to_string_pretty(&config)? + "\n").as_bytes())?;
    ModelConfig::from_json(config)
}

/// config.json of a generated model: the shared keys, then the family's (transformers 5
/// names). Tiny models switch every family feature on at sizes where it shows: short sliding
/// windows, soft-capping that bends the values, long-rope's switch within a short sequence.
fn family_config(spec: &InitSpec, dm: &Dims, vocab_size: usize, ids: serde_json::Value) -> serde_json::Value {
    use serde_json::json;
    let tiny = spec.size == Size::Tiny;
    let head_dim = match spec.size {
        Size::Qwen3Small => 128,
        _ => dm.hidden / dm.heads,
    };
    let mut c = json!({
        "vocab_size": vocab_size,
        "hidden_size": dm.hidden,
        "intermediate_size": dm.intermediate,
        "num_hidden_layers": dm.layers,
        "num_attention_heads": dm.heads,
        "num_key_value_heads": dm.kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": if dm.vocab_size.is_some() { 32768 } else { 2048 },
        "rms_norm_eps": 1e-6,
        "rope_parameters": dm.rope,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "dtype": "float32",
        "use_cache": true,
    });
    for (k, v) in ids.as_object().expect("an object") {
        c[k] = v.clone();
    }
    let tied = |d: bool| dm.tied.unwrap_or(d);
    let layers = dm.layers;
    let pattern =
        |sliding: &[usize]| json!((0..layers).map(|i| if sliding.contains(&i) { "sliding_attention" } else { "full_attention" }).collect::<Vec<_>>());
    match spec.arch {
        Arch::Llama => {
            c["tie_word_embeddings"] = tied(false).into();
            c["attention_bias"] = false.into();
            c["mlp_bias"] = false.into();
        }
        Arch::Qwen2 => {
            c["tie_word_embeddings"] = tied(true).into();
            c["use_sliding_window"] = false.into();
            c["sliding_window"] = serde_json::Value::Null;
            c["max_window_layers"] = layers.into();
        }
        Arch::Qwen3 => {
            c["tie_word_embeddings"] = tied(true).into();
            c["attention_bias"] = false.into();
            c["use_sliding_window"] = false.into();
            c["sliding_window"] = serde_json::Value::Null;
        }
        Arch::Qwen3Moe => {
            let (experts, top_k, moe_i) = if tiny { (4, 2, 32) } else { (16, 4, 256) };
            c["tie_word_embeddings"] = tied(false).into();
            c["attention_bias"] = false.into();
            c["num_experts"] = experts.into();
            c["num_experts_per_tok"] = top_k.into();
            c["moe_intermediate_size"] = moe_i.into();
            c["norm_topk_prob"] = true.into();
            c["decoder_sparse_step"] = 1.into();
            // Tiny: the middle layer is a dense MLP among MoE ones.
            c["mlp_only_layers"] = if tiny { json!([1]) } else { json!([]) };
            c["output_router_logits"] = false.into();
            c["router_aux_loss_coef"] = 0.001.into();
            c["use_sliding_window"] = false.into();
        }
        Arch::Mixtral => {
            c["tie_word_embeddings"] = tied(false).into();
            c["num_local_experts"] = 4.into();
            c["num_experts_per_tok"] = 2.into();
            c["intermediate_size"] = (dm.intermediate / 4).into();
            c["sliding_window"] = if tiny { 6.into() } else { serde_json::Value::Null };
            c["router_aux_loss_coef"] = 0.02.into();
            c["output_router_logits"] = false.into();
            c["rms_norm_eps"] = 1e-5.into();
        }
        Arch::Gemma2 => {
            c["tie_word_embeddings"] = tied(true).into();
            c["hidden_activation"] = "gelu_pytorch_tanh".into();
            c["query_pre_attn_scalar"] = (head_dim + 8).into();
            c["sliding_window"] = 4.into();
            c["layer_types"] = pattern(&[0, 2]);
            // Small caps, so the tiny model's scores and logits really bend.
            c["attn_logit_softcapping"] = if tiny { 1.0 } else { 50.0 }.into();
            c["final_logit_softcapping"] = if tiny { 2.0 } else { 30.0 }.into();
        }
        Arch::Gemma3 => {
            c["tie_word_embeddings"] = tied(true).into();
            c["hidden_activation"] = "gelu_pytorch_tanh".into();
            c["query_pre_attn_scalar"] = head_dim.into();
            c["sliding_window"] = 4.into();
            c["layer_types"] = pattern(&[0, 1]);
            c["rope_local_base_freq"] = 10_000.0.into();
            c["rope_parameters"] = json!({
                "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1_000_000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            });
            c["final_logit_softcapping"] = serde_json::Value::Null;
            c["attn_logit_softcapping"] = serde_json::Value::Null;
        }
        Arch::Phi3 => {
            c["tie_word_embeddings"] = tied(false).into();
            c["rms_norm_eps"] = 1e-5.into();
            c["sliding_window"] = serde_json::Value::Null;
            // Half of each head rotates; long-rope switches to its long factors past 16 positions.
            let rot = head_dim / 2 / 2;
            let (short, long): (Vec<f64>, Vec<f64>) =
                ((0..rot).map(|i| 1.0 + 0.1 * i as f64).collect(), (0..rot).map(|i| 1.5 + 0.5 * i as f64).collect());
            c["original_max_position_embeddings"] = 16.into();
            c["max_position_embeddings"] = 64.into();
            c["rope_parameters"] = json!({"rope_type": "longrope", "rope_theta": 10_000.0, "short_factor": short, "long_factor": long,
                "partial_rotary_factor": 0.5, "original_max_position_embeddings": 16});
        }
        Arch::Olmo2 => {
            c["tie_word_embeddings"] = tied(false).into();
            c["attention_bias"] = false.into();
            c["rms_norm_eps"] = 1e-5.into();
        }
        Arch::Smollm3 => {
            c["tie_word_embeddings"] = tied(true).into();
            c["no_rope_layer_interval"] = 2.into();
            c["use_sliding_window"] = false.into();
            c["attention_bias"] = false.into();
            c["mlp_bias"] = false.into();
        }
    }
    c
}
