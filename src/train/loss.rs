//! Preference losses on sequence log-probs, as HF TRL 1.16 defines them (README "Losses").
use crate::config::LossKind;
use anyhow::Result;
use candle_core::Tensor;

/// Per-pair inputs, all [n] tensors of one float dtype. `*_tokens` are the scored completion
/// token counts (IPO and sigmoid_norm normalise by them).
pub struct PairBatch<'a> {
    pub policy_chosen: &'a Tensor,
    pub policy_rejected: &'a Tensor,
    pub ref_chosen: &'a Tensor,
    pub ref_rejected: &'a Tensor,
    pub chosen_tokens: &'a Tensor,
    pub rejected_tokens: &'a Tensor,
}

pub struct LossOut {
    /// Per-pair loss [n]; the batch loss is its mean.
    pub per_pair: Tensor,
    /// β (log π_θ − log π_ref), detached, [n].
    pub chosen_rewards: Tensor,
    pub rejected_rewards: Tensor,
}

/// log σ(x) = −softplus(−x), computed stably: min(x, 0) − log(1 + exp(−|x|)).
pub fn log_sigmoid(x: &Tensor) -> Result<Tensor> {
    let zeros = x.zeros_like()?;
    let neg_abs = x.abs()?.neg()?;
    Ok((x.minimum(&zeros)? - (neg_abs.exp()? + 1.0)?.log()?)?)
}

pub fn preference_loss(kind: LossKind, beta: f64, label_smoothing: f64, b: &PairBatch) -> Result<LossOut> {
    let chosen_ratio = (b.policy_chosen - b.ref_chosen)?;
    let rejected_ratio = (b.policy_rejected - b.ref_rejected)?;
    let delta = (&chosen_ratio - &rejected_ratio)?;
    let bd = (&delta * beta)?;
    let per_pair = match kind {
        // cDPO when label_smoothing > 0: −(1−ε) log σ(βΔ) − ε log σ(−βΔ). (TRL 1.16 ignores ε here.)
        LossKind::Sigmoid => {
            let clean = (log_sigmoid(&bd)? * -(1.0 - label_smoothing))?;
            if label_smoothing > 0.0 { (clean - (log_sigmoid(&bd.neg()?)? * label_smoothing)?)? } else { clean }
        }
        LossKind::Hinge => (bd.neg()? + 1.0)?.relu()?,
        LossKind::Ipo => {
            let per_tok = ((&chosen_ratio / &b.chosen_tokens.clamp(1.0, f64::INFINITY)?)?
                - (&rejected_ratio / &b.rejected_tokens.clamp(1.0, f64::INFINITY)?)?)?;
            (per_tok - 1.0 / (2.0 * beta))?.sqr()?
        }
        LossKind::Robust => {
            let e = label_smoothing;
            let clean = (log_sigmoid(&bd)? * -(1.0 - e))?;
            let flipped = (log_sigmoid(&bd.neg()?)? * -e)?;
            ((clean - flipped)? / (1.0 - 2.0 * e))?
        }
        LossKind::SigmoidNorm => {
            let per_tok = ((&chosen_ratio / &b.chosen_tokens.clamp(1.0, f64::INFINITY)?)?
                - (&rejected_ratio / &b.rejected_tokens.clamp(1.0, f64::INFINITY)?)?)?;
            log_sigmoid(&(per_tok * beta)?)?.neg()?
        }
    };
    Ok(LossOut { per_pair, chosen_rewards: (chosen_ratio.detach() * beta)?, rejected_rewards: (rejected_ratio.detach() * beta)? })
}
