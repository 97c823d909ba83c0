//! `pipeline`: the command line. Parses flags, merges them over a pipeline TOML, calls a stage.
use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use dpo_pipeline::config::{CacheRefConfig, LossKind, PipelineConfig, PrepareConfig, SchedulerKind, TrainConfig};
use dpo_pipeline::data::batch::LayoutKind;
use dpo_pipeline::data::synth::{write_synth, SynthFormat};
use dpo_pipeline::model::init::{init_model, Arch, InitSpec, Size};
use dpo_pipeline::{demo, stages};
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "pipeline", version, about = "Offline DPO: prepare preference data, cache reference log-probs once, train the policy.",
    long_about = "Offline Direct Preference Optimization in three batch stages:\n\n  \
    prepare    preference parquet (prompt, chosen, rejected) -> token ids + manifest\n  \
    cache-ref  frozen reference model, run once -> log π_ref(y_w|x), log π_ref(y_l|x) as mmap columns\n  \
    train      DPO trainer reading the cache: each step runs only the policy\n\n\
    Every stage writes a manifest.json with a fingerprint of its inputs and settings, skips work \
    that is already done, and leaves parquet files to read with polars.\n\n\
    Start with `pipeline demo`.")]
struct Cli {
    /// CPU threads for tokenization and tensor math (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Tokenize preference parquet into a prepared directory (stage 1).
    Prepare(PrepareArgs),
    /// Run the frozen reference model once over every pair and cache its log-probs (stage 2).
    CacheRef(CacheRefArgs),
    /// Train the policy with DPO on the cached reference log-probs (stage 3).
    Train(Box<TrainArgs>),
    /// Run the stages of a pipeline TOML in order, each skipped when already up to date.
    Run {
        /// e.g. pipelines/demo.toml
        config: PathBuf,
    },
    /// Generate a tiny model and synthetic data (when absent) and run the whole pipeline on them.
    Demo {
        /// Working directory for the demo's model, data and outputs.
        #[arg(long, default_value = "demo")]
        dir: PathBuf,
        /// Training steps.
        #[arg(long, default_value_t = 150)]
        steps: usize,
        /// Synthetic training rows.
        #[arg(long, default_value_t = 1200)]
        rows: usize,
    },
    /// Write a randomly initialised model in Hugging Face layout (config, safetensors, tokenizer).
    InitModel {
        #[arg(long, value_enum)]
        arch: Arch,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long, value_enum, default_value = "tiny")]
        size: Size,
    },
    /// Write a synthetic preference parquet with a learnable signal.
    SynthPrefs {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 1000)]
        rows: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Conversational format: lists of {role, content} messages.
        #[arg(long)]
        conversational: bool,
        /// Implicit prompt: no prompt column, chosen and rejected start with the prompt.
        #[arg(long, conflicts_with = "conversational")]
        implicit: bool,
        /// Also write N held-out rows (different seed) to FILE with `.eval` before the extension.
        #[arg(long, default_value_t = 0)]
        eval_rows: usize,
    },
}

#[derive(Args)]
struct PrepareArgs {
    /// Pipeline TOML whose [prepare] section gives defaults for the flags below.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Preference parquet files or globs (several allowed).
    #[arg(long, num_args = 1..)]
    input: Vec<String>,
    /// Files whose rows all go to the eval split.
    #[arg(long, num_args = 1..)]
    eval_input: Vec<String>,
    /// Model directory: tokenizer.json, tokenizer_config.json (chat template).
    #[arg(long)]
    model: Option<PathBuf>,
    #[arg(long)]
    out: Option<PathBuf>,
    /// Prompt column (default: `prompt` if present, else the prompt is implicit).
    #[arg(long)]
    prompt_column: Option<String>,
    #[arg(long)]
    chosen_column: Option<String>,
    #[arg(long)]
    rejected_column: Option<String>,
    /// Longest prompt+completion sequence scored; longer ones keep their first tokens (TRL: 1024).
    #[arg(long)]
    max_length: Option<usize>,
    /// Keep only the last N prompt tokens.
    #[arg(long)]
    max_prompt_length: Option<usize>,
    /// Fraction of rows (by a hash of their content) that go to the eval split.
    #[arg(long)]
    eval_fraction: Option<f64>,
    /// Rebuild even when the output is up to date.
    #[arg(long)]
    force: bool,
}

#[derive(Args)]
struct CacheRefArgs {
    #[arg(long)]
    config: Option<PathBuf>,
    /// Prepared directory (output of `prepare`).
    #[arg(long)]
    prepared: Option<PathBuf>,
    /// Reference model directory (HF layout).
    #[arg(long)]
    model: Option<PathBuf>,
    #[arg(long)]
    out: Option<PathBuf>,
    /// Padded tokens per forward batch (default 4096).
    #[arg(long)]
    batch_tokens: Option<usize>,
    /// Compute dtype: f32, bf16 or f16.
    #[arg(long)]
    dtype: Option<String>,
    /// Attention layout: shared-prompt (prompt computed once per pair) or padded.
    #[arg(long, value_enum)]
    layout: Option<LayoutKind>,
    /// Overwrite a cache built from other inputs or settings.
    #[arg(long)]
    force: bool,
    /// Stop after N batches, leaving a resumable partial cache (for testing resume).
    #[arg(long, hide = true, default_value_t = 0)]
    stop_after_batches: usize,
}

