//! Stage 3: DPO on cached reference log-probs. The reference model is never loaded (unless
//! the `--ref-in-loop` ablation asks for it): each step runs only the policy.
use super::cache_ref::RefCache;
use super::{progress, secs};
use crate::config::{LossKind, TrainConfig};
use crate::data::batch::LayoutKind;
use crate::data::prepared::{PairView, PreparedDataset, Split};
use crate::model::logprobs::pair_logps;
use crate::model::{self, weights, Decoder, ModelConfig};
use crate::rng::Rng;
use crate::store::manifest::fingerprint;
use crate::store::{write_atomic, Manifest};
use crate::train::loss::{preference_loss, LossOut, PairBatch};
use crate::train::metrics::{self, PairStats, Row};
use crate::train::optim::{clip_by_global_norm, lr_factor, AdamW, AdamWConfig};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

pub const STAGE: &str = "train";
pub const FORMAT_VERSION: u32 = 1;
const TOKENIZER_FILES: &[&str] = &["tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json", "generation_config.json"];

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

/// Loss settings shared by training and evaluation.
#[derive(Clone, Copy)]
pub struct LossSettings {
    pub kind: LossKind,
    pub beta: f64,
    pub label_smoothing: f64,
    pub sft_weight: f64,
}

pub struct BatchOut {
    /// Scalar loss (DPO term + SFT term).
    pub loss: Tensor,
    pub out: LossOut,
    pub policy_chosen: Tensor,
    pub policy_rejected: Tensor,
    /// Tokens the forward ran over (prompt counted once per row it appears in).
    pub tokens: usize,
}

impl BatchOut {
    /// Adds this batch's loss, rewards and log-probs to the running metrics.
    pub fn record(&self, stats: &mut PairStats) -> Result<()> {
        let f32s = |t: &Tensor| -> Result<Vec<f32>> { Ok(t.to_dtype(DType::F32)?.to_vec1()?) };
        stats.add(
            self.out.per_pair.mean_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?,
            &f32s(&self.out.chosen_rewards)?, &f32s(&self.out.rejected_rewards)?,
            &f32s(&self.policy_chosen)?, &f32s(&self.policy_rejected)?,
        );
        Ok(())
    }
}

/// Policy forward and loss for one micro-batch, given the reference log-probs.
pub fn batch_loss(decoder: &Decoder, layout: LayoutKind, loss: LossSettings, pairs: &[PairView], ref_c: &[f32], ref_r: &[f32]) -> Result<BatchOut> {
    let lp = pair_logps(decoder, layout, pairs)?;
    let dt = lp.chosen.dtype();
    let dev = lp.chosen.device().clone();
    let vec = |v: Vec<f32>| -> Result<Tensor> { Ok(Tensor::from_vec(v, pairs.len(), &dev)?.to_dtype(dt)?) };
    let ref_chosen = vec(ref_c.to_vec())?;
    let ref_rejected = vec(ref_r.to_vec())?;
    let chosen_tokens = vec(pairs.iter().map(|p| p.chosen_scored as f32).collect())?;
    let rejected_tokens = vec(pairs.iter().map(|p| p.rejected_scored as f32).collect())?;
    let out = preference_loss(loss.kind, loss.beta, loss.label_smoothing, &PairBatch {
        policy_chosen: &lp.chosen, policy_rejected: &lp.rejected, ref_chosen: &ref_chosen, ref_rejected: &ref_rejected,
        chosen_tokens: &chosen_tokens, rejected_tokens: &rejected_tokens,
    })?;
    let mut total = out.per_pair.mean_all()?;
    if loss.sft_weight > 0.0 {
        // TRL's "sft" loss: mean negative log-likelihood over all chosen tokens of the batch.
        let mask: Vec<f32> = lp.scored.seq.iter().map(|s| if s % 2 == 0 { 1.0 } else { 0.0 }).collect();
        let n = mask.iter().sum::<f32>().max(1.0) as f64;
        let mask = Tensor::from_vec(mask, lp.scored.seq.len(), &dev)?.to_dtype(dt)?;
        let nll = ((lp.tokens * mask)?.sum_all()? * (-1.0 / n))?;
        total = (total + (nll * loss.sft_weight)?)?;
    }
    let tokens = pairs.iter().map(|p| crate::data::batch::computed_tokens(layout, p)).sum();
    Ok(BatchOut { loss: total, out, policy_chosen: lp.chosen.detach(), policy_rejected: lp.rejected.detach(), tokens })
}

