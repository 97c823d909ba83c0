//! `pipeline init-model`: a randomly initialised model in Hugging Face layout, with a real
//! byte-level BPE tokenizer trained by the `tokenizers` crate on text the project generates.
//! Same arguments, byte-identical files.
use super::prefs::{synth_row, text_prompt};
use crate::model::config::ModelConfig;
use crate::model::weights::{save_weights, tensor_names};
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Arch {
    Llama,
    Qwen2,
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

fn dims(size: Size) -> Dims {
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
    match size {
        Size::Tiny => d(512, 2000, 64, 176, 2, 4, 2),
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
    match arch {
        // Llama-style: a BOS the post-processor adds, `</s>` as EOS.
        Arch::Llama => Specials { bos: Some("<s>"), eos: "</s>", pad: "<pad>", all: &["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"] },
        // Qwen2-style: no BOS, `<|im_end|>` as EOS.
        Arch::Qwen2 => Specials { bos: None, eos: "<|im_end|>", pad: "<|endoftext|>", all: &["<|endoftext|>", "<|im_start|>", "<|im_end|>"] },
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
    match arch {
        Arch::Llama => {
            tok.with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false)));
        }
        // Exactly the pipeline of real Qwen2 tokenizers (transformers 5's Qwen2Tokenizer rebuilds
        // it from its own code, whatever tokenizer.json says): NFC, Qwen2's split regex (digits
        // one by one), byte-level without its own regex.
        Arch::Qwen2 => {
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
}

pub fn init_model(spec: &InitSpec, out: &Path) -> Result<ModelConfig> {
    let need = match spec.size {
        Size::Qwen25Half => Some(Arch::Qwen2),
        Size::Llama1b => Some(Arch::Llama),
        _ => None,
    };
    if need.is_some_and(|a| a != spec.arch) {
        anyhow::bail!("--size {:?} is a {:?} shape: pass --arch {:?}", spec.size, need.unwrap(), need.unwrap());
    }
    std::fs::create_dir_all(out)?;
    let dm = dims(spec.size);
    let (hidden, inter, layers, heads, kv) = (dm.hidden, dm.intermediate, dm.layers, dm.heads, dm.kv_heads);
    let tok = train_tokenizer(spec.arch, dm.tokenizer_vocab, spec.seed, dm.pseudo_words)?;
    let vocab_size = dm.vocab_size.unwrap_or(0).max(tok.get_vocab_size(true));
    let sp = specials(spec.arch);
    let id = |t: &str| tok.token_to_id(t).map(serde_json::Value::from).unwrap_or(serde_json::Value::Null);
    let (arch_name, model_type, tied) = match spec.arch {
        Arch::Llama => ("LlamaForCausalLM", "llama", dm.tied.unwrap_or(false)),
        Arch::Qwen2 => ("Qwen2ForCausalLM", "qwen2", dm.tied.unwrap_or(true)),
    };
    let mut config = serde_json::json!({
        "architectures": [arch_name],
        "model_type": model_type,
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "head_dim": hidden / heads,
        "hidden_act": "silu",
        "max_position_embeddings": if dm.vocab_size.is_some() { 32768 } else { 2048 },
        "rms_norm_eps": 1e-6,
        "rope_parameters": dm.rope,
        "tie_word_embeddings": tied,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "bos_token_id": sp.bos.map(id).unwrap_or(serde_json::Value::Null),
        "eos_token_id": id(sp.eos),
        "pad_token_id": id(sp.pad),
        "dtype": "float32",
        "use_cache": true,
    });
    match spec.arch {
        Arch::Llama => {
            config["attention_bias"] = false.into();
            config["mlp_bias"] = false.into();
        }
        Arch::Qwen2 => {
            config["use_sliding_window"] = false.into();
            config["sliding_window"] = serde_json::Value::Null;
            config["max_window_layers"] = layers.into();
        }
    }
    let cfg = ModelConfig::from_json(config.clone())?;

    let mut rng = Rng::new(spec.seed);
    let mut tensors = BTreeMap::new();
    let shape_of = |name: &str| -> Vec<usize> {
        let hd = cfg.head_dim;
        let (q, k) = (heads * hd, kv * hd);
        let leaf = name.rsplit('.').nth(1).unwrap_or("");
        let is_bias = name.ends_with(".bias");
        let (o, i) = match leaf {
            "embed_tokens" | "lm_head" => (vocab_size, hidden),
            "q_proj" => (q, hidden),
            "k_proj" | "v_proj" => (k, hidden),
            "o_proj" => (hidden, q),
            "gate_proj" | "up_proj" => (inter, hidden),
            "down_proj" => (hidden, inter),
            _ => (hidden, 0), // norms
        };
        if is_bias || i == 0 {
            vec![o]
        } else {
            vec![o, i]
        }
    };
    let mut names = tensor_names(&cfg);
    names.sort();
    for name in names {
        let shape = shape_of(&name);
        let n: usize = shape.iter().product();
        let values: Vec<f32> = if name.ends_with("norm.weight") {
            vec![1.0; n]
        } else if name.ends_with(".bias") {
            vec![0.0; n]
        } else {
            (0..n).map(|_| (rng.normal() * 0.02) as f32).collect()
        };
        tensors.insert(name, Tensor::from_vec(values, shape, &Device::Cpu)?);
    }
    save_weights(&out.join("model.safetensors"), &tensors, DType::F32)?;
    write_atomic(&out.join("config.json"), (serde_json::to_string_pretty(&config)? + "\n").as_bytes())?;
    write_atomic(&out.join("tokenizer.json"), tok.to_string(false).map_err(|e| anyhow!(e))?.as_bytes())?;
    let template = match spec.arch {
        Arch::Llama => format!("{{{{ bos_token }}}}{CHATML}"),
        Arch::Qwen2 => CHATML.to_string(),
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
    write_atomic(&out.join("tokenizer_config.json"), (serde_json::to_string_pretty(&tok_cfg)? + "\n").as_bytes())?;
    Ok(cfg)
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
    let arch = if cfg.model_type == "llama" { "LlamaForSequenceClassification" } else { "Qwen2ForSequenceClassification" };
    config["architectures"] = serde_json::json!([arch]);
    config["id2label"] = serde_json::json!({"0": "LABEL_0"});
    config["label2id"] = serde_json::json!({"LABEL_0": 0});
    write_atomic(&out.join("config.json"), (serde_json::to_string_pretty(&config)? + "\n").as_bytes())?;
    ModelConfig::from_json(config)
}
