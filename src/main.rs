//! `pipeline`: the command line. Parses flags, layers them over a pipeline TOML and the
//! defaults (`settings`), and calls a stage.
use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use dpo_pipeline::settings::{CacheRefLayer, LabelLayer, PipelineFile, PrepareLayer, SampleLayer, TrainLayer};
use dpo_pipeline::synth::model::{init_model, init_reward_model, Arch, InitSpec, Size};
use dpo_pipeline::synth::prefs::{eval_path, write_synth, Length, SynthFormat};
use dpo_pipeline::{demo, stages};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "pipeline",
    version,
    about = "Offline DPO: prepare preference data, cache reference log-probs once, train the policy.",
    long_about = "Offline Direct Preference Optimization in three batch stages:\n\n  \
    prepare    preference data (parquet, JSONL, JSON, datasets dirs) -> token ids + manifest\n  \
    cache-ref  frozen reference model, run once -> log π_ref(y_w|x), log π_ref(y_l|x) as mmap columns\n  \
    train      DPO trainer reading the cache: each step runs only the policy\n\n\
    and, to close the loop (iterative / on-policy DPO):\n  \
    sample     K completions per prompt from a model (key-value cache, seeded)\n  \
    label      score them (reward model or judge command) and pair best against worst\n\n\
    Every stage writes a manifest.json with a fingerprint of its inputs and settings, skips work \
    that is already done, refuses to overwrite other work without --force, and leaves parquet \
    files to read with polars. Settings come from flags, then the stage's section of a pipeline \
    TOML (--config), then the defaults shown in each command's --help.\n\n\
    Start with `pipeline demo`."
)]
struct Cli {
    /// CPU threads for tokenization and tensor math (default: all cores; never more than are free).
    #[arg(long, global = true)]
    threads: Option<usize>,
    /// Device for the model stages: cpu, cuda or cuda:N (default: cuda:0 in a CUDA build, else cpu).
    #[arg(long, global = true, value_name = "DEVICE")]
    device: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

/// A pipeline TOML whose section for this stage gives settings the flags do not.
#[derive(Args)]
struct ConfigFile {
    /// Pipeline TOML (see pipelines/); its section for this stage gives defaults for the flags.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Tokenize preference data (parquet, JSON Lines, JSON, `datasets` directories) into a prepared
    /// directory (stage 1).
    Prepare {
        #[command(flatten)]
        file: ConfigFile,
        #[command(flatten)]
        flags: PrepareLayer,
    },
    /// Run the frozen reference model once over every pair and cache its log-probs (stage 2).
    CacheRef {
        #[command(flatten)]
        file: ConfigFile,
        #[command(flatten)]
        flags: CacheRefLayer,
    },
    /// Join the shards of a reference cache (`cache-ref --shard K/N`) into one cache, identical
    /// to an unsharded run's.
    MergeRef {
        /// Output directory: the merged reference cache.
        #[arg(long)]
        out: PathBuf,
        /// Prepared directory the shards were computed from (default: the path in their manifests).
        #[arg(long)]
        prepared: Option<PathBuf>,
        /// Replace a cache built from other inputs or settings.
        #[arg(long, action = clap::ArgAction::Set, num_args = 0..=1, default_value_t = false, default_missing_value = "true", value_name = "BOOL")]
        force: bool,
        /// The N shard directories, in any order.
        #[arg(required = true, value_name = "SHARD_DIR")]
        shards: Vec<PathBuf>,
    },
    /// Merge a LoRA adapter into its base model's weights, writing an HF model directory.
    MergeLora {
        /// Base model directory (HF layout), or a Hub model id ORG/NAME[@REVISION].
        #[arg(long)]
        model: PathBuf,
        /// PEFT LoRA adapter directory (adapter_config.json, adapter_model.safetensors), or a Hub id.
        #[arg(long)]
        adapter: PathBuf,
        /// Output directory: the merged model.
        #[arg(long)]
        out: PathBuf,
    },
    /// Train the policy with DPO on the cached reference log-probs (stage 3).
    Train {
        #[command(flatten)]
        file: ConfigFile,
        #[command(flatten)]
        flags: Box<TrainLayer>,
    },
    /// Sample completions of prompts from a model, for on-policy / iterative DPO.
    Sample {
        #[command(flatten)]
        file: ConfigFile,
        #[command(flatten)]
        flags: SampleLayer,
    },
    /// Score samples with a reward model or a judge command and pair them into preference rows.
    Label {
        #[command(flatten)]
        file: ConfigFile,
        #[command(flatten)]
        flags: LabelLayer,
    },
    /// The synthetic task's judge, for `label --judge-cmd`: reads JSON lines {prompt, completion},
    /// writes one score per line (1 for the right answer, else partial credit below 1).
    SynthJudge,
    /// Run the stages of a pipeline TOML in order, each skipped when already up to date (with an
    /// [iterative] section: rounds of sample, label, prepare, cache-ref and train).
    Run {
        /// e.g. pipelines/demo.toml
        config: PathBuf,
        /// Redo every stage, replacing outputs built from other inputs or settings.
        #[arg(long, action = clap::ArgAction::Set, num_args = 0..=1, default_value_t = false, default_missing_value = "true", value_name = "BOOL")]
        force: bool,
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
        /// Then close the loop: rounds of sample → label (the synthetic task's judge) → train
        /// from the demo's policy, printing the held-out judged accuracy per round.
        #[arg(long, action = clap::ArgAction::Set, num_args = 0..=1, default_value_t = false, default_missing_value = "true", value_name = "BOOL")]
        iterative: bool,
        /// Rounds of --iterative.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// Write a randomly initialised model in Hugging Face layout (config, safetensors, tokenizer).
    InitModel {
        /// Architecture family (config.json's model_type).
        #[arg(long, value_enum)]
        arch: Arch,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// Seed of the weights and the tokenizer's training text.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Dimensions.
        #[arg(long, value_enum, default_value = "tiny")]
        size: Size,
        /// A reward model (*ForSequenceClassification, one label) instead of a causal LM.
        #[arg(long, action = clap::ArgAction::Set, num_args = 0..=1, default_value_t = false, default_missing_value = "true", value_name = "BOOL")]
        reward: bool,
        /// Dtype the weights are stored in.
        #[arg(long, value_enum, default_value = "f32")]
        dtype: dpo_pipeline::model::weights::FloatDtype,
    },
    /// Write a synthetic preference parquet with a learnable signal.
    SynthPrefs {
        /// Output parquet file.
        #[arg(long)]
        out: PathBuf,
        /// Rows to write.
        #[arg(long, default_value_t = 1000)]
        rows: usize,
        /// Seed of the rows.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Conversational format: lists of {role, content} messages.
        #[arg(long, action = clap::ArgAction::Set, num_args = 0..=1, default_value_t = false, default_missing_value = "true", value_name = "BOOL")]
        conversational: bool,
        /// Implicit prompt: no prompt column, chosen and rejected start with the prompt.
        #[arg(long, conflicts_with = "conversational", action = clap::ArgAction::Set, num_args = 0..=1, default_value_t = false, default_missing_value = "true", value_name = "BOOL")]
        implicit: bool,
        /// Also write N held-out rows (different seed) to FILE with `.eval` before the extension.
        #[arg(long, default_value_t = 0)]
        eval_rows: usize,
        /// Stretch prompts and answers with background sentences to UltraFeedback-like lengths
        /// (prompts ~15–200 tokens, answers ~5–200), for benchmarks of batching and padding.
        #[arg(long, action = clap::ArgAction::Set, num_args = 0..=1, default_value_t = false, default_missing_value = "true", value_name = "BOOL")]
        long: bool,
        /// Long pairs of about N tokens each (prompt + chosen + rejected, ±20%), for benchmarks
        /// of long-pair speed and memory.
        #[arg(long, value_name = "N", conflicts_with = "long")]
        tokens: Option<usize>,
    },
}

/// Keeps freed memory in the process for the next forward instead of unmapping it: a model's
/// activations are the same few large buffers every batch, and glibc's defaults would hand
/// each back to the kernel and fault it in again page by page (8% of cache-ref's time at the
/// 0.5B shape). Buffers up to 32 MiB (glibc's ceiling) then come from the reused heap.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 256 << 20);
    }
}

