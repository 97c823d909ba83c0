//! One micro-batch of DPO: the policy's log-probs of a batch of pairs, the preference loss
//! against the reference log-probs, and the gradients of every parameter.
use super::loss::{preference_loss, LossKind, LossOut, PairBatch};
use super::metrics::PairStats;
use super::policy::Policy;
use crate::data::prepared::PairView;
use crate::model::Decoder;
use crate::score::layout::{self, LayoutKind};
use crate::score::pair_logps;
use anyhow::{Context, Result};
use candle_core::{DType, Tensor};

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
            &f32s(&self.out.chosen_rewards)?,
            &f32s(&self.out.rejected_rewards)?,
            &f32s(&self.policy_chosen)?,
            &f32s(&self.policy_rejected)?,
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
    let mut total = out.per_pair.mean_all()?;
    if loss.sft_weight > 0.0 {
        // TRL's "sft" loss: mean negative log-likelihood over all chosen tokens of the batch.
        let mask: Vec<f32> = lp.scored.seq.iter().map(|s| if s % 2 == 0 { 1.0 } else { 0.0 }).collect();
        let n = mask.iter().sum::<f32>().max(1.0) as f64;
        let mask = Tensor::from_vec(mask, lp.scored.seq.len(), &dev)?.to_dtype(dt)?;
        let nll = ((lp.tokens * mask)?.sum_all()? * (-1.0 / n))?;
        total = (total + (nll * loss.sft_weight)?)?;
    }
    let tokens = pairs.iter().map(|p| layout::computed_tokens(layout, p)).sum();
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
