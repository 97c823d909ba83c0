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
use crate::settings::{ReportTo, TrainSettings};
use crate::store::{write_atomic, InputRef, Manifest};
use crate::train::dist::{owners, World};
use crate::train::loss::LossConfig;
use crate::train::loss::LossType;
use crate::train::metrics::{self, Row, Stats};
use crate::train::optim::{clip_scale, global_norm, lr_factor, AdamW, AdamWConfig};
use crate::train::plan::Plan;
use crate::train::policy::{Policy, Trainable};
use crate::train::shard::Moments;
use crate::train::step::{batch_loss, gradients, split_by_tokens, Reduce, Refs, Whole, UNPAIRED_SUMS};
use crate::train::tensorboard::EventWriter;
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

/// How the train rows are ordered and taken.
#[derive(Debug, Clone, Copy)]
pub struct OrderRule {
    pub seed: u64,
    pub shuffle: bool,
    /// Unpaired data: the KL blocks. Shuffling moves whole blocks (the last, short one stays
    /// last) and no micro-batch runs across an epoch's end, so every micro-batch is whole
    /// blocks, as in TRL's sequential KTO batches.
    pub kl_block: Option<usize>,
}

/// Epoch `e`'s order of the train rows: shuffled by (seed, e), or row_id order.
pub fn epoch_order(rows: &[u32], rule: OrderRule, epoch: usize) -> Vec<u32> {
    let mut v = rows.to_vec();
    if rule.shuffle {
        let mut rng = Rng::new(rule.seed ^ (epoch as u64).wrapping_mul(0xA24B_AED4_963E_E407));
        match rule.kl_block {
            None => rng.shuffle(&mut v),
            Some(b) => {
                let mut blocks: Vec<u32> = (0..(rows.len() / b) as u32).collect();
                rng.shuffle(&mut blocks);
                v = blocks.iter().flat_map(|&k| rows[k as usize * b..(k as usize + 1) * b].iter().copied()).collect();
                v.extend_from_slice(&rows[rows.len() / b * b..]);
            }
        }
    }
    v
}

impl Cursor {
    pub fn take(&mut self, rows: &[u32], rule: OrderRule, n: usize, order: &mut Vec<u32>) -> Vec<u32> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            if self.index >= rows.len() {
                if rule.kl_block.is_some() && !out.is_empty() {
                    break;
                }
                self.epoch += 1;
                self.index = 0;
                *order = epoch_order(rows, rule, self.epoch);
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
    /// TRL's `num_tokens` so far (real tokens of TRL's padded rows).
    #[serde(default)]
    num_tokens: u64,
    #[serde(flatten)]
    best: Best,
}

/// The best evaluation so far (`--load-best-model-at-end`), under the Trainer's names.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
struct Best {
    best_metric: Option<f64>,
    best_global_step: Option<usize>,
    /// The checkpoint directory holding the best step's model (as `--out` names it).
    best_model_checkpoint: Option<String>,
    /// Evaluations in a row without an improvement (transformers' EarlyStoppingCallback).
    early_stopping_patience_counter: usize,
}

impl Best {
    /// Records an evaluation at `step` (not at step 0: the Trainer does not evaluate there), as
    /// transformers does: the early-stopping counter compares with the best so far by more than
    /// `threshold`, then the best moves to any better value.
    fn update(&mut self, metric: f64, step: usize, greater_is_better: bool, threshold: f64) {
        let better = |a: f64, b: f64| if greater_is_better { a > b } else { a < b };
        match self.best_metric {
            Some(b) if !(better(metric, b) && (metric - b).abs() > threshold) => self.early_stopping_patience_counter += 1,
            _ => self.early_stopping_patience_counter = 0,
        }
        if self.best_metric.is_none_or(|b| better(metric, b)) {
            self.best_metric = Some(metric);
            self.best_global_step = Some(step);
        }
    }
}

/// Removes the oldest checkpoints beyond `limit`, never the newest nor `best` (the Trainer's
/// `_rotate_checkpoints`: the best counts as the newest, and a limit of 1 keeps both).
fn rotate_checkpoints(checkpoints: &Path, limit: usize, best: Option<&Path>) -> Result<()> {
    let mut all: Vec<(usize, PathBuf)> = std::fs::read_dir(checkpoints)?
        .filter_map(|e| e.ok())
        .filter_map(|e| Some((e.file_name().to_str()?.strip_prefix("step-")?.parse().ok()?, e.path())))
        .filter(|(_, p): &(usize, PathBuf)| p.join("trainer_state.json").exists())
        .collect();
    all.sort();
    let mut limit = limit;
    if let Some(i) = best.and_then(|b| all.iter().position(|(_, p)| p == b)) {
        if limit == 1 && i + 1 != all.len() {
            limit = 2;
        }
        let b = all.remove(i);
        all.push(b);
    }
    for (_, dir) in &all[..all.len().saturating_sub(limit)] {
        std::fs::remove_dir_all(dir).with_context(|| format!("cannot remove {}", dir.display()))?;
    }
    Ok(())
}

/// Makes `final_dir` the model of checkpoint `best` (`--load-best-model-at-end`), with the
/// run's final `state`; whole or not at all.
fn install_best(best: &Path, final_dir: &Path, state: &TrainerState) -> Result<()> {
    let tmp = final_dir.with_extension("partial");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    for e in std::fs::read_dir(best)? {
        let e = e?;
        if e.file_name() != "trainer_state.json" {
            std::fs::copy(e.path(), tmp.join(e.file_name())).map_err(|err| crate::store::space::write_error(&tmp.join(e.file_name()), err))?;
        }
    }
    write_atomic(&tmp.join("trainer_state.json"), serde_json::to_string_pretty(state)?.as_bytes())?;
    let _ = std::fs::remove_dir_all(final_dir);
    crate::store::atomic::rename_durable(&tmp, final_dir)
}

/// The reference log-probs of some rows (from the cache, or the reference model in the loop).
struct RefRows {
    chosen: Vec<f32>,
    rejected: Vec<f32>,
    chosen_shared: Option<Vec<f32>>,
    rejected_shared: Option<Vec<f32>>,
}

impl RefRows {
    fn of(cache: &RefCache, ids: &[u32]) -> Self {
        let pick = |c: &[f32]| ids.iter().map(|&i| c[i as usize]).collect::<Vec<f32>>();
        RefRows {
            chosen: pick(cache.chosen.as_slice()),
            rejected: pick(cache.rejected.as_slice()),
            chosen_shared: cache.chosen_shared.as_ref().map(|c| pick(c.as_slice())),
            rejected_shared: cache.rejected_shared.as_ref().map(|c| pick(c.as_slice())),
        }
    }

