//! Preference losses on sequence log-probs, each exactly as HF TRL 1.16 computes it
//! (`DPOTrainer._compute_loss`, the reference-free CPO and ORPO trainers, and KTOTrainer's
//! unpaired `kto` and `apo_zero_unpaired`), named as TRL names them so a config carries over.
//! README "Losses" has the table.
use anyhow::{bail, Result};
use candle_core::Tensor;

/// A loss type (TRL's `loss_type` values; `simpo`, `cpo`, `orpo` are the reference-free ones).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossType {
    /// DPO: −log σ(βΔ).
    Sigmoid,
    /// SLiC: relu(1 − βΔ).
    Hinge,
    /// IPO: (Δ/length − 1/(2β))², scores averaged over each completion's tokens.
    Ipo,
    /// EXO: KL between the model's and the smoothed labels' pair distributions (needs ε > 0).
    ExoPair,
    /// NCA: −log σ(βr_c) − ½ log σ(−βr_c) − ½ log σ(−βr_r).
    NcaPair,
    /// Robust DPO: unbiased under ε label noise.
    Robust,
    /// BCO on pairs: −log σ(βr_c) − log σ(−βr_r).
    BcoPair,
    /// SPPO (hard labels): (r_c − 1/(2β))² + (r_r + 1/(2β))².
    SppoHard,
    /// AOT: sigmoid on the sorted policy and reference log-ratio differences of the micro-batch.
    Aot,
    /// AOT unpaired: chosen and rejected log-ratios sorted separately.
    AotUnpaired,
    /// APO-zero: push chosen up and rejected down.
    ApoZero,
    /// APO-down: push both down, the rejected more.
    ApoDown,
    /// DiscoPOP: log-ratio-modulated mix of the logistic and exponential losses (τ).
    Discopop,
    /// SFT: mean negative log-likelihood of the micro-batch's chosen tokens.
    Sft,
    /// DPO on length-averaged log-ratios.
    SigmoidNorm,
    /// SimPO (CPOTrainer `loss_type="simpo"`): −log σ(β(avg_c − avg_r) − γ), reference-free.
    Simpo,
    /// CPO: −log σ(β(log π_c − log π_r)), reference-free, plus `cpo_alpha` × NLL.
    Cpo,
    /// ORPO: NLL − λ·log σ(log odds ratio), reference-free.
    Orpo,
    /// KTO on unpaired data: 1 − σ(β(r − z)) for desirable rows, 1 − σ(β(z − r)) for
    /// undesirable ones, z the batch's KL estimate (clamped at 0, detached).
    Kto,
    /// APO-zero on unpaired data: 1 − σ(βr) for desirable rows, σ(βr) for undesirable ones.
    ApoZeroUnpaired,
}

pub const ALL: [(&str, LossType); 20] = [
    ("sigmoid", LossType::Sigmoid),
    ("hinge", LossType::Hinge),
    ("ipo", LossType::Ipo),
    ("exo_pair", LossType::ExoPair),
    ("nca_pair", LossType::NcaPair),
    ("robust", LossType::Robust),
    ("bco_pair", LossType::BcoPair),
    ("sppo_hard", LossType::SppoHard),
    ("aot", LossType::Aot),
    ("aot_unpaired", LossType::AotUnpaired),
    ("apo_zero", LossType::ApoZero),
    ("apo_down", LossType::ApoDown),
    ("discopop", LossType::Discopop),
    ("sft", LossType::Sft),
    ("sigmoid_norm", LossType::SigmoidNorm),
    ("simpo", LossType::Simpo),
    ("cpo", LossType::Cpo),
    ("orpo", LossType::Orpo),
    ("kto", LossType::Kto),
    ("apo_zero_unpaired", LossType::ApoZeroUnpaired),
];

impl LossType {
    pub fn parse(s: &str) -> Result<Self> {
        match ALL.iter().find(|(n, _)| *n == s) {
            Some((_, t)) => Ok(*t),
            None => bail!("unknown loss type `{s}` (one of {})", ALL.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")),
        }
    }

    pub fn name(self) -> &'static str {
        ALL.iter().find(|(_, t)| *t == self).expect("every type is listed").0
    }

    /// Trains without a reference model (no cache).
    pub fn reference_free(self) -> bool {
        matches!(self, LossType::Simpo | LossType::Cpo | LossType::Orpo)
    }

