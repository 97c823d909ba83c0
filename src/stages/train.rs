//! Stage 3: DPO on cached reference log-probs. The reference model is never loaded (unless
//! the `--ref-in-loop` ablation asks for it): each step runs only the policy.
//!
//! Survives `kill -9` at any moment: checkpoints are written whole under a temporary name and
//! renamed, `metrics.jsonl` is cut back to the checkpoint's step on resume (a torn last line
//! included), and a resumed run ends with the same metrics and byte-identical final weights.
use super::{begin, progress, Begin};
use crate::data::prepared::{PairView, PreparedDataset, Split};
use crate::data::ref_cache::RefCache;
use crate::data::tokenize::check_same_tokenizer;
use crate::model::lora::{self, LoraConfig};
use crate::model::{self, weights};
use crate::rng::Rng;
use crate::score::pair_logps;
use crate::settings::TrainSettings;
use crate::store::{write_atomic, InputRef, Manifest};
use crate::train::metrics::{self, PairStats, Row};
use crate::train::optim::{clip_by_global_norm, lr_factor, AdamW, AdamWConfig};
use crate::train::policy::{Policy, Trainable};
use crate::train::step::{batch_loss, gradients, split_by_tokens, LossSettings, Whole};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

pub const STAGE: &str = "train";
/// 2: manifest inputs are typed.
pub const FORMAT_VERSION: u32 = 2;

/// Where the data order stands: epoch and index into that epoch's order.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Cursor {
    pub epoch: usize,
    pub index: usize,
}

/// Epoch `e`'s order of the train rows: shuffled by (seed, e), or row_id order.
pub fn epoch_order(rows: &[u32], seed: u64, epoch: usize, shuffle: bool) -> Vec<u32> {
    let mut v = rows.to_vec();
    if shuffle {
        Rng::new(seed ^ (epoch as u64).wrapping_mul(0xA24B_AED4_963E_E407)).shuffle(&mut v);
    }
    v
}

impl Cursor {
    pub fn take(&mut self, rows: &[u32], seed: u64, shuffle: bool, n: usize, order: &mut Vec<u32>) -> Vec<u32> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            if self.index >= rows.len() {
                self.epoch += 1;
                self.index = 0;
                *order = epoch_order(rows, seed, self.epoch, shuffle);
            }
            out.push(order[self.index]);
            self.index += 1;
        }
        out
    }
}

/// `trainer_state.json` of a checkpoint: where to pick up.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct TrainerState {
    step: usize,
    cursor: Cursor,
    adam_t: usize,
    fingerprint: String,
}

fn eval_pass(
    policy: &Policy,
    prepared: &PreparedDataset,
    cache: &RefCache,
    rows: &[u32],
    cfg: &TrainSettings,
    loss: LossSettings,
    budget: usize,
) -> Result<Row> {
    let mut stats = PairStats::default();
    for chunk in rows.chunks(cfg.batch_size) {
        let pairs: Vec<PairView> = chunk.iter().map(|&i| prepared.pair(i as usize)).collect();
        let rc: Vec<f32> = chunk.iter().map(|&i| cache.chosen.as_slice()[i as usize]).collect();
        let rr: Vec<f32> = chunk.iter().map(|&i| cache.rejected.as_slice()[i as usize]).collect();
        let whole = Whole::of(&pairs);
        for r in split_by_tokens(cfg.layout, &pairs, budget)? {
            let b = batch_loss(&policy.eval_decoder, cfg.layout, loss, &pairs[r.clone()], &rc[r.clone()], &rr[r], whole)?;
            b.record(&mut stats)?;
        }
    }
    let mut row = Row::new();
    stats.into_row("eval/", &mut row);
    Ok(row)
}