/// A usage error as every other error of the project: one `error:` line, exit status 1 (clap's
/// own report spans several lines and exits 2); `--help` and `--version` print as clap does.
fn parse_cli() -> Cli {
    use clap::error::ErrorKind;
    match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand) => {
            e.exit()
        }
        Err(e) => {
            let text = e.render().to_string();
            let lines: Vec<&str> =
                text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with("Usage:") && !l.starts_with("For more information")).collect();
            eprintln!("error: {}", lines.join(" ").trim_start_matches("error: "));
            std::process::exit(1);
        }
    }
}

fn main() {
    keep_freed_memory();
    let cli = parse_cli();
    if let Some(d) = &cli.device {
        dpo_pipeline::model::set_device(d);
    }
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
    if let Some((rank, size, by)) = dpo_pipeline::train::dist::launched().filter(|l| l.1 > 1) {
        if !matches!(cmd, Cmd::Train { .. }) {
            anyhow::bail!(
                "started by {by} as rank {rank} of {size}: only `train` runs data-parallel; run this command once \
                 (the reference pass spreads with `cache-ref --shard K/N`)"
            );
        }
    }
    match cmd {
        Cmd::Prepare { file, flags } => {
            let f = PipelineFile::load_optional(file.config.as_deref())?;
            stages::prepare::run(&flags.over(f.prepare).resolve())?;
        }
        Cmd::CacheRef { file, flags } => {
            let f = PipelineFile::load_optional(file.config.as_deref())?;
            stages::cache_ref::run(&flags.over(f.cache_ref).resolve())?;
        }
        Cmd::MergeRef { out, prepared, force, shards } => {
            stages::cache_ref::merge(&shards, &out, prepared.as_deref(), force)?;
        }
        Cmd::MergeLora { model, adapter, out } => {
            let (base, lora) = (dpo_pipeline::hub::model_dir(&model)?.path, dpo_pipeline::hub::model_dir(&adapter)?.path);
            dpo_pipeline::train::policy::merge_lora(&base, &lora, &out)?;
            eprintln!("merge-lora: {} + {} -> {}", model.display(), adapter.display(), out.display());
        }
        Cmd::Train { file, flags } => {
            // Under mpirun/srun: one rank of a data-parallel run. A rank's error ends every
            // rank (the others may be waiting for it in a collective), naming the rank.
            let world = dpo_pipeline::train::dist::World::from_env()?;
            let f = PipelineFile::load_optional(file.config.as_deref())?;
            if let Err(e) = stages::train::run_on(&flags.over(f.train).resolve(), &world) {
                if world.size == 1 {
                    return Err(e);
                }
                eprintln!("error: rank {} of {}: {e:#}", world.rank, world.size);
                world.abort(1);
            }
        }
        Cmd::Sample { file, flags } => {
            let f = PipelineFile::load_optional(file.config.as_deref())?;
            stages::sample::run(&flags.over(f.sample).resolve())?;
        }
        Cmd::Label { file, flags } => {
            let f = PipelineFile::load_optional(file.config.as_deref())?;
            stages::label::run(&flags.over(f.label).resolve())?;
        }
        Cmd::SynthJudge => dpo_pipeline::synth::judge::run_stdio()?,
        Cmd::Run { config, force } => {
            let f = PipelineFile::load(&config)?;
            if let Some(it) = &f.iterative {
                dpo_pipeline::iterative::run(&f, it, force)?;
                return Ok(());
            }
            // Reference-free losses (simpo, cpo, orpo) need no reference pass.
            let reference = !f.reference_free();
            // Check every stage's settings before the first one starts work.
            let (mut p, mut c, mut t) = (f.prepare.resolve(), f.cache_ref.resolve(), f.train.resolve());
            p.force |= force;
            c.force |= force;
            t.force |= force;
            p.validate()?;
            if reference {
                c.validate()?;
            }
            t.validate()?;
            stages::prepare::run(&p)?;
            if reference {
                stages::cache_ref::run(&c)?;
            }
            stages::train::run(&t)?;
        }
        Cmd::Demo { dir, steps, rows, iterative: false, .. } => demo::run(&dir, steps, rows)?,
        Cmd::Demo { dir, steps, rows, iterative: true, rounds } => demo::run_iterative(&dir, steps, rows, rounds)?,
        Cmd::InitModel { arch, out, seed, size, reward, dtype } => {
            let spec = InitSpec { arch, size, seed, dtype };
            let cfg = if reward { init_reward_model(&spec, &out)? } else { init_model(&spec, &out)? };
            eprintln!("init-model: {arch:?} {size:?}, {} parameters, vocab {} -> {}", cfg.num_parameters(), cfg.vocab_size, out.display());
        }
        Cmd::SynthPrefs { out, rows, seed, conversational, implicit, eval_rows, long, tokens } => {
            let length = match (long, tokens) {
                (_, Some(n)) => Length::Tokens(n),
                (true, None) => Length::Long,
                (false, None) => Length::Short,
            };
            let format = if conversational {
                SynthFormat::Conversational
            } else if implicit {
                SynthFormat::Implicit
            } else {
                SynthFormat::Standard
            };
            write_synth(&out, rows, seed, format, length)?;
            eprintln!("synth-prefs: {rows} rows -> {}", out.display());
            if eval_rows > 0 {
                let eval = eval_path(&out);
                write_synth(&eval, eval_rows, seed.wrapping_add(1_000_003), format, length)?;
                eprintln!("synth-prefs: {eval_rows} eval rows -> {}", eval.display());
            }
        }
    }
    Ok(())
}