    /// Reads the whole micro-batch (AOT sorts it, KTO estimates its KL): the micro-batch
    /// cannot be computed in pieces.
    pub fn batch_level(self) -> bool {
        matches!(self, LossType::Aot | LossType::AotUnpaired | LossType::Kto | LossType::ApoZeroUnpaired)
    }

    /// Trains on unpaired data (labelled completions), as TRL's KTOTrainer.
    pub fn unpaired(self) -> bool {
        matches!(self, LossType::Kto | LossType::ApoZeroUnpaired)
    }
}

/// The names of the loss types, reference-based (`false`) or reference-free (`true`), as the
/// flags' help lists them.
pub fn names(reference_free: bool) -> String {
    ALL.iter().filter(|(_, t)| t.reference_free() == reference_free && !t.unpaired()).map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
}

/// The unpaired loss types' names.
pub fn unpaired_names() -> String {
    ALL.iter().filter(|(_, t)| t.unpaired()).map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
}

/// A comma-separated list in a flag or TOML string (`--loss sigmoid,sft`, `--loss-weights
/// 0.8,0.2`), parsed once; written back the same way (settings, fingerprints).
#[derive(Debug, Clone, PartialEq)]
pub struct CommaList<T>(pub Vec<T>);

/// What one item of a [`CommaList`] is.
pub trait ListItem: Sized {
    fn parse_item(s: &str) -> Result<Self>;
    fn show(&self) -> String;
}

impl ListItem for LossType {
    fn parse_item(s: &str) -> Result<Self> {
        LossType::parse(s)
    }
    fn show(&self) -> String {
        self.name().into()
    }
}

impl ListItem for f64 {
    fn parse_item(s: &str) -> Result<Self> {
        s.parse().map_err(|_| anyhow::anyhow!("`{s}` is not a number"))
    }
    fn show(&self) -> String {
        self.to_string()
    }
}

impl<T: ListItem> std::str::FromStr for CommaList<T> {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        let items: Vec<T> = s.split(',').map(str::trim).filter(|x| !x.is_empty()).map(T::parse_item).collect::<Result<_>>()?;
        if items.is_empty() {
            bail!("an empty list");
        }
        Ok(Self(items))
    }
}

impl<T: ListItem> std::fmt::Display for CommaList<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.iter().map(T::show).collect::<Vec<_>>().join(","))
    }
}

impl<T: ListItem> serde::Serialize for CommaList<T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de, T: ListItem> serde::Deserialize<'de> for CommaList<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(|e: anyhow::Error| serde::de::Error::custom(format!("`{s}`: {e}")))
    }
}

/// `--loss`: the loss types summed.
pub type LossList = CommaList<LossType>;

impl LossList {
    /// Trains without a reference model (no cache).
    pub fn reference_free(&self) -> bool {
        self.0.iter().any(|t| t.reference_free())
    }
}

/// TRL's `f_divergence_type`: how log-ratios become the scores the loss compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum FDivergence {
    ReverseKl,
    ForwardKl,
    JsDivergence,
    AlphaDivergence,
}

/// The loss types TRL allows a non-reverse-KL f-divergence with.
pub const F_DIVERGENCE_LOSSES: [LossType; 8] = [
    LossType::Sigmoid,
    LossType::SigmoidNorm,
    LossType::Hinge,
    LossType::Ipo,
    LossType::ExoPair,
    LossType::Robust,
    LossType::Discopop,
    LossType::Sft,
];

/// Every setting the losses read.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LossConfig {
    /// The loss types with their weights (summed).
    pub terms: Vec<(LossType, f64)>,
    pub beta: f64,
    pub label_smoothing: f64,
    pub discopop_tau: f64,
    pub f_divergence: FDivergence,
    pub f_alpha: f64,
    /// WPO: each pair's losses × w_chosen · w_rejected.
    pub use_weighting: bool,
    /// LD-DPO: completion tokens past the shorter completion's length count α times.
    pub ld_alpha: Option<f64>,
    pub simpo_gamma: f64,
    pub cpo_alpha: f64,
    /// MoE models: the router load-balancing loss's weight (0: none).
    pub router_aux_loss_coef: f64,
    /// KTO / APO-zero-unpaired: weights of the desirable and undesirable rows' losses.
    pub desirable_weight: f64,
    pub undesirable_weight: f64,
}

