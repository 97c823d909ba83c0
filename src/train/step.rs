//! One micro-batch: the policy's log-probs of a batch of pairs, the loss (every TRL 1.16 loss
//! type, their weighted sum, WPO, LD-DPO, the reference-free SimPO/CPO/ORPO, KTO and
//! APO-zero-unpaired on unpaired rows, the MoE aux loss), its metrics, and the gradients of
//! every parameter.
use super::loss::{dpo_term, free_term, unpaired_term, FreeBatch, LossConfig, LossType, PairBatch};
use super::metrics::Stats;
use super::policy::Policy;
use crate::data::prepared::PairView;
use crate::model::Decoder;
use crate::score::layout::{self, LayoutKind};
use crate::score::{pair_logps_with, PairLogps, PairOptions};
use anyhow::Result;
use candle_core::{DType, Tensor};

/// What a micro-batch's loss is averaged over: its pairs, its chosen completion tokens, and
/// (ORPO) its chosen tokens with the prompts'. A micro-batch computed in pieces (under a token
/// budget) passes the whole micro-batch's counts to each piece, so the pieces' losses and
/// gradients add up to the whole's.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Whole {
    pub pairs: usize,
    pub chosen_tokens: usize,
    pub chosen_and_prompt_tokens: usize,
}

impl Whole {
    pub fn of(pairs: &[PairView]) -> Self {
        Self {
            pairs: pairs.len(),
            chosen_tokens: pairs.iter().map(|p| p.chosen_scored).sum(),
            chosen_and_prompt_tokens: pairs.iter().map(|p| p.chosen_scored + p.prompt.len() - 1).sum(),
        }
    }
}

/// The reference model's log-probs of a micro-batch's pairs (from the cache): sums, and for
/// LD-DPO the sums over each completion's first min(chosen, rejected) tokens.
#[derive(Clone, Copy)]
pub struct Refs<'a> {
    pub chosen: &'a [f32],
    pub rejected: &'a [f32],
    pub chosen_shared: Option<&'a [f32]>,
    pub rejected_shared: Option<&'a [f32]>,
}

impl<'a> Refs<'a> {
    pub fn slice(&self, r: std::ops::Range<usize>) -> Refs<'a> {
        Refs {
            chosen: &self.chosen[r.clone()],
            rejected: &self.rejected[r.clone()],
            chosen_shared: self.chosen_shared.map(|x| &x[r.clone()]),
            rejected_shared: self.rejected_shared.map(|x| &x[r]),
        }
    }
}

