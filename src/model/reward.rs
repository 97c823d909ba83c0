//! Reward models: Hugging Face `LlamaForSequenceClassification` / `Qwen2ForSequenceClassification`
//! with one label: the decoder's final-norm hidden states through the `score` head (no bias),
//! read at the last token that is not the pad token, as transformers pools them.
use super::decoder::{Block, DecoderOptions, SeqLayout};
use super::{weights, Decoder, ModelConfig};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use std::path::Path;

pub struct RewardModel {
    pub decoder: Decoder,
    /// `score.weight` [1, d].
    score: Tensor,
    pad_token_id: Option<u32>,
}

impl RewardModel {
    /// `quant`: quantize its linear layers to 4 bits on load (a 4-bit checkpoint loads as it is).
    pub fn load(model_dir: &Path, dtype: DType, quant: Option<&crate::model::quant::QuantSpec>, device: &Device) -> Result<Self> {
        let cfg = ModelConfig::load(model_dir)?;
        let arch = cfg.raw["architectures"].as_array().and_then(|a| a.first()).and_then(|a| a.as_str()).unwrap_or("");
        if !arch.ends_with("ForSequenceClassification") {
            bail!("{}: config.json's architectures is `{arch}`, not a *ForSequenceClassification reward model", model_dir.display());
        }
        let labels = cfg.raw["id2label"].as_object().map_or(cfg.raw["num_labels"].as_u64().unwrap_or(2) as usize, |m| m.len());
        if labels != 1 {
            bail!("{}: a reward model has one label (num_labels 1); this one has {labels}", model_dir.display());
        }
        let mut names: Vec<String> = weights::tensor_names(&cfg).into_iter().filter(|n| n != "lm_head.weight").collect();
        names.push("score.weight".into());
        let w = weights::load_model_named(model_dir, &cfg, &names, dtype, device, quant)?;
        let mut t = w.tensors;
        let score = t.remove("score.weight").context("score.weight")?;
        let decoder = Decoder::with_options(&cfg, &t, &DecoderOptions { without_lm_head: true, quantized: w.quant, ..Default::default() })?;
        let pad_token_id = cfg.raw["pad_token_id"].as_u64().map(|v| v as u32);
        Ok(Self { decoder, score, pad_token_id })
    }

    /// One reward per sequence, f32 (the sequences run packed, each its own causal block).
    pub fn scores(&self, seqs: &[&[u32]]) -> Result<Vec<f32>> {
        let mut layout = SeqLayout::default();
        let mut rows = Vec::with_capacity(seqs.len());
        for s in seqs {
            anyhow::ensure!(!s.is_empty(), "an empty sequence has no last token to score");
            // transformers: the last position whose token is not the pad token (0 when all are).
            let last = s.iter().rposition(|&t| Some(t) != self.pad_token_id).unwrap_or(0);
            rows.push((layout.input_ids.len() + last) as u32);
            layout.input_ids.extend_from_slice(s);
            layout.positions.extend(0..s.len() as u32);
            layout.blocks.push(Block::causal(s.len()));
        }
        let h = self.decoder.hidden(&layout)?;
        let h = h.index_select(&Tensor::from_slice(&rows, rows.len(), h.device())?, 0)?;
        let w = self.score.to_dtype(h.dtype())?;
        Ok(h.matmul(&w.t()?)?.squeeze(1)?.to_dtype(DType::F32)?.to_vec1()?)
    }
}