impl LossConfig {
    /// DPO's sigmoid loss at β with nothing else (tests and tools).
    pub fn sigmoid(beta: f64) -> Self {
        Self {
            terms: vec![(LossType::Sigmoid, 1.0)],
            beta,
            label_smoothing: 0.0,
            discopop_tau: 0.05,
            f_divergence: FDivergence::ReverseKl,
            f_alpha: 0.5,
            use_weighting: false,
            ld_alpha: None,
            simpo_gamma: 0.5,
            cpo_alpha: 1.0,
            router_aux_loss_coef: 0.0,
            desirable_weight: 1.0,
            undesirable_weight: 1.0,
        }
    }

    /// Trains on unpaired data (KTO, APO-zero-unpaired).
    pub fn unpaired(&self) -> bool {
        self.terms.iter().any(|(t, _)| t.unpaired())
    }

    /// KTO: the loss needs the micro-batch's KL estimate.
    pub fn needs_kl(&self) -> bool {
        self.has(LossType::Kto)
    }

    pub fn reference_free(&self) -> bool {
        self.terms.iter().any(|(t, _)| t.reference_free())
    }

    pub fn has(&self, t: LossType) -> bool {
        self.terms.iter().any(|(x, _)| *x == t)
    }

    /// The combinations TRL 1.16 refuses (and the ones it crashes on), each with a message
    /// naming the flags.
    pub fn validate(&self) -> Result<()> {
        let names: Vec<&str> = self.terms.iter().map(|(t, _)| t.name()).collect();
        if self.terms.is_empty() {
            bail!("--loss needs at least one loss type");
        }
        if self.unpaired() && self.terms.len() > 1 {
            bail!("--loss {}: kto and apo_zero_unpaired train on unpaired data, alone (as TRL's KTOTrainer)", names.join(","));
        }
        for (flag, w) in [("desirable-weight", self.desirable_weight), ("undesirable-weight", self.undesirable_weight)] {
            if !(w.is_finite() && w >= 0.0) {
                bail!("--{flag} must be a finite number ≥ 0, got {w}");
            }
        }
        if self.unpaired() && (self.label_smoothing != 0.0 || self.ld_alpha.is_some() || self.f_divergence != FDivergence::ReverseKl) {
            bail!("--label-smoothing, --ld-alpha and --f-divergence are DPO options; KTOTrainer has none of them");
        }
        if self.reference_free() && self.terms.len() > 1 {
            bail!("--loss {}: simpo, cpo and orpo are reference-free trainers of their own; use one alone", names.join(","));
        }
        if self.f_divergence != FDivergence::ReverseKl && !self.terms.iter().all(|(t, _)| F_DIVERGENCE_LOSSES.contains(t)) {
            let ok: Vec<&str> = F_DIVERGENCE_LOSSES.iter().map(|t| t.name()).collect();
            bail!(
                "--f-divergence {:?} works only with the loss types {} (as TRL 1.16); --loss is {}",
                self.f_divergence,
                ok.join(", "),
                names.join(",")
            );
        }
        if self.use_weighting {
            if let Some((t, _)) = self.terms.iter().find(|(t, _)| t.batch_level() || t.reference_free() || t.unpaired() || *t == LossType::Sft) {
                bail!(
                    "--use-weighting (WPO) cannot weigh `{}`: {}",
                    t.name(),
                    match t {
                        LossType::Sft => "it is one mean over the batch's tokens (TRL 1.16 fails on it too)",
                        _ if t.unpaired() => "WPO is a DPO option; KTOTrainer has no use_weighting",
                        _ if t.batch_level() => "it sorts across the batch, which would misalign the pair weights (TRL refuses it too)",
                        _ => "WPO is a DPO option",
                    }
                );
            }
        }
        if self.has(LossType::ExoPair) && self.label_smoothing <= 0.0 {
            bail!("--loss exo_pair needs --label-smoothing > 0 (the EXO paper recommends 1e-3)");
        }
        if self.label_smoothing > 0.0
            && !self.terms.iter().any(|(t, _)| {
                matches!(
                    t,
                    LossType::Robust
                        | LossType::ExoPair
                        | LossType::Aot
                        | LossType::AotUnpaired
                        | LossType::Sigmoid
                        | LossType::Simpo
                        | LossType::Cpo
                )
            })
        {
            bail!("--label-smoothing applies to sigmoid (cDPO), robust, exo_pair, aot, aot_unpaired, simpo and cpo only");
        }
        if !(0.0..0.5).contains(&self.label_smoothing) && !self.has(LossType::ExoPair) {
            bail!(
                "--label-smoothing must be in [0, 0.5) (at 0.5 the labels carry no information; robust divides by 1 − 2ε), got {}",
                self.label_smoothing
            );
        }
        if self.has(LossType::ExoPair) && self.label_smoothing >= 1.0 {
            bail!("--label-smoothing must be below 1 for exo_pair (log(1 − ε)), got {}", self.label_smoothing);
        }
        if let Some(a) = self.ld_alpha {
            if !(0.0..=1.0).contains(&a) {
                bail!("--ld-alpha must be in [0, 1], got {a}");
            }
            if self.reference_free() {
                bail!("--ld-alpha is an option of the reference-based losses");
            }
        }
        if !(self.discopop_tau.is_finite() && self.discopop_tau > 0.0) {
            bail!("--discopop-tau must be > 0, got {}", self.discopop_tau);
        }
        Ok(())
    }
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

/// σ(x) = exp(log σ(x)), with the same true derivative everywhere.
fn sigmoid(x: &Tensor) -> Result<Tensor> {
    Ok(log_sigmoid(x)?.exp()?)
}

/// relu with PyTorch's derivative at the kink: 0 (candle's relu passes the gradient at 0).
fn relu_torch(x: &Tensor) -> Result<Tensor> {
    let active = x.gt(&x.zeros_like()?)?.to_dtype(x.dtype())?;
    Ok((x * active)?)
}

/// −(1−ε) log σ(z) − ε log σ(−z): sigmoid with label smoothing (cDPO, AOT, CPO, SimPO).
fn smoothed_sigmoid(z: &Tensor, eps: f64) -> Result<Tensor> {
    let clean = (log_sigmoid(z)? * -(1.0 - eps))?;
    if eps == 0.0 {
        return Ok(clean);
    }
    Ok((clean - (log_sigmoid(&z.neg()?)? * eps)?)?)
}

/// A reference-based micro-batch's inputs, all [n] tensors of one float dtype.
pub struct PairBatch<'a> {
    /// Policy sequence log-probs (LD-weighted under `ld_alpha`).
    pub policy_chosen: &'a Tensor,
    pub policy_rejected: &'a Tensor,
    pub ref_chosen: &'a Tensor,
    pub ref_rejected: &'a Tensor,
    /// Scored completion tokens (IPO and sigmoid_norm average by them).
    pub chosen_tokens: &'a Tensor,
    pub rejected_tokens: &'a Tensor,
}