    /// The reference model's log-probs computed now (`--ref-in-loop`).
    fn computed(decoder: &crate::model::Decoder, layout: crate::score::layout::LayoutKind, pairs: &[PairView], ld: bool) -> Result<Self> {
        let lp = pair_logps(decoder, layout, pairs)?;
        let v = |t: &Tensor| -> Result<Vec<f32>> { Ok(t.to_dtype(DType::F32)?.to_vec1()?) };
        let shared = if ld { Some(lp.shared_sums(pairs)?) } else { None };
        Ok(RefRows {
            chosen: v(&lp.chosen)?,
            rejected: v(&lp.rejected)?,
            chosen_shared: shared.as_ref().map(|s| v(&s.0)).transpose()?,
            rejected_shared: shared.as_ref().map(|s| v(&s.1)).transpose()?,
        })
    }

    fn view(&self) -> Refs<'_> {
        Refs {
            chosen: &self.chosen,
            rejected: &self.rejected,
            chosen_shared: self.chosen_shared.as_deref(),
            rejected_shared: self.rejected_shared.as_deref(),
        }
    }
}

/// Unpaired data (KTO): the loss must be an unpaired one (and paired data must not get one),
/// the cache's KL blocks fix each row's KL completion, KTO's batch per rank must be whole KL
/// blocks (one is TRL's per-device batch), and TRL's warning on the weights is given. Returns the
/// KL block size (None for paired data).
fn unpaired_data(cfg: &TrainSettings, prepared: &mut PreparedDataset, cache: Option<&RefCache>) -> Result<Option<usize>> {
    let unpaired_loss = cfg.loss.0.iter().find(|t| t.unpaired());
    match (prepared.is_unpaired(), unpaired_loss) {
        (false, None) => return Ok(None),
        (false, Some(t)) => bail!(
            "--loss {} trains on unpaired data, and {} holds pairs: prepare it with `pipeline prepare --unpair` (TRL's unpair_preference_dataset)",
            t.name(),
            prepared.dir.display()
        ),
        (true, None) => bail!(
            "{} holds unpaired rows (prompt, completion, label): train them with --loss kto or apo_zero_unpaired, not {}",
            prepared.dir.display(),
            cfg.loss.0.iter().map(|t| t.name()).collect::<Vec<_>>().join(",")
        ),
        (true, Some(_)) => {}
    }
    let cache = cache.context("unpaired losses are reference-based: pass --ref-cache")?;
    let block = cache
        .kl_batch_size()
        .with_context(|| format!("reference cache {} has no kl_batch_size; rebuild it with cache-ref --force", cache.dir.display()))?;
    prepared.set_kl_blocks(block);
    // TRL estimates the KL over one block per device and averages over the devices; a
    // micro-batch of whole blocks is that (one process can so reproduce a data-parallel run).
    if cfg.loss.0.contains(&LossType::Kto) && !cfg.batch_size.is_multiple_of(block) {
        bail!(
            "--batch-size {} but the cache's KL completions come in blocks of {block} rows (cache-ref --kl-batch-size {block}): KTO estimates its KL \
             term over whole blocks, as TRL over each per-device batch; pass --batch-size {block} (TRL's setting) or a multiple of it, or rebuild \
             the cache with --kl-batch-size {}",
            cfg.batch_size,
            cfg.batch_size
        );
    }
    // TRL 1.16's advice on unbalanced data (KTOTrainer's train split).
    let rows = prepared.rows_of(Split::Train);
    let nd = rows.iter().filter(|&&i| prepared.pair(i as usize).label == Some(true)).count().max(1) as f64;
    let nu = (rows.len() as f64 - nd).max(1.0);
    let (dw, uw) = (cfg.desirable_weight, cfg.undesirable_weight);
    let r2 = |x: f64| (x * 100.0).round() / 100.0;
    if nd != nu {
        let (dlo, dhi) = (r2(nu * uw / nd), r2(nu * uw / nd * 1.33));
        let (ulo, uhi) = (r2(nd * dw / nu / 1.33), r2(nd * dw / nu));
        if !((dlo..=dhi).contains(&dw) || (ulo..=uhi).contains(&uw)) {
            eprintln!(
                "train: warning: {nd} desirable and {nu} undesirable rows, but the weights on their losses are outside the range TRL recommends: \
                 EITHER --desirable-weight in [{dlo}, {dhi}] or --undesirable-weight in [{ulo}, {uhi}] (but not both)"
            );
        }
    }
    Ok(Some(block))
}

/// The pieces a micro-batch runs in under the token budget (a loss that sorts across the
/// micro-batch cannot be split).
fn pieces(cfg: &TrainSettings, loss: &LossConfig, pairs: &[PairView], budget: usize) -> Result<Vec<std::ops::Range<usize>>> {
    let pieces = split_by_tokens(cfg.layout, pairs, budget)?;
    if pieces.len() > 1 {
        if let Some((t, _)) = loss.terms.iter().find(|(t, _)| t.batch_level()) {
            bail!(
                "--loss {} sorts across the micro-batch, which then cannot run in pieces of --batch-tokens/--max-memory: raise the limit or lower --batch-size",
                t.name()
            );
        }
    }
    Ok(pieces)
}

/// The eval split as micro-batches of the global batch size: each rank computes its share
/// (positions rank, rank + W, … of each), and the micro-batch's sums are reduced over the ranks.
#[allow(clippy::too_many_arguments)]
fn eval_pass(
    policy: &Policy,
    prepared: &PreparedDataset,
    cache: Option<&RefCache>,
    rows: &[u32],
    cfg: &TrainSettings,
    loss: &LossConfig,
    budget: usize,
    world: &World,
) -> Result<Row> {
    let mut stats = Stats::default();
    for chunk in rows.chunks(cfg.batch_size * world.size) {
        let all: Vec<PairView> = chunk.iter().map(|&i| prepared.pair(i as usize)).collect();
        let whole = Whole::of(&all);
        let mine: Vec<u32> = chunk.iter().skip(world.rank).step_by(world.size).copied().collect();
        let pairs: Vec<PairView> = mine.iter().map(|&i| prepared.pair(i as usize)).collect();
        let refs = cache.map(|c| RefRows::of(c, &mine));
        let mut reduce = |b: &mut [f64]| world.sum_f64(b);
        let pieces = pieces(cfg, loss, &pairs, budget)?;
        even_out(policy, world, loss, pieces.len(), false, &mut reduce)?;
        for r in pieces {
            let refs = refs.as_ref().map(|x| x.view().slice(r.clone()));
            let b = batch_loss(&policy.eval_decoder, cfg.layout, loss, &pairs[r.clone()], refs, whole, &mut reduce)?;
            b.record(&mut stats);
        }
        stats.reduce_micro(world);
        stats.end_micro();
    }
    let mut row = Row::new();
    stats.into_row("eval/", &mut row);
    Ok(row)
}

/// `grads` added to the micro-batches' sum so far.
fn add_grads(acc: &mut Option<Vec<Tensor>>, grads: Vec<Tensor>) -> Result<()> {
    *acc = Some(match acc.take() {
        None => grads,
        Some(a) => a.iter().zip(&grads).map(|(x, y)| x + y).collect::<candle_core::Result<_>>()?,
    });
    Ok(())
}