pub struct BatchOut {
    /// This piece's share of the micro-batch's loss (scalar).
    pub loss: Tensor,
    /// The metrics' contributions, for [`BatchOut::record`].
    metrics: Vec<(&'static str, f64, f64)>,
    /// Tokens the forward ran over (prompt counted once per row it appears in).
    pub tokens: usize,
    /// Real tokens of TRL's padded rows (the prompt twice), TRL's `num_tokens`.
    pub trl_tokens: usize,
    /// MoE models: the router's load-balancing loss (detached).
    pub aux_loss: Option<f64>,
}

impl BatchOut {
    /// Adds this piece's metrics to the micro-batch in `stats` (call `stats.end_micro()` after
    /// a micro-batch's last piece).
    pub fn record(&self, stats: &mut Stats) {
        for &(k, v, w) in &self.metrics {
            if w == 0.0 {
                stats.sum(k, v);
            } else {
                stats.mean(k, v, w);
            }
        }
    }
}

/// Splits a micro-batch into consecutive pieces of at most `budget` computed tokens each (one
/// pair over the budget is an error naming it).
pub fn split_by_tokens(kind: LayoutKind, pairs: &[PairView], budget: usize) -> Result<Vec<std::ops::Range<usize>>> {
    let mut out = Vec::new();
    let (mut start, mut used) = (0, 0);
    for (i, p) in pairs.iter().enumerate() {
        let t = layout::computed_tokens(kind, p);
        if t > budget {
            anyhow::bail!(
                "pair row_id {} has {t} tokens, more than the {budget} a micro-batch may hold (--batch-tokens, or what --max-memory allows); \
                 raise the limit, or use --gradient-checkpointing to need less memory per token",
                p.row_id
            );
        }
        if used + t > budget {
            out.push(start..i);
            (start, used) = (i, 0);
        }
        used += t;
    }
    if start < pairs.len() {
        out.push(start..pairs.len());
    }
    Ok(out)
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

fn f64s(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.to_dtype(DType::F64)?.to_vec1()?)
}

/// Sums a buffer over the data-parallel ranks (KTO's batch-wide sums; the identity in one
/// process). A rank with no rows of a micro-batch calls [`UNPAIRED_SUMS`] zeros itself.
pub type Reduce<'a> = &'a mut dyn FnMut(&mut [f64]);

/// How many values an unpaired micro-batch sums over the ranks.
pub const UNPAIRED_SUMS: usize = 6;

/// Policy forward, loss and metrics for `pairs` (all of a micro-batch, or a piece of `whole`);
/// `refs` for the reference-based losses.
pub fn batch_loss(
    decoder: &Decoder,
    layout: LayoutKind,
    c: &LossConfig,
    pairs: &[PairView],
    refs: Option<Refs>,
    whole: Whole,
    reduce: Reduce,
) -> Result<BatchOut> {
    let lp = pair_logps_with(decoder, layout, pairs, logps_options(c))?;
    let mut out = if c.unpaired() { unpaired_loss_of(c, pairs, &lp, refs, whole, reduce)? } else { loss_of(c, pairs, &lp, refs, whole)? };
    out.tokens = pairs.iter().map(|p| layout::computed_tokens(layout, p)).sum();
    Ok(out)
}

/// KTO or APO-zero-unpaired on unpaired rows, as TRL 1.16's KTOTrainer: each row is a pair
/// (its completion, its KL completion) and `refs` holds the reference's log-probs of both. The
/// KL estimate is the micro-batch's mean of log π − log π_ref over the KL completions, over
/// every rank, clamped at 0 and detached (TRL computes it under no_grad); the loss is the
/// weighted per-row losses' sum over the micro-batch's row count. Metrics follow TRL: means
/// over the desirable ("chosen") and undesirable ("rejected") rows, margins only when the
/// micro-batch has both, statistics over the completions' tokens (not the KL completions').
pub fn unpaired_loss_of(c: &LossConfig, pairs: &[PairView], lp: &PairLogps, refs: Option<Refs>, whole: Whole, reduce: Reduce) -> Result<BatchOut> {
    let n = pairs.len();
    let (dt, dev) = (lp.chosen.dtype(), lp.chosen.device().clone());
    let refs = refs.ok_or_else(|| anyhow::anyhow!("KTO needs the reference log-probs"))?;
    let label: Vec<bool> = pairs.iter().map(|p| p.label.expect("unpaired rows are labelled")).collect();
    let desirable = Tensor::from_vec(label.iter().map(|&l| f32::from(u8::from(l))).collect::<Vec<_>>(), n, &dev)?.to_dtype(dt)?;
    let ref_c = Tensor::from_vec(refs.chosen.to_vec(), n, &dev)?.to_dtype(dt)?;
    let ratio = (&lp.chosen - &ref_c)?;
    let (policy, kl_policy, ratios) = (f64s(&lp.chosen)?, f64s(&lp.rejected)?, f64s(&ratio)?);
    let beta = c.beta;
    // Summed over the ranks at once: the KL terms, then each side's rewards and counts.
    let mut sums = [0f64; UNPAIRED_SUMS];
    sums[0] = kl_policy.iter().zip(refs.rejected).map(|(p, &r)| p - r as f64).sum();
    sums[1] = n as f64;
    for (i, &l) in label.iter().enumerate() {
        let k = if l { 2 } else { 4 };
        sums[k] += beta * ratios[i];
        sums[k + 1] += 1.0;
    }
    reduce(&mut sums);
    let kl = if c.needs_kl() { (sums[0] / sums[1].max(1.0)).max(0.0) } else { 0.0 };
    let (t, _) = c.terms[0];
    let per_row = unpaired_term(t, c, &ratio, &desirable, kl)?;
    let total = (per_row.sum_all()? / whole.pairs.max(1) as f64)?;
    // A batch-wide value recorded by every rank with rows, weighted so the ranks' shares add
    // up to it once.
    let share = n as f64 / sums[1].max(1.0);
    let mut metrics: Vec<(&'static str, f64, f64)> = vec![("loss", scalar(&total)?, 0.0), ("kl", kl * share, share)];
    for (want, rewards, logps) in [(true, "rewards/chosen", "logps/chosen"), (false, "rewards/rejected", "logps/rejected")] {
        let rows: Vec<usize> = (0..n).filter(|&i| label[i] == want).collect();
        if !rows.is_empty() {
            let k = rows.len() as f64;
            metrics.push((rewards, rows.iter().map(|&i| beta * ratios[i]).sum(), k));
            metrics.push((logps, rows.iter().map(|&i| policy[i]).sum(), k));
        }
    }
    if sums[3] > 0.0 && sums[5] > 0.0 {
        metrics.push(("rewards/margins", (sums[2] / sums[3] - sums[4] / sums[5]) * share, share));
    }
    let (seq, stats) = (&lp.scored.seq, &lp.stats);
    let (mut ent, mut ntok, mut logit, mut count) = (0f64, 0f64, [0f64; 2], [0f64; 2]);
    for (i, &s) in seq.iter().enumerate().filter(|(_, &s)| (s as usize) < 2 * n && s % 2 == 0) {
        ent += stats.entropy[i] as f64;
        ntok += 1.0;
        let side = usize::from(!label[s as usize / 2]);
        logit[side] += stats.mean_logit[i] as f64;
        count[side] += 1.0;
    }
    if ntok > 0.0 {
        metrics.push(("entropy", ent, ntok));
    }
    for (side, key) in ["logits/chosen", "logits/rejected"].into_iter().enumerate() {
        if count[side] > 0.0 {
            metrics.push((key, logit[side], count[side]));
        }
    }
    let trl_tokens = pairs.iter().map(|p| p.prompt.len() + p.chosen_scored).sum();
    Ok(BatchOut { loss: total, metrics, tokens: 0, trl_tokens, aux_loss: None })
}

/// What the policy forward must compute for the loss `c`.
pub fn logps_options(c: &LossConfig) -> PairOptions {
    PairOptions { stats: true, ld_alpha: c.ld_alpha, score_prompt: c.has(LossType::Orpo) }
}

/// The loss and metrics of `pairs` from the policy's log-probs (`lp`, computed with
/// [`logps_options`]).
pub fn loss_of(c: &LossConfig, pairs: &[PairView], lp: &PairLogps, refs: Option<Refs>, whole: Whole) -> Result<BatchOut> {
    let n = pairs.len();
    let dt = lp.chosen.dtype();
    let dev = lp.chosen.device().clone();
    let vec = |v: Vec<f32>| -> Result<Tensor> { Ok(Tensor::from_vec(v, n, &dev)?.to_dtype(dt)?) };
    let chosen_len = vec(pairs.iter().map(|p| p.chosen_scored as f32).collect())?;
    let rejected_len = vec(pairs.iter().map(|p| p.rejected_scored as f32).collect())?;
    let (seq, stats) = (&lp.scored.seq, &lp.stats);
    let is_chosen = |s: u32| (s as usize) < 2 * n && s.is_multiple_of(2);
    let is_completion = |s: u32| (s as usize) < 2 * n;
    // −Σ log π over the chosen completion tokens (SFT, CPO's NLL).
    let chosen_mask = vec_m(seq.iter().map(|&s| is_chosen(s)), &dev, dt)?;
    let chosen_nll = (&lp.tokens * &chosen_mask)?.sum_all()?.neg()?;
    let mut metrics: Vec<(&'static str, f64, f64)> = Vec::new();
    let mut total = Tensor::zeros((), dt, &dev)?;
    let inv_pairs = 1.0 / whole.pairs.max(1) as f64;
    let beta = c.beta;
    let (chosen_logps, rejected_logps, chosen_rewards, rejected_rewards);
    if c.reference_free() {
        let (t, _) = c.terms[0];
        let (ca, ra) = ((&lp.chosen / &chosen_len)?, (&lp.rejected / &rejected_len)?);
        let out = free_term(t, c, &FreeBatch { chosen_sum: &lp.chosen, rejected_sum: &lp.rejected, chosen_avg: &ca, rejected_avg: &ra })?;
        total = (total + (out.per_pair.sum_all()? * inv_pairs)?)?;
        // The NLL term: CPO and SimPO over the chosen completion tokens; ORPO over the prompt's
        // tokens too (TRL's ORPO scores every non-padding chosen position).
        let nll = if t == LossType::Orpo {
            let prompt = lp.prompt.as_ref().expect("scored for ORPO").sum_all()?;
            Some(((&chosen_nll - prompt)? / whole.chosen_and_prompt_tokens.max(1) as f64)?)
        } else if c.cpo_alpha != 0.0 {
            Some((&chosen_nll / whole.chosen_tokens.max(1) as f64)?)
        } else {
            None
        };
        if let Some(nll) = nll {
            let weight = if t == LossType::Orpo { 1.0 } else { c.cpo_alpha };
            total = (total + (&nll * weight)?)?;
            metrics.push(("nll_loss", scalar(&nll)?, 0.0));
        } else {
            metrics.push(("nll_loss", 0.0, 0.0));
        }
        if let Some(lo) = &out.log_odds {
            let lo = f64s(lo)?;
            metrics.push(("log_odds_chosen", lo.iter().sum(), n as f64));
            metrics.push(("log_odds_ratio", lo.iter().map(|&x| -(1.0 + (-x).exp()).ln()).sum(), n as f64));
        }
        chosen_logps = f64s(&out.chosen_logps)?;
        rejected_logps = f64s(&out.rejected_logps)?;
        chosen_rewards = chosen_logps.iter().map(|x| beta * x).collect::<Vec<_>>();
        rejected_rewards = rejected_logps.iter().map(|x| beta * x).collect::<Vec<_>>();
    } else {
        let refs = refs.ok_or_else(|| anyhow::anyhow!("a reference-based loss needs the reference log-probs"))?;
        let ref_sum = |sum: &[f32], shared: Option<&[f32]>| -> Result<Tensor> {
            Ok(match (c.ld_alpha, shared) {
                (None, _) => vec(sum.to_vec())?,
                (Some(a), Some(sh)) => vec(sum.iter().zip(sh).map(|(&t, &s)| s + a as f32 * (t - s)).collect())?,
                (Some(_), None) => {
                    anyhow::bail!("--ld-alpha needs a reference cache with the shared-part log-probs (rebuild it with cache-ref --force)")
                }
            })
        };
        let (ref_c, ref_r) = (ref_sum(refs.chosen, refs.chosen_shared)?, ref_sum(refs.rejected, refs.rejected_shared)?);
        let batch = PairBatch {
            policy_chosen: &lp.chosen,
            policy_rejected: &lp.rejected,
            ref_chosen: &ref_c,
            ref_rejected: &ref_r,
            chosen_tokens: &chosen_len,
            rejected_tokens: &rejected_len,
        };
        // WPO: each pair's losses × w_c · w_r, w = exp(mean over the completion of log π − log Σ p²)
        // (detached, unweighted by LD).
        let pair_weight = if c.use_weighting {
            let mut sum = vec![0f64; 2 * n];
            let logp = f64s(&lp.tokens)?;
            for (i, &s) in seq.iter().enumerate().filter(|(_, &s)| is_completion(s)) {
                sum[s as usize] += logp[i] - stats.log_sum_sq[i] as f64;
            }
            let w: Vec<f32> = (0..n)
                .map(|i| {
                    let (lc, lr) = (pairs[i].chosen_scored.max(1) as f64, pairs[i].rejected_scored.max(1) as f64);
                    ((sum[2 * i] / lc).exp() * (sum[2 * i + 1] / lr).exp()) as f32
                })
                .collect();
            Some(vec(w)?)
        } else {
            None
        };
        for &(t, weight) in &c.terms {
            let term = if t == LossType::Sft {
                // TRL's "sft": the mean NLL over all chosen tokens of the micro-batch.
                (&chosen_nll / whole.chosen_tokens.max(1) as f64)?
            } else {
                let per_pair = dpo_term(t, c, &batch)?;
                let per_pair = match &pair_weight {
                    Some(w) => (per_pair * w)?,
                    None => per_pair,
                };
                (per_pair.sum_all()? * inv_pairs)?
            };
            total = (total + (term * weight)?)?;
        }
        chosen_logps = f64s(&lp.chosen)?;
        rejected_logps = f64s(&lp.rejected)?;
        // Rewards from the raw log-ratios (LD-weighted), whatever the loss or f-divergence.
        let (rc, rr) = (f64s(&ref_c)?, f64s(&ref_r)?);
        chosen_rewards = chosen_logps.iter().zip(&rc).map(|(p, r)| beta * (p - r)).collect();
        rejected_rewards = rejected_logps.iter().zip(&rr).map(|(p, r)| beta * (p - r)).collect();
    }
    let mut aux_loss = None;
    if let (Some(aux), true) = (&lp.aux_loss, c.router_aux_loss_coef != 0.0) {
        // TRL 1.16 adds router_aux_loss_coef × the model's aux loss to every micro-batch's loss.
        // (A micro-batch in pieces weighs each piece's aux loss by its share of the pairs.)
        let share = n as f64 * inv_pairs;
        total = (total + (aux.to_dtype(dt)? * (c.router_aux_loss_coef * share))?)?;
        let a = scalar(aux)?;
        aux_loss = Some(a);
        metrics.push(("aux_loss", a * n as f64, n as f64));
    }
    metrics.push(("loss", scalar(&total)?, 0.0));
    let nf = n as f64;
    metrics.push(("rewards/chosen", chosen_rewards.iter().sum(), nf));
    metrics.push(("rewards/rejected", rejected_rewards.iter().sum(), nf));
    metrics.push(("rewards/accuracies", chosen_rewards.iter().zip(&rejected_rewards).filter(|(a, b)| a > b).count() as f64, nf));
    metrics.push(("rewards/margins", chosen_rewards.iter().zip(&rejected_rewards).map(|(a, b)| a - b).sum(), nf));
    metrics.push(("logps/chosen", chosen_logps.iter().sum(), nf));
    metrics.push(("logps/rejected", rejected_logps.iter().sum(), nf));
    // The lm-head statistics over completion tokens, as TRL 1.16 logs them.
    let (mut ent, mut ntok, mut lc, mut nc, mut lr, mut nr, mut top) = (0f64, 0f64, 0f64, 0f64, 0f64, 0f64, 0f64);
    for (i, &s) in seq.iter().enumerate().filter(|(_, &s)| is_completion(s)) {
        ent += stats.entropy[i] as f64;
        ntok += 1.0;
        if s % 2 == 0 {
            lc += stats.mean_logit[i] as f64;
            nc += 1.0;
            top += f64::from(u8::from(stats.top1[i]));
        } else {
            lr += stats.mean_logit[i] as f64;
            nr += 1.0;
        }
    }
    metrics.extend([("entropy", ent, ntok), ("logits/chosen", lc, nc), ("logits/rejected", lr, nr), ("mean_token_accuracy", top, nc)]);
    let trl_tokens = pairs.iter().map(|p| 2 * p.prompt.len() + p.chosen_scored + p.rejected_scored).sum();
    Ok(BatchOut { loss: total, metrics, tokens: 0, trl_tokens, aux_loss })
}

fn vec_m(mask: impl Iterator<Item = bool>, dev: &candle_core::Device, dt: DType) -> Result<Tensor> {
    let v: Vec<f32> = mask.map(|b| if b { 1.0 } else { 0.0 }).collect();
    let n = v.len();
    Ok(Tensor::from_vec(v, n, dev)?.to_dtype(dt)?)
}

/// Gradients of `loss` for every parameter (with gradient checkpointing, the outer backward's
/// plus what the layers' local backwards collected); a parameter that got none is an error
/// naming it (candle silently drops gradients through non-differentiable kernels), except an
/// expert no token was routed to, whose gradient is zero. Under full sharding: this rank's
/// gradient shards, already summed over the ranks (a collective).
pub fn gradients(loss: &Tensor, policy: &Policy) -> Result<Vec<Tensor>> {
    let grads = loss.backward()?;
    if let Some(s) = &policy.shards {
        // The layers' gradient shards arrived during the backward; the root unit's now.
        s.reduce_root(&grads)?;
        return s.take_grads(&policy.names);
    }
    let mut local = policy.grad_sink.take();
    policy
        .vars
        .iter()
        .zip(&policy.names)
        .map(|(v, n)| {
            let t = v.as_tensor();
            match (grads.get(t).cloned(), local.remove(&t.id())) {
                (Some(a), Some(b)) => Ok((a + b)?),
                (Some(g), None) | (None, Some(g)) => Ok(g),
                (None, None) if n.contains(".experts.") => Ok(t.zeros_like()?),
                (None, None) => anyhow::bail!("parameter `{n}` received no gradient"),
            }
        })
        .collect()
}
