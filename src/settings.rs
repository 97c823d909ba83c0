//! Every setting of every stage, defined once: its help text, default, TOML key (the field
//! name) and flag (`--field-name`), in the `settings!` tables below. What a command runs with
//! is layered: its flags over its section of a pipeline TOML (`--config FILE`, `pipeline run`)
//! over the defaults, merged field by field in `over`, and checked in one `validate` per stage
//! before any work starts. A setting is "unset" only when no layer names it, never because it
//! equals its default.
use crate::data::input::ColumnNames;
use crate::model::quant::{QuantSpec, QuantType};
use crate::model::weights::FloatDtype;
use crate::score::layout::LayoutKind;
use crate::train::loss::{CommaList, FDivergence, LossConfig, LossList, LossType};
use crate::train::optim::SchedulerKind;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Help text with the default appended, as `--help` shows it.
pub fn help<T: Serialize>(doc: &str, default: &T) -> String {
    let text = doc.lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join(" ");
    // Lists that have one owner elsewhere are filled in here, not copied into the docs.
    let text = text
        .replace("{loss_types}", &crate::train::loss::names(false))
        .replace("{reference_free_losses}", &crate::train::loss::names(true))
        .replace("{unpaired_losses}", &crate::train::loss::unpaired_names());
    let shown = match serde_json::to_value(default) {
        Ok(serde_json::Value::String(s)) if !s.is_empty() => Some(s),
        Ok(serde_json::Value::Number(n)) => Some(n.to_string()),
        Ok(serde_json::Value::Bool(true)) => Some("true".into()),
        _ => None,
    };
    match shown {
        Some(d) => format!("{text} [default: {d}]"),
        None => text,
    }
}