/// The tokens a micro-batch may hold under `gb` of memory: one pair's forward and backward
/// (from the longest up to 1,024 computed tokens) measures the peak memory per token above
/// what the process holds before it; activation memory grows linearly with tokens (the
/// attention keeps no tokens × tokens scores), so the budget is what is left divided by that,
/// with a tenth kept spare.
#[allow(clippy::too_many_arguments)]
fn tokens_for_memory(
    policy: &Policy,
    prepared: &PreparedDataset,
    cache_c: &[f32],
    cache_r: &[f32],
    rows: &[u32],
    cfg: &TrainSettings,
    loss: LossSettings,
    gb: f64,
) -> Result<usize> {
    let tokens = |i: u32| crate::score::layout::computed_tokens(cfg.layout, &prepared.pair(i as usize));
    let probe =
        rows.iter().copied().filter(|&i| tokens(i) <= 1024).max_by_key(|&i| tokens(i)).or_else(|| rows.iter().copied().min_by_key(|&i| tokens(i)));
    let probe = probe.context("no train rows")?;
    let pairs = [prepared.pair(probe as usize)];
    let base = crate::memory::rss_bytes();
    crate::memory::reset_peak();
    let b = batch_loss(&policy.decoder, cfg.layout, loss, &pairs, &[cache_c[probe as usize]], &[cache_r[probe as usize]], Whole::of(&pairs))?;
    drop(gradients(&b.loss, policy)?);
    let device = policy.vars[0].device().clone();
    let per_token = (crate::memory::peak_bytes(&device).saturating_sub(base) as f64 / tokens(probe) as f64).max(1.0);
    let room = gb * 1e9 - base as f64;
    let budget = (0.9 * room / per_token).floor();
    if budget < 1.0 {
        bail!("--max-memory {gb} GB: the model and optimizer already take {:.2} GB, leaving no room for activations", base as f64 / 1e9);
    }
    eprintln!(
        "train: --max-memory {gb} GB: {:.1} kB per token measured on a {}-token pair, so micro-batches of at most {} tokens",
        per_token / 1e3,
        tokens(probe),
        budget as usize
    );
    Ok(budget as usize)
}

/// The newest complete checkpoint (`step-N` directories only ever appear whole).
fn latest_checkpoint(out: &Path) -> Option<(usize, PathBuf)> {
    std::fs::read_dir(out.join("checkpoints"))
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let step = name.strip_prefix("step-")?.parse::<usize>().ok()?;
            e.path().join("trainer_state.json").exists().then_some((step, e.path()))
        })
        .max_by_key(|(s, _)| *s)
}

fn save_checkpoint(dir: &Path, policy: &Policy, opt: &AdamW, state: &TrainerState, tokenizer_from: &Path) -> Result<()> {
    // Written under a temporary name and renamed, so a checkpoint directory is always whole.
    let tmp = dir.with_extension("partial");
    let _ = std::fs::remove_dir_all(&tmp);
    policy.save(&tmp, tokenizer_from)?;
    let mut moments = BTreeMap::new();
    for (i, n) in policy.names.iter().enumerate() {
        let (m, v) = opt.moments(i, &policy.vars[i])?;
        moments.insert(format!("m.{n}"), m);
        moments.insert(format!("v.{n}"), v);
    }
    weights::save_weights(&tmp.join("optimizer.safetensors"), &moments, DType::F32)?;
    write_atomic(&tmp.join("trainer_state.json"), serde_json::to_string_pretty(state)?.as_bytes())?;
    let _ = std::fs::remove_dir_all(dir);
    crate::store::atomic::rename_durable(&tmp, dir)
}

/// What the run continues from.
struct Start {
    step: usize,
    cursor: Cursor,
}

/// Restores weights, optimizer moments and the data cursor from a checkpoint.
fn restore(dir: &Path, fp: &str, policy: &Policy, opt: &mut AdamW) -> Result<Start> {
    let state_path = dir.join("trainer_state.json");
    let text = std::fs::read_to_string(&state_path).with_context(|| format!("cannot read {}", state_path.display()))?;
    let state: TrainerState = serde_json::from_str(&text).with_context(|| format!("{}: not a valid trainer state", state_path.display()))?;
    if state.fingerprint != fp {
        bail!(
            "checkpoint {} was made with other inputs or settings (fingerprint {} vs {}); --force starts over",
            dir.display(),
            state.fingerprint,
            fp
        );
    }
    policy.restore(dir)?;
    let device = policy.vars[0].device().clone();
    let opt_path = dir.join("optimizer.safetensors");
    // SAFETY: checkpoint files are ours and not modified while mapped.
    let st = unsafe { candle_core::safetensors::MmapedSafetensors::new(&opt_path) }.with_context(|| format!("cannot read {}", opt_path.display()))?;
    for (i, n) in policy.names.iter().enumerate() {
        let m = st.load(&format!("m.{n}"), &device).with_context(|| format!("{}: m.{n}", opt_path.display()))?;
        let v = st.load(&format!("v.{n}"), &device).with_context(|| format!("{}: v.{n}", opt_path.display()))?;
        opt.set_moments(i, &m, &v)?;
    }
    opt.t = state.adam_t;
    Ok(Start { step: state.step, cursor: state.cursor })
}