/// Gradients of `loss` for every parameter; a parameter that got none is an error naming it
/// (candle silently drops gradients through non-differentiable kernels).
pub fn gradients(loss: &Tensor, policy: &Policy) -> Result<Vec<Tensor>> {
    let grads = loss.backward()?;
    policy
        .vars
        .iter()
        .zip(&policy.names)
        .map(|(v, n)| grads.get(v.as_tensor()).cloned().with_context(|| format!("parameter `{n}` received no gradient")))
        .collect()
}

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

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct TrainerState {
    step: usize,
    cursor: Cursor,
    adam_t: usize,
    fingerprint: String,
}

fn eval_pass(policy: &Policy, prepared: &PreparedDataset, cache_c: &[f32], cache_r: &[f32], rows: &[u32], cfg: &TrainConfig, loss: LossSettings) -> Result<Row> {
    let mut stats = PairStats::default();
    for chunk in rows.chunks(cfg.batch_size.max(1)) {
        let pairs: Vec<PairView> = chunk.iter().map(|&i| prepared.pair(i as usize)).collect();
        let rc: Vec<f32> = chunk.iter().map(|&i| cache_c[i as usize]).collect();
        let rr: Vec<f32> = chunk.iter().map(|&i| cache_r[i as usize]).collect();
        let b = batch_loss(&policy.eval_decoder, cfg.layout, loss, &pairs, &rc, &rr)?;
        b.record(&mut stats)?;
    }
    let mut row = Row::new();
    stats.into_row("eval/", &mut row);
    Ok(row)
}

