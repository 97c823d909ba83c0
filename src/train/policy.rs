//! The trainable policy: one `Var` per Hugging Face tensor, a decoder that tracks gradients
//! and one that does not (evaluation), and saving in HF layout.
use crate::model::{weights, Decoder, ModelConfig};
use crate::store::write_atomic;
use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// Tokenizer and generation files copied beside saved weights, so the directory loads alone.
const TOKENIZER_FILES: &[&str] =
    &["tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json", "generation_config.json"];

/// The trainable policy: one `Var` per HF tensor, and a decoder over them.
pub struct Policy {
    pub cfg: ModelConfig,
    pub names: Vec<String>,
    pub vars: Vec<Var>,
    /// Tracks gradients.
    pub decoder: Decoder,
    /// Same storage, no autograd: for evaluation.
    pub eval_decoder: Decoder,
}

impl Policy {
    pub fn load(model_dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let cfg = ModelConfig::load(model_dir)?;
        let tensors = weights::load_weights(model_dir, &cfg, dtype, device)?;
        Self::from_tensors(cfg, tensors)
    }

    pub fn from_tensors(cfg: ModelConfig, tensors: HashMap<String, Tensor>) -> Result<Self> {
        let mut names: Vec<String> = tensors.keys().cloned().collect();
        names.sort();
        let vars = names.iter().map(|n| Ok(Var::from_tensor(&tensors[n])?)).collect::<Result<Vec<_>>>()?;
        let tracked: HashMap<String, Tensor> = names.iter().cloned().zip(vars.iter().map(|v| v.as_tensor().clone())).collect();
        let detached: HashMap<String, Tensor> = names.iter().cloned().zip(vars.iter().map(|v| v.as_tensor().detach())).collect();
        Ok(Self { decoder: Decoder::new(&cfg, &tracked)?, eval_decoder: Decoder::new(&cfg, &detached)?, cfg, names, vars })
    }

    pub fn tensors(&self) -> BTreeMap<String, Tensor> {
        self.names.iter().cloned().zip(self.vars.iter().map(|v| v.as_tensor().detach())).collect()
    }

    /// Writes an HF model directory transformers can load: config, weights, tokenizer files.
    pub fn save_hf(&self, dir: &Path, tokenizer_from: &Path) -> Result<()> {
        std::fs::create_dir_all(dir)?;
        weights::save_weights(&dir.join("model.safetensors"), &self.tensors(), DType::F32)?;
        let mut config = self.cfg.raw.clone();
        config["dtype"] = "float32".into();
        if config.get("torch_dtype").is_some() {
            config["torch_dtype"] = "float32".into();
        }
        write_atomic(&dir.join("config.json"), (serde_json::to_string_pretty(&config)? + "\n").as_bytes())?;
        for f in TOKENIZER_FILES {
            let src = tokenizer_from.join(f);
            if src.exists() {
                write_atomic(&dir.join(f), &std::fs::read(&src)?)?;
            }
        }
        Ok(())
    }
}