/// Defines a stage's resolved settings struct, its defaults, and its layer struct (every field
/// optional) that clap parses from flags and serde from a TOML section.
macro_rules! settings {
    (
        $(#[doc = $sdoc:literal])*
        pub struct $name:ident, layer $layer:ident {
            $(
                $(#[doc = $doc:literal])+
                $(#[arg($($arg:tt)*)])*
                $field:ident : $ty:ty = $default:expr,
            )*
        }
    ) => {
        $(#[doc = $sdoc])*
        #[derive(Debug, Clone, Serialize)]
        pub struct $name {
            $( $(#[doc = $doc])+ pub $field: $ty, )*
        }

        impl Default for $name {
            fn default() -> Self {
                Self { $( $field: $default, )* }
            }
        }

        /// One layer of settings (command-line flags, or a TOML section): `None` is unset.
        #[derive(Debug, Clone, Default, clap::Args, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct $layer {
            $(
                #[arg(long, allow_negative_numbers = true, help = help(concat!($($doc, "\n"),+), &$name::default().$field))]
                $(#[arg($($arg)*)])*
                #[serde(default)]
                pub $field: Option<$ty>,
            )*
        }

        impl $layer {
            /// `self` where set, else `lower`.
            pub fn over(self, lower: Self) -> Self {
                Self { $( $field: self.$field.or(lower.$field), )* }
            }

            /// Unset fields take their defaults.
            pub fn resolve(self) -> $name {
                let d = $name::default();
                $name { $( $field: self.$field.unwrap_or(d.$field), )* }
            }
        }
    };
}

settings! {
    /// `pipeline prepare`: preference data -> token ids.
    pub struct PrepareSettings, layer PrepareLayer {
        /// Preference data: parquet, JSON Lines (.jsonl, .jsonl.gz, .jsonl.zst), JSON arrays,
        /// `datasets` save_to_disk directories; files, globs, or directories (their data files,
        /// sorted); or a Hub dataset id ORG/NAME[@REVISION] (its --split files, through the Hugging
        /// Face cache).
        #[arg(long = "input", num_args = 1.., value_name = "PATH")]
        inputs: Vec<String> = vec![],
        /// Files (or globs, directories, Hub dataset ids with --eval-split) whose rows all go to the
        /// eval split.
        #[arg(long = "eval-input", num_args = 1.., value_name = "PATH")]
        eval_inputs: Vec<String> = vec![],
        /// The split of a Hub dataset --input reads (its files named or filed under it, as the
        /// `datasets` library finds them).
        #[arg(value_name = "NAME")]
        split: String = "train".into(),
        /// The split of a Hub dataset --eval-input reads.
        #[arg(value_name = "NAME")]
        eval_split: String = "test".into(),
        /// The subset (configuration) of a Hub dataset: its files under a directory of that name.
        #[arg(num_args = 1, value_name = "NAME")]
        subset: Option<String> = None,
        /// Model directory the tokenizer (tokenizer.json) and chat template come from, or a Hub
        /// model id ORG/NAME[@REVISION] (through the Hugging Face cache; see README "Hub ids").
        #[arg(value_name = "DIR")]
        model: PathBuf = PathBuf::new(),
        /// Output directory.
        #[arg(value_name = "DIR")]
        out: PathBuf = PathBuf::from("prepared"),
        /// Prompt column; unset: `prompt` if the file has one, else the prompt is implicit
        /// (the common prefix of chosen and rejected).
        #[arg(num_args = 1, value_name = "NAME")]
        prompt_column: Option<String> = None,
        /// Chosen-completion column.
        #[arg(value_name = "NAME")]
        chosen_column: String = "chosen".into(),
        /// Rejected-completion column.
        #[arg(value_name = "NAME")]
        rejected_column: String = "rejected".into(),
        /// Completion column of unpaired data (TRL's unpaired preference type: `prompt`,
        /// `completion`, `label`; an input with no chosen column is read as unpaired).
        #[arg(value_name = "NAME")]
        completion_column: String = "completion".into(),
        /// Label column of unpaired data: a boolean, true for a desirable completion.
        #[arg(value_name = "NAME")]
        label_column: String = "label".into(),
        /// Turn paired rows into unpaired ones for KTO, as TRL's `unpair_preference_dataset`
        /// (and KTOTrainer given pairs): each block of 1,000 pairs gives its chosen completions
        /// (label true), then its rejected ones (false).
        #[arg(num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
        unpair: bool = false,
        /// Longest prompt+completion sequence scored (TRL's default); longer ones keep their
        /// first tokens, chosen and rejected independently.
        #[arg(value_name = "TOKENS")]
        max_length: usize = 1024,
        /// Keep only the last N prompt tokens (unset: whole prompts).
        #[arg(num_args = 1, value_name = "TOKENS")]
        max_prompt_length: Option<usize> = None,
        /// Fraction of rows, chosen by a hash of their content, that go to the eval split.
        #[arg(value_name = "F")]
        eval_fraction: f64 = 0.0,
        /// The date chat templates' `strftime_now` prints (Llama 3.x writes it in every system
        /// turn), YYYY-MM-DD; unset: today (UTC). Recorded in the manifest (and fingerprint)
        /// when the template calls it, so a rerun with the recorded date gives the same ids.
        #[arg(num_args = 1, value_name = "YYYY-MM-DD")]
        template_date: Option<String> = None,
        /// Replace an output built from other inputs or settings (or damaged).
        #[arg(num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
        force: bool = false,
    }
}

settings! {
    /// `pipeline cache-ref`: the reference model's log-probs, computed once.
    pub struct CacheRefSettings, layer CacheRefLayer {
        /// Prepared directory (the output of `prepare`).
        #[arg(value_name = "DIR")]
        prepared: PathBuf = PathBuf::from("prepared"),
        /// Reference model directory (Hugging Face layout: config.json, safetensors, tokenizer), or
        /// a Hub model id ORG/NAME[@REVISION].
        #[arg(value_name = "DIR")]
        model: PathBuf = PathBuf::new(),
        /// Output directory.
        #[arg(value_name = "DIR")]
        out: PathBuf = PathBuf::from("ref_cache"),
        /// Token slots per forward batch, padding included (packed batches have none).
        #[arg(value_name = "TOKENS")]
        batch_tokens: usize = 1024,
        /// Compute dtype (log-probs are always accumulated in f32).
        #[arg(value_enum)]
        dtype: FloatDtype = FloatDtype::F32,
        /// Quantize the linear layers to 4 bits on load (bitsandbytes NF4/FP4, as transformers'
        /// `BitsAndBytesConfig(load_in_4bit=True)`; the output head stays as it is). A checkpoint
        /// saved quantized (`*-bnb-4bit`) loads as it is without this flag.
        #[arg(num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
        load_in_4bit: bool = false,
        /// The 4-bit data type under --load-in-4bit.
        #[arg(value_enum)]
        bnb_4bit_quant_type: QuantType = QuantType::Nf4,
        /// Quantize the per-block scales too (8-bit, blocks of 256): about 0.4 bit a weight less.
        #[arg(num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
        bnb_4bit_use_double_quant: bool = false,
        /// Dtype the 4-bit layers (and here the whole forward) compute in (unset: --dtype).
        #[arg(value_enum, num_args = 1)]
        bnb_4bit_compute_dtype: Option<FloatDtype> = None,
        /// Attention layout: packed puts the batch's pairs back to back with no padding, each
        /// pair computing its prompt once and attending only to itself; shared-prompt is one
        /// padded row per pair; padded is TRL's two right-padded rows per pair.
        #[arg(value_enum)]
        layout: LayoutKind = LayoutKind::Packed,
        /// Unpaired data (KTO): the KL completions rotate by one within blocks of this many
        /// rows, as TRL's KTOTrainer builds them within each per-device batch; `train` then
        /// needs --batch-size to be whole blocks (TRL: the same). Unset: 8 (TRL's
        /// per_device_train_batch_size default).
        #[arg(num_args = 1, value_name = "N")]
        kl_batch_size: Option<usize> = None,
        /// Replace a cache built from other inputs or settings (or damaged).
        #[arg(num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
        force: bool = false,
        /// Compute only shard K (from 0) of N into --out, for `pipeline merge-ref` to join; the
        /// batches are split by computed tokens, the same way on every machine.
        #[arg(num_args = 1, value_name = "K/N")]
        shard: Option<String> = None,
        /// Stop after N batches, leaving a resumable partial cache (for testing resume).
        #[arg(hide = true)]
        stop_after_batches: usize = 0,
    }
}

settings! {
    /// `pipeline train`: DPO on the cached reference log-probs.
    pub struct TrainSettings, layer TrainLayer {
        /// Prepared directory (the output of `prepare`).
        #[arg(value_name = "DIR")]
        prepared: PathBuf = PathBuf::from("prepared"),
        /// Reference cache (the output of `cache-ref` on the same prepared directory; unset:
        /// `ref_cache`). The reference-free losses (simpo, cpo, orpo) take none.
        #[arg(num_args = 1, value_name = "DIR")]
        ref_cache: Option<PathBuf> = None,
        /// Output directory: metrics, checkpoints, final model.
        #[arg(value_name = "DIR")]
        out: PathBuf = PathBuf::from("train"),
        /// Policy initialisation (unset: the reference model recorded in the cache; required
        /// for the reference-free losses).
        #[arg(num_args = 1, value_name = "DIR")]
        model: Option<PathBuf> = None,
        /// Loss types, comma-separated, summed with --loss-weights (TRL 1.16's names):
        /// {loss_types}; or one reference-free loss (no --ref-cache): {reference_free_losses};
        /// or, on unpaired data, one of {unpaired_losses} (KTOTrainer's).
        /// E.g. MPO: sigmoid,bco_pair,sft with 0.8,0.2,1.0.
        #[arg(value_name = "LIST")]
        loss: LossList = CommaList(vec![LossType::Sigmoid]),
        /// Weights of the --loss types, comma-separated (unset: 1 each).
        #[arg(num_args = 1, value_name = "LIST")]
        loss_weights: Option<CommaList<f64>> = None,
        /// β: the strength of the KL anchor to the reference (must be > 0); ORPO's λ.
        beta: f64 = 0.1,
        /// ε: assumed fraction of flipped labels: sigmoid (cDPO), robust, exo_pair (> 0), aot,
        /// aot_unpaired, simpo, cpo.
        label_smoothing: f64 = 0.0,
        /// DiscoPOP's temperature τ.
        #[arg(value_name = "TAU")]
        discopop_tau: f64 = 0.05,
        /// How log-ratios become scores (TRL's f_divergence_type): reverse_kl (DPO),
        /// forward_kl, js_divergence, alpha_divergence; not reverse_kl only with sigmoid,
        /// sigmoid_norm, hinge, ipo, exo_pair, robust, discopop, sft.
        #[arg(value_enum)]
        f_divergence: FDivergence = FDivergence::ReverseKl,
        /// α of the alpha divergence (TRL's f_alpha_divergence_coef).
        #[arg(value_name = "A")]
        f_alpha: f64 = 0.5,
        /// WPO: weigh each pair's losses by the policy's probability of its completions
        /// (w = exp(mean over tokens of log π − log Σ p²), chosen × rejected, detached).
        #[arg(num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
        use_weighting: bool = false,
        /// LD-DPO: completion tokens past the shorter completion's length count α times, in the
        /// policy's and the reference's log-probs (any α on the same cache).
        #[arg(num_args = 1, value_name = "A")]
        ld_alpha: Option<f64> = None,
        /// SimPO's target margin γ.
        #[arg(value_name = "G")]
        simpo_gamma: f64 = 0.5,
        /// CPO and SimPO: the weight of the NLL term (0 for pure SimPO).
        #[arg(value_name = "A")]
        cpo_alpha: f64 = 1.0,
        /// KTO / apo_zero_unpaired: weight of the desirable rows' losses (TRL's
        /// desirable_weight). With unbalanced data, TRL suggests desirable_weight ×
        /// #desirable / (undesirable_weight × #undesirable) in [1, 4/3]; train warns outside it.
        #[arg(value_name = "W")]
        desirable_weight: f64 = 1.0,
        /// KTO / apo_zero_unpaired: weight of the undesirable rows' losses.
        #[arg(value_name = "W")]
        undesirable_weight: f64 = 1.0,
        /// Old spelling of `--loss ...,sft --loss-weights ...,W`: adds an SFT term of weight W.
        #[arg(hide = true)]
        sft_weight: f64 = 0.0,
        /// Mixture-of-experts models: the weight of the router's load-balancing loss added to
        /// every step's loss, logged as `aux_loss` (unset: the model config's
        /// `router_aux_loss_coef`, as TRL does; 0 turns it off).
        #[arg(num_args = 1, value_name = "C")]
        router_aux_loss_coef: Option<f64> = None,
        /// Peak learning rate.
        lr: f64 = 1e-6,
        /// AdamW decoupled weight decay.
        weight_decay: f64 = 0.0,
        /// AdamW β1.
        adam_beta1: f64 = 0.9,
        /// AdamW β2.
        adam_beta2: f64 = 0.999,
        /// AdamW ε.
        adam_eps: f64 = 1e-8,
        /// Learning-rate schedule after warm-up (transformers' definitions).
        #[arg(value_enum)]
        scheduler: SchedulerKind = SchedulerKind::Linear,
        /// Linear warm-up steps.
        warmup_steps: usize = 0,
        /// Clip the global gradient norm to this (0: no clipping); `grad_norm` is logged before clipping.
        max_grad_norm: f64 = 1.0,
        /// Micro-batches per optimizer step.
        grad_accum: usize = 1,
        /// Pairs per micro-batch (per rank in a data-parallel run: the global batch is
        /// batch-size × grad-accum × ranks).
        batch_size: usize = 8,
        /// At most this many tokens through the policy at once: a micro-batch with more runs in
        /// pieces (gradients add up to the same; memory follows the piece, not the batch).
        #[arg(num_args = 1, value_name = "TOKENS")]
        batch_tokens: Option<usize> = None,
        /// Fit the run under this many GB per rank, as the memory plan (printed at start, in the
        /// manifest) measures it on one pair: gradient checkpointing is turned on if it would
        /// not fit otherwise, then micro-batches run in pieces of as many tokens as fit.
        #[arg(num_args = 1, value_name = "GB")]
        max_memory: Option<f64> = None,
        /// Optimizer steps (unset: from --epochs).
        #[arg(num_args = 1, value_name = "N")]
        max_steps: Option<usize> = None,
        /// Passes over the train split, when --max-steps is unset.
        epochs: f64 = 1.0,
        /// Seed of the data order.
        seed: u64 = 42,
        /// Shuffle the train rows each epoch (false: row_id order). KTO shuffles whole KL blocks
        /// (TRL's KTOTrainer refuses to shuffle: pass false for its order).
        #[arg(num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
        shuffle: bool = true,
        /// Evaluate on the eval split every N steps (and at step 0 and the end; 0: only those).
        eval_every: usize = 50,
        /// Save a resumable checkpoint every N steps (0: only the final model).
        save_every: usize = 500,
        /// Keep at most N checkpoints in --out/checkpoints (older ones removed; never the newest,
        /// nor the best with --load-best-model-at-end). Unset: keep all.
        #[arg(num_args = 1, value_name = "N")]
        save_total_limit: Option<usize> = None,
        /// Track the best checkpoint by --metric-for-best-model (`best_metric`,
        /// `best_model_checkpoint` in trainer_state.json) and make `final/` that checkpoint's model
        /// (needs an eval split and --save-every a multiple of --eval-every, as the Trainer).
        #[arg(num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
        load_best_model_at_end: bool = false,
        /// The eval metric that picks the best checkpoint (a metrics.parquet column; `loss` means
        /// `eval/loss`, as the Trainer adds its `eval_` prefix).
        #[arg(value_name = "NAME")]
        metric_for_best_model: String = "eval/loss".into(),
        /// Whether a larger --metric-for-best-model is better (unset: false for losses, true
        /// otherwise, as the Trainer decides).
        #[arg(num_args = 1, value_name = "BOOL")]
        greater_is_better: Option<bool> = None,
        /// Stop after N evaluations in a row without an improvement of the best metric by more than
        /// --early-stopping-threshold (transformers' EarlyStoppingCallback; needs
        /// --load-best-model-at-end).
        #[arg(num_args = 1, value_name = "N")]
        early_stopping_patience: Option<usize> = None,
        /// What counts as an improvement for --early-stopping-patience.
        #[arg(value_name = "DELTA")]
        early_stopping_threshold: f64 = 0.0,
        /// Where the metrics also go: none, or tensorboard (event files under --logging-dir, with
        /// `train/…` and `eval/…` tags at metrics.parquet's steps).
        #[arg(value_enum)]
        report_to: ReportTo = ReportTo::None,
        /// TensorBoard's log directory (unset: --out/runs, as the Trainer puts it under its output).
        #[arg(num_args = 1, value_name = "DIR")]
        logging_dir: Option<PathBuf> = None,
        /// Attention layout (see cache-ref).
        #[arg(value_enum)]
        layout: LayoutKind = LayoutKind::Packed,
        /// Continue from the newest complete checkpoint in --out (from the start if there is none).
        #[arg(num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
        resume: bool = false,
        /// Discard a training run already in --out and start over.
        #[arg(num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
        force: bool = false,
        /// Train a LoRA adapter of rank R instead of every weight (PEFT semantics; the base is
        /// frozen).
        #[arg(num_args = 1, value_name = "R")]
        lora_r: Option<usize> = None,
        /// LoRA α: the adapter's output is scaled by α/r.
        lora_alpha: f64 = 8.0,
        /// LoRA target modules, comma-separated (q_proj, k_proj, v_proj, o_proj, gate_proj,
        /// up_proj, down_proj) or all-linear.
        #[arg(value_name = "LIST")]
        lora_targets: String = "q_proj,v_proj".into(),
        /// Dropout on the adapter's input.
        lora_dropout: f64 = 0.0,
        /// Continue training an existing PEFT LoRA adapter (its adapter_config.json gives r, α,
        /// targets). The reference is whatever model cache-ref ran: the base, or the base with
        /// this adapter merged (`pipeline merge-lora`), as TRL uses a copy of the adapter.
        #[arg(num_args = 1, value_name = "DIR")]
        adapter: Option<PathBuf> = None,
        /// Dtype the frozen base weights are held in under LoRA (f32 or bf16); adapters stay f32.
        #[arg(value_enum)]
        base_dtype: FloatDtype = FloatDtype::F32,
        /// Quantize the linear layers to 4 bits on load (bitsandbytes NF4/FP4, as transformers'
        /// `BitsAndBytesConfig(load_in_4bit=True)`; the output head stays as it is). A checkpoint
        /// saved quantized (`*-bnb-4bit`) loads as it is without this flag.
        #[arg(num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
        load_in_4bit: bool = false,
        /// The 4-bit data type under --load-in-4bit.
        #[arg(value_enum)]
        bnb_4bit_quant_type: QuantType = QuantType::Nf4,
        /// Quantize the per-block scales too (8-bit, blocks of 256): about 0.4 bit a weight less.
        #[arg(num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
        bnb_4bit_use_double_quant: bool = false,
        /// Dtype the 4-bit layers (and here the whole forward) compute in (unset: --dtype).
        #[arg(value_enum, num_args = 1)]
        bnb_4bit_compute_dtype: Option<FloatDtype> = None,
        /// Compute dtype: f32, or bf16 for mixed precision (bf16 matmuls over f32 master
        /// weights, f32 AdamW state, log-softmax and loss in f32, as torch autocast + AdamW).
        #[arg(value_enum)]
        dtype: FloatDtype = FloatDtype::F32,
        /// Keep only each decoder layer's input during the forward and rerun the layer in the
        /// backward (TRL's `gradient_checkpointing`): activation memory of one layer instead of
        /// all, for about a third more compute; the gradients are the same.
        #[arg(num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
        gradient_checkpointing: bool = false,
        /// Data-parallel runs (under mpirun/srun): each rank keeps the AdamW moments of 1/N of
        /// the parameters, updates those and broadcasts them (ZeRO-1); the result is the same.
        #[arg(num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
        shard_optimizer: bool = false,
        /// Data-parallel runs: shard every weight, its gradient and its AdamW moments over the
        /// ranks (ZeRO-3 / FSDP's full shard), so a rank holds 1/N of the model. Each decoder
        /// layer is all-gathered just before it runs, again for its backward (it reruns there,
        /// as with --gradient-checkpointing) and freed after; gradients are reduce-scattered.
        /// The embedding, final norm and head are gathered for the step. Same result as one
        /// process; checkpoints are the usual HF / PEFT files, resumable at any world size.
        #[arg(num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
        shard_params: bool = false,
        /// Ablation: load the reference model and compute its log-probs in every step.
        #[arg(num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
        ref_in_loop: bool = false,
        /// Stop after N steps, keeping the schedule of the full run (for testing resume).
        #[arg(hide = true, num_args = 1)]
        stop_after_steps: Option<usize> = None,
    }
}

fn positive(flag: &str, v: f64) -> Result<()> {
    if !(v.is_finite() && v > 0.0) {
        bail!("--{flag} must be a positive number, got {v}");
    }
    Ok(())
}

fn non_negative(flag: &str, v: f64) -> Result<()> {
    if !(v.is_finite() && v >= 0.0) {
        bail!("--{flag} must be a number >= 0, got {v}");
    }
    Ok(())
}

fn in_unit(flag: &str, v: f64) -> Result<()> {
    if !(v.is_finite() && (0.0..1.0).contains(&v)) {
        bail!("--{flag} must be in [0, 1), got {v}");
    }
    Ok(())
}

fn at_least_one(flag: &str, v: usize) -> Result<()> {
    if v == 0 {
        bail!("--{flag} must be at least 1");
    }
    Ok(())
}

fn given(flag: &str, p: &Path) -> Result<()> {
    if p.as_os_str().is_empty() {
        bail!("--{flag} is required");
    }
    Ok(())
}

impl PrepareSettings {
    pub fn validate(&self) -> Result<()> {
        if self.inputs.is_empty() {
            bail!("--input is required: the preference data to prepare (parquet, JSON Lines, JSON, `datasets` directories)");
        }
        given("model", &self.model)?;
        at_least_one("max-length", self.max_length)?;
        if self.max_prompt_length == Some(0) {
            bail!("--max-prompt-length must be at least 1 (a pair needs a prompt token to score its first completion token); leave it unset to keep whole prompts");
        }
        in_unit("eval-fraction", self.eval_fraction)?;
        self.template_date().context("--template-date")?;
        let cols = [self.prompt_column.as_deref(), Some(self.chosen_column.as_str()), Some(self.rejected_column.as_str())];
        if cols.iter().flatten().any(|c| c.is_empty()) {
            bail!("--prompt-column, --chosen-column and --rejected-column must not be empty");
        }
        if self.chosen_column == self.rejected_column
            || self.prompt_column.as_deref().is_some_and(|p| p == self.chosen_column || p == self.rejected_column)
        {
            bail!("--prompt-column, --chosen-column and --rejected-column must name different columns");
        }
        Ok(())
    }

    /// `--template-date`, or today.
    pub fn template_date(&self) -> Result<crate::data::chat::Date> {
        self.template_date.as_deref().map_or_else(|| Ok(crate::data::chat::Date::today()), crate::data::chat::Date::parse)
    }

    pub fn columns(&self) -> ColumnNames {
        ColumnNames {
            prompt: self.prompt_column.clone(),
            chosen: self.chosen_column.clone(),
            rejected: self.rejected_column.clone(),
            completion: self.completion_column.clone(),
            label: self.label_column.clone(),
        }
    }
}

impl CacheRefSettings {
    pub fn validate(&self) -> Result<()> {
        given("model", &self.model)?;
        at_least_one("batch-tokens", self.batch_tokens)?;
        if self.kl_batch_size.is_some_and(|b| b < 2) {
            bail!("--kl-batch-size must be at least 2: in a block of one row the KL completion is the row's own, and KTO's KL term equals its reward (TRL refuses it too)");
        }
        self.shard()?;
        Ok(())
    }

    /// `--shard K/N` as (K, N).
    pub fn shard(&self) -> Result<Option<(usize, usize)>> {
        let Some(s) = &self.shard else { return Ok(None) };
        let parsed = s.split_once('/').and_then(|(k, n)| Some((k.trim().parse::<usize>().ok()?, n.trim().parse::<usize>().ok()?)));
        match parsed {
            Some((k, n)) if n >= 1 && k < n => Ok(Some((k, n))),
            _ => bail!("--shard must be K/N with 0 <= K < N (shards count from 0), got `{s}`"),
        }
    }
}

impl TrainSettings {
    /// The losses' settings (`router_aux_loss_coef`: this run's, or the model's).
    pub fn loss_config(&self, router_aux_loss_coef: f64) -> Result<LossConfig> {
        let types = &self.loss.0;
        let weights: Vec<f64> = match &self.loss_weights {
            None => vec![1.0; types.len()],
            Some(w) => w.0.clone(),
        };
        if weights.len() != types.len() {
            bail!("--loss-weights has {} weights for {} loss types", weights.len(), types.len());
        }
        let mut terms: Vec<(LossType, f64)> = types.iter().copied().zip(weights).collect();
        if self.sft_weight > 0.0 && !terms.iter().any(|(t, _)| *t == LossType::Sft) {
            terms.push((LossType::Sft, self.sft_weight));
        }
        let c = LossConfig {
            terms,
            beta: self.beta,
            label_smoothing: self.label_smoothing,
            discopop_tau: self.discopop_tau,
            f_divergence: self.f_divergence,
            f_alpha: self.f_alpha,
            use_weighting: self.use_weighting,
            ld_alpha: self.ld_alpha,
            simpo_gamma: self.simpo_gamma,
            cpo_alpha: self.cpo_alpha,
            router_aux_loss_coef,
            desirable_weight: self.desirable_weight,
            undesirable_weight: self.undesirable_weight,
        };
        c.validate()?;
        Ok(c)
    }

    pub fn validate(&self) -> Result<()> {
        positive("beta", self.beta)?;
        non_negative("label-smoothing", self.label_smoothing)?;
        non_negative("sft-weight", self.sft_weight)?;
        non_negative("cpo-alpha", self.cpo_alpha)?;
        if !self.f_alpha.is_finite() {
            bail!("--f-alpha must be a number");
        }
        let c = self.loss_config(0.0)?;
        if c.reference_free() && self.ref_cache.is_some() {
            bail!("--loss {} is reference-free: it takes no --ref-cache (drop the flag, or pick a reference-based loss)", self.loss);
        }
        if c.reference_free() && self.model.is_none() {
            bail!("--loss {} is reference-free: pass --model, the policy to start from (there is no cache to take it from)", self.loss);
        }
        non_negative("lr", self.lr)?;
        non_negative("weight-decay", self.weight_decay)?;
        in_unit("adam-beta1", self.adam_beta1)?;
        in_unit("adam-beta2", self.adam_beta2)?;
        positive("adam-eps", self.adam_eps)?;
        non_negative("max-grad-norm", self.max_grad_norm)?;
        at_least_one("grad-accum", self.grad_accum)?;
        at_least_one("batch-size", self.batch_size)?;
        if self.batch_tokens == Some(0) {
            bail!("--batch-tokens must be at least 1");
        }
        if let Some(gb) = self.max_memory {
            positive("max-memory", gb)?;
            if self.batch_tokens.is_some() {
                bail!("--batch-tokens sets the tokens per piece and --max-memory derives them: pass one of them");
            }
        }
        if let Some(c) = self.router_aux_loss_coef {
            non_negative("router-aux-loss-coef", c)?;
        }
        if self.max_steps == Some(0) {
            bail!("--max-steps must be at least 1");
        }
        if self.max_steps.is_none() {
            positive("epochs", self.epochs)?;
        }
        let lora = self.lora_r.is_some() || self.adapter.is_some();
        if self.lora_r.is_some() && self.adapter.is_some() {
            bail!("--lora-r starts a new adapter and --adapter continues one (its adapter_config.json gives r): pass one of them");
        }
        if lora {
            positive("lora-alpha", self.lora_alpha)?;
            in_unit("lora-dropout", self.lora_dropout)?;
            if self.lora_r == Some(0) {
                bail!("--lora-r must be at least 1");
            }
            if let Some(r) = self.lora_r {
                crate::model::lora::LoraConfig::new(r, self.lora_alpha, &self.lora_targets, self.lora_dropout).context("--lora-targets")?;
            }
        }
        if self.load_in_4bit && !lora {
            bail!("--load-in-4bit trains a LoRA adapter over the frozen 4-bit base (QLoRA): add --lora-r R (or --adapter DIR); full fine-tuning needs the full-precision weights");
        }
        if self.base_dtype == FloatDtype::F16 || (!lora && self.base_dtype != FloatDtype::F32) {
            bail!("--base-dtype holds a frozen LoRA base in f32 or bf16; full fine-tuning trains f32 weights");
        }
        if self.dtype == FloatDtype::F16 {
            bail!("train --dtype is f32 or bf16 (mixed precision over f32 weights)");
        }
        if self.shard_params && self.ref_in_loop {
            bail!("--shard-params with --ref-in-loop would hold the whole reference model on every rank: use the cached reference");
        }
        if self.resume && self.force {
            bail!("--resume continues a run and --force discards it: pass one of them");
        }
        if self.save_total_limit == Some(0) {
            bail!("--save-total-limit must be at least 1 (leave it unset to keep every checkpoint)");
        }
        if self.load_best_model_at_end {
            if self.eval_every == 0 || self.save_every == 0 || !self.save_every.is_multiple_of(self.eval_every) {
                bail!(
                    "--load-best-model-at-end needs checkpoints at evaluated steps: --save-every ({}) must be a multiple of --eval-every ({}), both > 0",
                    self.save_every,
                    self.eval_every
                );
            }
            if !self.metric_for_best_model().starts_with("eval/") {
                bail!(
                    "--metric-for-best-model names an eval metric (`eval/loss`, `eval/rewards/accuracies`, …), got `{}`",
                    self.metric_for_best_model
                );
            }
        }
        if let Some(n) = self.early_stopping_patience {
            at_least_one("early-stopping-patience", n)?;
            if !self.load_best_model_at_end {
                bail!("--early-stopping-patience needs --load-best-model-at-end (as transformers' EarlyStoppingCallback): the best checkpoint is what it keeps");
            }
        }
        non_negative("early-stopping-threshold", self.early_stopping_threshold)?;
        Ok(())
    }

    /// `--metric-for-best-model` as a metrics.parquet column: `loss` is `eval/loss` (the Trainer
    /// prefixes `eval_`).
    pub fn metric_for_best_model(&self) -> String {
        let m = self.metric_for_best_model.trim();
        if m.starts_with("eval/") {
            m.to_string()
        } else {
            format!("eval/{}", m.trim_start_matches("eval_"))
        }
    }

    /// `--greater-is-better`, or the Trainer's default: false for a loss, true otherwise.
    pub fn greater_is_better(&self) -> bool {
        self.greater_is_better.unwrap_or_else(|| !self.metric_for_best_model().ends_with("loss"))
    }
}

settings! {
    /// `pipeline sample`: completions of prompts from a model, for on-policy DPO.
    pub struct SampleSettings, layer SampleLayer {
        /// Model directory (Hugging Face layout) to sample from.
        #[arg(value_name = "DIR")]
        model: PathBuf = PathBuf::new(),
        /// Files (parquet, JSON Lines, JSON, `datasets` directories; globs, directories) with a
        /// prompt column: strings, or conversations rendered with the chat template and a
        /// generation prompt (with the row's `tools` and `chat_template_kwargs` when present).
        #[arg(long = "prompts", num_args = 1.., value_name = "PATH")]
        prompts: Vec<String> = vec![],
        /// Output directory: samples.parquet, skipped.parquet, manifest.json.
        #[arg(value_name = "DIR")]
        out: PathBuf = PathBuf::from("samples"),
        /// Prompt column.
        #[arg(value_name = "NAME")]
        prompt_column: String = "prompt".into(),
        /// Completions per prompt.
        #[arg(value_name = "K")]
        num_samples: usize = 4,
        /// New tokens per completion at most (it also stops at an end-of-sequence token).
        #[arg(value_name = "N")]
        max_new_tokens: usize = 128,
        /// Softmax temperature; 0 is greedy decoding.
        #[arg(value_name = "T")]
        temperature: f64 = 1.0,
        /// Keep only the K most likely tokens before sampling (0: all).
        #[arg(value_name = "K")]
        top_k: usize = 0,
        /// Nucleus sampling: keep the most likely tokens up to this total probability (1: all).
        #[arg(value_name = "P")]
        top_p: f64 = 1.0,
        /// Seed: each sample's draws depend only on it, its file, row and sample index.
        #[arg(value_name = "S")]
        seed: u64 = 0,
        /// Cache slots decoded together at most: samples × (longest prompt + new tokens).
        #[arg(value_name = "TOKENS")]
        batch_tokens: usize = 16384,
        /// A PEFT LoRA adapter to sample with (merged into the weights at load).
        #[arg(num_args = 1, value_name = "DIR")]
        adapter: Option<PathBuf> = None,
        /// Compute dtype.
        #[arg(value_enum)]
        dtype: FloatDtype = FloatDtype::F32,
        /// Quantize the linear layers to 4 bits on load (bitsandbytes NF4/FP4, as transformers'
        /// `BitsAndBytesConfig(load_in_4bit=True)`; the output head stays as it is). A checkpoint
        /// saved quantized (`*-bnb-4bit`) loads as it is without this flag.
        #[arg(num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
        load_in_4bit: bool = false,
        /// The 4-bit data type under --load-in-4bit.
        #[arg(value_enum)]
        bnb_4bit_quant_type: QuantType = QuantType::Nf4,
        /// Quantize the per-block scales too (8-bit, blocks of 256): about 0.4 bit a weight less.
        #[arg(num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
        bnb_4bit_use_double_quant: bool = false,
        /// Dtype the 4-bit layers (and here the whole forward) compute in (unset: --dtype).
        #[arg(value_enum, num_args = 1)]
        bnb_4bit_compute_dtype: Option<FloatDtype> = None,
        /// The date chat templates' `strftime_now` prints, YYYY-MM-DD (unset: today, UTC).
        #[arg(num_args = 1, value_name = "YYYY-MM-DD")]
        template_date: Option<String> = None,
        /// Replace an output built from other inputs or settings (or damaged).
        #[arg(num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
        force: bool = false,
        /// Stop after N waves, leaving a resumable partial run (for testing resume).
        #[arg(hide = true)]
        stop_after_waves: usize = 0,
    }
}

settings! {
    /// `pipeline label`: score samples and pair them into preference data.
    pub struct LabelSettings, layer LabelLayer {
        /// The output directory of `pipeline sample` (or its samples.parquet).
        #[arg(value_name = "PATH")]
        samples: PathBuf = PathBuf::new(),
        /// Reward model directory: a Hugging Face *ForSequenceClassification model with one label.
        #[arg(num_args = 1, value_name = "DIR")]
        reward_model: Option<PathBuf> = None,
        /// Quantize the linear layers to 4 bits on load (bitsandbytes NF4/FP4, as transformers'
        /// `BitsAndBytesConfig(load_in_4bit=True)`; the output head stays as it is). A checkpoint
        /// saved quantized (`*-bnb-4bit`) loads as it is without this flag.
        #[arg(num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
        load_in_4bit: bool = false,
        /// The 4-bit data type under --load-in-4bit.
        #[arg(value_enum)]
        bnb_4bit_quant_type: QuantType = QuantType::Nf4,
        /// Quantize the per-block scales too (8-bit, blocks of 256): about 0.4 bit a weight less.
        #[arg(num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
        bnb_4bit_use_double_quant: bool = false,
        /// Dtype the 4-bit layers compute in (unset: f32).
        #[arg(value_enum, num_args = 1)]
        bnb_4bit_compute_dtype: Option<FloatDtype> = None,
        /// Instead of a reward model: a shell command that reads JSON lines {"prompt", "completion"}
        /// on stdin and writes one number per line on stdout.
        #[arg(num_args = 1, value_name = "CMD")]
        judge_cmd: Option<String> = None,
        /// Output directory: scores.parquet, prefs.parquet, skipped.parquet, manifest.json.
        #[arg(value_name = "DIR")]
        out: PathBuf = PathBuf::from("labels"),
        /// best-worst: one pair per prompt (highest vs lowest score); all-pairs: every two
        /// samples whose scores differ by more than --min-margin; unpaired: every sample as a
        /// labelled completion for KTO (desirable when its score is above --threshold).
        #[arg(value_enum)]
        pairs: PairMode = PairMode::BestWorst,
        /// --pairs unpaired: scores above this are desirable (label true), the rest not.
        #[arg(value_name = "T")]
        threshold: f64 = 0.0,
        /// A pair needs chosen_score − rejected_score above this.
        #[arg(value_name = "M")]
        min_margin: f64 = 0.0,
        /// Sequences per reward-model forward, in tokens.
        #[arg(value_name = "TOKENS")]
        batch_tokens: usize = 4096,
        /// Replace an output built from other inputs or settings (or damaged).
        #[arg(num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
        force: bool = false,
    }
}

/// Where `train` reports its metrics besides metrics.jsonl / metrics.parquet (the Trainer's
/// `report_to`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum ReportTo {
    None,
    Tensorboard,
}

/// How `label` turns scored samples into pairs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum PairMode {
    BestWorst,
    AllPairs,
    /// No pairs: each sample a (prompt, completion, label) row.
    Unpaired,
}

impl SampleSettings {
    pub fn validate(&self) -> Result<()> {
        given("model", &self.model)?;
        if self.prompts.is_empty() {
            bail!("--prompts is required: files (parquet, JSON Lines, JSON, `datasets` directories) with a `{}` column", self.prompt_column);
        }
        at_least_one("num-samples", self.num_samples)?;
        at_least_one("max-new-tokens", self.max_new_tokens)?;
        at_least_one("batch-tokens", self.batch_tokens)?;
        non_negative("temperature", self.temperature)?;
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            bail!("--top-p must be in (0, 1], got {}", self.top_p);
        }
        self.template_date().context("--template-date")?;
        Ok(())
    }

    /// `--template-date`, or today.
    pub fn template_date(&self) -> Result<crate::data::chat::Date> {
        self.template_date.as_deref().map_or_else(|| Ok(crate::data::chat::Date::today()), crate::data::chat::Date::parse)
    }
}

impl LabelSettings {
    pub fn validate(&self) -> Result<()> {
        given("samples", &self.samples)?;
        match (&self.reward_model, &self.judge_cmd) {
            (Some(_), Some(_)) => bail!("pass --reward-model or --judge-cmd, not both"),
            (None, None) => bail!("--reward-model DIR or --judge-cmd CMD is required: what scores the samples"),
            _ => {}
        }
        non_negative("min-margin", self.min_margin)?;
        at_least_one("batch-tokens", self.batch_tokens)?;
        if !self.threshold.is_finite() {
            bail!("--threshold must be a finite score, got {}", self.threshold);
        }
        Ok(())
    }
}

/// The `[iterative]` section of a pipeline TOML; the stage sections give every round's other
/// settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IterativeSection {
    /// Rounds to run.
    pub rounds: usize,
    /// π0: the first round's policy and every round's reference.
    pub base_model: PathBuf,
    /// Prompt files (as `sample --prompts`) sampled in every round.
    pub prompts: Vec<String>,
    /// Held-out prompt files each round's policy is judged on (greedy, one completion each).
    #[serde(default)]
    pub eval_prompts: Vec<String>,
    /// Where the rounds go.
    pub dir: PathBuf,
    /// What scores samples: a judge command or a reward model (as `label`).
    #[serde(default)]
    pub judge_cmd: Option<String>,
    #[serde(default)]
    pub reward_model: Option<PathBuf>,
    /// A held-out completion counts as right when its score reaches this.
    #[serde(default = "one")]
    pub correct_score: f64,
}

fn one() -> f64 {
    1.0
}

/// A pipeline TOML: one section per stage, each a settings layer. Later stages read what
/// earlier ones wrote unless the file says otherwise.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PipelineFile {
    pub prepare: PrepareLayer,
    pub cache_ref: CacheRefLayer,
    pub train: TrainLayer,
    pub sample: SampleLayer,
    pub label: LabelLayer,
    /// Rounds of sample → label → prepare → cache-ref → train (see `iterative`).
    pub iterative: Option<IterativeSection>,
}

impl PipelineFile {
    /// Reads a pipeline TOML (relative paths in it are relative to the working directory).
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        let mut f: Self = toml::from_str(&text).with_context(|| format!("{}: invalid pipeline config", path.display()))?;
        let out = f.prepare.out.clone().or(Some(PrepareSettings::default().out));
        f.cache_ref.prepared = f.cache_ref.prepared.or(out.clone());
        f.cache_ref.model = f.cache_ref.model.or(f.prepare.model.clone());
        f.train.prepared = f.train.prepared.or(out);
        // The reference cache cache-ref writes, unless train's loss is reference-free.
        if f.reference_free() {
            // Reference-free: the policy starts from the prepare section's model.
            f.train.model = f.train.model.or(f.prepare.model.clone().map(Some));
        } else {
            f.train.ref_cache = f.train.ref_cache.or(Some(f.cache_ref.out.clone().or(Some(CacheRefSettings::default().out))));
        }
        Ok(f)
    }

    /// Whether `pipeline run` trains with a reference-free loss (so runs no cache-ref).
    pub fn reference_free(&self) -> bool {
        self.train.loss.as_ref().is_some_and(LossList::reference_free)
    }

    /// The file's sections, or empty layers without a file.
    pub fn load_optional(path: Option<&Path>) -> Result<Self> {
        path.map(Self::load).transpose().map(Option::unwrap_or_default)
    }
}