/// Before this rank's `mine` passes of a micro-batch: under --shard-params, the empty passes
/// that make it run as many as the busiest rank (each pass's layers are collectives; one max
/// over the ranks), with their zero gradients when training. A rank with no rows of an
/// unpaired micro-batch still joins the other ranks' batch-wide sums (in its empty pass, where
/// a real pass makes them, under sharding).
fn even_out(policy: &Policy, world: &World, loss: &LossConfig, mine: usize, train: bool, reduce: Reduce) -> Result<Vec<Vec<Tensor>>> {
    let passes = match policy.shards {
        Some(_) if world.size > 1 => {
            let mut n = [mine as f64];
            world.max_f64(&mut n);
            n[0] as usize
        }
        _ => mine,
    };
    let mut grads = Vec::new();
    for _ in mine..passes {
        grads.extend(idle_pass(policy, train, &mut || {
            if loss.unpaired() {
                reduce(&mut [0.0; UNPAIRED_SUMS]);
            }
        })?);
    }
    if passes == 0 && loss.unpaired() {
        reduce(&mut [0.0; UNPAIRED_SUMS]);
    }
    Ok(grads)
}

/// An empty pass under --shard-params: one token through every layer, so this rank joins the
/// busier ranks' gathers and reduce-scatters in the same order; its loss is 0, its gradients
/// zero. `between` runs where a real pass computes its loss (KTO's cross-rank sums).
fn idle_pass(policy: &Policy, train: bool, between: &mut dyn FnMut()) -> Result<Option<Vec<Tensor>>> {
    let layout = crate::model::decoder::SeqLayout::causal(&[0]);
    let decoder = if train { &policy.decoder } else { &policy.eval_decoder };
    let hidden = decoder.hidden(&layout)?;
    // Through the head too: it is gathered (and reduce-scattered) like a layer.
    let scored = crate::model::logprobs::Scored { rows: vec![0], targets: vec![0], seq: vec![0], num_seqs: 1 };
    let (logps, _) = decoder.token_logps_stats(&hidden, &scored, false)?;
    between();
    if !train {
        return Ok(None);
    }
    let loss = logps.to_dtype(DType::F32)?.sum_all()?.affine(0.0, 0.0)?;
    Ok(Some(gradients(&loss, policy)?))
}

/// The most tokens the memory plan's probe pair computes.
const PROBE_TOKENS: usize = 1024;