fn latest_checkpoint(out: &Path) -> Option<(usize, PathBuf)> {
    std::fs::read_dir(out.join("checkpoints")).ok()?
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
    policy.save_hf(&tmp, tokenizer_from)?;
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

pub fn run(cfg: &TrainConfig) -> Result<Manifest> {
    let t0 = Instant::now();
    let prepared = PreparedDataset::open(&cfg.prepared)?;
    let cache = RefCache::open(&cfg.ref_cache, &prepared)?;
    let model_dir = match &cfg.model {
        Some(m) => m.clone(),
        None => PathBuf::from(cache.manifest.inputs["model"].as_str().context("cache manifest names no model")?),
    };
    if cfg.batch_size == 0 || cfg.grad_accum == 0 {
        bail!("--batch-size and --grad-accum must be at least 1");
    }
    let train_rows = prepared.rows_of(Split::Train);
    let eval_rows = prepared.rows_of(Split::Eval);
    if train_rows.is_empty() {
        bail!("{}: no train rows", cfg.prepared.display());
    }
    let per_step = cfg.batch_size * cfg.grad_accum;
    let total_steps = cfg.max_steps.unwrap_or_else(|| ((cfg.epochs * train_rows.len() as f64) / per_step as f64).ceil().max(1.0) as usize);
    let mut settings = serde_json::to_value(cfg)?;
    for k in ["resume", "force", "prepared", "ref_cache", "out", "model"] {
        settings.as_object_mut().unwrap().remove(k);
    }
    let inputs = serde_json::json!({
        "prepared": cfg.prepared.display().to_string(), "prepared_fingerprint": prepared.fingerprint(),
        "ref_cache": cfg.ref_cache.display().to_string(), "ref_cache_fingerprint": cache.manifest.fingerprint,
        "model": model_dir.display().to_string(), "weights_blake3": weights::weights_hash(&model_dir)?,
    });
    let fp_inputs = serde_json::json!({"prepared": inputs["prepared_fingerprint"], "ref_cache": inputs["ref_cache_fingerprint"], "weights": inputs["weights_blake3"]});
    let fp = fingerprint(STAGE, FORMAT_VERSION, &fp_inputs, &settings);
    let out = &cfg.out;
    if let Some(old) = Manifest::load_if_exists(out, STAGE)? {
        if old.fingerprint == fp && !cfg.force {
            eprintln!("train: {} is up to date (fingerprint {}), nothing to do; --force retrains", out.display(), &fp[..16]);
            return Ok(old);
        }
    }
    let resume_from = if cfg.resume { latest_checkpoint(out) } else { None };
    if resume_from.is_none() && !cfg.force && (out.join("metrics.jsonl").exists() || out.join("checkpoints").exists()) {
        if cfg.resume {
            bail!("{} has no checkpoint to resume from (none was saved yet); --force starts over", out.join("checkpoints").display());
        }
        bail!("{} already holds a training run; pass --resume to continue it or --force to start over", out.display());
    }
    if resume_from.is_none() {
        for f in ["metrics.jsonl", "metrics.parquet", "curves.png", "manifest.json"] {
            let _ = std::fs::remove_file(out.join(f));
        }
        let _ = std::fs::remove_dir_all(out.join("checkpoints"));
    }
    std::fs::create_dir_all(out.join("checkpoints"))?;

    let device = model::device()?;
    let policy = Policy::load(&model_dir, DType::F32, &device)?;
    let mut opt = AdamW::new(
        AdamWConfig { lr: cfg.lr, beta1: cfg.adam_beta1, beta2: cfg.adam_beta2, eps: cfg.adam_eps, weight_decay: cfg.weight_decay },
        &policy.vars,
    )?;
    let mut cursor = Cursor { epoch: 0, index: 0 };
    let mut start_step = 0;
    if let Some((step, dir)) = &resume_from {
        let state: TrainerState = serde_json::from_str(&std::fs::read_to_string(dir.join("trainer_state.json"))?)?;
        if state.fingerprint != fp {
            bail!("checkpoint {} was made with other inputs or settings (fingerprint {} vs {}); --force starts over", dir.display(), state.fingerprint, fp);
        }
        let saved = weights::load_weights(dir, &policy.cfg, DType::F32, &device)?;
        for (n, v) in policy.names.iter().zip(&policy.vars) {
            v.set(&saved[n])?;
        }
        // SAFETY: checkpoint files are ours and not modified while mapped.
        let st = unsafe { candle_core::safetensors::MmapedSafetensors::new(dir.join("optimizer.safetensors"))? };
        for (i, n) in policy.names.iter().enumerate() {
            opt.set_moments(i, &st.load(&format!("m.{n}"), &device)?, &st.load(&format!("v.{n}"), &device)?)?;
        }
        opt.t = state.adam_t;
        cursor = state.cursor;
        start_step = *step;
        eprintln!("train: resuming from {} (step {step} of {total_steps})", dir.display());
    }
    let ref_decoder = if cfg.ref_in_loop { Some(model::load_decoder(&model_dir, DType::F32, &device)?) } else { None };
    let loss = LossSettings { kind: cfg.loss, beta: cfg.beta, label_smoothing: cfg.label_smoothing, sft_weight: cfg.sft_weight };
    let (cache_c, cache_r) = (cache.chosen.as_slice(), cache.rejected.as_slice());
    let metrics_path = out.join("metrics.jsonl");
    // Keep only what came before the checkpoint we resume from.
    let mut rows = metrics::read_jsonl(&metrics_path, start_step)?;
    metrics::write_jsonl(&metrics_path, &rows)?;
    if start_step == 0 && !eval_rows.is_empty() {
        let row = eval_pass(&policy, &prepared, cache_c, cache_r, &eval_rows, cfg, loss)?;
        metrics::append_jsonl(&metrics_path, 0, &row)?;
        rows.push((0, row));
    }
    let mut order = epoch_order(&train_rows, cfg.seed, cursor.epoch, cfg.shuffle);
    let pb = progress(total_steps as u64, "train", "steps");
    pb.set_position(start_step as u64);
    let (mut tokens_total, t_loop) = (0usize, Instant::now());
    let mut steps_run = 0;
    for step in start_step..total_steps {
        if cfg.stop_after_steps == Some(steps_run) {
            pb.abandon();
            eprintln!("train: stopping after {steps_run} steps as asked; --resume continues");
            return Ok(Manifest::load_if_exists(out, STAGE)?.unwrap_or_else(|| Manifest::unfinished(STAGE, FORMAT_VERSION, &fp)));
        }
        let t_step = Instant::now();
        let lr = cfg.lr * lr_factor(cfg.scheduler, step, cfg.warmup_steps, total_steps);
        let mut acc: Option<Vec<Tensor>> = None;
        let mut stats = PairStats::default();
        let mut tokens = 0;
        for _ in 0..cfg.grad_accum {
            let ids = cursor.take(&train_rows, cfg.seed, cfg.shuffle, cfg.batch_size, &mut order);
            let pairs: Vec<PairView> = ids.iter().map(|&i| prepared.pair(i as usize)).collect();
            let (rc, rr): (Vec<f32>, Vec<f32>) = match &ref_decoder {
                Some(r) => {
                    let lp = pair_logps(r, cfg.layout, &pairs)?;
                    (lp.chosen.to_vec1()?, lp.rejected.to_vec1()?)
                }
                None => (ids.iter().map(|&i| cache_c[i as usize]).collect(), ids.iter().map(|&i| cache_r[i as usize]).collect()),
            };
            let b = batch_loss(&policy.decoder, cfg.layout, loss, &pairs, &rc, &rr)?;
            let grads = gradients(&(&b.loss / cfg.grad_accum as f64)?, &policy)?;
            acc = Some(match acc {
                None => grads,
                Some(a) => a.iter().zip(&grads).map(|(x, y)| x + y).collect::<candle_core::Result<_>>()?,
            });
            b.record(&mut stats)?;
            tokens += b.tokens;
        }
        let (grad_norm, clipped) = clip_by_global_norm(&acc.expect("grad_accum >= 1"), cfg.max_grad_norm)?;
        opt.step(&policy.vars, &clipped, lr)?;
        let n = step + 1;
        let dt = t_step.elapsed().as_secs_f64();
        tokens_total += tokens;
        let mut row = Row::new();
        stats.into_row("", &mut row);
        row.insert("grad_norm".into(), grad_norm);
        row.insert("learning_rate".into(), lr);
        row.insert("tokens_per_s".into(), tokens as f64 / dt.max(1e-9));
        row.insert("step_seconds".into(), dt);
        row.insert("epoch".into(), (n * per_step) as f64 / train_rows.len() as f64);
        pb.set_message(format!("loss {:.4} acc {:.2} {:.0} tok/s", row["loss"], row["rewards/accuracies"], tokens_total as f64 / t_loop.elapsed().as_secs_f64().max(1e-9)));
        metrics::append_jsonl(&metrics_path, n, &row)?;
        rows.push((n, row));
        if !eval_rows.is_empty() && cfg.eval_every > 0 && (n % cfg.eval_every == 0 || n == total_steps) {
            let row = eval_pass(&policy, &prepared, cache_c, cache_r, &eval_rows, cfg, loss)?;
            metrics::append_jsonl(&metrics_path, n, &row)?;
            rows.push((n, row));
        }
        if cfg.save_every > 0 && n % cfg.save_every == 0 && n < total_steps {
            let state = TrainerState { step: n, cursor, adam_t: opt.t, fingerprint: fp.clone() };
            save_checkpoint(&out.join("checkpoints").join(format!("step-{n}")), &policy, &opt, &state, &model_dir)?;
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
    let wall = secs(t0);
    let last = |k: &str| rows.iter().rev().find_map(|(_, r)| r.get(k).copied());
    let mut manifest = Manifest {
        stage: STAGE.into(), format_version: FORMAT_VERSION, fingerprint: fp, tool_version: env!("CARGO_PKG_VERSION").into(),
        inputs, settings,
        counts: [("steps".to_string(), total_steps as u64), ("pairs_train".to_string(), train_rows.len() as u64),
            ("pairs_eval".to_string(), eval_rows.len() as u64)].into(),
        stats: serde_json::json!({
            "final_loss": last("loss"), "final_eval_loss": last("eval/loss"), "final_eval_accuracy": last("eval/rewards/accuracies"),
            "final_eval_margin": last("eval/rewards/margins"),
            "tokens_per_s": tokens_total as f64 / t_loop.elapsed().as_secs_f64().max(1e-9),
            "seconds_per_step": t_loop.elapsed().as_secs_f64() / steps_run.max(1) as f64,
        }),
        timings: [("wall_s".to_string(), wall)].into(),
        files: Default::default(),
    };
    manifest.record_files(out, &["metrics.parquet", "final/model.safetensors"])?;
    manifest.save(out)?;
    eprintln!("train: {total_steps} steps in {wall:.1}s; final model in {}", out.join("final").display());
    Ok(manifest)
}
