//! HF `config.json` in both dialects: transformers 5 (`rope_parameters`, `dtype`) and older
//! files (top-level `rope_theta`/`rope_scaling`, `torch_dtype`).
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::path::Path;

#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    /// Llama 3.1's frequency-dependent scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub tie_word_embeddings: bool,
    /// Bias on q/k/v (Qwen2 always; Llama when `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on o_proj (Llama's `attention_bias` covers it; Qwen2 has none).
    pub o_bias: bool,
    pub mlp_bias: bool,
    /// Per layer: the sliding attention window, if that layer uses one.
    pub layer_windows: Vec<Option<usize>>,
    /// The checkpoint's own dtype (`dtype` or `torch_dtype`), for saving back.
    pub dtype: Option<String>,
    /// config.json as read, written back unchanged with checkpoints.
    pub raw: Value,
}

pub const SUPPORTED: &[&str] = &["llama", "qwen2", "mistral"];

impl ModelConfig {
    pub fn load(model_dir: &Path) -> Result<Self> {
        let path = model_dir.join("config.json");
        let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let raw: Value = serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", path.display()))?;
        Self::from_json(raw).with_context(|| format!("{}", path.display()))
    }

    pub fn from_json(raw: Value) -> Result<Self> {
        let model_type = raw["model_type"].as_str().unwrap_or("").to_string();
        if !SUPPORTED.contains(&model_type.as_str()) {
            bail!("unsupported model_type `{model_type}` (supported: {})", SUPPORTED.join(", "));
        }
        let req = |k: &str| -> Result<usize> { raw[k].as_u64().map(|v| v as usize).with_context(|| format!("missing or invalid `{k}`")) };
        let hidden_size = req("hidden_size")?;
        let num_attention_heads = req("num_attention_heads")?;
        let num_hidden_layers = req("num_hidden_layers")?;
        let num_key_value_heads = raw["num_key_value_heads"].as_u64().map(|v| v as usize).unwrap_or(num_attention_heads);
        let head_dim = raw["head_dim"].as_u64().map(|v| v as usize).unwrap_or(hidden_size / num_attention_heads);
        if num_attention_heads % num_key_value_heads != 0 {
            bail!("num_attention_heads {num_attention_heads} is not a multiple of num_key_value_heads {num_key_value_heads}");
        }
        // transformers 5 keeps rope settings in `rope_parameters`; older files at top level.
        let rope = raw.get("rope_parameters").filter(|v| v.is_object()).or(raw.get("rope_scaling").filter(|v| v.is_object()));
        let rope_theta = raw["rope_theta"].as_f64().or_else(|| rope.and_then(|r| r["rope_theta"].as_f64())).unwrap_or(10000.0);
        let rope_type = rope.and_then(|r| r["rope_type"].as_str().or(r["type"].as_str())).unwrap_or("default");
        let rope_scaling = match rope_type {
            "default" | "linear" if rope.and_then(|r| r["factor"].as_f64()).unwrap_or(1.0) == 1.0 => RopeScaling::None,
            "llama3" => {
                let r = rope.expect("rope_type came from it");
                let f = |k: &str| r[k].as_f64().with_context(|| format!("llama3 rope scaling needs `{k}`"));
                RopeScaling::Llama3 {
                    factor: f("factor")?,
                    low_freq_factor: f("low_freq_factor")?,
                    high_freq_factor: f("high_freq_factor")?,
                    original_max_position_embeddings: f("original_max_position_embeddings")?,
                }
            }
            other => bail!("unsupported rope scaling `{other}` (supported: default, llama3)"),
        };
        let attention_bias = raw["attention_bias"].as_bool().unwrap_or(false);
        let is_qwen2 = model_type == "qwen2";
        let window = raw["sliding_window"].as_u64().map(|v| v as usize);
        let layer_windows = (0..num_hidden_layers)
            .map(|i| {
                if let Some(types) = raw["layer_types"].as_array() {
                    return (types.get(i).and_then(|t| t.as_str()) == Some("sliding_attention")).then_some(window).flatten();
                }
                match model_type.as_str() {
                    "mistral" => window,
                    "qwen2" if raw["use_sliding_window"].as_bool().unwrap_or(false) => {
                        let from = raw["max_window_layers"].as_u64().unwrap_or(0) as usize;
                        if i >= from {
                            window
                        } else {
                            None
                        }
                    }
                    _ => None,
                }
            })
            .collect();
        Ok(Self {
            vocab_size: req("vocab_size")?,
            hidden_size,
            intermediate_size: req("intermediate_size")?,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: raw["rms_norm_eps"].as_f64().unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            tie_word_embeddings: raw["tie_word_embeddings"].as_bool().unwrap_or(false),
            qkv_bias: is_qwen2 || attention_bias,
            o_bias: !is_qwen2 && attention_bias,
            mlp_bias: raw["mlp_bias"].as_bool().unwrap_or(false),
            layer_windows,
            dtype: raw["dtype"].as_str().or(raw["torch_dtype"].as_str()).map(String::from),
            model_type,
            raw,
        })
    }

    /// Parameter count (embeddings counted once when tied).
    pub fn num_parameters(&self) -> usize {
        let (h, i, hd) = (self.hidden_size, self.intermediate_size, self.head_dim);
        let (q, kv) = (self.num_attention_heads * hd, self.num_key_value_heads * hd);
        let attn = h * q + 2 * h * kv + q * h + if self.qkv_bias { q + 2 * kv } else { 0 } + if self.o_bias { h } else { 0 };
        let mlp = 3 * h * i + if self.mlp_bias { 2 * i + h } else { 0 };
        let layer = attn + mlp + 2 * h;
        let emb = self.vocab_size * h;
        emb + self.num_hidden_layers * layer + h + if self.tie_word_embeddings { 0 } else { emb }
    }

    /// RoPE inverse frequencies, computed in f32 as transformers does.
    pub fn inv_freq(&self) -> Vec<f32> {
        let d = self.head_dim;
        let base = self.rope_theta as f32;
        let mut inv: Vec<f32> = (0..d / 2).map(|k| 1.0 / base.powf((2 * k) as f32 / d as f32)).collect();
        if let RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings: old } = self.rope_scaling {
            let (low_wl, high_wl) = (old / low_freq_factor, old / high_freq_factor);
            for f in inv.iter_mut() {
                let wl = 2.0 * std::f64::consts::PI / *f as f64;
                let v = *f as f64;
                *f = if wl < high_wl {
                    *f
                } else if wl > low_wl {
                    (v / factor) as f32
                } else {
                    let smooth = (old / wl - low_freq_factor) / (high_freq_factor - low_freq_factor);
                    ((1.0 - smooth) * v / factor + smooth * v) as f32
                };
            }
        }
        inv
    }
}