#[derive(Args)]
struct TrainArgs {
    #[arg(long)]
    config: Option<PathBuf>,
    #[arg(long)]
    prepared: Option<PathBuf>,
    #[arg(long)]
    ref_cache: Option<PathBuf>,
    #[arg(long)]
    out: Option<PathBuf>,
    /// Policy initialisation (default: the reference model recorded in the cache).
    #[arg(long)]
    model: Option<PathBuf>,
    #[arg(long, value_enum)]
    loss: Option<LossKind>,
    #[arg(long)]
    beta: Option<f64>,
    #[arg(long)]
    label_smoothing: Option<f64>,
    /// Weight of an SFT (negative log-likelihood) term on chosen.
    #[arg(long)]
    sft_weight: Option<f64>,
    #[arg(long)]
    lr: Option<f64>,
    #[arg(long)]
    weight_decay: Option<f64>,
    #[arg(long)]
    adam_beta1: Option<f64>,
    #[arg(long)]
    adam_beta2: Option<f64>,
    #[arg(long)]
    adam_eps: Option<f64>,
    #[arg(long, value_enum)]
    scheduler: Option<SchedulerKind>,
    #[arg(long)]
    warmup_steps: Option<usize>,
    #[arg(long)]
    max_grad_norm: Option<f64>,
    #[arg(long)]
    grad_accum: Option<usize>,
    /// Pairs per micro-batch.
    #[arg(long)]
    batch_size: Option<usize>,
    #[arg(long)]
    max_steps: Option<usize>,
    #[arg(long)]
    epochs: Option<f64>,
    #[arg(long)]
    seed: Option<u64>,
    /// Keep row_id order instead of shuffling by the seed.
    #[arg(long)]
    no_shuffle: bool,
    #[arg(long)]
    eval_every: Option<usize>,
    #[arg(long)]
    save_every: Option<usize>,
    #[arg(long, value_enum)]
    layout: Option<LayoutKind>,
    /// Continue from the newest checkpoint in OUT.
    #[arg(long)]
    resume: bool,
    #[arg(long)]
    force: bool,
    /// Ablation: load the reference model and compute its log-probs in every step.
    #[arg(long)]
    ref_in_loop: bool,
    #[arg(long, hide = true)]
    stop_after_steps: Option<usize>,
}

macro_rules! set {
    ($cfg:expr, $args:expr, $($f:ident),*) => { $( if let Some(v) = $args.$f { $cfg.$f = v.into(); } )* };
}

fn base(config: &Option<PathBuf>) -> Result<PipelineConfig> {
    Ok(match config {
        Some(p) => PipelineConfig::load(p)?,
        None => PipelineConfig::default(),
    })
}

fn main() {
    let cli = Cli::parse();
    if let Some(n) = cli.threads {
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        let _ = rayon::ThreadPoolBuilder::new().num_threads(n).build_global();
    }
    if let Err(e) = run(cli.cmd) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cmd: Cmd) -> Result<()> {
    match cmd {
        Cmd::Prepare(a) => {
            let mut c: PrepareConfig = base(&a.config)?.prepare;
            if !a.input.is_empty() {
                c.inputs = a.input;
            }
            if !a.eval_input.is_empty() {
                c.eval_inputs = a.eval_input;
            }
            set!(c, a, model, out, max_length, eval_fraction, chosen_column, rejected_column);
            if a.prompt_column.is_some() {
                c.prompt_column = a.prompt_column;
            }
            if a.max_prompt_length.is_some() {
                c.max_prompt_length = a.max_prompt_length;
            }
            c.force |= a.force;
            stages::prepare::run(&c)?;
        }
        Cmd::CacheRef(a) => {
            let mut c: CacheRefConfig = base(&a.config)?.cache_ref;
            set!(c, a, prepared, model, out, batch_tokens, dtype, layout);
            c.force |= a.force;
            c.stop_after_batches = a.stop_after_batches;
            stages::cache_ref::run(&c)?;
        }
        Cmd::Train(a) => {
            let mut c: TrainConfig = base(&a.config)?.train;
            set!(c, a, prepared, ref_cache, out, loss, beta, label_smoothing, sft_weight, lr, weight_decay, adam_beta1, adam_beta2,
                adam_eps, scheduler, warmup_steps, max_grad_norm, grad_accum, batch_size, epochs, seed, eval_every, save_every, layout);
            if a.model.is_some() {
                c.model = a.model;
            }
            if a.max_steps.is_some() {
                c.max_steps = a.max_steps;
            }
            c.shuffle &= !a.no_shuffle;
            c.resume |= a.resume;
            c.force |= a.force;
            c.ref_in_loop |= a.ref_in_loop;
            c.stop_after_steps = a.stop_after_steps;
            stages::train::run(&c)?;
        }
        Cmd::Run { config } => {
            let c = PipelineConfig::load(&config)?;
            stages::prepare::run(&c.prepare)?;
            stages::cache_ref::run(&c.cache_ref)?;
            stages::train::run(&c.train)?;
        }
        Cmd::Demo { dir, steps, rows } => demo::run(&dir, steps, rows)?,
        Cmd::InitModel { arch, out, seed, size } => {
            let cfg = init_model(&InitSpec { arch, size, seed }, &out)?;
            eprintln!("init-model: {:?} {:?}, {} parameters, vocab {} -> {}", arch, size, cfg.num_parameters(), cfg.vocab_size, out.display());
        }
        Cmd::SynthPrefs { out, rows, seed, conversational, implicit, eval_rows } => {
            let format = if conversational { SynthFormat::Conversational } else if implicit { SynthFormat::Implicit } else { SynthFormat::Standard };
            write_synth(&out, rows, seed, format)?;
            eprintln!("synth-prefs: {rows} rows -> {}", out.display());
            if eval_rows > 0 {
                let eval = dpo_pipeline::data::synth::eval_path(&out);
                write_synth(&eval, eval_rows, seed.wrapping_add(1_000_003), format)?;
                eprintln!("synth-prefs: {eval_rows} eval rows -> {}", eval.display());
            }
        }
    }
    Ok(())
}