/// The 4-bit request of a stage's flags (`--load-in-4bit` and its settings), in `dtype`.
pub fn quant_request(
    load_in_4bit: bool,
    quant_type: QuantType,
    double_quant: bool,
    compute: Option<FloatDtype>,
    dtype: FloatDtype,
) -> Option<QuantSpec> {
    load_in_4bit.then(|| QuantSpec::new(quant_type, double_quant, compute.unwrap_or(dtype).dtype()))
}

macro_rules! quant_of {
    ($($s:ty => $dtype:ident),*) => {$(
        impl $s {
            /// What `--load-in-4bit` and its settings ask for (None: no quantizing on load).
            pub fn quant(&self) -> Option<QuantSpec> {
                quant_request(self.load_in_4bit, self.bnb_4bit_quant_type, self.bnb_4bit_use_double_quant, self.bnb_4bit_compute_dtype, quant_of!(@d self $dtype))
            }

            /// The compute dtype: --bnb-4bit-compute-dtype where given, else the stage's dtype.
            pub fn compute_dtype(&self) -> FloatDtype {
                self.bnb_4bit_compute_dtype.unwrap_or(quant_of!(@d self $dtype))
            }
        }
    )*};
    (@d $self:ident f32) => { FloatDtype::F32 };
    (@d $self:ident $f:ident) => { $self.$f };
}
quant_of!(CacheRefSettings => dtype, TrainSettings => dtype, SampleSettings => dtype, LabelSettings => f32);
