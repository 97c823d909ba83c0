//! Stage settings: one struct per stage, read from a pipeline TOML (`pipelines/*.toml`,
//! sections `[prepare]`, `[cache_ref]`, `[train]`) and overridden by command-line flags.
//! Relative paths in a TOML are relative to the directory the command runs in.
use crate::data::batch::LayoutKind;
use crate::data::input::ColumnNames;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PrepareConfig {
    /// Preference parquet files or globs.
    pub inputs: Vec<String>,
    /// Files whose rows all go to the eval split.
    pub eval_inputs: Vec<String>,
    /// Model directory the tokenizer and chat template come from.
    pub model: PathBuf,
    pub out: PathBuf,
    /// Prompt column; unset: `prompt` if present, else the prompt is implicit.
    pub prompt_column: Option<String>,
    pub chosen_column: String,
    pub rejected_column: String,
    pub max_length: usize,
    pub max_prompt_length: Option<usize>,
    pub eval_fraction: f64,
    pub force: bool,
}

impl Default for PrepareConfig {
    fn default() -> Self {
        Self {
            inputs: vec![],
            eval_inputs: vec![],
            model: PathBuf::new(),
            out: PathBuf::from("prepared"),
            prompt_column: None,
            chosen_column: "chosen".into(),
            rejected_column: "rejected".into(),
            max_length: 1024,
            max_prompt_length: None,
            eval_fraction: 0.0,
            force: false,
        }
    }
}

impl PrepareConfig {
    pub fn columns(&self) -> ColumnNames {
        ColumnNames { prompt: self.prompt_column.clone(), chosen: self.chosen_column.clone(), rejected: self.rejected_column.clone() }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheRefConfig {
    pub prepared: PathBuf,
    pub model: PathBuf,
    pub out: PathBuf,
    /// Padded tokens per forward batch.
    pub batch_tokens: usize,
    pub dtype: String,
    pub layout: LayoutKind,
    pub force: bool,
    /// Stop after this many batches (to test resuming); 0 = run to the end.
    #[serde(skip)]
    pub stop_after_batches: usize,
}

impl Default for CacheRefConfig {
    fn default() -> Self {
        Self {
            prepared: PathBuf::from("prepared"),
            model: PathBuf::new(),
            out: PathBuf::from("ref_cache"),
            batch_tokens: 4096,
            dtype: "f32".into(),
            layout: LayoutKind::SharedPrompt,
            force: false,
            stop_after_batches: 0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum LossKind {
    Sigmoid,
    Ipo,
    Hinge,
    Robust,
    SigmoidNorm,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum SchedulerKind {
    Constant,
    Linear,
    Cosine,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    pub prepared: PathBuf,
    pub ref_cache: PathBuf,
    pub out: PathBuf,
    /// Policy initialisation; default: the reference model recorded in the cache's manifest.
    pub model: Option<PathBuf>,
    pub loss: LossKind,
    pub beta: f64,
    pub label_smoothing: f64,
    pub sft_weight: f64,
    pub lr: f64,
    pub weight_decay: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_eps: f64,
    pub scheduler: SchedulerKind,
    pub warmup_steps: usize,
    pub max_grad_norm: f64,
    pub grad_accum: usize,
    pub batch_size: usize,
    pub max_steps: Option<usize>,
    pub epochs: f64,
    pub seed: u64,
    pub shuffle: bool,
    pub eval_every: usize,
    pub save_every: usize,
    pub layout: LayoutKind,
    pub resume: bool,
    pub force: bool,
    /// Ablation: load the reference model and compute its log-probs in the loop.
    pub ref_in_loop: bool,
    /// Stop after this many steps (to test resuming), keeping the schedule of the full run.
    #[serde(skip)]
    pub stop_after_steps: Option<usize>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            prepared: PathBuf::from("prepared"),
            ref_cache: PathBuf::from("ref_cache"),
            out: PathBuf::from("train"),
            model: None,
            loss: LossKind::Sigmoid,
            beta: 0.1,
            label_smoothing: 0.0,
            sft_weight: 0.0,
            lr: 1e-6,
            weight_decay: 0.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_eps: 1e-8,
            scheduler: SchedulerKind::Linear,
            warmup_steps: 0,
            max_grad_norm: 1.0,
            grad_accum: 1,
            batch_size: 8,
            max_steps: None,
            epochs: 1.0,
            seed: 42,
            shuffle: true,
            eval_every: 50,
            save_every: 500,
            layout: LayoutKind::SharedPrompt,
            resume: false,
            force: false,
            ref_in_loop: false,
            stop_after_steps: None,
        }
    }
}

/// A whole pipeline in one TOML file.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PipelineConfig {
    pub prepare: PrepareConfig,
    pub cache_ref: CacheRefConfig,
    pub train: TrainConfig,
}

impl PipelineConfig {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        let mut cfg: Self = toml::from_str(&text).with_context(|| format!("{}: invalid pipeline config", path.display()))?;
        // Later stages read what earlier ones wrote unless told otherwise.
        let d = Self::default();
        if cfg.cache_ref.prepared == d.cache_ref.prepared {
            cfg.cache_ref.prepared = cfg.prepare.out.clone();
        }
        if cfg.cache_ref.model.as_os_str().is_empty() {
            cfg.cache_ref.model = cfg.prepare.model.clone();
        }
        if cfg.train.prepared == d.train.prepared {
            cfg.train.prepared = cfg.prepare.out.clone();
        }
        if cfg.train.ref_cache == d.train.ref_cache {
            cfg.train.ref_cache = cfg.cache_ref.out.clone();
        }
        Ok(cfg)
    }
}
