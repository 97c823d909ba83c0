//! One micro-batch of DPO: the policy's log-probs of a batch of pairs, the preference loss
//! against the reference log-probs, and the gradients of every parameter.
use super::loss::{preference_loss, LossKind, LossOut, PairBatch};
use super::metrics::PairStats;
use super::policy::Policy;
use crate::data::prepared::PairView;
use crate::model::Decoder;
use crate::score::layout::{self, LayoutKind};
use crate::score::pair_logps;
use anyhow::Result;
use candle_core::{DType, Tensor};

/// Loss settings shared by training and evaluation.
#[derive(Clone, Copy)]
pub struct LossSettings {
    pub kind: LossKind,
    pub beta: f64,
    pub label_smoothing: f64,
    pub sft_weight: f64,
    /// MoE models: the weight of the router's load-balancing loss (0: none).
    pub router_aux_loss_coef: f64,
}

pub struct BatchOut {
    /// Scalar loss (DPO term + SFT term).
    pub loss: Tensor,
    pub out: LossOut,
    pub policy_chosen: Tensor,
    pub policy_rejected: Tensor,
    /// Tokens the forward ran over (prompt counted once per row it appears in).
    pub tokens: usize,
    /// MoE models: the router's load-balancing loss (detached), for the `aux_loss` metric.
    pub aux_loss: Option<f64>,
}

impl BatchOut {
    /// Adds this batch's loss, rewards and log-probs to the running metrics.
    pub fn record(&self, stats: &mut PairStats) -> Result<()> {
        let f32s = |t: &Tensor| -> Result<Vec<f32>> { Ok(t.to_dtype(DType::F32)?.to_vec1()?) };
        stats.add(
            self.out.per_pair.mean_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?,
            &f32s(&self.out.chosen_rewards)?,
            &f32s(&self.out.rejected_rewards)?,
            &f32s(&self.policy_chosen)?,
            &f32s(&self.policy_rejected)?,
        );
        if let Some(a) = self.aux_loss {
            stats.aux_loss += a;
            stats.aux_batches += 1;
        }
        Ok(())
    }
}

/// What a micro-batch's loss is averaged over: its pairs and its chosen tokens. A micro-batch
/// computed in pieces (under a token budget) passes the whole micro-batch's counts to each
/// piece, so the pieces' losses and gradients add up to the whole's.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Whole {
    pub pairs: usize,
    pub chosen_tokens: usize,
}

impl Whole {
    pub fn of(pairs: &[PairView]) -> Self {
        Self { pairs: pairs.len(), chosen_tokens: pairs.iter().map(|p| p.chosen_scored).sum() }
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

/// Policy forward and loss for `pairs` (all of a micro-batch, or a piece of `whole`), given the
/// reference log-probs.
pub fn batch_loss(
    decoder: &Decoder,
    layout: LayoutKind,
    loss: LossSettings,
    pairs: &[PairView],
    ref_c: &[f32],
    ref_r: &[f32],
    whole: Whole,
) -> Result<BatchOut> {
    let lp = pair_logps(decoder, layout, pairs)?;
    let dt = lp.chosen.dtype();
    let dev = lp.chosen.device().clone();
    let vec = |v: Vec<f32>| -> Result<Tensor> { Ok(Tensor::from_vec(v, pairs.len(), &dev)?.to_dtype(dt)?) };
    let ref_chosen = vec(ref_c.to_vec())?;
    let ref_rejected = vec(ref_r.to_vec())?;
    let chosen_tokens = vec(pairs.iter().map(|p| p.chosen_scored as f32).collect())?;
    let rejected_tokens = vec(pairs.iter().map(|p| p.rejected_scored as f32).collect())?;
    let out = preference_loss(
        loss.kind,
        loss.beta,
        loss.label_smoothing,
        &PairBatch {
            policy_chosen: &lp.chosen,
            policy_rejected: &lp.rejected,
            ref_chosen: &ref_chosen,
            ref_rejected: &ref_rejected,
            chosen_tokens: &chosen_tokens,
            rejected_tokens: &rejected_tokens,
        },
    )?;
    let share = pairs.len() as f64 / whole.pairs.max(1) as f64;
    let mut total = (out.per_pair.sum_all()? / whole.pairs.max(1) as f64)?;
    if loss.sft_weight > 0.0 {
        // TRL's "sft" loss: mean negative log-likelihood over all chosen tokens of the batch.
        let mask: Vec<f32> = lp.scored.seq.iter().map(|s| if s % 2 == 0 { 1.0 } else { 0.0 }).collect();
        let n = whole.chosen_tokens.max(1) as f64;
        let mask = Tensor::from_vec(mask, lp.scored.seq.len(), &dev)?.to_dtype(dt)?;
        let nll = ((lp.tokens * mask)?.sum_all()? * (-1.0 / n))?;
        total = (total + (nll * loss.sft_weight)?)?;
    }
    let mut aux_loss = None;
    if let (Some(aux), true) = (&lp.aux_loss, loss.router_aux_loss_coef != 0.0) {
        // TRL 1.16 adds router_aux_loss_coef × the model's aux loss to every micro-batch's loss.
        // (A micro-batch in pieces weighs each piece's aux loss by its share of the pairs.)
        total = (total + (aux.to_dtype(dt)? * (loss.router_aux_loss_coef * share))?)?;
        aux_loss = Some(aux.to_dtype(DType::F64)?.to_scalar::<f64>()?);
    }
    let tokens = pairs.iter().map(|p| layout::computed_tokens(layout, p)).sum();
    Ok(BatchOut { loss: total, out, policy_chosen: lp.chosen.detach(), policy_rejected: lp.rejected.detach(), tokens, aux_loss })
}

/// Gradients of `loss` for every parameter (with gradient checkpointing, the outer backward's
/// plus what the layers' local backwards collected); a parameter that got none is an error
/// naming it (candle silently drops gradients through non-differentiable kernels), except an
/// expert no token was routed to, whose gradient is zero.
pub fn gradients(loss: &Tensor, policy: &Policy) -> Result<Vec<Tensor>> {
    let grads = loss.backward()?;
    let mut local = policy.grad_sink.as_ref().map(|s| s.take()).unwrap_or_default();
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