/// Scores from log-ratios under the f-divergence (TRL's `chosen_scores`).
fn scores(r: &Tensor, c: &LossConfig) -> Result<Tensor> {
    Ok(match c.f_divergence {
        FDivergence::ReverseKl => r.clone(),
        FDivergence::ForwardKl => (1.0 - r.neg()?.exp()?)?,
        FDivergence::JsDivergence => (log_sigmoid(r)? + std::f64::consts::LN_2)?,
        FDivergence::AlphaDivergence if (c.f_alpha - 1.0).abs() < 1e-6 => r.clone(),
        FDivergence::AlphaDivergence => {
            // torch.clamp(max=80): no gradient at and above the bound.
            let t = (r * (c.f_alpha - 1.0))?;
            let keep = t.lt(&t.ones_like()?.affine(0.0, 80.0)?)?.to_dtype(t.dtype())?;
            let t = ((&t * &keep)? + ((1.0 - &keep)? * 80.0)?.detach())?;
            ((t.exp()? - 1.0)? * (1.0 / (c.f_alpha - 1.0)))?
        }
    })
}

/// Per-pair loss [n] of one reference-based loss type (all but sft, which is batch-level).
pub fn dpo_term(t: LossType, c: &LossConfig, b: &PairBatch) -> Result<Tensor> {
    let (beta, eps) = (c.beta, c.label_smoothing);
    let rc = (b.policy_chosen - b.ref_chosen)?;
    let rr = (b.policy_rejected - b.ref_rejected)?;
    let (sc, sr) = (scores(&rc, c)?, scores(&rr, c)?);
    let delta = (&sc - &sr)?;
    let bd = (&delta * beta)?;
    let avg = |s: &Tensor, n: &Tensor| -> Result<Tensor> { Ok((s / n.clamp(1.0, f64::INFINITY)?)?) };
    Ok(match t {
        // cDPO when label_smoothing > 0 (TRL 1.16 reads ε only for robust/exo/aot; ours keeps it).
        LossType::Sigmoid => smoothed_sigmoid(&bd, eps)?,
        // The margin 1 − βΔ = 0 is a true kink; like torch.relu we take derivative 0 there.
        LossType::Hinge => relu_torch(&(bd.neg()? + 1.0)?)?,
        LossType::Ipo => ((avg(&sc, b.chosen_tokens)? - avg(&sr, b.rejected_tokens)?)? - 1.0 / (2.0 * beta))?.sqr()?,
        LossType::ExoPair => {
            let (log_pw, log_pl) = ((-eps).ln_1p(), eps.ln());
            let (log_qw, log_ql) = (log_sigmoid(&bd)?, log_sigmoid(&bd.neg()?)?);
            ((log_qw.exp()? * (&log_qw - log_pw)?)? + (log_ql.exp()? * (&log_ql - log_pl)?)?)?
        }
        LossType::NcaPair => {
            let (cw, rw) = ((&rc * beta)?, (&rr * beta)?);
            ((log_sigmoid(&cw)?.neg()? - (log_sigmoid(&cw.neg()?)? * 0.5)?)? - (log_sigmoid(&rw.neg()?)? * 0.5)?)?
        }
        LossType::Robust => {
            let clean = (log_sigmoid(&bd)? * -(1.0 - eps))?;
            let flipped = (log_sigmoid(&bd.neg()?)? * -eps)?;
            ((clean - flipped)? / (1.0 - 2.0 * eps))?
        }
        LossType::BcoPair => (log_sigmoid(&(&rc * beta)?)?.neg()? - log_sigmoid(&(&rr * -beta)?)?)?,
        LossType::SppoHard => ((&rc - 0.5 / beta)?.sqr()? + (&rr + 0.5 / beta)?.sqr()?)?,
        LossType::Aot | LossType::AotUnpaired => {
            let (a, r) = if t == LossType::Aot {
                ((b.policy_chosen - b.policy_rejected)?, (b.ref_chosen - b.ref_rejected)?)
            } else {
                (rc.clone(), rr.clone())
            };
            let d = (sort_ascending(&a)? - sort_ascending(&r)?)?;
            smoothed_sigmoid(&(d * beta)?, eps)?
        }
        LossType::ApoZero => ((1.0 - sigmoid(&(&rc * beta)?)?)? + sigmoid(&(&rr * beta)?)?)?,
        LossType::ApoDown => (sigmoid(&(&rc * beta)?)? + (1.0 - sigmoid(&((&rc - &rr)? * beta)?)?)?)?,
        LossType::Discopop => {
            let modulation = sigmoid(&(&bd / c.discopop_tau)?)?;
            let logistic = log_sigmoid(&bd)?.neg()?;
            ((logistic * (1.0 - &modulation)?)? + (bd.neg()?.exp()? * modulation)?)?
        }
        LossType::SigmoidNorm => log_sigmoid(&((avg(&sc, b.chosen_tokens)? - avg(&sr, b.rejected_tokens)?)? * beta)?)?.neg()?,
        LossType::Sft | LossType::Simpo | LossType::Cpo | LossType::Orpo | LossType::Kto | LossType::ApoZeroUnpaired => {
            bail!("{} is not a per-pair reference-based loss", t.name())
        }
    })
}