/// `p` with prompt and completions each cut to `f` of their length (at least one token).
fn shortened(p: PairView<'_>, f: f64) -> PairView<'_> {
    let cut = |s: &[u32]| ((s.len() as f64 * f).ceil() as usize).clamp(1.min(s.len()), s.len());
    let (c, r) = (cut(p.chosen), cut(p.rejected));
    PairView {
        prompt: &p.prompt[..cut(p.prompt)],
        chosen: &p.chosen[..c],
        rejected: &p.rejected[..r],
        chosen_scored: p.chosen_scored.min(c),
        rejected_scored: p.rejected_scored.min(r),
        ..p
    }
}

/// The run's memory plan ([`Plan`]): the weights, gradients and moments from the tensors; the
/// activations per token from one pair's forward and backward (the longest up to 1,024
/// computed tokens, or the shortest cut to that), measured as the peak above what was in use before, less the
/// gradients the pass made (activation memory grows linearly with tokens: the attention keeps
/// no tokens × tokens scores). Under --max-memory the plan is fitted, which may turn gradient
/// checkpointing on and split micro-batches; the policy is left as the plan says.
#[allow(clippy::too_many_arguments)]
fn memory_plan(
    policy: &mut Policy,
    opt: &AdamW,
    prepared: &PreparedDataset,
    cache: Option<&RefCache>,
    ref_decoder: Option<&crate::model::Decoder>,
    rows: &[u32],
    cfg: &TrainSettings,
    loss: &LossConfig,
) -> Result<Plan> {
    // (tokens, row) of every train row, longest first.
    let mut lengths: Vec<(usize, u32)> =
        rows.iter().map(|&i| (crate::score::layout::computed_tokens(cfg.layout, &prepared.pair(i as usize)), i)).collect();
    lengths.sort_unstable_by(|a, b| b.cmp(a));
    let longest = lengths.first().context("no train rows")?.0;
    // The longest pair within the probe's tokens; or, every pair longer, the shortest, each
    // part cut in proportion (only its memory counts), so the probe never needs more than the
    // budget it is measuring for.
    let (probe_len, probe) = *lengths.iter().find(|(t, _)| *t <= PROBE_TOKENS).unwrap_or(&lengths[lengths.len() - 1]);
    let pair = prepared.pair(probe as usize);
    let pair = match probe_len {
        t if t > PROBE_TOKENS => shortened(pair, PROBE_TOKENS as f64 / t as f64),
        _ => pair,
    };
    let probe_tokens = crate::score::layout::computed_tokens(cfg.layout, &pair);
    let device = policy.vars[0].device().clone();
    let trainable_bytes = policy.trainable_bytes();
    // Bytes above the weights at the peak of one pass over `pair`.
    let above = |policy: &mut Policy, checkpointing: bool, pair: PairView<'_>| -> Result<u64> {
        policy.set_checkpointing(checkpointing);
        let pairs = [pair];
        let refs = match (ref_decoder, cache) {
            (Some(r), _) => Some(RefRows::computed(r, cfg.layout, &pairs, loss.ld_alpha.is_some())?),
            (None, Some(c)) => Some(RefRows::of(c, &[probe])),
            (None, None) => None,
        };
        // On the CPU the heap's own count (the resident set keeps freed memory); elsewhere the
        // device's memory in use.
        let cpu = device.is_cpu();
        let used = || if cpu { crate::memory::heap_peak() } else { crate::memory::peak_bytes(&device) };
        if cpu {
            crate::memory::heap_reset_peak()
        } else {
            crate::memory::reset_peak()
        }
        let before = used();
        let b = batch_loss(&policy.decoder, cfg.layout, loss, &pairs, refs.as_ref().map(RefRows::view), Whole::of(&pairs), &mut |_| {})?;
        drop(gradients(&b.loss, policy)?);
        Ok(used().saturating_sub(before + trainable_bytes))
    };
    // Activations per token, and under --shard-params what the step gathers whole (a layer, the
    // head and their gradients: constant in the tokens), told apart by a second probe of half
    // the pair: the peak is taken as constant + per-token × tokens.
    let measure = |policy: &mut Policy, checkpointing: bool| -> Result<(f64, u64)> {
        let full = above(policy, checkpointing, pair)?;
        let half = shortened(pair, 0.5);
        let half_tokens = crate::score::layout::computed_tokens(cfg.layout, &half);
        if policy.shards.is_none() || half_tokens >= probe_tokens {
            let gathered = policy.shards.as_ref().map_or(0, |s| s.transient_bytes().min(full));
            return Ok((((full - gathered) as f64 / probe_tokens as f64).max(1.0), gathered));
        }
        let part = above(policy, checkpointing, half)?;
        let per_token = (full.saturating_sub(part) as f64 / (probe_tokens - half_tokens) as f64).max(1.0);
        Ok((per_token, (full as f64 - per_token * probe_tokens as f64).max(0.0) as u64))
    };
    // A second set of gradients while micro-batches (or pieces) add up.
    let accumulating = trainable_bytes;
    // What else is live: the heap beyond weights and moments (the resident set would also
    // count what the allocator freed but keeps, which activations reuse), and mapped files.
    let optimizer_bytes = opt.state_bytes();
    let other_bytes =
        crate::memory::heap_live().saturating_sub(policy.frozen_bytes + trainable_bytes + optimizer_bytes) + crate::memory::rss_file_bytes();
    let mut plan = Plan {
        frozen_bytes: policy.frozen_bytes,
        trainable_params: policy.trainable_params(),
        trainable_bytes,
        gradient_bytes: trainable_bytes + if cfg.grad_accum > 1 || cfg.batch_tokens.is_some() { accumulating } else { 0 },
        optimizer_bytes,
        other_bytes,
        probe_tokens,
        largest_micro_batch_tokens: lengths.iter().take(cfg.batch_size).map(|(t, _)| t).sum(),
        gradient_checkpointing: cfg.gradient_checkpointing,
        piece_tokens: cfg.batch_tokens,
        ..Default::default()
    };
    (plan.per_token_bytes, plan.gathered_bytes) = measure(policy, cfg.gradient_checkpointing)?;
    if let (Some(gb), None) = (cfg.max_memory, cfg.batch_tokens) {
        let accumulating = if cfg.grad_accum > 1 { 0 } else { accumulating };
        plan.fit(gb, longest, accumulating, |on| Ok(measure(policy, on)?.0))?;
        // Freed buffers kept for reuse stay inside the budget the plan leaves.
        crate::memory::limit_pool((gb * 1e9 - plan.total_bytes()).max(0.0) as u64);
    }
    policy.set_checkpointing(plan.gradient_checkpointing);
    Ok(plan)
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

/// Every parameter's AdamW moments, on rank 0 (None elsewhere): its own, or under ZeRO-1 each
/// from the rank that keeps it. Every rank must call it (a collective under ZeRO-1).
fn gathered_moments(policy: &Policy, opt: &AdamW, owner: Option<&[usize]>, world: &World) -> Result<Option<BTreeMap<String, Tensor>>> {
    let mut out = BTreeMap::new();
    for (i, n) in policy.names.iter().enumerate() {
        let var = &policy.vars[i];
        let (m, v) = match owner {
            None if world.is_root() => opt.moments(i, var)?,
            None => continue,
            Some(o) => {
                let (m, v) = if opt.owns(i) { opt.moments(i, var)? } else { (var.as_tensor().zeros_like()?, var.as_tensor().zeros_like()?) };
                (world.broadcast_tensor(&m, o[i])?, world.broadcast_tensor(&v, o[i])?)
            }
        };
        out.insert(format!("m.{n}"), m);
        out.insert(format!("v.{n}"), v);
    }
    Ok(world.is_root().then_some(out))
}

/// Writes a checkpoint (rank 0, after every rank finished the step: a barrier, so no
/// checkpoint is half a step). Called on every rank; only rank 0 writes.
fn save_checkpoint(
    dir: &Path,
    policy: &Policy,
    opt: &AdamW,
    owner: Option<&[usize]>,
    state: &TrainerState,
    tokenizer_from: &Path,
    world: &World,
) -> Result<()> {
    world.barrier();
    if let Some(s) = &policy.shards {
        return save_sharded_checkpoint(dir, policy, s, opt, state, tokenizer_from, world);
    }
    let Some(moments) = gathered_moments(policy, opt, owner, world)? else { return Ok(()) };
    // Written under a temporary name and renamed, so a checkpoint directory is always whole.
    let tmp = dir.with_extension("partial");
    let _ = std::fs::remove_dir_all(&tmp);
    // The trained tensors and both moments, all f32: known before writing, so a full disk is
    // refused here rather than found half-way (any older checkpoint stays as it was).
    let elems: usize = policy.vars.iter().map(|v| v.elem_count()).sum();
    crate::store::ensure_free(&[(tmp.join("model.safetensors"), 3 * 4 * elems as u64)], &format!("checkpoint {}", dir.display()))?;
    let written = (|| -> Result<()> {
        policy.save(&tmp, tokenizer_from)?;
        weights::save_weights(&tmp.join("optimizer.safetensors"), &moments, DType::F32)?;
        write_atomic(&tmp.join("trainer_state.json"), serde_json::to_string_pretty(state)?.as_bytes())
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    let _ = std::fs::remove_dir_all(dir);
    crate::store::atomic::rename_durable(&tmp, dir)
}

/// `save_checkpoint` under full sharding: rank 0 writes the weights as they are gathered one at
/// a time, every rank its own moments; renamed into place once every rank has written.
fn save_sharded_checkpoint(
    dir: &Path,
    policy: &Policy,
    s: &crate::train::shard::Sharded,
    opt: &AdamW,
    state: &TrainerState,
    tokenizer_from: &Path,
    world: &World,
) -> Result<()> {
    let tmp = dir.with_extension("partial");
    let mut ok = [1.0];
    if world.is_root() {
        let _ = std::fs::remove_dir_all(&tmp);
        let numel = s.total_params(&policy.names);
        let made = std::fs::create_dir_all(&tmp)
            .map_err(anyhow::Error::from)
            .and_then(|_| crate::store::ensure_free(&[(tmp.join("model.safetensors"), 3 * 4 * numel)], &format!("checkpoint {}", dir.display())));
        if let Err(e) = &made {
            eprintln!("error: {e:#}");
            ok[0] = 0.0;
        }
    }
    world.broadcast_f64(&mut ok, 0);
    if ok[0] == 0.0 {
        bail!("checkpoint {}: rank 0 could not make room for it (above)", dir.display());
    }
    policy.save(&tmp, tokenizer_from)?;
    let moments = (0..policy.names.len()).map(|i| opt.moments(i, &policy.vars[i])).collect::<Result<Vec<_>>>()?;
    s.save_moments(&tmp, &policy.names, &moments)?;
    world.barrier();
    if !world.is_root() {
        return Ok(());
    }
    write_atomic(&tmp.join("trainer_state.json"), serde_json::to_string_pretty(state)?.as_bytes())?;
    let _ = std::fs::remove_dir_all(dir);
    crate::store::atomic::rename_durable(&tmp, dir)
}

/// What the run continues from.
struct Start {
    step: usize,
    cursor: Cursor,
    num_tokens: u64,
    best: Best,
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
    // Whichever layout wrote the moments (whole tensors, or a sharded run's per-rank files at any
    // world size), each parameter's as this run holds it.
    let moments = Moments::open(dir)?;
    for (i, n) in policy.names.iter().enumerate() {
        let (m, v) = match &policy.shards {
            Some(s) => {
                let (numel, w) = (s.total_params(std::slice::from_ref(n)) as usize, s.world());
                (moments.shard("m", n, numel, w.size, w.rank, &device)?, moments.shard("v", n, numel, w.size, w.rank, &device)?)
            }
            None => {
                let shape = policy.vars[i].shape().clone();
                let numel = shape.elem_count();
                (moments.range("m", n, numel, 0..numel, &device)?.reshape(&shape)?, moments.range("v", n, numel, 0..numel, &device)?.reshape(&shape)?)
            }
        };
        opt.set_moments(i, &m, &v)?;
    }
    opt.t = state.adam_t;
    Ok(Start { step: state.step, cursor: state.cursor, num_tokens: state.num_tokens, best: state.best })
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
    run_on(cfg, &World::single())
}

/// `train` as one rank of `world` (a world of one: the single-process run). Every rank reads
/// the inputs and trains on its share of each global batch; rank 0 owns `--out`.
pub fn run_on(cfg: &TrainSettings, world: &World) -> Result<Manifest> {
    // Every flag is checked before a Hub id is resolved (or downloaded).
    cfg.validate()?;
    let mut hub = Vec::new();
    let model = crate::hub::optional_model(cfg.model.as_deref(), &mut hub)?;
    let adapter = crate::hub::optional_model(cfg.adapter.as_deref(), &mut hub)?;
    let cfg = &TrainSettings { model, adapter, ..cfg.clone() };
    let mut t = match Trainer::start(cfg, world, hub)? {
        Started::UpToDate(m) => return Ok(*m),
        Started::Ready(t) => *t,
    };
    let mut steps_run = 0;
    while t.step < t.total_steps && !t.stopped_early {
        if cfg.stop_after_steps == Some(steps_run) {
            t.pb.abandon();
            if world.is_root() {
                eprintln!("train: stopping after {steps_run} steps as asked; --resume continues");
            }
            return Ok(Manifest::unfinished(STAGE, FORMAT_VERSION, &t.fp));
        }
        t.step()?;
        steps_run += 1;
    }
    t.finish(steps_run)
}

/// What `Trainer::start` found: a finished run with these inputs, or a run to continue.
enum Started<'a> {
    UpToDate(Box<Manifest>),
    Ready(Box<Trainer<'a>>),
}

/// A training run on one rank: what every step reads, and what a step carries to the next
/// (the step, the data order, the optimizer, the metrics so far).
struct Trainer<'a> {
    cfg: &'a TrainSettings,
    world: &'a World,
    prepared: PreparedDataset,
    cache: Option<RefCache>,
    model_dir: PathBuf,
    train_rows: Vec<u32>,
    eval_rows: Vec<u32>,
    /// Pairs per micro-batch over all ranks, and per optimizer step.
    global_batch: usize,
    per_step: usize,
    total_steps: usize,
    fp: String,
    /// Rank 0's hold on --out (None on the other ranks).
    sd: Option<super::StageDir>,
    device: candle_core::Device,
    policy: Policy,
    opt: AdamW,
    /// ZeRO-1: the rank that keeps each parameter's moments.
    owner: Option<Vec<usize>>,
    /// `--ref-in-loop`: the reference model, run in every step.
    ref_decoder: Option<crate::model::Decoder>,
    loss: LossConfig,
    /// Tokens a micro-batch may hold at once (usize::MAX: no limit).
    budget: usize,
    /// The memory plan, for the manifest.
    memory_plan: serde_json::Value,
    metrics_path: PathBuf,
    checkpoints: PathBuf,
    rows: Vec<(usize, Row)>,
    /// The next step to run (the steps done so far).
    step: usize,
    cursor: Cursor,
    order: Vec<u32>,
    order_rule: OrderRule,
    num_tokens: u64,
    pb: indicatif::ProgressBar,
    tokens_total: f64,
    t_loop: Instant,
    peak_memory_gb: f64,
    /// `--load-best-model-at-end`: the best evaluation so far and the early-stopping counter.
    best: Best,
    /// `--early-stopping-patience` ran out.
    stopped_early: bool,
    /// `--report-to tensorboard` (rank 0).
    tensorboard: Option<EventWriter>,
}

impl<'a> Trainer<'a> {
    /// Checks the inputs (`run_on` has validated the settings), claims --out (rank 0), loads the policy and optimizer (from the
    /// newest checkpoint with --resume) and runs the step-0 evaluation of a fresh run.
    fn start(cfg: &'a TrainSettings, world: &'a World, hub: Vec<serde_json::Value>) -> Result<Started<'a>> {
        let mut prepared = PreparedDataset::open(&cfg.prepared)?;
        // The reference-free losses take no cache (settings.validate refuses one).
        let reference_free = cfg.loss.reference_free();
        let cache = if reference_free { None } else { Some(RefCache::open(cfg.ref_cache.as_deref().unwrap_or(Path::new("ref_cache")), &prepared)?) };
        let kl_block = unpaired_data(cfg, &mut prepared, cache.as_ref())?;
        if cfg.ld_alpha.is_some() {
            if let Some(c) = &cache {
                c.check_ld()?;
            }
        }
        if world.size > 1 {
            if let Some(t) = cfg.loss.0.iter().find(|t| t.batch_level() && !t.unpaired()) {
                bail!(
                    "--loss {} sorts across the whole micro-batch, which data-parallel ranks each hold a part of; train it in one process",
                    t.name()
                );
            }
        }
        let model_dir = match (&cfg.model, &cache) {
            (Some(m), _) => m.clone(),
            (None, Some(c)) => c.model_dir()?,
            (None, None) => bail!("--model is required with a reference-free loss"),
        };
        check_same_tokenizer(&prepared.manifest, &prepared.dir, &model_dir)?;
        let train_rows = prepared.rows_of(Split::Train);
        let eval_rows = prepared.rows_of(Split::Eval);
        if train_rows.is_empty() {
            bail!("{}: no train rows", cfg.prepared.display());
        }
        // The global batch: what a step's update is the mean over, whatever the number of ranks.
        let global_batch = cfg.batch_size * world.size;
        let per_step = global_batch * cfg.grad_accum;
        // Unpaired data: micro-batches end at each epoch's end (TRL's short last batch).
        let micro_per_epoch = match kl_block {
            Some(_) => train_rows.len().div_ceil(global_batch) as f64,
            None => train_rows.len() as f64 / global_batch as f64,
        };
        let total_steps = cfg.max_steps.unwrap_or_else(|| ((cfg.epochs * micro_per_epoch) / cfg.grad_accum as f64).ceil().max(1.0) as usize);
        let order_rule = OrderRule { seed: cfg.seed, shuffle: cfg.shuffle, kl_block };
        // Settings that change the result; paths and run control are not among them. The batch is
        // the global one, so a run resumes on another number of ranks with the same global batch.
        let mut settings = serde_json::to_value(cfg)?;
        settings["batch_size"] = global_batch.into();
        if !hub.is_empty() {
            settings["hub"] = hub.into();
        }
        // Gradient checkpointing, token budgets and a sharded optimizer change memory, not results;
        // how many checkpoints are kept and where else metrics go change no result either.
        for k in [
            "resume", "force", "prepared", "ref_cache", "out", "model", "stop_after_steps", "adapter", "gradient_checkpointing", "batch_tokens",
            "max_memory", "shard_optimizer", "shard_params", "save_total_limit", "report_to", "logging_dir",
        ] {
            settings.as_object_mut().expect("a struct").remove(k);
        }
        let out = &cfg.out;
        let checkpoints = out.join("checkpoints");
        // Rank 0 claims --out and decides where the run starts; the others hear it.
        let (sd, decision) = if world.is_root() {
            let mut inputs = vec![InputRef::new("prepared", &cfg.prepared, prepared.fingerprint())];
            if let Some(c) = &cache {
                inputs.push(InputRef::new("ref_cache", &c.dir, &c.manifest.fingerprint));
            }
            inputs.push(InputRef::new("model", &model_dir, &weights::weights_hash(&model_dir)?));
            if let Some(a) = &cfg.adapter {
                let w = a.join(lora::WEIGHTS_FILE);
                inputs.push(InputRef::new("adapter", a, &crate::store::file_hash(&w)?.blake3));
            }
            match begin(STAGE, FORMAT_VERSION, out, inputs, settings, cfg.force)? {
                Begin::UpToDate(m) => {
                    world.broadcast_string(&mut String::from("up to date"));
                    return Ok(Started::UpToDate(Box::new(m)));
                }
                Begin::Run(sd) => {
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
                        if cfg.logging_dir.is_none() {
                            let _ = std::fs::remove_dir_all(out.join("runs"));
                        }
                    }
                    std::fs::create_dir_all(&checkpoints)?;
                    let mut decision =
                        format!("{}\n{}", sd.fingerprint, resume_from.as_ref().map_or(String::new(), |(_, d)| d.display().to_string()));
                    world.broadcast_string(&mut decision);
                    (Some(sd), decision)
                }
            }
        } else {
            let mut decision = String::new();
            world.broadcast_string(&mut decision);
            if decision == "up to date" {
                return Ok(Started::UpToDate(Box::new(Manifest::unfinished(STAGE, FORMAT_VERSION, ""))));
            }
            (None, decision)
        };
        let (fp, resume_dir) =
            decision.split_once('\n').map(|(f, d)| (f.to_string(), (!d.is_empty()).then(|| PathBuf::from(d)))).context("rank 0's decision")?;

        let device = model::device()?;
        let mut policy = if cfg.shard_params {
            Policy::load_sharded(
                &model_dir,
                cfg.base_dtype.dtype(),
                Some(cfg.compute_dtype().dtype()),
                &trainable(cfg)?,
                cfg.quant().as_ref(),
                world,
                &device,
            )?
        } else {
            Policy::load_mixed(
                &model_dir,
                cfg.base_dtype.dtype(),
                Some(cfg.compute_dtype().dtype()),
                &trainable(cfg)?,
                cfg.gradient_checkpointing,
                cfg.quant().as_ref(),
                &device,
            )?
        };
        let adam = AdamWConfig { lr: cfg.lr, beta1: cfg.adam_beta1, beta2: cfg.adam_beta2, eps: cfg.adam_eps, weight_decay: cfg.weight_decay };
        // ZeRO-1: each parameter's moments live on one rank, which updates it and broadcasts it.
        let owner = (cfg.shard_optimizer && !cfg.shard_params && world.size > 1)
            .then(|| owners(&policy.vars.iter().map(|v| v.elem_count()).collect::<Vec<_>>(), world.size));
        let mut opt = match &owner {
            Some(o) => AdamW::sharded(adam, &policy.vars, &o.iter().map(|&r| r == world.rank).collect::<Vec<_>>())?,
            None => AdamW::new(adam, &policy.vars)?,
        };
        let Start { step, cursor, num_tokens, best } = match &resume_dir {
            Some(dir) => {
                let s = restore(dir, &fp, &policy, &mut opt)?;
                if world.is_root() {
                    eprintln!("train: resuming from {} (step {} of {total_steps})", dir.display(), s.step);
                }
                s
            }
            None => Start { step: 0, cursor: Cursor { epoch: 0, index: 0 }, num_tokens: 0, best: Best::default() },
        };
        if world.size > 1 && world.is_root() {
            eprintln!(
                "train: {} ranks, {} pairs per rank per micro-batch, global batch {per_step} pairs per step{}",
                world.size,
                cfg.batch_size,
                match (cfg.shard_params, owner.is_some()) {
                    (true, _) => ", weights, gradients and optimizer state sharded (ZeRO-3)",
                    (false, true) => ", optimizer state sharded (ZeRO-1)",
                    _ => "",
                }
            );
        }
        // The reference is what cache-ref ran, whatever the policy starts from.
        let ref_decoder = match (&cache, cfg.ref_in_loop) {
            (Some(c), true) => Some(model::load_decoder(&c.model_dir()?, DType::F32, cfg.quant().as_ref(), &device)?),
            _ => None,
        };
        // MoE models: TRL 1.16 adds the router's load-balancing loss whenever the model has one,
        // weighted by the config's router_aux_loss_coef unless the run sets its own.
        let router_aux_loss_coef = cfg.router_aux_loss_coef.or(policy.cfg.moe.as_ref().map(|m| m.router_aux_loss_coef)).unwrap_or(0.0);
        let loss = cfg.loss_config(router_aux_loss_coef)?;
        // What the run needs, and under --max-memory what it turns on to fit: a micro-batch over
        // the plan's tokens per piece runs in pieces.
        let plan = memory_plan(&mut policy, &opt, &prepared, cache.as_ref(), ref_decoder.as_ref(), &train_rows, cfg, &loss)?;
        if world.is_root() {
            eprintln!("{}", plan.describe());
        }
        let budget = plan.piece_tokens.unwrap_or(usize::MAX);
        let metrics_path = out.join("metrics.jsonl");
        // Keep only what came before the checkpoint we resume from (rank 0 writes the metrics).
        let rows = if world.is_root() { metrics::read_jsonl(&metrics_path, step)? } else { vec![] };
        if world.is_root() {
            metrics::write_jsonl(&metrics_path, &rows)?;
        }
        let order = epoch_order(&train_rows, order_rule, cursor.epoch);
        let tensorboard = match cfg.report_to {
            ReportTo::Tensorboard if world.is_root() => {
                let mut w = EventWriter::create(&cfg.logging_dir.clone().unwrap_or_else(|| out.join("runs")))?;
                w.text(step, "settings", &format!("```json\n{}\n```", serde_json::to_string_pretty(cfg)?))?;
                Some(w)
            }
            _ => None,
        };
        let mut t = Trainer {
            cfg,
            world,
            prepared,
            cache,
            model_dir,
            train_rows,
            eval_rows,
            global_batch,
            per_step,
            total_steps,
            fp,
            sd,
            device,
            policy,
            opt,
            owner,
            ref_decoder,
            loss,
            budget,
            memory_plan: plan.to_json(),
            metrics_path,
            checkpoints,
            rows,
            step,
            cursor,
            order,
            order_rule,
            num_tokens,
            pb: indicatif::ProgressBar::hidden(),
            tokens_total: 0.0,
            t_loop: Instant::now(),
            peak_memory_gb: 0.0,
            best,
            stopped_early: false,
            tensorboard,
        };
        if t.step == 0 && !t.eval_rows.is_empty() {
            t.evaluate(0)?;
        }
        if world.is_root() {
            t.pb = progress(total_steps as u64, "train", "steps");
        }
        t.pb.set_position(t.step as u64);
        t.t_loop = Instant::now();
        Ok(Started::Ready(Box::new(t)))
    }

    /// One optimizer step: the micro-batches' gradients (this rank's share of each global one,
    /// in pieces under the token budget), summed over the ranks, clipped, AdamW; then the step's
    /// metrics, and the evaluation and checkpoint when they are due.
    fn step(&mut self) -> Result<()> {
        let (cfg, world, step) = (self.cfg, self.world, self.step);
        let t_step = Instant::now();
        if let Some(sh) = &self.policy.shards {
            sh.take_collective_seconds(); // not the plan's probe's or an evaluation's
            sh.take_prefetched_share();
        }
        crate::memory::reset_peak();
        let lr = cfg.lr * lr_factor(cfg.scheduler, step, cfg.warmup_steps, self.total_steps);
        let mut acc: Option<Vec<Tensor>> = None;
        let mut stats = Stats::default();
        // This rank's tokens through the policy, and TRL's count of the step's tokens.
        let mut counts = [0f64, 0f64];
        // Where the step's time goes: policy forward + loss, backward, clipping + AdamW.
        let (mut fwd_s, mut bwd_s) = (0.0, 0.0);
        for micro in 0..cfg.grad_accum {
            self.policy.reseed(cfg.seed, step, micro * world.size + world.rank);
            // The global micro-batch (the same on every rank); this rank's share is every W-th.
            let global = self.cursor.take(&self.train_rows, self.order_rule, self.global_batch, &mut self.order);
            let whole = Whole::of(&global.iter().map(|&i| self.prepared.pair(i as usize)).collect::<Vec<_>>());
            let ids: Vec<u32> = global.iter().skip(world.rank).step_by(world.size).copied().collect();
            let pairs: Vec<PairView> = ids.iter().map(|&i| self.prepared.pair(i as usize)).collect();
            let refs = match (&self.ref_decoder, &self.cache) {
                (Some(r), _) => Some(RefRows::computed(r, cfg.layout, &pairs, self.loss.ld_alpha.is_some())?),
                (None, Some(c)) => Some(RefRows::of(c, &ids)),
                (None, None) => None,
            };
            let mut reduce = |b: &mut [f64]| world.sum_f64(b);
            let pieces = pieces(cfg, &self.loss, &pairs, self.budget)?;
            for grads in even_out(&self.policy, world, &self.loss, pieces.len(), true, &mut reduce)? {
                add_grads(&mut acc, grads)?;
            }
            for r in pieces {
                let t = Instant::now();
                let refs = refs.as_ref().map(|x| x.view().slice(r.clone()));
                let b = batch_loss(&self.policy.decoder, cfg.layout, &self.loss, &pairs[r.clone()], refs, whole, &mut reduce)?;
                fwd_s += t.elapsed().as_secs_f64();
                let t = Instant::now();
                let grads = gradients(&(&b.loss / cfg.grad_accum as f64)?, &self.policy)?;
                bwd_s += t.elapsed().as_secs_f64();
                add_grads(&mut acc, grads)?;
                b.record(&mut stats);
                counts[0] += b.tokens as f64;
                counts[1] += b.trl_tokens as f64;
            }
            stats.reduce_micro(world);
            stats.end_micro();
        }
        // Each rank's gradient is its share of the global mean: summed, it is the whole (under
        // --shard-params the backward already reduce-scattered it: each rank has its shard's sum).
        let acc = acc.expect("grad_accum >= 1");
        let grads = if self.policy.shards.is_some() { acc } else { world.sum_tensors(acc)? };
        world.sum_f64(&mut counts);
        self.num_tokens += counts[1] as u64;
        let t = Instant::now();
        let grad_norm = match &self.policy.shards {
            Some(_) => {
                let mut sq = [global_norm(&grads)?.powi(2)];
                world.sum_f64(&mut sq);
                sq[0].sqrt()
            }
            None => global_norm(&grads)?,
        };
        self.opt.step_scaled(&self.policy.vars, &grads, lr, clip_scale(grad_norm, cfg.max_grad_norm))?;
        if let Some(s) = &self.policy.shards {
            s.refresh_root()?;
        }
        if let Some(o) = &self.owner {
            for (i, v) in self.policy.vars.iter().enumerate() {
                let t = world.broadcast_tensor(v.as_tensor(), o[i])?;
                if o[i] != world.rank {
                    v.set(&t)?;
                }
            }
        }
        let opt_s = t.elapsed().as_secs_f64();
        let n = step + 1;
        self.step = n;
        let dt = t_step.elapsed().as_secs_f64();
        self.tokens_total += counts[0];
        let mut peak = [crate::memory::peak_bytes(&self.device) as f64 / 1e9];
        world.max_f64(&mut peak);
        self.peak_memory_gb = self.peak_memory_gb.max(peak[0]);
        let mut row = Row::new();
        stats.into_row("", &mut row);
        row.insert("grad_norm".into(), grad_norm);
        row.insert("learning_rate".into(), lr);
        row.insert("tokens_per_s".into(), counts[0] / dt.max(1e-9));
        row.insert("step_seconds".into(), dt);
        row.insert("forward_seconds".into(), fwd_s);
        row.insert("backward_seconds".into(), bwd_s);
        row.insert("optimizer_seconds".into(), opt_s);
        if let Some(sh) = &self.policy.shards {
            row.insert("collective_seconds".into(), sh.take_collective_seconds());
            if let Some(share) = sh.take_prefetched_share() {
                row.insert("gathers_prefetched".into(), share);
            }
        }
        row.insert("peak_memory_gb".into(), peak[0]);
        row.insert("epoch".into(), (n * self.per_step) as f64 / self.train_rows.len() as f64);
        row.insert("num_tokens".into(), self.num_tokens as f64);
        // KTO has no pairs to be right about; its KL estimate says how far the policy moved.
        let (name, value) = match row.get("rewards/accuracies") {
            Some(&a) => ("acc", a),
            None => ("kl", row.get("kl").copied().unwrap_or(0.0)),
        };
        self.pb.set_message(format!(
            "loss {:.4} {name} {value:.3} {:.0} tok/s",
            row["loss"],
            self.tokens_total / self.t_loop.elapsed().as_secs_f64().max(1e-9)
        ));
        self.record(n, row)?;
        if !self.eval_rows.is_empty() && cfg.eval_every > 0 && (n % cfg.eval_every == 0 || n == self.total_steps) {
            self.evaluate(n)?;
        }
        // The Trainer's EarlyStoppingCallback stops after this step's checkpoint.
        self.stopped_early = cfg.early_stopping_patience.is_some_and(|p| self.best.early_stopping_patience_counter >= p);
        if cfg.save_every > 0 && n % cfg.save_every == 0 && n < self.total_steps {
            let dir = self.checkpoints.join(format!("step-{n}"));
            if self.best.best_global_step == Some(n) {
                self.best.best_model_checkpoint = Some(dir.display().to_string());
            }
            self.save(&dir)?;
            if world.is_root() {
                metrics::write_parquet(&self.cfg.out.join("metrics.parquet"), &self.rows)?;
                if let Some(limit) = cfg.save_total_limit {
                    rotate_checkpoints(&self.checkpoints, limit, self.best.best_model_checkpoint.as_deref().map(Path::new))?;
                }
            }
        }
        if self.stopped_early && world.is_root() {
            eprintln!(
                "train: early stopping at step {n}: {} has not improved on {:.6} (step {}) for {} evaluations",
                cfg.metric_for_best_model(),
                self.best.best_metric.unwrap_or(f64::NAN),
                self.best.best_global_step.unwrap_or(0),
                self.best.early_stopping_patience_counter
            );
        }
        self.pb.inc(1);
        Ok(())
    }

    /// Appends a metrics row (rank 0 writes the metrics), and to TensorBoard: eval metrics under
    /// their names, the others as `train/<name>`.
    fn record(&mut self, step: usize, row: Row) -> Result<()> {
        if self.world.is_root() {
            metrics::append_jsonl(&self.metrics_path, step, &row)?;
            if let Some(tb) = &mut self.tensorboard {
                let tags: Vec<(String, f64)> =
                    row.iter().map(|(k, v)| (if k.starts_with("eval/") { k.clone() } else { format!("train/{k}") }, *v)).collect();
                tb.scalars(step, &tags)?;
                tb.flush()?;
            }
            self.rows.push((step, row));
        }
        Ok(())
    }

    /// The eval split's metrics after `step` steps.
    fn evaluate(&mut self, step: usize) -> Result<()> {
        let mut row = eval_pass(&self.policy, &self.prepared, self.cache.as_ref(), &self.eval_rows, self.cfg, &self.loss, self.budget, self.world)?;
        row.insert("num_tokens".into(), self.num_tokens as f64);
        let cfg = self.cfg;
        if cfg.load_best_model_at_end {
            let name = cfg.metric_for_best_model();
            let Some(&metric) = row.get(&name) else {
                bail!("--metric-for-best-model {name}: no such eval metric (there are {})", row.keys().cloned().collect::<Vec<_>>().join(", "));
            };
            if step > 0 {
                self.best.update(metric, step, cfg.greater_is_better(), cfg.early_stopping_threshold);
            }
        }
        self.record(step, row)
    }

    /// A checkpoint of where the run stands, in `dir` (every rank calls it; rank 0 writes).
    fn save(&self, dir: &Path) -> Result<()> {
        save_checkpoint(dir, &self.policy, &self.opt, self.owner.as_deref(), &self.state(), &self.model_dir, self.world)
    }

    fn state(&self) -> TrainerState {
        TrainerState {
            step: self.step,
            cursor: self.cursor,
            adam_t: self.opt.t,
            fingerprint: self.fp.clone(),
            num_tokens: self.num_tokens,
            best: self.best.clone(),
        }
    }

    /// The final model (with `--load-best-model-at-end`, the best checkpoint's), metrics.parquet,
    /// curves.png and the manifest (rank 0).
    fn finish(mut self, steps_run: usize) -> Result<Manifest> {
        self.pb.finish_and_clear();
        let out = self.cfg.out.clone();
        let final_dir = out.join("final");
        // The last step evaluated best: final/ is that model (no checkpoint holds it).
        if self.cfg.load_best_model_at_end && self.best.best_global_step == Some(self.step) {
            self.best.best_model_checkpoint = Some(final_dir.display().to_string());
        }
        self.save(&final_dir)?;
        let Some(sd) = self.sd.take() else { return Ok(Manifest::unfinished(STAGE, FORMAT_VERSION, &self.fp)) };
        if let Some(best) = self.best.best_model_checkpoint.as_deref().filter(|b| self.cfg.load_best_model_at_end && Path::new(b) != final_dir) {
            install_best(Path::new(best), &final_dir, &self.state())?;
            eprintln!(
                "train: final/ holds the best checkpoint, {best} ({} {:.6})",
                self.cfg.metric_for_best_model(),
                self.best.best_metric.unwrap_or(f64::NAN)
            );
        }
        let rows = &self.rows;
        metrics::write_parquet(&out.join("metrics.parquet"), rows)?;
        if let Err(e) = crate::train::plot::curves(&out.join("curves.png"), rows) {
            eprintln!("train: could not draw curves.png: {e:#}");
        }
        let last = |k: &str| rows.iter().rev().find_map(|(_, r)| r.get(k).copied());
        let total_steps = self.total_steps;
        let counts = [
            ("steps".to_string(), total_steps as u64),
            ("pairs_train".to_string(), self.train_rows.len() as u64),
            ("pairs_eval".to_string(), self.eval_rows.len() as u64),
        ]
        .into();
        let stats = serde_json::json!({
            "final_loss": last("loss"), "final_eval_loss": last("eval/loss"), "final_eval_accuracy": last("eval/rewards/accuracies"),
            "final_eval_margin": last("eval/rewards/margins"),
            "tokens_per_s": self.tokens_total / self.t_loop.elapsed().as_secs_f64().max(1e-9),
            "seconds_per_step": self.t_loop.elapsed().as_secs_f64() / steps_run.max(1) as f64,
            "peak_memory_gb": self.peak_memory_gb,
            "micro_batch_tokens": (self.budget != usize::MAX).then_some(self.budget),
            "gradient_checkpointing": self.policy.decoder.checkpointing(),
            "memory_plan": self.memory_plan,
            "world_size": self.world.size,
            "shard_optimizer": self.owner.is_some() || self.cfg.shard_params,
            "shard_params": self.cfg.shard_params,
            "best_metric": self.best.best_metric,
            "best_model_checkpoint": self.best.best_model_checkpoint,
            "stopped_early": self.stopped_early,
        });
        let manifest = sd.manifest(counts, stats);
        let wall = manifest.timings["wall_s"];
        let weights_file = if self.policy.lora.is_some() { "final/adapter_model.safetensors" } else { "final/model.safetensors" };
        let manifest = sd.finish(manifest, &["metrics.parquet", weights_file])?;
        eprintln!("train: {total_steps} steps in {wall:.1}s; final model in {}", out.join("final").display());
        Ok(manifest)
    }
}
