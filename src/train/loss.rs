//! Preference losses on sequence log-probs, as HF TRL 1.16 defines them (README "Losses").
use anyhow::Result;
use candle_core::Tensor;

/// The preference losses, named as TRL names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum LossKind {
    /// DPO: −log σ(βΔ) (cDPO with label smoothing).
    Sigmoid,
    /// IPO: (Δ/length − 1/(2β))², length-normalised as TRL.
    Ipo,
    /// SLiC: relu(1 − βΔ).
    Hinge,
    /// Robust DPO: unbiased under ε label noise.
    Robust,
    /// DPO on per-token (length-normalised) log-ratios.
    SigmoidNorm,
}

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

/// log σ(x) = −log(e⁰ + e⁻ˣ), as a log-sum-exp shifted by m = max(−x, 0) for stability.
/// The shift is detached (a constant for autograd, as in softmax), so the derivative is the
/// true σ(−x) everywhere. (The textbook `min(x,0) − log1p(e^−|x|)` has kinks that cancel in
/// value but not in autograd: at x = 0, where every pair sits at step 0, candle's one-sided
/// derivatives of `minimum` and `abs` gave 1 instead of ½, doubling the first step's gradient.)
pub fn log_sigmoid(x: &Tensor) -> Result<Tensor> {
    let m = x.neg()?.relu()?.detach();
    let lse = (m.neg()?.exp()? + x.neg()?.broadcast_sub(&m)?.exp()?)?.log()?;
    Ok((m + lse)?.neg()?)
}

/// relu with PyTorch's derivative at the kink: 0 (candle's relu passes the gradient at 0).
fn relu_torch(x: &Tensor) -> Result<Tensor> {
    let active = x.gt(&x.zeros_like()?)?.to_dtype(x.dtype())?;
    Ok((x * active)?)
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
            if label_smoothing > 0.0 {
                (clean - (log_sigmoid(&bd.neg()?)? * label_smoothing)?)?
            } else {
                clean
            }
        }
        // The margin 1 − βΔ = 0 is a true kink; like torch.relu we take derivative 0 there.
        LossKind::Hinge => relu_torch(&(bd.neg()? + 1.0)?)?,
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