/// KTO's or APO-zero-unpaired's per-row loss [n], weighted, as TRL 1.16's KTOTrainer:
/// `r` the rows' log-ratios log π − log π_ref, `desirable` 1 or 0 per row, `kl` the batch's
/// KL estimate (a constant; KTO only).
pub fn unpaired_term(t: LossType, c: &LossConfig, r: &Tensor, desirable: &Tensor, kl: f64) -> Result<Tensor> {
    let beta = c.beta;
    let (good, bad) = match t {
        LossType::Kto => ((1.0 - sigmoid(&((r - kl)? * beta)?)?)?, (1.0 - sigmoid(&((r.neg()? + kl)? * beta)?)?)?),
        LossType::ApoZeroUnpaired => ((1.0 - sigmoid(&(r * beta)?)?)?, sigmoid(&(r * beta)?)?),
        other => bail!("{} is not an unpaired loss", other.name()),
    };
    let undesirable = (1.0 - desirable)?;
    Ok((((good * desirable)? * c.desirable_weight)? + ((bad * undesirable)? * c.undesirable_weight)?)?)
}

/// x sorted ascending along its one dimension, differentiable (the gradient goes to the
/// element occupying each slot, as torch.sort's).
fn sort_ascending(x: &Tensor) -> Result<Tensor> {
    let v: Vec<f64> = x.detach().to_dtype(candle_core::DType::F64)?.to_vec1()?;
    let mut idx: Vec<u32> = (0..v.len() as u32).collect();
    idx.sort_by(|&a, &b| v[a as usize].total_cmp(&v[b as usize]).then(a.cmp(&b)));
    Ok(x.index_select(&Tensor::from_vec(idx, v.len(), x.device())?, 0)?)
}

