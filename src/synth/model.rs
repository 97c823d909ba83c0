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

fn dims(size: Size) -> (usize, usize, usize, usize, usize, usize, usize) {
    // (target vocab, hidden, intermediate, layers, heads, kv heads, pseudo-words)
    match size {
        Size::Tiny => (512, 64, 176, 2, 4, 2, 2000),
        Size::Small => (8000, 512, 1408, 8, 8, 4, 400_000),
    }
}

pub fn init_model(spec: &InitSpec, out: &Path) -> Result<ModelConfig> {
    std::fs::create_dir_all(out)?;
    let (vocab, hidden, inter, layers, heads, kv, words) = dims(spec.size);
    let tok = train_tokenizer(spec.arch, vocab, spec.seed, words)?;
    let vocab_size = tok.get_vocab_size(true);
    let sp = specials(spec.arch);
    let id = |t: &str| tok.token_to_id(t).map(serde_json::Value::from).unwrap_or(serde_json::Value::Null);
    let (arch_name, model_type, tied) = match spec.arch {
        Arch::Llama => ("LlamaForCausalLM", "llama", false),
        Arch::Qwen2 => ("Qwen2ForCausalLM", "qwen2", true),
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
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
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