/// What this run trains, from the settings.
fn trainable(cfg: &TrainSettings) -> Result<Trainable> {
    Ok(match (&cfg.adapter, cfg.lora_r) {
        (Some(dir), _) => Trainable::Adapter(dir.clone()),
        (None, Some(r)) => Trainable::NewLora { config: LoraConfig::new(r, cfg.lora_alpha, &cfg.lora_targets, cfg.lora_dropout)?, seed: cfg.seed },
        (None, None) => Trainable::Full,
    })
}

pub fn run(cfg: &TrainSettings) -> Result<Manifest> {
    cfg.validate()?;
    let prepared = PreparedDataset::open(&cfg.prepared)?;
    let cache = RefCache::open(&cfg.ref_cache, &prepared)?;
    let model_dir = match &cfg.model {
        Some(m) => m.clone(),
        None => cache.model_dir()?,
    };
    check_same_tokenizer(&prepared.manifest, &prepared.dir, &model_dir)?;
    let train_rows = prepared.rows_of(Split::Train);
    let eval_rows = prepared.rows_of(Split::Eval);
    if train_rows.is_empty() {
        bail!("{}: no train rows", cfg.prepared.display());
    }
    let per_step = cfg.batch_size * cfg.grad_accum;
    let total_steps = cfg.max_steps.unwrap_or_else(|| ((cfg.epochs * train_rows.len() as f64) / per_step as f64).ceil().max(1.0) as usize);
    // Settings that change the result; paths and run control are not among them.
    let mut settings = serde_json::to_value(cfg)?;
    // Gradient checkpointing and token budgets change memory, not results.
    for k in [
        "resume", "force", "prepared", "ref_cache", "out", "model", "stop_after_steps", "adapter", "gradient_checkpointing", "batch_tokens",
        "max_memory",
    ] {
        settings.as_object_mut().expect("a struct").remove(k);
    }
    let mut inputs = vec![
        InputRef::new("prepared", &cfg.prepared, prepared.fingerprint()),
        InputRef::new("ref_cache", &cfg.ref_cache, &cache.manifest.fingerprint),
        InputRef::new("model", &model_dir, &weights::weights_hash(&model_dir)?),
    ];
    if let Some(a) = &cfg.adapter {
        let w = a.join(lora::WEIGHTS_FILE);
        inputs.push(InputRef::new("adapter", a, &crate::store::file_hash(&w)?.blake3));
    }
    let out = &cfg.out;
    let sd = match begin(STAGE, FORMAT_VERSION, out, inputs, settings, cfg.force)? {
        Begin::UpToDate(m) => return Ok(m),
        Begin::Run(sd) => sd,
    };
    let fp = sd.fingerprint.clone();
    let checkpoints = out.join("checkpoints");
    let resume_from = if cfg.resume { latest_checkpoint(out) } else { None };
    let started = out.join("metrics.jsonl").exists() || checkpoints.exists();
    if cfg.resume && resume_from.is_none() && started {
        eprintln!("train: {} has no complete checkpoint yet; starting from step 0", checkpoints.display());
    }
    if !cfg.resume && !cfg.force && started {
        bail!("{} already holds a training run; pass --resume to continue it or --force to start over", out.display());
    }
    if resume_from.is_none() {
        for f in ["metrics.jsonl", "metrics.parquet", "curves.png"] {
            let _ = std::fs::remove_file(out.join(f));
        }
        let _ = std::fs::remove_dir_all(&checkpoints);
        let _ = std::fs::remove_dir_all(out.join("final"));
    }
    std::fs::create_dir_all(&checkpoints)?;

    let device = model::device()?;
    let base_dtype = weights::parse_dtype(&cfg.base_dtype)?;
    let compute = weights::parse_dtype(&cfg.dtype)?;
    let policy = Policy::load_mixed(&model_dir, base_dtype, Some(compute), &trainable(cfg)?, cfg.gradient_checkpointing, &device)?;
    let mut opt = AdamW::new(
        AdamWConfig { lr: cfg.lr, beta1: cfg.adam_beta1, beta2: cfg.adam_beta2, eps: cfg.adam_eps, weight_decay: cfg.weight_decay },
        &policy.vars,
    )?;
    let Start { step: start_step, mut cursor } = match &resume_from {
        Some((_, dir)) => {
            let s = restore(dir, &fp, &policy, &mut opt)?;
            eprintln!("train: resuming from {} (step {} of {total_steps})", dir.display(), s.step);
            s
        }
        None => Start { step: 0, cursor: Cursor { epoch: 0, index: 0 } },
    };
    // The reference is what cache-ref ran, whatever the policy starts from.
    let ref_decoder = if cfg.ref_in_loop { Some(model::load_decoder(&cache.model_dir()?, DType::F32, &device)?) } else { None };
    // MoE models: TRL 1.16 adds the router's load-balancing loss whenever the model has one,
    // weighted by the config's router_aux_loss_coef unless the run sets its own.
    let router_aux_loss_coef = cfg.router_aux_loss_coef.or(policy.cfg.moe.as_ref().map(|m| m.router_aux_loss_coef)).unwrap_or(0.0);
    let loss =
        LossSettings { kind: cfg.loss, beta: cfg.beta, label_smoothing: cfg.label_smoothing, sft_weight: cfg.sft_weight, router_aux_loss_coef };
    let (cache_c, cache_r) = (cache.chosen.as_slice(), cache.rejected.as_slice());
    // Tokens a micro-batch may hold at once: --batch-tokens, or what --max-memory leaves room
    // for at the per-token cost measured on one pair; a micro-batch over it runs in pieces.
    let budget = match (cfg.batch_tokens, cfg.max_memory) {
        (Some(t), _) => t,
        (None, Some(gb)) => tokens_for_memory(&policy, &prepared, cache_c, cache_r, &train_rows, cfg, loss, gb)?,
        (None, None) => usize::MAX,
    };
    let metrics_path = out.join("metrics.jsonl");
    // Keep only what came before the checkpoint we resume from.
    let mut rows = metrics::read_jsonl(&metrics_path, start_step)?;
    metrics::write_jsonl(&metrics_path, &rows)?;
    if start_step == 0 && !eval_rows.is_empty() {
        let row = eval_pass(&policy, &prepared, &cache, &eval_rows, cfg, loss, budget)?;
        metrics::append_jsonl(&metrics_path, 0, &row)?;
        rows.push((0, row));
    }
    let mut order = epoch_order(&train_rows, cfg.seed, cursor.epoch, cfg.shuffle);
    let pb = progress(total_steps as u64, "train", "steps");
    pb.set_position(start_step as u64);
    let (mut tokens_total, t_loop) = (0usize, Instant::now());
    let mut peak_memory_gb = 0f64;
    let mut steps_run = 0;
    for step in start_step..total_steps {
        if cfg.stop_after_steps == Some(steps_run) {
            pb.abandon();
            eprintln!("train: stopping after {steps_run} steps as asked; --resume continues");
            return Ok(Manifest::unfinished(STAGE, FORMAT_VERSION, &fp));
        }
        let t_step = Instant::now();
        crate::memory::reset_peak();
        let lr = cfg.lr * lr_factor(cfg.scheduler, step, cfg.warmup_steps, total_steps);
        let mut acc: Option<Vec<Tensor>> = None;
        let mut stats = PairStats::default();
        let mut tokens = 0;
        // Where the step's time goes: policy forward + loss, backward, clipping + AdamW.
        let (mut fwd_s, mut bwd_s) = (0.0, 0.0);
        for micro in 0..cfg.grad_accum {
            policy.reseed(cfg.seed, step, micro);
            let ids = cursor.take(&train_rows, cfg.seed, cfg.shuffle, cfg.batch_size, &mut order);
            let pairs: Vec<PairView> = ids.iter().map(|&i| prepared.pair(i as usize)).collect();
            let (rc, rr): (Vec<f32>, Vec<f32>) = match &ref_decoder {
                Some(r) => {
                    let lp = pair_logps(r, cfg.layout, &pairs)?;
                    (lp.chosen.to_vec1()?, lp.rejected.to_vec1()?)
                }
                None => (ids.iter().map(|&i| cache_c[i as usize]).collect(), ids.iter().map(|&i| cache_r[i as usize]).collect()),
            };
            let whole = Whole::of(&pairs);
            for r in split_by_tokens(cfg.layout, &pairs, budget)? {
                let t = Instant::now();
                let b = batch_loss(&policy.decoder, cfg.layout, loss, &pairs[r.clone()], &rc[r.clone()], &rr[r], whole)?;
                fwd_s += t.elapsed().as_secs_f64();
                let t = Instant::now();
                let grads = gradients(&(&b.loss / cfg.grad_accum as f64)?, &policy)?;
                bwd_s += t.elapsed().as_secs_f64();
                acc = Some(match acc {
                    None => grads,
                    Some(a) => a.iter().zip(&grads).map(|(x, y)| x + y).collect::<candle_core::Result<_>>()?,
                });
                b.record(&mut stats)?;
                tokens += b.tokens;
            }
        }
        let t = Instant::now();
        let (grad_norm, clipped) = clip_by_global_norm(&acc.expect("grad_accum >= 1"), cfg.max_grad_norm)?;
        opt.step(&policy.vars, &clipped, lr)?;
        let opt_s = t.elapsed().as_secs_f64();
        let n = step + 1;
        let dt = t_step.elapsed().as_secs_f64();
        tokens_total += tokens;
        let mut row = Row::new();
        stats.into_row("", &mut row);
        row.insert("grad_norm".into(), grad_norm);
        row.insert("learning_rate".into(), lr);
        row.insert("tokens_per_s".into(), tokens as f64 / dt.max(1e-9));
        row.insert("step_seconds".into(), dt);
        row.insert("forward_seconds".into(), fwd_s);
        row.insert("backward_seconds".into(), bwd_s);
        row.insert("optimizer_seconds".into(), opt_s);
        let peak_gb = crate::memory::peak_bytes(&device) as f64 / 1e9;
        peak_memory_gb = peak_memory_gb.max(peak_gb);
        row.insert("peak_memory_gb".into(), peak_gb);
        row.insert("epoch".into(), (n * per_step) as f64 / train_rows.len() as f64);
        pb.set_message(format!(
            "loss {:.4} acc {:.2} {:.0} tok/s",
            row["loss"],
            row["rewards/accuracies"],
            tokens_total as f64 / t_loop.elapsed().as_secs_f64().max(1e-9)
        ));
        metrics::append_jsonl(&metrics_path, n, &row)?;
        rows.push((n, row));
        if !eval_rows.is_empty() && cfg.eval_every > 0 && (n % cfg.eval_every == 0 || n == total_steps) {
            let row = eval_pass(&policy, &prepared, &cache, &eval_rows, cfg, loss, budget)?;
            metrics::append_jsonl(&metrics_path, n, &row)?;
            rows.push((n, row));
        }
        if cfg.save_every > 0 && n % cfg.save_every == 0 && n < total_steps {
            let state = TrainerState { step: n, cursor, adam_t: opt.t, fingerprint: fp.clone() };
            save_checkpoint(&checkpoints.join(format!("step-{n}")), &policy, &opt, &state, &model_dir)?;
            metrics::write_parquet(&out.join("metrics.parquet"), &rows)?;
        }
        pb.inc(1);
        steps_run += 1;
    }
    pb.finish_and_clear();
    let state = TrainerState { step: total_steps, cursor, adam_t: opt.t, fingerprint: fp.clone() };
    save_checkpoint(&out.join("final"), &policy, &opt, &state, &model_dir)?;
    metrics::write_parquet(&out.join("metrics.parquet"), &rows)?;
    if let Err(e) = crate::train::plot::curves(&out.join("curves.png"), &rows) {
        eprintln!("train: could not draw curves.png: {e:#}");
    }
    let last = |k: &str| rows.iter().rev().find_map(|(_, r)| r.get(k).copied());
    let counts = [
        ("steps".to_string(), total_steps as u64),
        ("pairs_train".to_string(), train_rows.len() as u64),
        ("pairs_eval".to_string(), eval_rows.len() as u64),
    ]
    .into();
    let stats = serde_json::json!({
        "final_loss": last("loss"), "final_eval_loss": last("eval/loss"), "final_eval_accuracy": last("eval/rewards/accuracies"),
        "final_eval_margin": last("eval/rewards/margins"),
        "tokens_per_s": tokens_total as f64 / t_loop.elapsed().as_secs_f64().max(1e-9),
        "seconds_per_step": t_loop.elapsed().as_secs_f64() / steps_run.max(1) as f64,
        "peak_memory_gb": peak_memory_gb,
        "micro_batch_tokens": (budget != usize::MAX).then_some(budget),
    });
    let manifest = sd.manifest(counts, stats);
    let wall = manifest.timings["wall_s"];
    let weights_file = if policy.lora.is_some() { "final/adapter_model.safetensors" } else { "final/model.safetensors" };
    let manifest = sd.finish(manifest, &["metrics.parquet", weights_file])?;
    eprintln!("train: {total_steps} steps in {wall:.1}s; final model in {}", out.join("final").display());
    Ok(manifest)
}