/// A reference-free micro-batch's inputs: policy log-probs summed and averaged over each
/// completion's tokens, [n].
pub struct FreeBatch<'a> {
    pub chosen_sum: &'a Tensor,
    pub rejected_sum: &'a Tensor,
    pub chosen_avg: &'a Tensor,
    pub rejected_avg: &'a Tensor,
}

/// What a reference-free loss reports beyond its per-pair loss.
pub struct FreeOut {
    pub per_pair: Tensor,
    /// The log-probs its rewards are β times (sums for cpo, averages for simpo and orpo).
    pub chosen_logps: Tensor,
    pub rejected_logps: Tensor,
    /// ORPO's log odds ratio per pair (detached).
    pub log_odds: Option<Tensor>,
}

/// log(1 − eˣ) for x < 0, as TRL's ORPO computes it.
fn log1mexp(x: &Tensor) -> Result<Tensor> {
    let vals: Vec<f64> = x.detach().to_dtype(candle_core::DType::F64)?.to_vec1()?;
    let near: Vec<f32> = vals.iter().map(|&v| if v < -std::f64::consts::LN_2 { 0.0 } else { 1.0 }).collect();
    let near = Tensor::from_vec(near, vals.len(), x.device())?.to_dtype(x.dtype())?;
    // x < −ln 2: log1p(−eˣ); else log(−expm1(x)) = log(1 − eˣ) computed as log(−(eˣ − 1)).
    let far = (1.0 - x.exp()?)?.log()?;
    let close = (x.exp()? - 1.0)?.neg()?.log()?;
    Ok(((far * (1.0 - &near)?)? + (close * near)?)?)
}

/// CPO, SimPO or ORPO's per-pair term (the NLL term is added by the caller).
pub fn free_term(t: LossType, c: &LossConfig, b: &FreeBatch) -> Result<FreeOut> {
    let (beta, eps) = (c.beta, c.label_smoothing);
    Ok(match t {
        LossType::Cpo => {
            let logits = (b.chosen_sum - b.rejected_sum)?;
            FreeOut {
                per_pair: smoothed_sigmoid(&(logits * beta)?, eps)?,
                chosen_logps: b.chosen_sum.clone(),
                rejected_logps: b.rejected_sum.clone(),
                log_odds: None,
            }
        }
        LossType::Simpo => {
            // As TRL computes it: subtract γ/β, then multiply by β.
            let logits = ((b.chosen_avg - b.rejected_avg)? - c.simpo_gamma / beta)?;
            FreeOut {
                per_pair: smoothed_sigmoid(&(logits * beta)?, eps)?,
                chosen_logps: b.chosen_avg.clone(),
                rejected_logps: b.rejected_avg.clone(),
                log_odds: None,
            }
        }
        LossType::Orpo => {
            let log_odds = ((b.chosen_avg - b.rejected_avg)? - (log1mexp(b.chosen_avg)? - log1mexp(b.rejected_avg)?)?)?;
            let ratio = log_sigmoid(&log_odds)?;
            FreeOut {
                per_pair: (ratio * -beta)?,
                chosen_logps: b.chosen_avg.clone(),
                rejected_logps: b.rejected_avg.clone(),
                log_odds: Some(log_odds.detach()),
            }
        }
        other => bail!("{} is not a reference-free loss", other.name()),
    })
}
